"""The sharded (rank-major) column layout of gradtrace_format.format, without processes."""

import numpy as np
import pytest

from gradtrace_format import format as fmt

TABLE = fmt.tensor_table([("a.weight", (10, 6)), ("a.bias", (10,)), ("b.weight", (3, 10)), ("b.bias", (1,))])
# FSDP2's split of dim 0 over 2 ranks: ceil(n / 2) rows to rank 0, the rest to rank 1 (none for b.bias)
HELD = [[(0, 0, 5), (1, 0, 5), (2, 0, 2), (3, 0, 1)], [(0, 5, 10), (1, 5, 10), (2, 2, 3)]]


def test_layout_columns_chunks_and_pads():
    lay = fmt.sharded_layout(TABLE, HELD, param_chunk=16)
    d = sum(t.size for t in TABLE)
    assert lay.chunk % 8 == 0 and lay.rank_width % lay.chunk == 0
    local = [30 + 5 + 20 + 1, 30 + 5 + 10]
    assert lay.rank_width >= max(local) and lay.rank_width - max(local) < lay.chunk
    assert lay.columns == 2 * lay.rank_width
    assert sum(s.size for s in lay.shards) == d
    # rank r's shards sit in its own range, in table order, from its first column
    for r in range(2):
        lo, hi = lay.rank_columns(r)
        mine = sorted((s for s in lay.shards if s.rank == r), key=lambda s: s.column)
        assert mine[0].column == lo and mine[-1].column + mine[-1].size == lo + local[r] <= hi
        assert [s.tensor for s in mine] == sorted(s.tensor for s in mine)
    # natural order from the columns, and back: a natural vector survives the round trip, pads 0
    x = np.arange(1, d + 1, dtype=np.float64)
    cols = lay.natural_columns(len(TABLE))
    assert np.unique(cols).size == d
    row = np.zeros(lay.columns)
    row[cols] = x
    np.testing.assert_array_equal(lay.natural(row, len(TABLE)), x)
    # tensor a.weight: rows 0..4 at rank 0's start, rows 5..9 at rank 1's
    (a0, a1), (b0, b1) = lay.tensor_columns(0)
    np.testing.assert_array_equal(np.concatenate([row[a0:a1], row[b0:b1]]), x[:60])
    pads = np.setdiff1d(np.arange(lay.columns), cols)
    assert pads.size == lay.columns - d and (row[pads] == 0).all()
    assert fmt.ShardedLayout.from_json(lay.to_json()) == lay


def test_array_specs_of_a_sharded_store():
    lay = fmt.sharded_layout(TABLE, HELD, param_chunk=16)
    tiers = {"grad": fmt.Tier.parse("sketch:32"), "weight": fmt.Tier.parse("lossless")}
    specs = {s.name: s for s in fmt.array_specs(TABLE, tiers, 16, layout=lay)}
    assert specs["weight"].width == lay.columns and specs["weight"].chunk_width == lay.chunk
    assert specs["grad_signbits"].width == lay.columns // 8 and specs["grad_signbits"].chunk_width == lay.chunk // 8
    # the sketch is the natural one: its width is the plan's, whatever the layout
    plan = fmt.sketch_plan(TABLE, 32, 0)
    assert specs["grad_sketch"].width == plan.dim
    assert specs["grad_sqnorm_tensor"].width == len(TABLE)


def test_shards_that_do_not_tile_a_tensor_are_refused():
    with pytest.raises(ValueError, match="cover 8 rows of 10"):
        fmt.sharded_layout(TABLE, [[(0, 0, 5), (1, 0, 10), (2, 0, 3), (3, 0, 1)], [(0, 5, 8)]], 16)
    with pytest.raises(ValueError, match="do not tile"):
        fmt.sharded_layout(TABLE, [[(0, 0, 5), (1, 0, 10), (2, 0, 3), (3, 0, 1)], [(0, 6, 10)]], 16)
