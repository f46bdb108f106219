"""Shared by the callback tests: read a store's rows, check the SGD update."""

import numpy as np

import analysis as ga

LR = 0.05
TOL = 1e-5


def rows(path):
    """(steps, G (n, d), W (n + 1, d) with the final iterate, loss, lr, epoch) in float64."""
    run = ga.open_run(path)
    g = run.grad_steps
    assert run.final_step == int(g[-1]) + 1
    ds = run.ds
    G = np.asarray(ds["grad"].sel(step=g).values, np.float64)
    W = np.asarray(ds["weight"].sel(step=list(g) + [run.final_step]).values, np.float64)
    pick = ds.sel(step=g)
    return (g, G, W, np.asarray(pick["loss"].values), np.asarray(pick["lr"].values),
            np.asarray(pick["epoch"].values), run)


def assert_sgd_rows(G, W, scale=None):
    """w_{t+1} = w_t - lr * c_t G_t for every row (c_t = 1 unless given)."""
    c = np.ones(len(G)) if scale is None else np.asarray(scale)
    err = np.abs(W[1:] - (W[:-1] - LR * c[:, None] * G)).max()
    assert err <= TOL, f"w_(t+1) - (w_t - lr G_t) reaches {err:.2e}"


def clip_coef(G, max_norm):
    """torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (||G|| + 1e-6)), per row."""
    n = np.sqrt((G * G).sum(axis=1))
    return np.minimum(1.0, max_norm / (n + 1e-6))


