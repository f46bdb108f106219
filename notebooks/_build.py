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


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, HERE / name)


if __name__ == "__main__":
    write("quickstart.ipynb", quickstart)
