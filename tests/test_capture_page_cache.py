"""page_cache="drop": the same store as "keep", its chunk bytes out of the page cache once on
the disk, write errors raised instead of kept quiet, and no effect where the kernel cannot."""

import ctypes
import errno
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

from capture import Recorder
from capture import writer as cw
from capture.writer import StoreWriter
from gradtrace_format import format as fmt

pytestmark = pytest.mark.skipif(cw._SYNC_FILE_RANGE is None, reason="sync_file_range is Linux's")

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (longest mount point that is a prefix)."""
    best, kind = "", "?"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4]
        if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def _resident(root: Path, names=("grad", "weight")) -> tuple[int, int]:
    """(pages in the page cache, pages) of the chunk files of ``names`` (mincore on a mapping)."""
    cached = total = 0
    for name in names:
        for p in (root / name).rglob("*"):
            size = p.stat().st_size if p.is_file() and p.name != "zarr.json" else 0
            if not size:
                continue
            with open(p, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
                pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                vec = (ctypes.c_ubyte * pages)()
                view = np.frombuffer(m, dtype=np.uint8)
                assert _LIBC.mincore(view.ctypes.data, size, vec) == 0
                del view
                cached += sum(v & 1 for v in vec)
                total += pages
    return cached, total


def _write(path, mode, rows=12, d=300_000, **kw):
    rng = np.random.default_rng(0)
    tensors = fmt.tensor_table([("a", (d // 3,)), ("b", (d - d // 3,))])
    sw = StoreWriter(path, tensors, {"grad": "lossless", "weight": "rounded:7"}, page_cache=mode, **kw)
    for s in range(rows):
        g = rng.standard_normal(d).astype(np.float32)
        g[::7] = 0.0
        sw.append(s, g, rng.standard_normal(d).astype(np.float32), loss=1.0 / (s + 1), lr=0.1)
    return sw


def _assert_same_store(a: Path, b: Path):
    x, y = xr.open_zarr(a), xr.open_zarr(b)
    assert set(x.data_vars) == set(y.data_vars)
    for name in x.data_vars:
        np.testing.assert_array_equal(x[name].values, y[name].values, err_msg=name)


def test_drop_stores_what_keep_stores_and_leaves_its_chunks_out_of_the_page_cache(tmp_path, monkeypatch):
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay", "?"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages are its storage")
    monkeypatch.setattr(cw, "WRITE_BEHIND", 0)  # nothing in flight beside the last row
    keep = _write(tmp_path / "keep.zarr", "keep")
    keep.close()
    drop = _write(tmp_path / "drop.zarr", "drop")
    assert drop._behind.on and drop._behind.dropped > 0
    row_bytes = drop._behind.bytes  # the last row's, still in flight
    drop.close()
    assert not drop._behind.pending and drop._behind.bytes == 0
    cached, total = _resident(tmp_path / "keep.zarr")
    assert total > 1000 and cached > total // 2  # "keep" leaves the pages written in the page cache
    cached, total = _resident(tmp_path / "drop.zarr")
    # every row but the last (dropped at close where written back already) is out of the
    # cache, up to the partial pages at the ranges' ends and the shard indexes
    assert cached <= row_bytes // mmap.PAGESIZE + 64, (cached, total)
    assert cached < total // 4
    _assert_same_store(tmp_path / "keep.zarr", tmp_path / "drop.zarr")  # (reading caches the pages)


def test_drop_keeps_a_window_of_write_behind_bytes_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(cw, "WRITE_BEHIND", 3 << 20)
    sw = _write(tmp_path / "w.zarr", "drop", rows=10)
    behind = sw._behind
    assert behind.dropped > 0
    # in flight after the last row: at most the window beside the newest row's bytes
    newest = sum(hi - lo for _, lo, hi, _ in list(behind.pending)[-4:])
    assert behind.bytes <= (3 << 20) + newest
    assert behind.bytes == sum(hi - lo for _, lo, hi, _ in behind.pending)
    handles = {h for h, *_ in behind.pending}
    assert len(handles) <= 4  # one descriptor per shard file, shared by its ranges
    sw.close()
    assert all(h.fd == -1 and h.refs == 0 for h in handles)  # every one released


def test_a_write_error_the_kernel_reports_is_raised_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(cw, "WRITE_BEHIND", 0)
    real = cw._SYNC_FILE_RANGE

    waits = []

    def failing(fd, off, n, flags):
        if flags & cw._SFR_WAIT_AFTER:
            waits.append(off)
            if len(waits) > 4:  # the disk fails a while after row 0's commit
                return -1
        return real(fd, off, n, flags)

    monkeypatch.setattr(cw, "_SYNC_FILE_RANGE", failing)
    monkeypatch.setattr(cw, "_errno", lambda: errno.EIO)
    rng = np.random.default_rng(0)
    d = 300_000
    tensors = fmt.tensor_table([("a", (d // 3,)), ("b", (d - d // 3,))])
    sw = StoreWriter(tmp_path / "e.zarr", tensors, {"grad": "lossless", "weight": "rounded:7"}, page_cache="drop")
    sw.append(0, rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32), loss=1.0, lr=0.1)
    with pytest.raises(OSError, match=r"writing .*(grad|weight).* back to the disk failed: .*Input/output error; "
                                      r"no further row is committed") as info:
        for s in range(1, 6):  # batched commits, as the Recorder's: rows written, not yet committed
            sw.append(s, rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32),
                      loss=1.0, lr=0.1, commit=False)
    assert info.value.errno == errno.EIO
    assert sw.n_written > 2 and sw.header.n_steps == 1
    with pytest.raises(OSError, match="back to the disk failed"):
        sw.commit()  # the rows whose write-back failed are never committed
    sw.abort()  # what the Recorder does after a writer error: keeps what was committed
    assert fmt.read_header(tmp_path / "e.zarr").n_steps == 1


def test_a_file_system_that_cannot_turns_it_off_and_the_store_is_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(cw, "WRITE_BEHIND", 0)
    calls = []

    def unsupported(fd, off, n, flags):
        calls.append(flags)
        return -1

    monkeypatch.setattr(cw, "_SYNC_FILE_RANGE", unsupported)
    monkeypatch.setattr(cw, "_errno", lambda: errno.EINVAL)
    sw = _write(tmp_path / "u.zarr", "drop", rows=5)
    assert not sw._behind.on and not sw._behind.pending
    assert len(calls) == 1  # tried once, then off for the writer
    sw.close()
    keep = _write(tmp_path / "k.zarr", "keep", rows=5)
    keep.close()
    _assert_same_store(tmp_path / "k.zarr", tmp_path / "u.zarr")


def test_drop_survives_a_rewind_and_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(cw, "WRITE_BEHIND", 0)
    sw = _write(tmp_path / "r.zarr", "drop", rows=6)
    sw.abort()  # a stop without close: committed rows kept, store resumable
    d = 300_000
    tensors = fmt.tensor_table([("a", (d // 3,)), ("b", (d - d // 3,))])
    sw = StoreWriter(tmp_path / "r.zarr", tensors, {"grad": "lossless", "weight": "rounded:7"}, mode="resume",
                     resume_step=4, page_cache="drop")
    rng = np.random.default_rng(1)
    for s in range(4, 9):
        sw.append(s, rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32),
                  loss=0.5, lr=0.1)
    sw.close()
    ref = _write(tmp_path / "ref.zarr", "keep", rows=4)
    rng = np.random.default_rng(1)
    for s in range(4, 9):
        ref.append(s, rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32),
                   loss=0.5, lr=0.1)
    ref.close()
    _assert_same_store(tmp_path / "ref.zarr", tmp_path / "r.zarr")


def test_recorder_page_cache(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    with pytest.raises(ValueError, match=r"page_cache='lru': use 'auto' \(the default\), 'keep' or 'drop'"):
        Recorder(model, tmp_path / "bad.zarr", page_cache="lru")
    assert not (tmp_path / "bad.zarr").exists()
    stores = {}
    for mode in ("keep", "drop", "auto"):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        stores[mode] = tmp_path / f"{mode}.zarr"
        with Recorder(net, stores[mode], optimizer=opt, page_cache=mode) as rec:
            for step in range(5):
                x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step))
                loss = net(x).square().mean()
                opt.zero_grad()
                loss.backward()
                rec.record(step, loss=loss)
                opt.step()
    _assert_same_store(stores["keep"], stores["drop"])
    _assert_same_store(stores["keep"], stores["auto"])


def test_sharded_recording_refuses_drop_in_one_line(tmp_path):
    from capture.sharded import ShardedRecorder

    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"Recorder\(sharded\): page_cache='drop' not supported for sharded models"):
        ShardedRecorder(model, tmp_path / "s.zarr", page_cache="drop")
    assert not (tmp_path / "s.zarr").exists()


def test_auto_keeps_the_first_bytes_in_the_page_cache_and_drops_behind_after_them(tmp_path, monkeypatch):
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay", "?"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages are its storage")
    monkeypatch.setattr(cw, "WRITE_BEHIND", 0)
    monkeypatch.setattr(cw, "_keep_first", lambda: 4 << 20)
    sw = _write(tmp_path / "a.zarr", "auto", rows=12)
    behind = sw._behind
    assert behind.keep_first == 4 << 20 and behind.kept == 4 << 20
    assert behind.dropped > 0
    assert all(lo >= 0 for _, lo, _, _ in behind.pending)
    sw.close()
    cached, total = _resident(tmp_path / "a.zarr")
    kept_pages = (4 << 20) // mmap.PAGESIZE
    assert kept_pages // 2 <= cached < total // 2, (cached, total)  # about the first 4 MB, not the rest
    assert 1 << 20 <= cw._keep_first() <= 1 << 30  # 1 GiB, or 1/16 of the memory


def test_sharded_recording_takes_auto_and_keep_and_refuses_others(tmp_path):
    from capture.sharded import ShardedRecorder

    with pytest.raises(ValueError, match=r"page_cache='lru': use 'auto'"):
        ShardedRecorder(nn.Linear(4, 2), tmp_path / "s.zarr", page_cache="lru")
    for mode in ("auto", "keep"):  # accepted: then it stops at the missing process group
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            ShardedRecorder(nn.Linear(4, 2), tmp_path / "s.zarr", page_cache=mode)


def test_small_rows_over_a_long_run_hold_few_descriptors_and_few_pages(tmp_path, monkeypatch):
    """Rows of a few KB: appends are handed over in ranges of at least MIN_RANGE whole pages,
    one descriptor per shard file, so descriptors and cached pages stay bounded whatever the
    number of rows (a page two rows share is handed over once, with the later range)."""
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay", "?"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages are its storage")
    monkeypatch.setattr(cw, "WRITE_BEHIND", 4 << 20)  # 50 rows' bytes in flight
    monkeypatch.setattr(cw, "MIN_RANGE", 64 << 10)
    def store_fds() -> int:  # this process's descriptors of files in the store
        n = 0
        for fd in Path("/proc/self/fd").iterdir():
            try:
                n += os.readlink(fd).startswith(str(tmp_path / "s.zarr"))
            except OSError:
                pass
        return n

    d = 20_000
    rng = np.random.default_rng(0)
    tensors = fmt.tensor_table([("a", (d,))])
    sw = StoreWriter(tmp_path / "s.zarr", tensors, {"grad": "lossless", "weight": "lossless"}, page_cache="drop")
    most = 0
    for s in range(600):
        sw.append(s, rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32),
                  loss=1.0, lr=0.1, commit=s % 16 == 15)
        most = max(most, store_fds())
    behind = sw._behind
    assert behind.dropped > 0 and len(behind.pending) <= 4 << 20 >> 16
    sw.close()
    assert store_fds() == 0  # every descriptor released
    assert most <= 30, most  # the store's own files, and one more per open shard file
    cached, total = _resident(tmp_path / "s.zarr")
    # the window in flight (a 1000 pages) and less than MIN_RANGE of each open shard file
    assert total > 20_000 and cached < total // 10, (cached, total)


def test_auto_keeps_at_most_a_sixteenth_of_a_cgroups_memory(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(cw, "_CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
    limit.write_text("max\n")  # no limit: the machine's memory
    assert cw._memory_limit() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit.write_text(f"{4 << 30}\n")  # a 4 GiB container
    assert cw._memory_limit() == 4 << 30
    assert cw._keep_first() == 256 << 20
