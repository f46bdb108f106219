"""Integrity and safety (issue 14): every attack repeated; no number may come out of a damaged store.

Each test damages a store the way an attacker or a careless user did (flipped bytes, deleted
or truncated chunks, a flipped flag, shifted offsets, truncated metadata, ``-o`` onto the
input or a foreign directory, two writers, a pickle beside a store, a bad reference) and
fails if a metric returns a value instead of an error that names the damage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import analysis as ga
from gradtrace_format import format as fmt
from gradtrace_format import integrity
from capture.writer import LOCK_NAME, StoreWriter
from tests.helpers_stores import delete_chunk, flip_chunk_byte, make_store, truncate_chunk

ROOT = Path(__file__).resolve().parent.parent


def gradtrace(*args, timeout=240):
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    e.pop("GRADTRACE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "gradtrace.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=timeout)


class _Done:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


@pytest.fixture
def cli(capsys):
    """``gradtrace ARGS`` in this process (``gradtrace.cli.main``: the same error handling as the
    script, without a second interpreter's start-up)."""
    from gradtrace.cli import main

    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return _Done(rc, out.out, out.err)

    return run


def one_line_error(p, *words):
    """Exit 2, one line on stderr, no traceback, naming each of ``words``."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert str(w) in err, (w, err)
    return err


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("integ") / "run.zarr", steps=10, param_chunk=32)


@pytest.fixture
def copy(clean, tmp_path):
    dst = tmp_path / "run.zarr"
    shutil.copytree(clean.path, dst)
    return dst


def flip(path: Path, pos: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[pos % len(data)] ^= mask
    path.write_bytes(bytes(data))


def metrics_all_fail(path, array: str, step: int):
    """corr, lag series, signs, rsi (and the Dataset) each raise a DamagedStoreError naming
    ``array`` and ``step``, or (for metrics that do not read ``array``) return a value equal to
    the clean store's."""
    run = ga.open_run(path)
    calls = [lambda: ga.corr_matrix(run), lambda: ga.lag_series(run, 1), lambda: ga.sign_shift_matrix(run),
             lambda: ga.rsi(run, "final"), lambda: run.ds[array].values]
    if array == "weight":
        calls = calls[3:]
    for call in calls:
        with pytest.raises(fmt.DamagedStoreError) as info:
            call()
        msg = str(info.value)
        assert f"'{array}'" in msg and f"step {step}" in msg and "damaged" in msg, msg


# ----------------------------------------------------------------------------- checksums


def test_every_array_has_a_checksum_that_plain_zarr_checks(clean):
    g = zarr.open_group(str(clean.path), mode="r")
    for name, arr in g.arrays():
        assert integrity.has_crc(arr), name
    import xarray as xr

    ds = xr.open_zarr(clean.path).load()  # plain xarray still reads (and checks) every array
    np.testing.assert_array_equal(ds.grad.values[: len(clean.grads)], clean.grads)
    assert np.isfinite(ds.grad_sqnorm_tensor.values[:-1]).all()


@pytest.mark.parametrize("array", ["grad", "weight"])
def test_flipped_bytes_never_give_a_number(clean, tmp_path, array):
    rng = np.random.default_rng(3 if array == "grad" else 4)
    for k in range(5):
        dst = tmp_path / f"f{k}.zarr"
        shutil.copytree(clean.path, dst)
        row = int(rng.integers(0, 9))
        flip_chunk_byte(dst, array, row, int(rng.integers(0, 5)), int(rng.integers(0, 1 << 20)),
                        1 << int(rng.integers(0, 8)))
        metrics_all_fail(dst, array, int(clean.steps[row]))
        shutil.rmtree(dst)


def test_deleted_and_truncated_chunks_are_errors_not_nan(copy, clean):
    delete_chunk(copy, "grad", 4, 1)
    metrics_all_fail(copy, "grad", 4)
    shutil.rmtree(copy)
    shutil.copytree(clean.path, copy)
    truncate_chunk(copy, "weight", 2, 0, 20)
    metrics_all_fail(copy, "weight", 2)


def test_flag_byte_and_scalar_damage(copy):
    flip(copy / "flags" / "c" / "0", 4 * 3, 0x04)  # row 3 claims to be the final iterate
    with pytest.raises(fmt.DamagedStoreError, match=r"'flags' is damaged at steps 0, 1, 2.*checksum"):
        ga.open_run(copy)


def test_implausible_values_with_valid_checksums(copy):
    """Damage a checksum cannot see (bytes changed before it was computed): flags against the
    stored norms, and the norm a Gram pass computes against the stored one."""
    g = zarr.open_group(str(copy), mode="r+", use_consolidated=False)
    flags = g["flags"][:]
    flags[3] |= fmt.FLAG_FINAL
    g["flags"][:] = flags
    with pytest.raises(fmt.DamagedStoreError, match="step 3.*final iterate"):
        ga.open_run(copy)
    flags[3] &= ~fmt.FLAG_FINAL
    g["flags"][:] = flags
    row = g["grad"][5, :]
    row[7] *= 1.5
    g["grad"][5, :] = row  # through zarr: a valid crc over a wrong value
    with pytest.raises(fmt.DamagedStoreError, match="'grad' is damaged at step 5.*grad_sqnorm"):
        ga.corr_matrix(copy)
    assert any("step 5" in p and "grad_sqnorm" in p for p in integrity.verify_store(copy))


def test_shifted_offsets_are_refused(copy, clean):
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["gradtrace"]["tensors"][1]["offset"] += 3
    (copy / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(fmt.DamagedStoreError, match="offset"):
        ga.open_run(copy)
    shutil.rmtree(copy)
    shutil.copytree(clean.path, copy)
    g = zarr.open_group(str(copy), mode="r+", use_consolidated=False)
    off = g["tensor_offset"][:]
    off[2] += 1
    g["tensor_offset"][:] = off
    with pytest.raises(fmt.DamagedStoreError, match="tensor_offset"):
        ga.open_run(copy)


def test_truncated_metadata_says_damaged(copy, cli):
    meta = copy / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:300])
    with pytest.raises(fmt.DamagedStoreError, match="damaged.*not valid JSON"):
        ga.open_run(copy)
    arr_meta = copy / "grad" / "zarr.json"
    shutil.copy(arr_meta, copy / "g.json")
    one_line_error(cli("info", copy), "damaged", copy)


