"""DDP with two real processes (gloo, CPU): only rank 0 writes, and it writes the all-reduced gradient."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import xarray as xr

from gradtrace_format import format as fmt
from capture import restore_weights

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3

WORKER = textwrap.dedent(
    """
    import sys
    import torch, torch.nn as nn, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from capture import Recorder

    rank, world, init_file, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    x = torch.randn(24, 6, generator=g) + 2.0 * rank
    y = torch.randn(24, 2, generator=g) * (1 + rank)
    torch.save({"x": x, "y": y}, f"{out}/rank{rank}.pt")
    with Recorder(ddp, store, opt) as rec:
        for step in range(%d):
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            recorded = rec.record(step, loss=loss)
            assert recorded == (rank == 0), (rank, recorded)
            opt.step()
            opt.zero_grad()
    assert rec.summary()["active"] == (rank == 0)
    dist.destroy_process_group()
    """
    % STEPS
)


def test_rank0_records_the_allreduced_gradient(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store = tmp_path / "ddp.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", str(tmp_path / "init"), str(store), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-3000:]}"

    ds = xr.open_zarr(store)
    assert ds.sizes["step"] == STEPS + 1
    header = fmt.read_header(store)
    assert header.settings["world_size"] == 2
    assert [t.name for t in header.tensors] == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no "module."
    data = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    for t in range(STEPS):
        restore_weights(model, store, t)
        per_rank = []
        for d in data:
            model.zero_grad()
            nn.functional.mse_loss(model(d["x"]), d["y"]).backward()
            per_rank.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
        mean = (per_rank[0] + per_rank[1]) / 2
        stored = ds.grad.values[t]
        np.testing.assert_allclose(stored, mean, rtol=1e-5, atol=1e-7)
        # the all-reduce matters: neither rank's own gradient is what was stored
        assert np.abs(stored - per_rank[0]).max() > 100 * np.abs(stored - mean).max() + 1e-6
        assert np.abs(stored - per_rank[1]).max() > 100 * np.abs(stored - mean).max() + 1e-6
    # and the recorded trajectory is the one DDP trained: w[t+1] = w[t] - lr * G[t]
    w = ds.weight.values.astype(np.float64)
    np.testing.assert_allclose(w[1:], w[:-1] - 0.2 * ds.grad.values[:STEPS].astype(np.float64), rtol=0, atol=1e-6)
