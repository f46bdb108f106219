"""RSI / EB / gamma / eta* / distance against slow float64 loops, every kind of reference."""

import numpy as np
import pytest

import analysis as ga
from analysis import engine
from tests.helpers_stores import count_decodes, dot, make_store, slow_rsi

TOL = 1e-10
METRICS = ("rsi", "eb", "gamma", "eta_star", "distance")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("rsi") / "run.zarr", steps=12, seed=4)


def check(ds, G, W, ref, steps):
    assert list(ds["step"].values) == list(steps)
    for k, t in enumerate(steps):
        want = slow_rsi(G[t], W[t], ref)
        for m in METRICS:
            got = ds[m].values[k]
            if np.isnan(want[m]):
                assert np.isnan(got), (m, t)
            else:
                assert abs(got - want[m]) <= TOL * max(1.0, abs(want[m])), (m, t, got, want[m])


def test_final_iterate_reference(data):
    r = ga.rsi(data.path)
    check(r, data.grads, data.weights, data.final_weight, range(12))
    assert r.attrs["reference"] == "final iterate (step 12)" and r.attrs["tier"] == "lossless"
    np.testing.assert_allclose(r.random_walk.values, (12 - np.arange(12.0)) ** -0.5)
    # gamma = RSI / EB and eta* = RSI / EB^2 exactly as docs/methods.md states
    np.testing.assert_allclose(r.gamma.values, r.rsi.values / r.eb.values, rtol=1e-12)
    np.testing.assert_allclose(r.eta_star.values, r.rsi.values / r.eb.values**2, rtol=1e-12)
    for c in ("epoch", "lr", "loss"):
        assert c in r.coords


def test_direct_gamma_with_final_reference(data):
    """gamma_t = cos(G_t, w_t - w_T), computed directly with numpy in float64."""
    r = ga.rsi(data.path)
    D = data.weights.astype(np.float64) - data.final_weight.astype(np.float64)
    G = data.grads.astype(np.float64)
    gamma = (G * D).sum(1) / (np.linalg.norm(G, axis=1) * np.linalg.norm(D, axis=1))
    np.testing.assert_allclose(r.gamma.values, gamma, atol=1e-12)


def test_step_range_array_and_file_references(data, tmp_path):
    check(ga.rsi(data.path, reference=5), data.grads, data.weights, data.weights[5], range(12))
    mean = data.weights[2:6].astype(np.float64).mean(0)
    r = ga.rsi(data.path, reference=slice(2, 5))
    check(r, data.grads, data.weights, mean, range(12))
    assert "mean of the weights at 4 steps 2..5" in r.attrs["reference"]
    assert ga.rsi(data.path, reference="mean:2:5").gamma.equals(r.gamma)
    assert ga.rsi(data.path, reference="step:5").gamma.equals(ga.rsi(data.path, reference=5).gamma)
    vec = np.random.default_rng(9).standard_normal(data.d)
    check(ga.rsi(data.path, reference=vec), data.grads, data.weights, vec, range(12))
    np.save(tmp_path / "ref.npy", vec.astype(np.float32))
    check(ga.rsi(data.path, reference=tmp_path / "ref.npy"), data.grads, data.weights, vec.astype(np.float32),
          range(12))
    sd = {t.name: vec[t.offset: t.offset + t.size].reshape(t.shape) for t in data.tensors}
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "ref.safetensors"))
    check(ga.rsi(data.path, reference=str(tmp_path / "ref.safetensors")), data.grads, data.weights, vec, range(12))
    check(ga.rsi(data.path, reference={"state_dict": {"module." + k: v for k, v in sd.items()}}),
          data.grads, data.weights, vec, range(12))


def test_torch_checkpoint_reference(data, tmp_path):
    torch = pytest.importorskip("torch")
    vec = np.random.default_rng(10).standard_normal(data.d)
    sd = {t.name: torch.tensor(vec[t.offset: t.offset + t.size].reshape(t.shape)) for t in data.tensors}
    sd["bn.running_mean"] = torch.zeros(3)
    torch.save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(ga.BadReferenceError, match="bn.running_mean.*strict=False"):
        ga.rsi(data.path, reference=tmp_path / "ckpt.pt")
    r = ga.rsi(data.path, reference=tmp_path / "ckpt.pt", strict=False)
    check(r, data.grads, data.weights, vec, range(12))
    assert r.attrs["reference"] == "checkpoint ckpt.pt"