def test_kill_between_row_and_checksum_damages_nothing_committed(tmp_path, monkeypatch):
    """The per-step arrays are patched in place at each commit, rows and crc in one write: a
    kill that cuts that write after the rows leaves a crc over the old rows, which readers
    accept for the uncommitted rows only."""
    from capture import writer as cw

    tensors = fmt.tensor_table([("a", (40,)), ("b", (3,))])
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 43)).astype(np.float32)
    sw = StoreWriter(tmp_path / "k.zarr", tensors, param_chunk=16)
    for s in range(3):
        sw.append(s, rows[s], rows[s], loss=float(s))

    class Killed(BaseException):
        pass

    def die(*a, **k):
        raise Killed

    sw.append(3, rows[3], rows[3], loss=3.0, commit=False)  # batched commits: written, not committed
    sw.append(4, rows[4], rows[4], loss=4.0, commit=False)

    def torn(self):  # the commit's write of rows + crc, cut after the rows (a kill mid-write)
        lo, hi = self._dirty_rows
        if hi > lo and self._fd is not None:
            at = lo * self.row_bytes
            os.pwrite(self._fd, bytes(self._blockbuf[at: hi * self.row_bytes]), at)
        die()

    monkeypatch.setattr(cw._ArrayWriter, "flush_rows", torn)
    with pytest.raises(Killed):
        sw.commit()
    monkeypatch.undo()
    sw._close_files()
    sw._unlock()  # what the OS does for a killed process (abort() would commit row 3)
    run = ga.open_run(tmp_path / "k.zarr")  # committed rows 0..2 read, checked
    np.testing.assert_array_equal(run.ds.loss.values, [0.0, 1.0, 2.0])
    assert integrity.verify_store(tmp_path / "k.zarr") == []
    sw = StoreWriter(tmp_path / "k.zarr", tensors, mode="resume")  # repairs the block's crc
    sw.append(3, rows[3], rows[3], loss=3.0)
    sw.close(rows[4])
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    np.testing.assert_array_equal(g["loss"][:4], [0.0, 1.0, 2.0, 3.0])  # plain zarr: crc valid
    with open(tmp_path / "k.zarr" / "loss" / "c" / "0", "r+b") as f:  # a committed row changed: damage
        f.seek(8)
        f.write(np.float64(7.0).tobytes())
    with pytest.raises(fmt.DamagedStoreError, match="'loss' is damaged at steps 0, 1, 2, 3, 4"):
        ga.open_run(tmp_path / "k.zarr")


