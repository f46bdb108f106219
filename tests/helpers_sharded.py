"""Worker of tests/test_capture_sharded.py: one rank trains an FSDP2-sharded MLP on the full batch
and records it (``world == 1`` and ``--plain``: the same training unsharded, the reference).

    python tests/helpers_sharded.py RANK WORLD PORT STORE STEPS TIERS PARAM_CHUNK [--plain] [--resume] [--slow] [--wsched]
        [--s3=ENDPOINT]  (STORE an s3:// URL on that moto server: tests/test_capture_sharded_remote.py)
        [--putlog=DIR]   (log every RemoteSink put, with its monotonic start and end, to DIR/putsRANK.jsonl)
"""

import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from capture import Recorder

LR = 0.1


def build():
    torch.manual_seed(0)
    # 10 / 3 / 1 output rows: uneven shards over 2 ranks, and an empty one (rank 1 of the last layer)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3), nn.Tanh(), nn.Linear(3, 1))


def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)


def log_puts(folder, rank):
    """Wrap ``RemoteSink.put`` / ``put_many`` to log each put's keys, start and end (the system-wide
    monotonic clock: comparable across the ranks' processes) and, for the root marker, n_steps."""
    import json

    from capture.sink import RemoteSink

    f = open(f"{folder}/puts{rank}.jsonl", "a", buffering=1)
    put, put_many = RemoteSink.put, RemoteSink.put_many

    def log(items, t0, t1):
        rec = {"rank": rank, "t0": t0, "t1": t1, "keys": sorted(items)}
        if "zarr.json" in items:
            rec["n_steps"] = json.loads(bytes(items["zarr.json"]))["attributes"]["gradtrace"]["n_steps"]
        f.write(json.dumps(rec) + "\n")

    def logged_put(self, rel, data):
        t0 = time.monotonic()
        put(self, rel, data)
        log({rel: data}, t0, time.monotonic())

    def logged_put_many(self, items):
        if len(items) <= 1:
            return put_many(self, items)  # through put: logged there
        t0 = time.monotonic()
        put_many(self, items)
        log(items, t0, time.monotonic())

    RemoteSink.put, RemoteSink.put_many = logged_put, logged_put_many


def main(argv):
    rank, world, port, store, steps, tiers, pc = argv[:7]
    rank, world, steps, pc = int(rank), int(world), int(steps), int(pc)
    plain, resume, slow = "--plain" in argv, "--resume" in argv, "--slow" in argv
    if "=" in tiers:  # "grad=sketch:24,weight=rounded:7"
        tiers = dict(kv.split("=") for kv in tiers.split(","))
    torch.set_num_threads(1)
    opts = {}
    for a in argv:
        if a.startswith("--s3="):
            opts = {"storage_options": {"endpoint_url": a[len("--s3="):], "key": "testing", "secret": "testing"}}
        if a.startswith("--putlog="):
            log_puts(a[len("--putlog="):], rank)
    model = build()
    if not plain:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
    x, y = batch()  # the same full batch on every rank
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start = 0
    if resume:  # replay the training up to the store's last committed step (deterministic)
        from gradtrace_format import format as fmt

        h = fmt.read_header(store, **opts)
        import zarr

        n = h.n_steps - (1 if h.has_final else 0)
        start = int(zarr.open_group(store, mode="r", **opts)["step"][n - 1]) + 1 if n else 0
        for _ in range(start):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    extra = {}
    if "--wsched" in argv:  # weights every other step, and a lag band of 2
        extra = {"weight_schedule": "every:2", "lag_band": 2}
    with Recorder(model, store, opt, tiers=tiers, param_chunk=pc, resume=resume, **extra, **opts) as rec:
        for step in range(start, steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            rec.record(step, loss=loss)
            opt.step()
            opt.zero_grad()
            if slow:
                time.sleep(0.02)
    if not plain:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
