"""open_run: the Dataset, crash leftovers, step and parameter selection, bad stores."""

import json

import numpy as np
import pytest
import zarr

import analysis as ga
from gradtrace_format import format as fmt
from capture.writer import StoreWriter
from tests.helpers_stores import make_store, slow_corr_matrix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "run.zarr", steps=10)


def test_dataset_dims_coords_and_values(data):
    run = ga.open_run(data.path)
    ds = run.ds
    assert ds.sizes["step"] == 11 and ds.sizes["param"] == data.d and ds.sizes["tensor"] == 5
    assert list(ds["step"].values) == list(range(11))
    for c in ("epoch", "lr", "loss", "flags", "tensor", "tensor_offset", "tensor_size"):
        assert c in ds.coords
    np.testing.assert_array_equal(ds["grad"].values[:10], data.grads)
    np.testing.assert_array_equal(ds["weight"].values[10], data.final_weight)
    assert np.isnan(ds["grad"].values[10]).all()
    first = ds["grad"].data.chunks[1][0]
    assert first % run.chunk_width("grad") == 0 or first == data.d  # aligned to storage chunks
    small = ga.open_run(data.path, chunks=20).ds["grad"].data.chunks[1]
    assert small[0] == 32 and sum(small) == data.d  # rounded up to whole storage chunks
    assert run.final_step == 10 and list(run.grad_steps) == list(range(10))
    assert run.tier["grad"].name == "lossless"
    assert "10 steps" not in repr(run) and "d=154" in repr(run)


def test_file_url_opens_the_same_store(data):
    run = ga.open_run("file://" + str(data.path))
    np.testing.assert_array_equal(run.ds["grad"].values[:10], data.grads)


def test_rows_past_n_steps_are_not_data(tmp_path):
    """A crash leaves rows >= n_steps (and arrays of different lengths): they are ignored."""
    tensors = fmt.tensor_table([("a", (5,)), ("b", (3,))])
    w = StoreWriter(tmp_path / "crash.zarr", tensors, {"grad": "lossless", "weight": "lossless"}, param_chunk=4)
    rng = np.random.default_rng(0)
    for s in range(6):
        w.append(s, rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32))
    # no close(): simulate a kill after row 6 was written but only 4 rows were committed
    g = zarr.open_group(str(tmp_path / "crash.zarr"), mode="r+", use_consolidated=False)
    attrs = g.attrs.asdict()[fmt.ATTR_KEY]
    attrs["n_steps"] = 4
    g.attrs.update({fmt.ATTR_KEY: attrs})
    g["loss"].resize((5,))  # arrays of different lengths after a crash
    run = ga.open_run(tmp_path / "crash.zarr")
    assert run.ds.sizes["step"] == 4
    assert list(run.steps) == [0, 1, 2, 3]
    assert run.final_step is None
    assert ga.corr_matrix(run).shape == (4, 4)