# ----------------------------------------------------------------------------- the CLI


def test_cli_one_flipped_byte_fails_corr_and_rsi_and_verify_lists_every_step(copy):
    flip_chunk_byte(copy, "grad", 6, 0, 9)
    delete_chunk(copy, "grad", 2, 3)
    for cmd in (("corr", copy), ("rsi", copy)):
        one_line_error(gradtrace(*cmd), "'grad'", "damaged", "step")
    p = gradtrace("verify", copy)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "step 6: array 'grad'" in p.stdout and "checksum" in p.stdout
    assert "step 2: array 'grad'" in p.stdout and "missing" in p.stdout


def test_cli_report_bad_ref_and_nan_reference(clean, tmp_path, cli):
    p = cli("report", clean.path, "--ref", "step:999", "-o", tmp_path / "rep")
    one_line_error(p, "999")
    assert not (tmp_path / "rep" / "index.html").exists()
    w = np.array(clean.weights[-1], dtype=np.float32)
    w[3] = np.nan
    nanrun = make_store(tmp_path / "nan.zarr", steps=6, param_chunk=32, final_weight=w)
    with pytest.raises(ga.BadReferenceError, match="NaN or Inf"):
        ga.rsi(nanrun.path, "final")
    one_line_error(cli("rsi", nanrun.path), "NaN")


def test_output_never_destroys_input(copy, tmp_path, cli):
    before = sorted(p.name for p in copy.iterdir())
    one_line_error(cli("corr", copy, "-o", copy), str(copy))
    one_line_error(cli("corr", copy, "-o", copy, "--force"), str(copy))
    assert sorted(p.name for p in copy.iterdir()) == before
    foreign = tmp_path / "mine.zarr"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    one_line_error(cli("corr", copy, "-o", foreign, "--force"), "did not write")
    assert (foreign / "thesis.tex").read_text() == "keep me"
    other = tmp_path / "other.zarr"
    shutil.copytree(copy, other)
    one_line_error(cli("corr", copy, "-o", other, "--force"), "run store")
    assert ga.open_run(other).header.n_steps == ga.open_run(copy).header.n_steps
    out = tmp_path / "res.zarr"
    assert cli("corr", copy, "-o", out).returncode == 0
    one_line_error(cli("corr", copy, "-o", out), "exists", "--force")
    assert cli("corr", copy, "-o", out, "--force").returncode == 0  # a result it wrote: replaced


def test_overwrite_replaces_only_gradtrace_stores(tmp_path):
    tensors = fmt.tensor_table([("a", (8,))])
    f = tmp_path / "file.zarr"
    f.write_text("data")
    foreign = tmp_path / "grp.zarr"
    zarr.open_group(str(foreign), mode="w")
    (foreign / "notes.txt").write_text("keep")
    for p in (f, foreign):
        with pytest.raises(FileExistsError, match="refusing to overwrite"):
            StoreWriter(p, tensors, mode="overwrite")
    assert f.read_text() == "data" and (foreign / "notes.txt").exists()
    ok = tmp_path / "ok.zarr"
    StoreWriter(ok, tensors).close()
    StoreWriter(ok, tensors, mode="overwrite").close()


# ----------------------------------------------------------------------- writers, creation


def test_second_writer_is_refused_and_lock_is_released(tmp_path):
    tensors = fmt.tensor_table([("a", (8,))])
    path = tmp_path / "w.zarr"
    a = StoreWriter(path, tensors)
    a.append(0, np.ones(8, np.float32), np.ones(8, np.float32))
    for mode in ("resume", "overwrite"):
        with pytest.raises(fmt.StoreLockedError, match=f"process {os.getpid()}"):
            StoreWriter(path, tensors, mode=mode)
    assert ga.open_run(path).header.n_steps == 1  # the refused writers changed nothing
    a.close()
    assert not (path / LOCK_NAME).exists()  # a closed store holds no lock file
    b = StoreWriter(path, tensors, mode="resume")
    b.append(1, np.ones(8, np.float32), np.ones(8, np.float32))
    b.close()


