"""What does recording straight to object storage cost per step, against local disk?

The fast MLP of ``capture_overhead.py`` (784-1024-256-10, 1.07M parameters, batch 256, plain
SGD) trains ``--steps`` steps three times from the same weights: bare, recorded to a local
path (lossless), recorded to ``s3://`` on a moto S3 server started here in its own process on
127.0.0.1 (not real S3: no network, no S3 latency; moto keeps the objects in memory). A
recorded phase's time includes draining the writer's queue (``rec.flush()``); creating the
store and the close (trim + consolidate) are timed separately.

Usage (the README quotes it; under a minute)::

    .venv/bin/python benchmarks/remote_write.py --steps 100
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.capture_overhead import build, mnist_like  # noqa: E402
from capture import Recorder  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase(model0, batches, steps, path=None, **options):
    """(seconds of the steps incl. flush, seconds to create, seconds to close)."""
    model = copy.deepcopy(model0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t0 = time.perf_counter()
    rec = Recorder(model, path, opt, **options) if path is not None else None
    t1 = time.perf_counter()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if rec is not None:
            rec.record(step, loss=loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if rec is not None:
        rec.flush()
    t2 = time.perf_counter()
    if rec is not None:
        rec.close()
    return t2 - t1, t1 - t0, time.perf_counter() - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tiers", default="lossless")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build("mlp", 28)
    batches = mnist_like(256, 8, "cpu")
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="gradtrace-remote-"))
    try:
        import s3fs

        opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        for _ in range(100):
            try:
                s3fs.S3FileSystem(**opts, skip_instance_cache=True).mkdir("runs")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        phase(model, batches, 5)  # warm-up
        rows = []
        for label, path, extra in (
            ("bare", None, {}),
            ("local disk", tmp / "run.zarr", {"tiers": args.tiers}),
            ("s3:// (moto)", "s3://runs/run.zarr", {"tiers": args.tiers, "storage_options": opts}),
        ):
            run_s, create_s, close_s = phase(model, batches, args.steps, path, **extra)
            rows.append((label, run_s, create_s, close_s))
        bare = rows[0][1] / args.steps
        size = sum(f.stat().st_size for f in (tmp / "run.zarr").rglob("*") if f.is_file())
        print(f"MLP 784-1024-256-10, {sum(p.numel() for p in model.parameters())} parameters, batch 256, "
              f"{args.steps} steps, tier {args.tiers} ({size / (args.steps + 1) / 2**20:.1f} MiB per step), "
              f"{os.cpu_count()} cores\n")
        print("| target | ms per step | recording cost per step | create | close |")
        print("|---|---:|---:|---:|---:|")
        for label, run_s, create_s, close_s in rows:
            ms = 1e3 * run_s / args.steps
            cost = "-" if label == "bare" else f"+{ms - 1e3 * bare:.1f} ms"
            create = "-" if label == "bare" else f"{create_s:.2f} s"
            close = "-" if label == "bare" else f"{close_s:.2f} s"
            print(f"| {label} | {ms:.1f} | {cost} | {create} | {close} |")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
