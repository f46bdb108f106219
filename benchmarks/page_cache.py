"""The machine's page-cache write floor, without gradtrace: blocks appended to a new file.

A writer that records every step puts its chunks into the page cache; what a new page costs
there is the machine's, not the recorder's. This script writes ``--gb`` GB in blocks of
``--block-mb`` MB (the size of one recorded row: 6.7 MB for the fast MLP's lossless row) into
a new file, four times: into new pages (the file kept), into new pages again, with the
writeback and page dropping of ``Recorder(page_cache="drop")`` (``capture.writer._WriteBehind``,
the one gradtrace piece used here), and right after the first two files were deleted (their
pages free to recycle).
It prints GB/s, the system CPU per GB and, for ``--params``, the equivalent in ns per
parameter-step (one block per step): the figure to read beside the capture benchmark's
writer CPU.

    python benchmarks/page_cache.py --dir DIR [--gb 2] [--block-mb 6.716] [--params 1.07e6]

On the 2-core development VM (whose host backs guest memory lazily and takes freed pages
back) new pages cost several times recycled ones; on a machine with backed memory the three
figures are alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


class _Appended:
    """What ``_WriteBehind.hand`` reads of a shard file: its descriptor, path, bytes appended
    (``end``), bytes already handed over (``marked``) and its write-behind descriptor."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path, self.end, self.marked, self.wb = fd, path, 0, 0, None


def write_file(path: Path, block: bytes, n: int, drop: bool = False) -> tuple[float, float]:
    """(wall seconds, system + user CPU seconds) of n appends of ``block`` to a new file; with
    ``drop``, each block handed to page_cache="drop"'s write-behind as a row's chunks are."""
    behind = None
    if drop:
        from capture.writer import _WriteBehind

        behind = _WriteBehind()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    f = _Appended(fd, path)
    try:
        c0, t0 = os.times(), time.perf_counter()
        for i in range(n):
            if os.pwrite(fd, block, i * len(block)) != len(block):
                raise OSError(f"short write to {path}")
            f.end += len(block)
            if behind is not None:
                behind.hand(f, complete=i == n - 1)
                behind.row_done()
        if behind is not None:
            behind.close()
        c1, t1 = os.times(), time.perf_counter()
    finally:
        os.close(fd)
        if f.wb is not None:
            f.wb.release()
    return t1 - t0, (c1.system - c0.system) + (c1.user - c0.user)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir); removed afterwards")
    ap.add_argument("--gb", type=float, default=2.0, help="GB per file (default 2)")
    ap.add_argument("--block-mb", type=float, default=6.716, help="MB per write (default 6.716: a fast-MLP lossless row)")
    ap.add_argument("--params", type=float, default=1.07e6, help="parameters per row, for ns per parameter-step")
    args = ap.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="gradtrace-pagecache-"))
    root.mkdir(parents=True, exist_ok=True)
    block = os.urandom(max(1, int(args.block_mb * 1e6)))
    n = max(1, int(args.gb * 1e9 / len(block)))
    rows = []
    files = [root / f"pagecache-{i}.bin" for i in range(4)]
    cases = ["new pages", "new pages again", "page_cache='drop'", "after deleting 1 and 2"]
    try:
        os.sync()
        for i, (path, what) in enumerate(zip(files, cases)):
            if i == 3:  # the pages of the first two files are freed now: this one may recycle them
                for f in files[:2]:
                    f.unlink()
                os.sync()
            wall, cpu = write_file(path, block, n, drop=i == 2)
            nbytes = n * len(block)
            rows.append({"case": what, "gb_s": nbytes / wall / 1e9, "cpu_s_per_gb": cpu / (nbytes / 1e9),
                         "ns_per_param_step": cpu / n / args.params * 1e9})
            print(f"{what:24s} {rows[-1]['gb_s']:5.2f} GB/s  {rows[-1]['cpu_s_per_gb']:5.2f} CPU s per GB  "
                  f"= {rows[-1]['ns_per_param_step']:5.2f} ns per parameter-step of {args.params:.3g} parameters",
                  flush=True)
    finally:
        for f in files:
            f.unlink(missing_ok=True)
        if args.dir is None:
            root.rmdir()
        os.sync()
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
