"""Per-rank cost of sharded (FSDP2) recording, and what each commit protocol costs.

Two gloo processes on this machine (``torch.multiprocessing`` spawn, free port):

1. Commit protocol, per step (``--reps`` times, median): a ``barrier`` on a gloo group, the
   all-reduce of a float64 vector of ``3 n_tensors + 3`` values (what the sharded recorder
   issues anyway, for the scalars), and one atomic rename of a per-rank marker file (the
   per-rank-marker alternative; readers would then read W such files and take the minimum).
2. Per-rank recording cost: an FSDP2 MLP (``--width``) records ``--steps`` lossless steps; the
   recorder reports each rank's training-thread time in ``record()`` (flattening the local
   shards; the time blocked on a full queue is reported apart and not counted), its writer thread's time writing its chunks (encode + put + partial scalars) and
   in the all-reduce; divided by its local entries: ns per local parameter-step.

Usage (docs/scale.md quotes it)::

    .venv/bin/python benchmarks/sharded_capture.py                # ~30 s on 2 cores
    .venv/bin/python benchmarks/sharded_capture.py --width 1024 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank, world, port, args, tmp, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from capture import Recorder
    from capture.writer import atomic_put

    g = dist.new_group(backend="gloo")
    res = {}
    vec = torch.zeros(3 * 6 + 3, dtype=torch.float64)
    for name, fn in (("barrier", lambda: dist.barrier(group=g)),
                     ("allreduce", lambda: dist.all_reduce(vec, group=g)),
                     ("marker", lambda: atomic_put(Path(tmp) / f"marker.{rank}", b"{\"n_steps\": 1}"))):
        fn()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        res[name + "_us"] = 1e6 * statistics.median(ts)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    w = args.width
    model = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, w), torch.randint(0, 10, (64,))
    with Recorder(model, Path(tmp) / "run.zarr", opt, tiers=args.tiers) as rec:
        for step in range(args.steps):
            nn.functional.cross_entropy(model(x), y).backward()
            rec.record(step)
            opt.step()
            opt.zero_grad()
        rec.flush()  # every queued row written: the writer thread's times are complete
        s = rec.summary()
        local = rec._n_local
    res.update(rank=rank, local_params=local, d=rec.d, record_s=s["record_seconds"], write_s=s["write_seconds"],
               allreduce_s=s["allreduce_seconds"], wait_s=s["wait_seconds"],
               record_ns_per_param_step=1e9 * (s["record_seconds"] - s["wait_seconds"]) / max(1, local * args.steps),
               write_ns_per_param_step=1e9 * s["write_seconds"] / max(1, local * args.steps),
               allreduce_ms_per_step=1e3 * s["allreduce_seconds"] / args.steps)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--tiers", default="lossless")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, port, args, tmp, out), nprocs=2, join=True)
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    for r in rows:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
