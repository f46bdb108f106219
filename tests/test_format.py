"""The format module: tiers, bit rounding, chunk rows, header round trip (numpy only)."""

import json

import numpy as np
import pytest

from gradtrace_format import format as fmt


def test_tier_parsing_and_errors():
    assert fmt.Tier.parse("lossless") == fmt.Tier("lossless")
    assert fmt.Tier.parse("rounded:10").keepbits == 10
    assert fmt.Tier.parse("bf16") == fmt.Tier("rounded", keepbits=7)
    assert fmt.Tier.parse("sketch:4096").sketch_dim == 4096
    raw = fmt.Tier.parse("lossless:raw")
    assert raw == fmt.Tier("lossless", compress=False) and raw != fmt.Tier("lossless")
    assert fmt.Tier.from_json(raw.to_json()) == raw and raw.max_rel_error == 0.0
    assert "compress" not in fmt.Tier("lossless").to_json()  # older headers read as before
    specs = {s.name: s for s in fmt.array_specs(fmt.tensor_table([("a", (10,))]), {"grad": raw, "weight": fmt.Tier()})}
    assert specs["grad"].codecs == "raw" and [type(c).__name__ for c in fmt.codecs_for("raw")] == ["Crc32cCodec"] and specs["weight"].codecs == "lossless"
    with pytest.raises(ValueError, match="lossless tier only"):
        fmt.Tier("rounded", compress=False)
    t = fmt.Tier("rounded", keepbits=5)
    assert fmt.Tier.from_json(t.to_json()) == t
    assert t.max_rel_error == 2.0**-6
    for bad, msg in (("zip", "unknown fidelity tier"), ("rounded:x", "integer"), ("rounded:30", "out of range"),
                     ("lossless:3", "':raw'")):
        with pytest.raises(ValueError, match=msg):
            fmt.Tier.parse(bad)


@pytest.mark.parametrize("keepbits", [1, 4, 7, 10, 16, 22])
def test_bitround_error_bound_signs_and_specials(keepbits):
    rng = np.random.default_rng(keepbits)
    x = np.concatenate([
        rng.standard_normal(50_000) * np.exp(rng.uniform(-30, 30, 50_000)),
        [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0 + 2.0**-keepbits, np.finfo(np.float32).max / 2],
    ]).astype(np.float32)
    r = fmt.bitround(x, keepbits)
    normal = np.isfinite(x) & (np.abs(x) >= np.finfo(np.float32).tiny) & np.isfinite(r)
    rel = np.abs(r[normal].astype(np.float64) - x[normal]) / np.abs(x[normal].astype(np.float64))
    assert rel.max() <= 2.0 ** -(keepbits + 1)
    assert rel.max() > 2.0 ** -(keepbits + 1) / 4  # the bound is reached, not vacuous
    np.testing.assert_array_equal(np.signbit(r[~np.isnan(x)]), np.signbit(x[~np.isnan(x)]))
    np.testing.assert_array_equal(r == 0, x == 0)
    assert np.isnan(r[np.isnan(x)]).all() and np.array_equal(r[np.isinf(x)], x[np.isinf(x)])
    # the kept bits are all there are: rounding again changes nothing
    np.testing.assert_array_equal(fmt.bitround(r, keepbits), r)


def test_scalar_chunk_rows():
    assert fmt.scalar_chunk_rows(None) == fmt.SCALAR_CHUNK
    assert fmt.scalar_chunk_rows(2) == fmt.SCALAR_CHUNK
    assert fmt.scalar_chunk_rows(62) == 128  # 128 * 62 * 8 bytes <= 64 KiB
    assert fmt.scalar_chunk_rows(100_000) == 16
    for width in (1, 3, 62, 500, 4097):
        rows = fmt.scalar_chunk_rows(width)
        assert rows & (rows - 1) == 0
        assert rows == 16 or rows * width * 8 <= fmt.SCALAR_CHUNK_BYTES


def test_array_specs_chunks_are_whole_rows():
    tensors = fmt.tensor_table([("a", (10, 10)), ("b", (7,))])
    specs = {s.name: s for s in fmt.array_specs(tensors, {"grad": fmt.Tier("lossless"), "weight": fmt.Tier("sketch", sketch_dim=64)}, 32)}
    assert specs["grad"].chunks == (1, 32)
    assert specs["weight_signbits"].chunks[0] == 1 and specs["weight_sketch"].chunks[0] == 1
    assert specs["loss"].chunks == (fmt.SCALAR_CHUNK,)
    assert specs["grad_sqnorm_tensor"].chunks == (fmt.SCALAR_CHUNK, 2)