def test_one_checkpoint_unwrapper():
    """analysis.reference.unwrap_checkpoint is the one place (RSI references and the
    interpolation endpoints) that finds the state dict inside a checkpoint dict."""
    from analysis.reference import CHECKPOINT_KEYS, unwrap_checkpoint

    sd = {"fc.weight": np.zeros((2, 2)), "fc.bias": np.zeros(2)}
    assert unwrap_checkpoint(sd) is sd
    for key in CHECKPOINT_KEYS:
        assert unwrap_checkpoint({key: sd, "epoch": 3, "optimizer": {"lr": 0.1}}) is sd
    assert unwrap_checkpoint({"model": {"x": 1}, "state_dict": sd}) is sd  # the keys' order decides
    with pytest.raises(ga.BadReferenceError, match="ck.pt holds a list, not a state dict"):
        unwrap_checkpoint([sd], "ck.pt")


def test_bad_references(data, tmp_path):
    d = data.d
    with pytest.raises(ga.BadReferenceError, match=f"shape \\({d - 1},\\).*d = {d}"):
        ga.rsi(data.path, reference=np.zeros(d - 1))
    bad = np.zeros(d)
    bad[80] = np.nan
    with pytest.raises(ga.BadReferenceError, match="NaN/Inf \\(first at index 80, tensor 'fc1.weight'"):
        ga.rsi(data.path, reference=bad)
    sd = {t.name: np.zeros(t.shape) for t in data.tensors}
    with pytest.raises(ga.BadReferenceError, match="lacks 1 parameter tensor.*fc2.weight"):
        ga.rsi(data.path, reference={k: v for k, v in sd.items() if k != "fc2.weight"})
    with pytest.raises(ga.BadReferenceError, match="'conv.bias' has shape \\(2, 2\\), the store records \\(4,\\)"):
        ga.rsi(data.path, reference={**sd, "conv.bias": np.zeros((2, 2))})
    with pytest.raises(ga.BadReferenceError, match="does not exist"):
        ga.rsi(data.path, reference=tmp_path / "missing.npy")
    (tmp_path / "ref.txt").write_text("1 2 3")
    with pytest.raises(ga.BadReferenceError, match="unknown type '.txt'"):
        ga.rsi(data.path, reference=tmp_path / "ref.txt")
    with pytest.raises(ga.StepNotFoundError, match="step 99 is not recorded"):
        ga.rsi(data.path, reference=99)
    nofinal = make_store(tmp_path / "nofinal.zarr", steps=4, final=False)
    with pytest.raises(ga.BadReferenceError, match="no final iterate"):
        ga.rsi(nofinal.path)


def test_reference_equal_to_an_iterate_and_zero_gradient(tmp_path):
    base = make_store(tmp_path / "a.zarr", steps=6, seed=5)
    g = base.grads.copy()
    g[1] = 0.0
    d = make_store(tmp_path / "b.zarr", steps=6, grads=g, weights=base.weights)
    r = ga.rsi(d.path, reference=3)  # w_3 == w*: distance 0 at step 3
    assert r.zero_distance.values.tolist() == [False, False, False, True, False, False]
    assert r.distance.values[3] == 0.0
    for m in ("rsi", "eb", "gamma", "eta_star"):
        assert np.isnan(r[m].values[3])
    assert r.zero_grad.values[1] and np.isnan(r.gamma.values[1]) and np.isnan(r.eta_star.values[1])
    assert r.rsi.values[1] == 0.0 and r.eb.values[1] == 0.0  # defined: <0, w - w*> / ||w - w*||^2
    check(r.drop_sel(step=[1, 3]), d.grads, d.weights, d.weights[3], [0, 2, 4, 5])


def test_reference_close_to_the_iterates_keeps_full_precision(tmp_path):
    """||w_t - w*|| ~ 1e-6 ||w||: the ||w||^2 - 2<w,w*> + ||w*||^2 route would lose ~12 digits."""
    rng = np.random.default_rng(6)
    T, d = 5, 400
    w0 = (100.0 + rng.standard_normal(d)).astype(np.float32)
    W = np.stack([w0 + np.float32(1e-3) * (T - t) * rng.standard_normal(d).astype(np.float32) for t in range(T)])
    G = rng.standard_normal((T, d)).astype(np.float32)
    data = make_store(tmp_path / "near.zarr", steps=T, shapes=(("w", (d,)),), grads=G, weights=W, final_weight=w0)
    r = ga.rsi(data.path)
    check(r, data.grads, data.weights, data.final_weight, range(T))
    W64 = data.weights.astype(np.float64)
    cancel = (np.einsum("ij,ij->i", W64, W64) + dot(w0, w0)) / r.distance.values**2
    assert cancel.max() > 1e7  # the case the direct route is for