def test_not_a_store_errors(tmp_path):
    with pytest.raises(ga.NotAStoreError, match="does not exist"):
        ga.open_run(tmp_path / "nothing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ga.NotAStoreError):
        ga.open_run(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(ga.NotAStoreError, match="not a gradtrace run store"):
        ga.open_run(tmp_path / "other.zarr")


def _set_version(path, version, **settings):
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    attrs = g.attrs.asdict()[fmt.ATTR_KEY]
    attrs["format_version"] = version
    attrs["settings"].update(settings)
    g.attrs.update({fmt.ATTR_KEY: attrs})
    zarr.consolidate_metadata(str(path))


def test_stores_are_written_in_the_final_format(tmp_path):
    d = make_store(tmp_path / "s.zarr", steps=3)
    g = zarr.open_group(str(d.path), mode="r")
    assert g.attrs[fmt.ATTR_KEY]["format_version"] == fmt.FORMAT_VERSION == "1.0"
    assert ga.open_run(d.path).header.format_version == "1.0"


def test_a_later_minor_version_reads(tmp_path):
    d = make_store(tmp_path / "minor.zarr", steps=3)
    _set_version(d.path, "1.7")
    run = ga.open_run(d.path)
    assert run.header.format_version == "1.7" and len(run.grad_steps) == 3


def test_newer_format_version_is_refused(tmp_path):
    d = make_store(tmp_path / "new.zarr", steps=3)
    _set_version(d.path, "2.0")
    with pytest.raises(ga.FormatVersionError, match=r"newer than the 1.0 .*upgrade gradtrace \(pip install -U"):
        ga.open_run(d.path)


@pytest.mark.parametrize("version, wrote", [(1, "0.1.0"), (1, None), ("0.9", "0.0.5")])
def test_a_store_from_before_1_0_says_to_re_record_it(tmp_path, version, wrote):
    d = make_store(tmp_path / "old.zarr", steps=3)
    _set_version(d.path, version, gradtrace_version=wrote)
    with pytest.raises(ga.FormatVersionError) as err:
        ga.open_run(d.path)
    msg = str(err.value)
    assert "Re-record the run, or read it with the gradtrace version that wrote it" in msg
    assert "\n" not in msg
    assert (f"(gradtrace {wrote})" in msg) == (wrote is not None)


@pytest.mark.parametrize("version", ["one", "1", "1.x", None, True, 1.0])
def test_a_malformed_format_version_is_damage(tmp_path, version):
    d = make_store(tmp_path / "bad.zarr", steps=3)
    _set_version(d.path, version)
    with pytest.raises(ga.DamagedStoreError, match="MAJOR.MINOR"):
        ga.open_run(d.path)


def test_step_selection(tmp_path):
    d = make_store(tmp_path / "sparse.zarr", steps=range(0, 100, 10))
    run = ga.open_run(d.path)
    assert list(run.select_steps(slice(15, 45))) == [20, 30, 40]
    assert list(run.select_steps(range(20, 50, 10))) == [20, 30, 40]
    assert list(run.select_steps([90, 0])) == [0, 90]
    assert list(run.select_steps(30)) == [30]
    with pytest.raises(ga.StepNotFoundError) as err:
        run.select_steps([20, 25])
    msg = str(err.value)
    assert "step 25 is not recorded" in msg and "20, 30" in msg and "every 10 steps" in msg
    assert d.final_step == 91
    with pytest.raises(ga.StepNotFoundError, match="final iterate"):
        run.select_steps([91])
    assert 91 in run.select_steps([91], grads=False)
    with pytest.raises(ga.StepNotFoundError):
        ga.corr_matrix(run, [20, 21])
    with pytest.raises(ga.StepNotFoundError, match="selects no gradient step"):
        ga.corr_matrix(run, slice(200, 300))


def test_param_groups(data):
    run = ga.open_run(data.path)
    g = run.params("fc*")
    assert g.names == ("fc1.weight", "fc1.bias", "fc2.weight")
    t = {t.name: t for t in data.tensors}
    assert g.ranges == ((t["fc1.weight"].offset, t["fc2.weight"].offset + t["fc2.weight"].size),)
    g2 = run.params(["conv.bias", "fc2.weight"])
    assert len(g2.ranges) == 2 and g2.size == 4 + 18
    assert run.params().size == data.d and run.params().label == "all"
    with pytest.raises(ga.ParamSelectionError) as err:
        run.params("lstm*")
    assert "conv.weight" in str(err.value)  # lists the tensors that exist


def test_sketch_store_dataset(tmp_path):
    d = make_store(tmp_path / "sk.zarr", steps=4, tiers="sketch:64")
    run = ga.open_run(d.path)
    assert "grad_sketch" in run.ds and "grad_signbits" in run.ds and "grad" not in run.ds
    np.testing.assert_array_equal(run.ds["grad_sketch"].values[:4], d.grad_sketch)
    plan = run.sketch_plan("grad")
    assert plan.dim == run.ds.sizes["sketch"]
    assert json.loads(str(run.ds["tensor_shape"].values[0])) == [4, 2, 3, 3]


def test_a_rewritten_store_is_read_afresh(tmp_path):
    """Open arrays are cached per process; rewriting the store at the same path must not reuse them."""
    first = make_store(tmp_path / "same.zarr", steps=5, seed=1)
    assert ga.corr_matrix(first.path).shape == (5, 5)
    second = make_store(tmp_path / "same.zarr", steps=7, seed=2, shapes=(("w", (40,)),))
    c = ga.corr_matrix(second.path)
    assert c.shape == (7, 7)
    np.testing.assert_allclose(c.values, slow_corr_matrix(second.grads), atol=1e-10)
    r = ga.rsi(second.path)
    assert r.sizes["step"] == 7
