"""Reference points w* for RSI / EB / gamma (seeds 001/004; docs/methods.md).

A reference is resolved once, validated (length d, finite), and handed to the one-pass
engine either as store rows (the final iterate, a recorded step, the mean of a step range:
read inside the pass, nothing big travels in the graph) or as a vector (a numpy array, a
``.npy`` / ``.safetensors`` file, a PyTorch checkpoint), flattened in the store's
parameter-table order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradtrace_format.errors import BadReferenceError, StepNotFoundError
from analysis.store import Run

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
#: Keys under which a checkpoint dict may hold the model's state dict, tried in this order.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class Reference:
    """A resolved reference point.

    Attributes:
        label: human-readable description (goes into result attrs).
        rows: store rows whose weights are combined (``coef @ weight[rows]``), or None.
        coef: float64 coefficients of those rows (mean: 1/n each).
        vector: the reference as a flat vector of length d (float32 or float64), or None.
        step: the step of the iterate when the reference is one recorded iterate.
    """

    label: str
    rows: np.ndarray | None = None
    coef: np.ndarray | None = None
    vector: np.ndarray | None = None
    step: int | None = None


def resolve_reference(run: Run, reference="final", *, strict: bool = True) -> Reference:
    """Turn any accepted reference specification into a validated :class:`Reference`.

    Args:
        run: the opened store (its parameter table fixes length and order).
        reference: ``"final"`` (the final iterate, default), an int (the weights at that
            recorded step), ``slice(a, b)`` (mean of the recorded weights with a <= step <= b),
            the strings ``"step:N"`` / ``"mean:A:B"``, a numpy array of length d, a dict of
            named arrays (a state dict), or the path of a ``.npy``, ``.safetensors`` or
            PyTorch checkpoint file (``torch.load(..., weights_only=True)``; torch is imported
            only then).
        strict: refuse tensors in a state dict that are not parameters of the store (for
            example BatchNorm running statistics). ``False`` ignores them.

    Raises:
        BadReferenceError: wrong length, NaN/Inf entries, missing / extra / mis-shaped
            tensors, no final iterate, an unknown file type.
        StepNotFoundError: a step (or range) that is not recorded.
    """
    if isinstance(reference, str):
        reference = parse_reference(reference)
    if reference is None or (isinstance(reference, str) and reference == "final"):
        fin = run.final_step
        if fin is None:
            raise BadReferenceError(
                f"{run.path} has no final iterate (the run was not closed with its final weights), so "
                "reference='final' is unavailable. Pass reference=<step>, reference=slice(a, b) or an array."
            )
        return _finite(run, Reference(f"final iterate (step {fin})", rows=run.rows_of([fin]), coef=np.ones(1), step=fin))
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        step = int(reference)
        return _finite(run, Reference(f"weights at step {step}", rows=run.rows_of([step]), coef=np.ones(1), step=step))
    if isinstance(reference, slice):
        steps = run.select_steps(reference, grads=False)
        if len(steps) == 0:
            raise StepNotFoundError(
                f"reference={reference!r}: no recorded step in that range of {run.path} "
                f"(recorded: {int(run.steps[0])}..{int(run.steps[-1])})"
            )
        n = len(steps)
        return _finite(run, Reference(f"mean of the weights at {n} steps {int(steps[0])}..{int(steps[-1])}",
                                      rows=run.rows_of(steps), coef=np.full(n, 1.0 / n)))
    if isinstance(reference, (str, os.PathLike)):
        return _from_file(run, Path(reference), strict)
    if isinstance(reference, dict):
        return Reference("state dict", vector=flatten_state_dict(run, reference, strict=strict, source="the state dict"))
    if isinstance(reference, np.ndarray) or hasattr(reference, "__array__"):
        return Reference("array", vector=check_vector(run, np.asarray(reference), "the reference array"))
    raise BadReferenceError(
        f"reference={reference!r} ({type(reference).__name__}) is not understood: use 'final', a step, "
        "slice(a, b), an array of length d, a state dict, or a .npy / .safetensors / checkpoint path"
    )


def _finite(run: Run, ref: Reference) -> Reference:
    """A reference made of store rows must have finite weights (the writer flags rows whose
    weights hold NaN or Inf: ``FLAG_NONFINITE_WEIGHT``); else every result would be NaN."""
    from gradtrace_format import format as fmt

    flags = run.flags[ref.rows]
    bad = (flags & fmt.FLAG_NONFINITE_WEIGHT) != 0
    if bad.any():
        steps = run.steps[ref.rows[bad]]
        raise BadReferenceError(
            f"reference {ref.label}: the weights recorded at step {int(steps[0])}"
            + (f" (and {len(steps) - 1} more)" if len(steps) > 1 else "")
            + f" in {run.path} hold NaN or Inf (flag nonfinite_weight), so gamma, RSI and EB against it are "
            "undefined. Choose a step whose weights are finite (e.g. --ref step:N before the divergence)."
        )
    return ref


def parse_reference(text: str):
    """Parse a reference written as text, the one parser the library and the command line share.

    ``"final"`` -> ``"final"``; the path of an existing file -> the path (a ``str``);
    ``"step:N"`` -> ``N`` (int); ``"mean:A:B"`` -> ``slice(A, B)`` (the mean of the recorded
    weights with A <= step <= B). Keywords are case-insensitive.

    Raises:
        BadReferenceError: a malformed ``step:`` / ``mean:`` form, or text that is none of
            these forms and no existing file.
    """
    t = str(text).strip()
    low = t.lower()
    if low == "final":
        return "final"
    if os.path.exists(t):
        return t
    if low.startswith("step:"):
        try:
            return int(t.split(":", 1)[1])
        except ValueError as err:
            raise BadReferenceError(f"reference {text!r}: 'step:N' needs an integer step, e.g. step:100") from err
    if low.startswith("mean:"):
        parts = t.split(":")
        try:
            if len(parts) != 3:
                raise ValueError(text)
            return slice(int(parts[1]), int(parts[2]))
        except ValueError as err:
            raise BadReferenceError(
                f"reference {text!r}: 'mean:A:B' needs two integer steps, e.g. mean:900:999"
            ) from err
    raise BadReferenceError(
        f"reference {text!r} does not exist as a file and is not 'final', 'step:N' or 'mean:A:B': "
        "give one of those or the path of a .npy, .safetensors or PyTorch checkpoint file"
    )


def check_vector(run: Run, vec: np.ndarray, what: str) -> np.ndarray:
    """Validate a flat reference vector (length d, finite); returns it without copying."""
    d = run.n_params
    if vec.ndim != 1 or vec.shape[0] != d:
        raise BadReferenceError(
            f"{what} has shape {vec.shape}, but the store's parameter vector has d = {d} entries "
            f"({len(run.tensors)} tensors). Flatten it in named_parameters() order, or pass a state dict."
        )
    if vec.dtype.kind not in "fiu":
        raise BadReferenceError(f"{what} has dtype {vec.dtype}: give real numbers")
    step = 1 << 22
    for lo in range(0, d, step):  # in pieces: a memory-mapped .npy is never loaded whole
        part = np.asarray(vec[lo: lo + step])
        bad = ~np.isfinite(part)
        if bad.any():
            i = lo + int(np.argmax(bad))
            raise BadReferenceError(
                f"{what} holds NaN/Inf (first at index {i}, tensor {_tensor_at(run, i)}, value {vec[i]}). "
                "A reference point must be finite: pick another iterate or checkpoint."
            )
    return vec


def _tensor_at(run: Run, i: int) -> str:
    for t in run.tensors:
        if t.offset <= i < t.offset + t.size:
            return f"'{t.name}'"
    return "?"


def flatten_state_dict(run: Run, sd: dict, *, strict: bool = True, source: str = "the checkpoint") -> np.ndarray:
    """Flatten named arrays in the store's parameter-table order into a float64 vector.

    Accepts a plain ``{name: array}`` dict, a checkpoint dict holding one under
    ``"state_dict"``, ``"model_state_dict"`` or ``"model"``, and DDP ``"module."`` prefixes.

    Raises:
        BadReferenceError: missing tensors, mis-shaped tensors, or (with ``strict``) tensors
            that are not parameters of the store.
    """
    sd = unwrap_checkpoint(sd, source)
    names = [t.name for t in run.tensors]
    if names and not any(n in sd for n in names) and all(str(k).startswith("module.") for k in sd):
        sd = {str(k)[len("module."):]: v for k, v in sd.items()}
    missing = [n for n in names if n not in sd]
    if missing:
        raise BadReferenceError(
            f"{source} lacks {len(missing)} parameter tensor(s) of the store: {', '.join(missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}. It must hold every trainable parameter by its "
            "named_parameters() name."
        )
    extra = [str(k) for k in sd if k not in set(names)]
    if extra and strict:
        raise BadReferenceError(
            f"{source} holds {len(extra)} tensor(s) that are not parameters of the store: "
            f"{', '.join(extra[:8])}{', ...' if len(extra) > 8 else ''}. Buffers such as BatchNorm "
            "running statistics are not part of w; pass strict=False to ignore them."
        )
    out = np.empty(run.n_params, dtype=np.float64)
    for t in run.tensors:
        arr = _to_numpy(sd[t.name])
        if tuple(arr.shape) != tuple(t.shape):
            raise BadReferenceError(
                f"{source}: tensor '{t.name}' has shape {tuple(arr.shape)}, the store records {tuple(t.shape)}. "
                "Is it a checkpoint of the same model?"
            )
        out[t.offset: t.offset + t.size] = arr.reshape(-1)
    return check_vector(run, out, source)


def unwrap_checkpoint(obj, source: str = "the checkpoint") -> Mapping:
    """The ``{name: tensor}`` state dict in a loaded checkpoint: ``obj`` itself, or the mapping
    it holds under the first of :data:`CHECKPOINT_KEYS` (``"state_dict"``,
    ``"model_state_dict"``, ``"model"``) that it has. Torch-free; used for RSI references and
    for the interpolation endpoints of the paper harness.

    Raises:
        BadReferenceError: ``obj`` is not a mapping (a pickled model, a bare tensor...).
    """
    if not isinstance(obj, Mapping):
        raise BadReferenceError(f"{source} holds a {type(obj).__name__}, not a state dict of tensors")
    for key in CHECKPOINT_KEYS:
        if key in obj and isinstance(obj[key], Mapping) and not _is_array(obj[key]):
            return obj[key]
    return obj


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _to_numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        import torch  # only reached with tensors that came from torch

        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _from_file(run: Run, path: Path, strict: bool) -> Reference:
    if not path.exists():
        raise BadReferenceError(f"reference file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        vec = np.load(path, mmap_mode="r", allow_pickle=False)
        return Reference(f"file {path.name}", vector=check_vector(run, vec, f"{path}"))
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        sd = load_file(str(path))
        return Reference(f"file {path.name}", vector=flatten_state_dict(run, sd, strict=strict, source=str(path)))
    if suffix in TORCH_SUFFIXES:
        try:
            import torch  # lazily: the analysis stage never needs torch otherwise
        except ImportError as err:
            raise BadReferenceError(
                f"{path} is a PyTorch checkpoint, and reading one needs torch, which is not installed here "
                "(cluster workers never need it). Convert it once where torch is available, e.g. "
                "safetensors.torch.save_file(state_dict, 'ref.safetensors'), and pass that file."
            ) from err

        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise BadReferenceError(
                f"cannot load {path} with torch.load(weights_only=True): {err}. Save the model's "
                "state_dict (tensors only), or convert it to .safetensors / .npy."
            ) from err
        return Reference(f"checkpoint {path.name}", vector=flatten_state_dict(run, obj, strict=strict, source=str(path)))
    raise BadReferenceError(
        f"reference file {path}: unknown type '{suffix}'. Use .npy (flat vector), .safetensors, or a "
        f"PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)})."
    )