def test_exclude_tail_and_by_epoch(data):
    r = ga.rsi(data.path, exclude_tail=3)
    assert list(r["step"].values) == list(range(9)) and r.attrs["excluded_steps"] == 3
    e = ga.rsi(data.path, exclude_tail="epoch")  # epochs: step // 4 -> last epoch is steps 8..11
    assert list(e["step"].values) == list(range(8))
    agg = ga.by_epoch(ga.rsi(data.path))
    assert list(agg["epoch"].values) == [0, 1, 2] and list(agg["n_steps"].values) == [4, 4, 4]
    full = ga.rsi(data.path)
    np.testing.assert_allclose(agg.gamma_mean.values, full.gamma.values.reshape(3, 4).mean(1))
    np.testing.assert_allclose(agg.eb_min.values, full.eb.values.reshape(3, 4).min(1))
    np.testing.assert_allclose(agg.rsi_max.values, full.rsi.values.reshape(3, 4).max(1))
    with pytest.raises(ga.AnalysisError, match="removes every selected step"):
        ga.rsi(data.path, steps=slice(10, 11), exclude_tail=2)
    with pytest.raises(ga.AnalysisError, match="'epoch'"):
        ga.rsi(data.path, exclude_tail="last")


def test_param_group_and_steps(data):
    r = ga.rsi(data.path, steps=[1, 4], params="fc*")
    cols = np.r_[data.tensor_slice("fc1.weight"), data.tensor_slice("fc1.bias"), data.tensor_slice("fc2.weight")]
    check(r, data.grads[:, cols], data.weights[:, cols], data.final_weight[cols], [1, 4])
    assert r.attrs["params"] == "fc*"


def test_lossy_tiers_carry_their_error(tmp_path):
    rounded = make_store(tmp_path / "r.zarr", steps=8, tiers="rounded:7", seed=7)
    r = ga.rsi(rounded.path)
    for t in range(8):  # dot products from the stored (rounded) values, ||G|| the exact stored norm
        want = slow_rsi(rounded.grads[t], rounded.weights[t], rounded.final_weight)
        assert abs(r.rsi.values[t] - want["rsi"]) <= TOL * abs(want["rsi"])
        assert abs(r.distance.values[t] - want["distance"]) <= TOL * want["distance"]
        exact_norm = np.sqrt(dot(rounded.raw_grads[t], rounded.raw_grads[t]))
        assert abs(r.eb.values[t] - exact_norm / want["distance"]) <= TOL * r.eb.values[t]
    true = np.array([slow_rsi(rounded.raw_grads[t], rounded.raw_weights[t], rounded.final_weight)["gamma"]
                     for t in range(8)])
    assert (np.abs(r.gamma.values - true) <= r.gamma_error_bound.values).all()
    assert r.attrs["grad_max_rel_error"] == 2.0**-8
    shapes = (("big", (400,)), ("small", (6,)))
    sk = make_store(tmp_path / "s.zarr", steps=8, tiers="sketch:128", shapes=shapes, seed=8)
    s = ga.rsi(sk.path)
    true = np.array([slow_rsi(sk.raw_grads[t], sk.raw_weights[t], sk.final_weight)["gamma"] for t in range(8)])
    assert s.attrs["tier"] == "sketch" and "gamma_stderr" in s
    assert (np.abs(s.gamma.values - true) <= 5 * s.gamma_stderr.values + 0.05).all()
    mixed = make_store(tmp_path / "m.zarr", steps=3, tiers={"grad": "sketch:64", "weight": "lossless"})
    with pytest.raises(ga.TierError, match="same space"):
        ga.rsi(mixed.path)