def test_header_round_trip_with_source_dtype_and_flags():
    tensors = fmt.tensor_table([("w", (2, 3))])
    h = fmt.Header(tensors=tensors, tiers={"grad": fmt.Tier("lossless"), "weight": fmt.Tier("rounded")},
                   n_steps=3, source_dtype="bfloat16", settings={"lr": float("nan")})
    doc = json.loads(json.dumps(h.to_json(), allow_nan=False))
    back = fmt.Header.from_json(doc)
    assert back.source_dtype == "bfloat16" and back.n_steps == 3 and back.tiers == h.tiers
    assert back.settings["lr"] == "nan"
    assert doc["flags"][str(fmt.FLAG_LR_GROUPS_DIFFER)] == "lr_groups_differ"
    old = dict(doc)
    del old["source_dtype"]  # stores from before the field existed
    assert fmt.Header.from_json(old).source_dtype is None


def test_sketch_plan_water_filling():
    sizes = [1728, 64, 73728, 128, 294912, 256, 589824, 256, 32768, 128, 1280, 10]
    tensors = fmt.tensor_table([(f"t{i}", (n,)) for i, n in enumerate(sizes)])
    for k in (512, 4096, 16384, 262144, 10**7):
        plan = fmt.sketch_plan(tensors, k, seed=3)
        assert plan.offsets == tuple(np.cumsum((0,) + plan.sizes[:-1]))
        for n, kt, exact in zip(sizes, plan.sizes, plan.exact):
            assert (kt == n) if exact else (fmt.MIN_SKETCH_PER_TENSOR <= kt < n)
        sketched = [(n, kt) for n, kt, e in zip(sizes, plan.sizes, plan.exact) if not e]
        if sketched and k >= 4096:
            floors = sum(kt == fmt.MIN_SKETCH_PER_TENSOR for _, kt in sketched)
            # the budget is spent (up to rounding and the per-tensor floor), not exceeded
            assert abs(plan.dim - k) <= len(sizes) + floors * fmt.MIN_SKETCH_PER_TENSOR
            # buckets grow like sqrt(size) among sketched tensors
            ratios = [kt / np.sqrt(n) for n, kt in sketched if kt > fmt.MIN_SKETCH_PER_TENSOR]
            assert max(ratios) / min(ratios) < 1.05
    assert all(fmt.sketch_plan(tensors, 10**7, 0).exact)
    # the small, norm-heavy output layer (1280 entries) is exact at a 262144 budget
    assert fmt.sketch_plan(tensors, 262144, 0).exact[10]


def test_sketch_stderr_bound_from_tensor_norms():
    plan = fmt.SketchPlan(offsets=(0, 64, 74), sizes=(64, 10, 100), exact=(False, True, False), seed=0)
    a = np.array([1.0, 5.0, 0.0])
    b = np.array([4.0, 1.0, 1.0])
    got = fmt.sketch_cosine_stderr_tensors(plan, a, b)
    assert got == pytest.approx(np.sqrt(2 * 1.0 * 4.0 / 64 / (6.0 * 6.0)))
    # the flat formula understates the error when the mass sits in a sketched tensor
    assert got > fmt.sketch_cosine_stderr(164, 0.0) / 2


def test_tier_kind_and_predicates():
    kinds = {"lossless": fmt.TierKind.LOSSLESS, "lossless:raw": fmt.TierKind.LOSSLESS,
             "rounded:5": fmt.TierKind.ROUNDED, "bf16": fmt.TierKind.ROUNDED, "sketch:8": fmt.TierKind.SKETCH}
    for spec, kind in kinds.items():
        t = fmt.Tier.parse(spec)
        assert t.kind is kind and t.kind == kind.value and f"{t.kind}" == kind.value
        assert (t.is_lossless, t.rounds, t.is_sketch) == (kind is fmt.TierKind.LOSSLESS, kind is fmt.TierKind.ROUNDED,
                                                          kind is fmt.TierKind.SKETCH)
        assert t.is_dense is not t.is_sketch
    # a TierKind given as the name is stored as the plain string
    t = fmt.Tier(fmt.TierKind.SKETCH, sketch_dim=8)
    assert type(t.name) is str and t == fmt.Tier.parse("sketch:8")
    assert json.dumps(t.to_json()) == '{"tier": "sketch", "sketch_dim": 8, "seed": 0}'
    assert fmt.TIERS == ("lossless", "rounded", "sketch")
