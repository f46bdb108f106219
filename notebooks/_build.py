"""Builds the notebooks from the cell sources below (run: python notebooks/_build.py).

The notebooks are committed without outputs; tests/test_notebooks.py executes them top to
bottom with small settings (GRADTRACE_NB_QUICK=1) so they cannot rot.
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def md(s):
    return nbf.v4.new_markdown_cell(s.strip())


def code(s):
    return nbf.v4.new_code_cell(s.strip())


quickstart = [
    md("""
# gradtrace quickstart

Record a training run **once** in a plain PyTorch loop, then ask questions of it afterwards
without re-training: a gradient correlation window, the share of entries that flip sign,
and gamma / RSI / EB against the final weights.
"""),
    code("""
import os, time
import numpy as np
import torch
import matplotlib.pyplot as plt
from sklearn.datasets import load_digits

from capture import Recorder
import analysis as ga
from analysis import plots

QUICK = os.environ.get("GRADTRACE_NB_QUICK") == "1"   # the test suite runs this notebook small
STEPS = 40 if QUICK else 200
STORE = "quickstart.zarr"
"""),
    md("""
## 1. Record

Any training loop works: call `rec.record(step, loss=loss)` after `backward()` and before
`opt.step()`. Here: a small CNN on scikit-learn's bundled digits, full-batch gradient
descent at a large learning rate (the zigzag paper's setting). On exit the recorder also
stores the final iterate (the weights after the last update).
"""),
    code("""
X, y = load_digits(return_X_y=True)
X = torch.tensor((X / 16.0 - 0.3) / 0.4, dtype=torch.float32).reshape(-1, 1, 8, 8)
y = torch.tensor(y)

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
)
opt = torch.optim.SGD(model.parameters(), lr=0.1)

t0 = time.perf_counter()
with Recorder(model, STORE, optimizer=opt, overwrite=True) as rec:
    for step in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        rec.record(step, loss=loss, epoch=step)     # full batch: one step per epoch
        opt.step()
        if step % 25 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:5.1f} s", flush=True)
print(f"trained and recorded {STEPS} steps in {time.perf_counter() - t0:.1f} s")
"""),
    md("""
## 2. Open

`open_run` is lazy (xarray + dask); `run.ds` is the labelled Dataset. Plain
`xarray.open_zarr(STORE)` opens the same store without gradtrace.
"""),
    code("""
run = ga.open_run(STORE)
print(run)
run.ds[["loss", "lr", "grad_sqnorm"]].to_dataframe().tail()
"""),
    md("""
## 3. Ask

Three questions, each one pass over the store:
1. the 5 x 5 gradient correlation window at the last steps (zigzag paper, Figure 1);
2. the percentage of gradient entries that flip sign between adjacent steps;
3. gamma = cos(G_t, w_t - w*) against the final iterate (No Wrong Turns), excluding the last step.
"""),
    code("""
last = int(run.grad_steps[-5])
window = ga.corr_window(run, last, h=5)
flips = ga.sign_shift_lag(run, 1)
r = ga.rsi(run, "final", exclude_tail=1)
print(window.round(2).values)
print(f"adjacent steps: {float(flips['sign_shift'][-10:].mean()):.1f}% of entries flip sign over the last 10 steps")
print(f"gamma > 0 on {float((r['gamma'] > 0).mean()) * 100:.0f}% of steps")
"""),
    md("## 4. Plot"),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
plots.plot_loss(run.ds["loss"].sel(step=run.grad_steps), axes[0], markers=[last])
plots.plot_corr_matrix(window, axes[1])
plots.plot_gamma(r, axes[2])
plt.show()
"""),
    md("""
Any other question is one more call: `ga.corr_matrix(run)` for the full T x T matrix,
`ga.mean_corr(run, h=5)`, `ga.rsi(run, reference=120)` for a different reference point,
`ga.layer_table(run)` per layer. From the shell: `gradtrace corr quickstart.zarr --lag 2`,
`gradtrace report quickstart.zarr`.
"""),
]