def test_many_steps_cut_rows_not_chunks(data, monkeypatch):
    """With many steps the RSI pass cuts its rows into blocks of whole chunks: every chunk
    of grad and weight is decoded exactly once, and each task holds at most SLAB_BYTES."""
    run = ga.open_run(data.path)
    cw = run.chunk_width("grad")
    monkeypatch.setattr(engine, "SLAB_BYTES", 4 * cw * 4)  # 4 rows of one chunk: 2 steps
    monkeypatch.setattr(engine, "CHUNK_SLAB_BYTES", 4 * cw * 4)  # (a chunk used to be cut in 8)
    monkeypatch.setattr(engine, "MIN_SLAB_COLS", 2)
    decodes, reads = count_decodes(monkeypatch)
    vec = np.random.default_rng(3).standard_normal(data.d)
    check(ga.rsi(run, reference=vec), data.grads, data.weights, vec, range(12))
    n_chunks = -(-data.d // cw)
    assert decodes == {(a, t, c): 1 for a in ("grad", "weight") for t in range(12) for c in range(n_chunks)}
    assert max(n for _, n, _, _ in reads) == 2 and all(lo % cw == 0 for _, _, lo, _ in reads)
    # references made of store rows: formed once per slab, not re-read by every block
    decodes.clear()
    check(ga.rsi(run), data.grads, data.weights, data.final_weight, range(12))
    assert decodes == {**{(a, t, c): 1 for a in ("grad", "weight") for t in range(12) for c in range(n_chunks)},
                       **{("weight", 12, c): 1 for c in range(n_chunks)}}  # the final iterate
    decodes.clear()
    mean = data.weights[2:6].astype(np.float64).mean(0)
    check(ga.rsi(run, reference=slice(2, 5)), data.grads, data.weights, mean, range(12))
    assert {k for k, n in decodes.items() if n == 2} == {("weight", t, c) for t in range(2, 6) for c in range(n_chunks)}
    assert max(decodes.values()) == 2  # steps 2..5: for the reference, and as steps
    # more reference rows than a slab holds: summed in row blocks
    mean = data.weights[:12].astype(np.float64).mean(0)
    check(ga.rsi(run, reference=slice(0, 11)), data.grads, data.weights, mean, range(12))
    # a step selection, a parameter group
    check(ga.rsi(run, steps=[1, 4, 5, 9]), data.grads, data.weights, data.final_weight, [1, 4, 5, 9])
    r = ga.rsi(run, reference=vec, params="fc*")
    cols = np.r_[data.tensor_slice("fc1.weight"), data.tensor_slice("fc1.bias"), data.tensor_slice("fc2.weight")]
    check(r, data.grads[:, cols], data.weights[:, cols], vec[cols], range(12))


# ---------------------------------------------------------------- direction= (NWT code's variants)

def check_dir(ds, D, W, ref, steps):
    """``D`` (T, d) float64 directions: the metrics of every step against slow_rsi."""
    for k, t in enumerate(steps):
        want = slow_rsi(D[t], W[t], ref)
        for m in METRICS:
            got = ds[m].values[k]
            if np.isnan(want[m]):
                assert np.isnan(got), (m, t)
            else:
                assert abs(got - want[m]) <= TOL * max(1.0, abs(want[m])), (m, t, got, want[m])


def lam_vector(data, per_name):
    lam = np.zeros(data.weights.shape[1])
    for t in data.tensors:
        lam[t.offset: t.offset + t.size] = per_name.get(t.name, 0.0)
    return lam


@pytest.mark.parametrize("slab", [None, 1])
def test_direction_gradient_plus_wd(data, slab, monkeypatch):
    if slab:
        monkeypatch.setattr(engine, "SLAB_BYTES", slab)  # many slabs, reference rows read per slab
    W, G = data.weights.astype(np.float64), data.grads.astype(np.float64)
    r = ga.rsi(data.path, direction="gradient+wd", weight_decay=5e-4)
    check_dir(r, G + 5e-4 * W, W, data.final_weight, range(12))
    assert r.attrs["direction"] == "gradient+wd" and "lambda w_t" in r.attrs["direction_definition"]
    assert r.gamma.attrs["direction"] == "gradient+wd"
    per = {"conv.weight": 0.3, "fc1.weight": 0.05}  # large and per tensor, so a wrong mapping shows
    r = ga.rsi(data.path, 3, direction="gradient+wd", weight_decay={"conv.weight": 0.3, "fc1.w*": 0.05})
    check_dir(r, G + lam_vector(data, per) * W, W, data.weights[3], range(12))
    assert np.isnan(r.gamma.values[3]) and r.zero_distance.values[3]
    ref = np.random.default_rng(0).standard_normal(W.shape[1])
    r = ga.rsi(data.path, ref, params="fc*", direction="gradient+wd", weight_decay=0.1)
    cols = np.concatenate([np.arange(t.offset, t.offset + t.size) for t in data.tensors if t.name.startswith("fc")])
    check_dir(r, (G + 0.1 * W)[:, cols], W[:, cols], ref[cols], range(12))
    # lambda = 0 is the plain gradient direction (stored ||G||^2 vs the pass's own: float64 rounding)
    r0, rg = ga.rsi(data.path, direction="gradient+wd", weight_decay=0.0), ga.rsi(data.path)
    for m in METRICS:
        np.testing.assert_allclose(r0[m].values, rg[m].values, rtol=1e-12)


@pytest.mark.parametrize("slab", [None, 1])
def test_direction_update(data, slab, monkeypatch):
    if slab:
        monkeypatch.setattr(engine, "SLAB_BYTES", slab)
    W = np.vstack([data.weights, data.final_weight[None]]).astype(np.float64)
    D = (W[:-1] - W[1:]) / data.lrs[:, None]  # w_12 is the final iterate
    r = ga.rsi(data.path, slice(8, 11), direction="update")
    check_dir(r, D, W, W[8:12].mean(axis=0), range(12))
    assert r.attrs["direction"] == "update" and not r.no_next_weight.values.any()
    # plain SGD: the update direction is the gradient up to float32 rounding of the weights
    rg = ga.rsi(data.path, slice(8, 11))
    np.testing.assert_allclose(r.gamma.values, rg.gamma.values, atol=1e-3)


def test_direction_update_sparse_and_bad_input(tmp_path):
    d = make_store(tmp_path / "sparse.zarr", steps=[0, 1, 2, 5, 6], seed=2)
    with pytest.warns(RuntimeWarning, match="1 of 5 steps have no recorded weights at t \\+ 1 \\(first: step 2\\)"):
        r = ga.rsi(d.path, direction="update")
    assert list(r.no_next_weight.values) == [False, False, True, False, False]  # 2 -> 3 missing; 6 -> 7 final
    assert np.isnan(r.gamma.values[2]) and np.isfinite(r.gamma.values[[0, 1, 3, 4]]).all()
    W = d.weights.astype(np.float64)
    want = slow_rsi((W[0] - W[1]) / 0.1, W[0], d.final_weight)
    assert abs(r.rsi.values[0] - want["rsi"]) <= TOL * abs(want["rsi"])
    with pytest.raises(ga.AnalysisError, match="direction='grad'"):
        ga.rsi(d.path, direction="grad")
    with pytest.raises(ga.AnalysisError, match="weight_decay= is used by direction='gradient\\+wd' only"):
        ga.rsi(d.path, weight_decay=0.1)
    with pytest.raises(ga.AnalysisError, match="records no optimizer param_groups.*pass weight_decay="):
        ga.rsi(d.path, direction="gradient+wd")
    with pytest.raises(ga.AnalysisError, match="'nope' matches no parameter tensor"):
        ga.rsi(d.path, direction="gradient+wd", weight_decay={"nope": 1.0})
    rd = make_store(tmp_path / "rounded.zarr", steps=4, tiers="rounded:7", seed=2)
    with pytest.raises(ga.TierError, match="needs lossless weights"):
        ga.rsi(rd.path, direction="update")
    sk = make_store(tmp_path / "sketch.zarr", steps=4, tiers="sketch:64", seed=2)
    with pytest.raises(ga.TierError, match="needs dense grad and weight tiers"):
        ga.rsi(sk.path, direction="gradient+wd", weight_decay=0.1)


def test_directions_cut_rows_not_chunks(data, monkeypatch):
    """The direction passes are row-wise too: with many steps their rows are cut into blocks
    of whole chunks (each chunk decoded at most twice: a block's partner row), and every value
    equals the unblocked pass's."""
    run = ga.open_run(data.path)
    whole = {d: ga.rsi(run, direction=d, **kw) for d, kw in
             (("gradient+wd", {"weight_decay": 0.05}), ("update", {}))}
    whole_ref = ga.rsi(run, slice(2, 5), direction="update")
    cw = run.chunk_width("grad")
    monkeypatch.setattr(engine, "SLAB_BYTES", 4 * cw * 4)
    monkeypatch.setattr(engine, "CHUNK_SLAB_BYTES", 4 * cw * 4)
    monkeypatch.setattr(engine, "MIN_SLAB_COLS", 2)
    decodes, reads = count_decodes(monkeypatch)
    n_chunks = -(-data.d // cw)
    W = np.vstack([data.weights, data.final_weight[None]]).astype(np.float64)
    for d, kw in (("gradient+wd", {"weight_decay": 0.05}), ("update", {})):
        decodes.clear()
        r = ga.rsi(run, direction=d, **kw)
        for m in METRICS:
            np.testing.assert_allclose(r[m].values, whole[d][m].values, rtol=1e-13)
        D = data.grads + 0.05 * W[:-1] if d == "gradient+wd" else (W[:-1] - W[1:]) / data.lrs[:, None]
        check_dir(r, D, W, W[-1], range(12))
        assert all(lo % cw == 0 for _, _, lo, _ in reads) and max(decodes.values()) <= 2
        assert max(n for _, n, _, _ in reads) <= 4  # row blocks of whole chunks, not all 13 rows
        reads.clear()
        assert {c for (_, _, c) in decodes} == set(range(n_chunks))
    r = ga.rsi(run, slice(2, 5), direction="update")  # a reference of store rows, formed once per slab
    for m in METRICS:
        np.testing.assert_allclose(r[m].values, whole_ref[m].values, rtol=1e-13)


def test_weight_decay_from_the_header(tmp_path):
    """settings["param_groups"] + settings["param_group_of"] give each tensor its lambda."""
    from gradtrace_format import format as fmt
    from capture.writer import StoreWriter

    d = make_store(tmp_path / "h.zarr", steps=4, seed=1)
    names = [t.name for t in d.tensors]
    of = [0 if n.endswith("weight") else 1 for n in names]
    for settings, match in (({"param_groups": [{"weight_decay": 0.2}, {"weight_decay": 0.0}], "param_group_of": of},
                             None),
                            ({"param_groups": [{"weight_decay": 0.2}, {"weight_decay": 0.0}]}, "does not record which"),
                            ({"param_groups": [{"weight_decay": 0.2}], "param_group_of": [0, None, 0, 0, 0]},
                             "in no recorded optimizer group")):
        path = tmp_path / f"s{len(settings)}{match is None}.zarr"
        w = StoreWriter(path, d.tensors, d.tiers, mode="overwrite", param_chunk=16, settings=settings)
        for k in range(4):
            w.append(k, d.raw_grads[k], d.raw_weights[k], loss=1.0, lr=0.1, epoch=0)
        w.close(final_weight=d.final_weight)
        if match:
            with pytest.raises(ga.AnalysisError, match=match):
                ga.rsi(path, direction="gradient+wd")
            continue
        r = ga.rsi(path, direction="gradient+wd")
        lam = lam_vector(d, {n: 0.2 for n in names if n.endswith("weight")})
        W = d.weights.astype(np.float64)
        check_dir(r, d.grads + lam * W, W, d.final_weight, range(4))
        assert "conv.weight=0.2" in r.attrs["weight_decay"] and "conv.bias=0" in r.attrs["weight_decay"]
    assert fmt.read_header(tmp_path / "s2True.zarr").settings["param_group_of"] == of


def test_parse_reference_is_the_one_text_parser(data, tmp_path):
    from analysis.reference import parse_reference
    from gradtrace import cli

    assert parse_reference(" Final ") == "final"
    assert parse_reference("step:7") == 7 and parse_reference("STEP:7") == 7
    assert parse_reference("mean:3:9") == slice(3, 9)
    (tmp_path / "step:2").write_bytes(b"")  # an existing file is a file, whatever its name
    assert parse_reference(str(tmp_path / "step:2")) == str(tmp_path / "step:2")
    for text, why in (("step:x", "'step:N' needs an integer"), ("mean:1", "'mean:A:B' needs two integer"),
                      ("mean:1:b", "'mean:A:B' needs two integer"), ("nowhere.npy", "does not exist as a file")):
        with pytest.raises(ga.BadReferenceError, match=why):
            parse_reference(text)
        with pytest.raises(cli.UserError, match="--ref: reference .*" + why):
            cli.parse_ref(text)  # the command line asks the same parser
    # the library reads the text forms through it: step:N is that step's weights
    a = ga.rsi(data.path, reference="step:2")
    b = ga.rsi(data.path, reference=2)
    np.testing.assert_allclose(a["rsi"].values, b["rsi"].values, rtol=1e-12, equal_nan=True)
    with pytest.raises(ga.BadReferenceError, match="'mean:A:B' needs"):
        ga.rsi(data.path, reference="mean:0")
