"""Lossy tiers on real gradients (a small CNN in training): each stays inside its stated error."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr
import zarr

from gradtrace_format import format as fmt
from capture import Recorder
from tests.helpers_stores import chunk_span

STEPS = 6


@pytest.fixture(scope="module")
def cnn_run():
    """Gradients and weights of a small ReLU CNN, computed here, as the ground truth."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    x = torch.randn(64, 3, 16, 16)
    y = torch.randint(0, 10, (64,))
    return model, x, y


def record(model, x, y, path, tiers):
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grads, weights = [], []
    with Recorder(model, path, opt, tiers=tiers) as rec:
        for step in range(STEPS):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
            weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy())
            rec.record(step, loss=loss)
            opt.step()
            opt.zero_grad()
    model.load_state_dict(init)
    return np.stack(grads), np.stack(weights)


def test_uncompressed_lossless_is_exact_and_raw_on_disk(cnn_run, tmp_path):
    """``lossless:raw``: the chunks are the float32 bytes themselves, read back exactly."""
    model, x, y = cnn_run
    path = tmp_path / "raw.zarr"
    grads, weights = record(model, x, y, path, {"grad": "lossless:raw", "weight": "lossless"})
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds.grad.values[:STEPS], grads)
    np.testing.assert_array_equal(ds.weight.values[:STEPS], weights)
    group = zarr.open_group(str(path), mode="r")
    # raw: only the crc32c checksum after the float32 bytes; lossless: Blosc then the checksum
    assert [type(c).__name__ for c in group["grad"].compressors] == ["Crc32cCodec"]
    assert [type(c).__name__ for c in group["weight"].compressors] == ["BloscCodec", "Crc32cCodec"]
    chunk = group["grad"].chunks[1]
    file, off, nb = chunk_span(path, "grad", 0, 0)  # the chunk, inside its shard file
    first = file.read_bytes()[off: off + nb]
    assert first[:-4] == grads[0, :chunk].astype("<f4").tobytes() and len(first) == 4 * chunk + 4
    assert fmt.read_header(path).tiers["grad"] == fmt.Tier("lossless", compress=False)
    import analysis as ga

    g64 = grads.astype(np.float64)
    n = np.linalg.norm(g64, axis=1)
    corr = ga.corr_matrix(ga.open_run(path))
    np.testing.assert_allclose(corr.values, g64 @ g64.T / np.outer(n, n), rtol=0, atol=1e-12)
    assert corr.attrs["tier"] == "lossless"


@pytest.mark.parametrize("keepbits", [4, 7, 12])
def test_rounded_tier_error_bound_and_exact_signs(cnn_run, tmp_path, keepbits):
    model, x, y = cnn_run
    g, w = record(model, x, y, tmp_path / "r.zarr", f"rounded:{keepbits}")
    ds = xr.open_zarr(tmp_path / "r.zarr")
    assert ds.grad.attrs["gradtrace_tier"]["max_rel_error"] == 2.0 ** -(keepbits + 1)
    assert (g == 0).any()  # ReLU nets have exact-zero gradient entries: they must stay zero
    for stored, raw in ((ds.grad.values[:STEPS], g), (ds.weight.values[:STEPS], w)):
        nz = raw != 0
        rel = np.abs(stored[nz].astype(np.float64) - raw[nz]) / np.abs(raw[nz].astype(np.float64))
        assert rel.max() <= 2.0 ** -(keepbits + 1)
        assert rel.max() > 2.0 ** -(keepbits + 3)  # really rounded
        np.testing.assert_array_equal(np.sign(stored), np.sign(raw))
    # the per-step scalars are computed from the exact gradient, in float64
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(ds.grad_sqnorm.values[:STEPS], (g64**2).sum(1), rtol=1e-12)


def test_sketch_tier_cosines_within_stated_error_and_exact_sign_bits(cnn_run, tmp_path):
    model, x, y = cnn_run
    k = 512
    g, w = record(model, x, y, tmp_path / "s.zarr", f"sketch:{k}")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    header = fmt.read_header(tmp_path / "s.zarr")
    d = header.n_params
    sk = np.asarray(group["grad_sketch"][:STEPS], dtype=np.float64)
    plan = fmt.SketchPlan.from_json(group["grad_sketch"].attrs["sketch_plan"])
    # the stored sketch is the documented CountSketch of the exact gradient
    sketcher = fmt.Sketcher(header.tensors, plan)
    np.testing.assert_allclose(sk[2], sketcher(g[2]), rtol=1e-6, atol=1e-9)
    assert not all(plan.exact) and any(plan.exact)
    # cosines: unbiased estimates within a few standard errors of the per-tensor bound
    g64 = g.astype(np.float64)
    norms = np.linalg.norm(g64, axis=1)
    true = (g64 @ g64.T) / np.outer(norms, norms)
    est = (sk @ sk.T) / np.outer(norms, norms)  # exact norms are stored (grad_sqnorm)
    sq = np.stack([[np.sum(g64[s, t.offset : t.offset + t.size] ** 2) for t in header.tensors] for s in range(STEPS)])
    np.testing.assert_allclose(np.asarray(group["grad_sqnorm_tensor"][:STEPS]), sq, rtol=1e-12)
    bound = fmt.sketch_cosine_stderr_tensors(plan, sq[:, None, :], sq[None, :, :])
    z = np.abs(est - true) / bound
    assert z.max() < 5.0, z
    assert np.abs(est - true).max() > 1e-4  # an estimate, not a copy: the test can tell
    # sign and non-zero bits are exact
    for a, raw in (("grad", g), ("weight", w)):
        sb = np.unpackbits(np.asarray(group[f"{a}_signbits"][:STEPS]), axis=1)[:, :d].astype(bool)
        nzb = np.unpackbits(np.asarray(group[f"{a}_nonzero"][:STEPS]), axis=1)[:, :d].astype(bool)
        np.testing.assert_array_equal(sb, raw < 0)
        np.testing.assert_array_equal(nzb, raw != 0)
    # the final iterate has weight bits and no gradient bits
    assert np.asarray(group["grad_signbits"][STEPS]).sum() == 0
    assert np.isnan(np.asarray(group["grad_sketch"][STEPS])).all()
