"""SIGKILL a real recording process at random moments: the store opens, holds only whole steps.

The child trains a small model and records every step; before each ``record`` it appends the
SHA-1 of the gradient and weight vectors it computed itself to a side file. After the kill the
parent checks that every committed row hashes to exactly what the child computed, that the
store opens with ``read_header``, zarr and xarray, and (once) that it resumes.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import analysis as ga
from gradtrace_format import format as fmt

ROOT = Path(__file__).resolve().parents[1]

# A zygote imports torch once and forks one recording process per command line on stdin
# ("STORE SIDEFILE"); it prints the pid, then the wait status once the parent has killed it.
ZYGOTE = textwrap.dedent(
    """
    import hashlib, os, sys
    import torch, torch.nn as nn
    from capture import Recorder

    def run(store, side):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        model = nn.Sequential(nn.Linear(256, 400), nn.Tanh(), nn.Linear(400, 300), nn.Tanh(), nn.Linear(300, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
        def sha(ts):
            return hashlib.sha1(torch.cat([t.detach().reshape(-1) for t in ts]).numpy().tobytes()).hexdigest()
        with open(side, "w") as f, Recorder(model, store, opt, param_chunk=4096, queue_size=2) as rec:
            for step in range(100000):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                f.write(f"{step} {sha(p.grad for p in model.parameters())} {sha(model.parameters())}\\n")
                f.flush()
                rec.record(step, loss=loss)
                opt.step()
                opt.zero_grad()

    # warm up what a first optimizer and record would import (torch.optim pulls in the
    # compiler stack: seconds), and freeze the heap so the children do not copy it on GC
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    import gc
    gc.freeze()
    for line in sys.stdin:
        store, side = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                run(store, side)
            finally:
                os._exit(3)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)
    """
)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _committed(path: Path) -> int:
    """n_steps from the root zarr.json, read cheaply (polling through zarr would starve the child)."""
    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["gradtrace"]["n_steps"])
    except (OSError, ValueError, KeyError):  # not created yet
        return -1


class Zygote:
    def __init__(self, tmp_path: Path):
        script = tmp_path / "zygote.py"
        script.write_text(ZYGOTE)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.log = tmp_path / "zygote.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log.open("w"), text=True,
        )

    def record(self, store: Path, side: Path) -> int:
        self.proc.stdin.write(f"{store} {side}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"zygote died: {self.log.read_text()[-2000:]}")
        return int(line)

    def status(self) -> int:
        return int(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _kill_when(zygote: Zygote, pid: int, store: Path, min_rows: int, extra_delay: float) -> None:
    deadline = time.monotonic() + 90
    try:
        while _committed(store) < min_rows:
            if time.monotonic() > deadline:
                raise AssertionError("the recording process committed too few steps within 90 s")
            time.sleep(0.002)
        time.sleep(extra_delay)
    finally:
        os.kill(pid, signal.SIGKILL)
    status = zygote.status()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended otherwise: {status}"


def _check(store: Path, side: Path, min_rows: int) -> int:
    header = fmt.read_header(store)
    n = header.n_steps
    assert n >= min_rows and not header.closed
    lines = [ln.split() for ln in side.read_text().splitlines() if ln.count(" ") == 2]
    computed = {int(s): (g, w) for s, g, w in lines}
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    grads = np.asarray(group["grad"][:n])  # plain zarr: the committed rows' chunks, crc checked
    weights = np.asarray(group["weight"][:n])
    assert np.isfinite(grads).all() and np.isfinite(weights).all()
    for t in range(n):
        assert (_sha(grads[t]), _sha(weights[t])) == computed[t], f"row {t} differs from what the child computed"
    # the reader a crashed store is for (README, crash safety): a kill can cut the commit's
    # write of a per-step block (rows + crc) or a capacity doubling half way (arrays of two
    # lengths, which plain xarray refuses until a resume or a clean close trims them)
    ds = ga.open_run(store).ds
    assert ds.sizes["step"] == n
    np.testing.assert_array_equal(ds["step"].values, np.arange(n))
    np.testing.assert_allclose(ds["grad_sqnorm"].values, (grads.astype(np.float64) ** 2).sum(1), rtol=1e-12)
    assert np.isfinite(ds["loss"].values).all()
    assert (ds["flags"].values == 0).all()
    return n


def test_sigkill_at_random_moments_never_tears_a_step(tmp_path):
    rng = random.Random(1234)
    zygote = Zygote(tmp_path)
    try:
        for i, (min_rows, delay) in enumerate([(1, 0.0), (3, rng.uniform(0, 0.02)), (5, rng.uniform(0.02, 0.2))]):
            store, side = tmp_path / f"k{i}.zarr", tmp_path / f"k{i}.txt"
            pid = zygote.record(store, side)
            _kill_when(zygote, pid, store, min_rows, delay)
            _check(store, side, min_rows)
    finally:
        zygote.close()
    # the last killed store resumes: the committed rows stay, new ones append, close trims
    import torch
    import torch.nn as nn

    from capture import Recorder

    n = _committed(store)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 400), nn.Tanh(), nn.Linear(400, 300), nn.Tanh(), nn.Linear(300, 10))
    before = np.asarray(zarr.open_group(str(store), mode="r", use_consolidated=False)["grad"][:n])
    with Recorder(model, store, resume=True) as rec:
        for step in (n, n + 1):
            model(torch.randn(4, 256)).sum().backward()
            rec.record(step)
            model.zero_grad()
    ds = xr.open_zarr(store)
    np.testing.assert_array_equal(ds.step.values, np.arange(n + 3))
    np.testing.assert_array_equal(ds.grad.values[:n], before)
    assert not list(store.glob("*.partial"))


@pytest.mark.parametrize("where", ["before_data", "before_commit"])
def test_kill_between_data_and_commit_in_process(tmp_path, monkeypatch, where):
    """Deterministic companion: the process 'dies' (an exception) right before the marker."""
    from capture import writer as cw

    tensors = fmt.tensor_table([("a", (50,)), ("b", (7,))])
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4, 57)).astype(np.float32)
    sw = cw.StoreWriter(tmp_path / "d.zarr", tensors, param_chunk=16)
    sw.append(0, rows[0], rows[0])
    sw.append(1, rows[1], rows[1])

    class Killed(BaseException):
        pass

    def die(*a, **k):
        raise Killed

    monkeypatch.setattr(sw, "_write_header" if where == "before_commit" else "_ensure_capacity", die)
    with pytest.raises(Killed):
        sw.append(2, rows[2], rows[2])
    monkeypatch.undo()
    assert fmt.read_header(tmp_path / "d.zarr").n_steps == 2
    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="r", use_consolidated=False)
    np.testing.assert_array_equal(g["grad"][:2], rows[:2])