reproduction = [
    md("""
# Reproducing the papers' statistics with gradtrace

Two findings, each from a run recorded **once**:

1. *Zigzag geometry* (seed 000): under full-batch gradient descent at a large learning rate,
   adjacent gradients first point the same way (smooth), then almost opposite ways (zigzag:
   lag-1 correlation near -1, lag 2 near +1), and most gradient entries flip sign between
   adjacent steps. At a 100x smaller learning rate the run stays smooth.
2. *No Wrong Turns* (seed 001): with minibatch SGD, gamma = cos(G_t, w_t - w*) against the final
   iterate is positive on the large majority of steps; any other reference point costs one
   more pass over the store, not another training run.

The settings are CPU-sized (scikit-learn digits, small CNNs); `docs/reproduction.md` states
where they differ from the papers' CIFAR-10 runs.
"""),
    code("""
import os
import numpy as np
import matplotlib.pyplot as plt

from experiments.recipes import load_config, run_recipe
import analysis as ga
from analysis import plots

QUICK = os.environ.get("GRADTRACE_NB_QUICK") == "1"
"""),
    md("## 1. Zigzag: full-batch GD at a large learning rate, and 100x smaller"),
    code("""
big = load_config("demo-quick" if QUICK else "demo")
small = load_config("demo-quick" if QUICK else "demo", lr=big.lr / 100, steps=60 if QUICK else 300)
# each training prints a progress line every ~5% of its steps (a few minutes in all on 2 cores)
run_recipe(big, "zigzag.zarr", overwrite=True, progress=True)
run_recipe(small, "smooth.zarr", overwrite=True, progress=True)
zz, sm = ga.open_run("zigzag.zarr"), ga.open_run("smooth.zarr")
print(big.lr, small.lr)
"""),
    code("""
ph = ga.phases(zz, h=5)
lag1, lag2 = ga.lag_series(zz, 1), ga.lag_series(zz, 2)
flips = ga.sign_shift_lag(zz, 1)
zig_steps = ph["step"].values[(ph["phase"] == "zigzag").values]


def mean_on(series, steps):
    # mean of a per-step series over the given steps (those it has)
    return float(series.sel(step=np.intersect1d(series["step"].values, steps)).mean())


print("steps per phase:", {k: int((ph["phase"] == k).sum()) for k in ("smooth", "zigzag", "random")})
print(f"zigzag phase: lag-1 correlation {mean_on(lag1, zig_steps):+.2f}, lag-2 {mean_on(lag2, zig_steps):+.2f}, "
      f"{mean_on(flips['sign_shift'], zig_steps):.0f}% of entries flip sign between adjacent steps")
print(f"share of the loss decrease achieved under zigzag: {100 * ph.attrs['zigzag_share']:.0f}%")
print("GAWU change point (first + to - crossing):", ph.attrs["gawu_step"])
print(f"100x smaller lr: adjacent correlation min {float(ga.lag_series(sm, 1).min()):+.3f}")
"""),
    code("""
w = int(zig_steps[len(zig_steps) // 2])
fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), layout="constrained")
plots.plot_mean_corr(ph["mean_corr"], axes[0, 0], markers=[0, w])
plots.plot_phases(ph["phase"], zz.ds["loss"].sel(step=zz.grad_steps), axes[0, 1])
plots.plot_lags({1: lag1, 2: lag2, 3: ga.lag_series(zz, 3)}, axes[0, 2])
plots.plot_corr_matrix(ga.corr_window(zz, 0), axes[1, 0], title="smooth: window at step 0")
plots.plot_corr_matrix(ga.corr_window(zz, w), axes[1, 1], title=f"zigzag: window at step {w}")
plots.plot_sign_shift_matrix(ga.sign_shift_window(zz, w)["sign_shift"], axes[1, 2])
plt.show()
"""),
    md("""
## 2. No Wrong Turns: gamma against the final iterate, and against any other reference

Minibatch SGD on digits. The reference point is chosen *after* training: the final iterate
(the paper's choice), the mean of the last iterates, or an early iterate.
"""),
    code("""
nwt = load_config("nwt-cnn3-digits", epochs=2 if QUICK else 8)
run_recipe(nwt, "nwt.zarr", overwrite=True, progress=True)
run = ga.open_run("nwt.zarr")
last = run.grad_steps[-10:]
refs = {"final iterate": "final", "mean of the last 10 iterates": slice(int(last[0]), int(last[-1])),
        f"step {int(run.grad_steps[len(run.grad_steps) // 2])}": int(run.grad_steps[len(run.grad_steps) // 2])}
results = {name: ga.rsi(run, ref, exclude_tail=1) for name, ref in refs.items()}
for name, r in results.items():
    g = r["gamma"].values
    print(f"{name:32s} gamma > 0 on {100 * np.mean(g[np.isfinite(g)] > 0):.0f}% of steps")
"""),
    code("""
r = results["final iterate"]
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
plots.plot_gamma(r, axes[0])
plots.plot_rsi(r, axes[1])
plots.plot_eta_star(r, axes[2])
plt.show()
ga.by_epoch(r)[["gamma_mean", "gamma_min", "gamma_max"]].to_dataframe()
"""),
]


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, HERE / name)


if __name__ == "__main__":
    write("quickstart.ipynb", quickstart)
    write("reproduction.ipynb", reproduction)
