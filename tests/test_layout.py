"""The package floors (README, "How the code is laid out"): what each top-level package may import.

    gradtrace_format          numpy, zarr, numcodecs, google_crc32c (the bottom floor)
    capture, analysis         gradtrace_format, never each other
    experiments               capture, analysis, gradtrace_format
    gradtrace                 everything (the command line, demo and report)

Checked twice: statically (every ``import`` in every file, lazy ones inside functions included)
and by importing each package in a fresh interpreter and looking at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradtrace_format", "capture", "analysis", "experiments", "gradtrace")
#: which project packages each package may import (besides itself)
ALLOWED = {
    "gradtrace_format": set(),
    "capture": {"gradtrace_format"},
    "analysis": {"gradtrace_format"},
    "experiments": {"gradtrace_format", "capture", "analysis"},
    "gradtrace": {"gradtrace_format", "capture", "analysis", "experiments"},
}
#: third-party modules the format layer may import
FORMAT_THIRD_PARTY = {"numpy", "zarr", "numcodecs", "google_crc32c"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (relative imports: none here)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the packages use absolute imports"
            out.add(node.module.split(".")[0])
    return out


def _graph() -> dict[str, dict[str, set[str]]]:
    """package -> {imported top-level module -> files that import it}."""
    graph = {}
    for pkg in PACKAGES:
        edges: dict[str, set[str]] = {}
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for mod in _imports(f):
                edges.setdefault(mod, set()).add(str(f.relative_to(ROOT)))
        graph[pkg] = edges
    return graph


def test_every_package_is_a_package_and_listed_in_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(meta["tool"]["setuptools"]["packages"]) == sorted(PACKAGES)
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


def test_the_import_graph_respects_the_floors():
    graph = _graph()
    bad = []
    for pkg, edges in graph.items():
        for mod, files in edges.items():
            if mod in PACKAGES and mod != pkg and mod not in ALLOWED[pkg]:
                bad.append(f"{pkg} imports {mod} in {sorted(files)}")
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    graph = {pkg: {m for m in edges if m in PACKAGES and m != pkg} for pkg, edges in _graph().items()}
    state: dict[str, int] = {}

    def visit(p, path):
        if state.get(p) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [p]))
        if state.get(p) == 2:
            return
        state[p] = 1
        for q in sorted(graph[p]):
            visit(q, path + [p])
        state[p] = 2

    for p in PACKAGES:
        visit(p, [])


def test_the_format_layer_imports_numpy_zarr_numcodecs_only():
    edges = _graph()["gradtrace_format"]
    std = set(sys.stdlib_module_names) | {"__future__"}
    extra = {m: sorted(f) for m, f in edges.items() if m not in std and m not in FORMAT_THIRD_PARTY
             and m != "gradtrace_format"}
    assert not extra, extra


def test_capture_never_imports_the_analysis_libraries():
    edges = _graph()["capture"]
    bad = {m: sorted(f) for m, f in edges.items() if m in {"xarray", "pandas", "dask", "distributed"}}
    assert not bad, bad


def test_analysis_imports_torch_only_to_read_a_checkpoint_reference():
    """A PyTorch checkpoint given as an RSI reference needs torch.load; nothing else in analysis does."""
    edges = _graph()["analysis"]
    assert set(edges.get("torch", ())) <= {"analysis/reference.py"}, edges.get("torch")


def test_the_static_check_sees_lazy_imports(tmp_path):
    """The walker finds an import inside a function body (so the floor test can fail)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from analysis.store import open_run\n    import torch.nn as nn\n")
    assert _imports(f) == {"analysis", "torch"}


def _loaded(code: str, env_block_torch: bool = False) -> set[str]:
    """Top-level modules in sys.modules after running ``code`` in a fresh interpreter."""
    prog = textwrap.dedent("""
        import sys
        if BLOCK:
            sys.modules["torch"] = None  # any `import torch` now fails
        CODE
        print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
    """).replace("BLOCK", str(env_block_torch)).replace("CODE", code)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(out.stdout.split())


@pytest.mark.parametrize("code, forbidden", [
    ("import gradtrace_format, gradtrace_format.format, gradtrace_format.integrity, gradtrace_format.errors",
     {"torch", "xarray", "pandas", "dask", "distributed", "capture", "analysis", "experiments", "gradtrace"}),
    ("import capture", {"xarray", "pandas", "dask", "distributed", "analysis", "experiments", "gradtrace", "torch"}),
    ("import capture.writer, capture.schedules, capture.kernels",
     {"xarray", "pandas", "dask", "distributed", "analysis", "experiments", "gradtrace", "torch"}),
    ("from capture import Recorder; import capture.callbacks",
     {"xarray", "pandas", "dask", "distributed", "analysis", "experiments", "gradtrace"}),
    ("import analysis", {"torch", "capture", "experiments", "gradtrace"}),
])
def test_importing_a_package_loads_only_its_floor(code, forbidden):
    loaded = _loaded(code)
    assert not loaded & forbidden, sorted(loaded & forbidden)


def test_the_loaded_module_check_can_fail():
    assert "xarray" in _loaded("import xarray")


def test_without_torch_capture_imports_and_recording_says_which_extra():
    loaded = _loaded("import capture, analysis, gradtrace.cli", env_block_torch=True)
    assert "capture" in loaded and "analysis" in loaded
    prog = 'import sys; sys.modules["torch"] = None\nfrom capture import Recorder'
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: ") and 'pip install "gradtrace[capture]"' in last, out.stderr
    assert "During handling" not in out.stderr  # one error, not a chain


def test_a_plain_install_needs_no_torch():
    """The base requirements (``pip install gradtrace``) read and analyse stores without torch;
    the capture extra and the test extra bring it."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        import re

        return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    base = names(meta["dependencies"])
    extras = {k: names(v) for k, v in meta["optional-dependencies"].items()}
    assert not base & {"torch", "torchvision", "scikit-learn", "mnist1d"}, base
    assert {"zarr", "numpy", "xarray", "dask"} <= base
    assert {"torch", "torchvision"} <= extras["capture"]
    assert extras["capture"] | {"scikit-learn", "mnist1d"} <= extras["experiments"]
    assert extras["experiments"] <= extras["test"]
    assert "fast" not in extras
    assert meta["scripts"]["gradtrace"] == "gradtrace.cli:main"


def test_without_torch_the_demo_says_which_extra(tmp_path):
    prog = ('import sys; sys.modules["torch"] = None\nfrom gradtrace.cli import main\n'
            f'sys.exit(main(["demo", "--quick", "--out", {str(tmp_path / "demo")!r}]))')
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        'gradtrace: error: `gradtrace demo` needs torch, which this install lacks: pip install "gradtrace[experiments]"']