def test_killed_writer_releases_its_lock(tmp_path):
    path = tmp_path / "dead.zarr"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from gradtrace_format import format as fmt
        from capture.writer import StoreWriter
        w = StoreWriter({str(path)!r}, fmt.tensor_table([("a", (8,))]))
        w.append(0, np.ones(8, np.float32), np.ones(8, np.float32))
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        p = gradtrace("info", path)
        assert p.returncode == 0  # readers never wait for the lock
        with pytest.raises(fmt.StoreLockedError, match=f"process {proc.pid}"):
            StoreWriter(path, fmt.tensor_table([("a", (8,))]), mode="resume")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    w = StoreWriter(path, fmt.tensor_table([("a", (8,))]), mode="resume")
    assert w.n_steps == 1
    w.close()


def test_kill_during_creation_leaves_nothing(tmp_path, monkeypatch):
    from capture import writer as cw

    class Killed(BaseException):
        pass

    real = cw.StoreWriter._setup_writers

    def die(self, arrays):
        real(self, arrays)
        raise Killed

    tensors = fmt.tensor_table([("a", (8,))])
    path = tmp_path / "c.zarr"
    monkeypatch.setattr(cw.StoreWriter, "_setup_writers", die)
    with pytest.raises(Killed):
        StoreWriter(path, tensors)
    monkeypatch.undo()
    assert not path.exists()
    # a real kill leaves the hidden temporary directory; the next creation removes it
    stale = tmp_path / ".c.zarr.gradtrace-new-1-1"
    stale.mkdir()
    (stale / LOCK_NAME).write_text("1\n")
    w = StoreWriter(path, tensors)
    w.close()
    assert not stale.exists() and ga.open_run(path).header.closed


# ------------------------------------------------------------------------ steps, pickles


def test_bad_steps_are_refused_at_once(tmp_path):
    torch = pytest.importorskip("torch")
    from capture import Recorder

    model = torch.nn.Linear(3, 2)
    rec = Recorder(model, tmp_path / "s.zarr")
    model(torch.ones(1, 3)).sum().backward()
    for bad in (-1, 2**63, True, 1.0, "3", torch.tensor(1.5)):
        with pytest.raises(ValueError, match="step"):
            rec.record(bad)
    assert rec.record(0)
    rec.close()
    w = StoreWriter(tmp_path / "w.zarr", fmt.tensor_table([("a", (2,))]))
    with pytest.raises(ValueError, match="2\\*\\*63"):
        w.append(2**63, np.ones(2, np.float32), np.ones(2, np.float32))
    w.close()


class Boom:
    """Unpickling this runs a shell command (what a crafted checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_never_runs(clean, tmp_path, cli):
    """Every command that reads a file beside or for a store: record --resume (the checkpoint),
    rsi --ref and report --ref (a reference checkpoint)."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "PWNED"
    store = tmp_path / "rec.zarr"
    shutil.copytree(clean.path, store)
    ckpt = tmp_path / "rec.zarr.ckpt.pt"
    torch.save({"step": 1, "recipe": Boom(marker), "model": {}}, ckpt)
    assert ckpt.exists() and not marker.exists()
    one_line_error(cli("record", "--preset", "demo-quick", "--out", store, "--resume"), "weights_only")
    ref = tmp_path / "ref.pt"
    shutil.copy(ckpt, ref)
    one_line_error(cli("rsi", clean.path, "--ref", ref), "weights_only")
    one_line_error(cli("report", clean.path, "--ref", ref, "-o", tmp_path / "rep"), "weights_only")
    # the commands that read only the store, with the payload planted beside it
    for cmd in ("info", "verify", "corr", "signs", "phases", "layers"):
        assert cli(cmd, store).returncode == 0, cmd
    time.sleep(0.2)
    assert not marker.exists()


@pytest.mark.parametrize("zarrs", ["1", "0"])
def test_zeroed_shard_index_entry_is_damage_not_nan(copy, monkeypatch, zarrs):
    """A committed chunk whose shard index entry was zeroed (a lost page): zarr-python reads
    it as the fill value; gradtrace's readers, through zarrs or zarr-python, report the damage
    with the step."""
    from tests.helpers_stores import _shard_index_entry

    monkeypatch.setenv("GRADTRACE_ZARRS", zarrs)
    path, at = _shard_index_entry(copy, "grad", 3, 1)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\0" * 16)
    with pytest.raises(fmt.DamagedStoreError, match="'grad' is damaged at step 3"):
        ga.corr_matrix(ga.open_run(copy))
    assert any("step 3" in p for p in integrity.verify_store(copy))
