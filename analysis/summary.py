"""What a store holds: the facts behind ``gradtrace info``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gradtrace_format import format as fmt


def _sizes(path: str, storage_options: dict | None = None) -> dict[str, int]:
    """Bytes on disk per top-level key (array name) of the store."""
    out: dict[str, int] = {}
    if "://" in path and not path.startswith("file://"):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        for f, info in fs.find(root, detail=True).items():
            rel = f[len(root):].lstrip("/")
            key = rel.split("/", 1)[0]
            out[key] = out.get(key, 0) + int(info.get("size") or 0)
        return out
    root = Path(path.removeprefix("file://"))
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        key = rel.parts[0] if rel.parts else "."
        for f in files:
            try:
                out[key] = out.get(key, 0) + (Path(dirpath) / f).stat().st_size
            except OSError:
                pass
    return out


def store_info(path, storage_options: dict | None = None) -> dict:
    """A JSON-able summary of the store at ``path`` (a path, an fsspec URL or an opened Run).

    Args:
        storage_options: passed to fsspec for remote URLs (as in :func:`analysis.open_run`).

    Returns:
        dict with the steps (count, first, last, final iterate), the schedule, tiers, bytes
        on disk against the raw float32 size, the layers, flagged steps and the settings.
    """
    from analysis.store import Run, open_run

    run = path if isinstance(path, Run) else open_run(path, storage_options=storage_options)
    path = run.path
    h = run.header
    steps = run.steps
    gsteps = run.grad_steps
    flags = run.flags
    d = h.n_params
    sizes = _sizes(str(path), run.storage_options)
    data_keys = [k for k in sizes if k in ("grad", "weight") or k.startswith(("grad_", "weight_"))
                 and k.endswith(fmt.SKETCH_SUFFIXES)]
    data_bytes = sum(sizes[k] for k in data_keys)
    raw = 4 * d * (len(gsteps) + len(steps))  # float32 gradient rows + weight rows
    flagged = {}
    for bit, name in fmt.FLAG_NAMES.items():
        if bit == fmt.FLAG_FINAL:
            continue
        hit = steps[(flags & bit) != 0]
        if len(hit):
            flagged[name] = [int(s) for s in hit[:50]]
    gaps = np.diff(gsteps)
    return {
        "path": str(path),
        "format_version": h.format_version,
        "closed_cleanly": bool(h.closed),
        "n_rows": int(len(steps)),
        "n_gradient_steps": int(len(gsteps)),
        "first_step": int(gsteps[0]) if len(gsteps) else None,
        "last_gradient_step": int(gsteps[-1]) if len(gsteps) else None,
        "final_iterate_step": run.final_step,
        "step_gaps": sorted({int(g) for g in np.unique(gaps)})[:10] if len(gaps) else [],
        "epochs": sorted({int(e) for e in np.unique(run.ds["epoch"].values) if e >= 0})[-1:] if len(steps) else [],
        "schedule": h.schedule,
        "tiers": {k: v.to_json() for k, v in h.tiers.items()},
        "n_params": d,
        "bytes_on_disk": int(sum(sizes.values())),
        "data_bytes_on_disk": int(data_bytes),
        "raw_float32_bytes": int(raw),
        "compression_ratio": (raw / data_bytes) if data_bytes else None,
        "layers": [{"name": t.name, "shape": list(t.shape), "size": t.size, "offset": t.offset} for t in h.tensors],
        "flagged_steps": flagged,
        "n_nonfinite_steps": int(((flags & fmt.FLAG_NONFINITE_GRAD) != 0).sum()),
        "settings": h.settings,
        "parent": h.parent,
        "index": _index_info(run, sizes),
    }


def _index_info(run, sizes: dict) -> dict | None:
    """The query index: layout, rows covered, whether it is up to date (None: no index)."""
    from analysis.index import open_index

    idx = open_index(run)
    if idx is None:
        return None
    out = idx.describe()
    out["bytes_on_disk"] = int(sizes.get(fmt.INDEX_GROUP, 0))
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _flat_items(v, prefix: str = ""):
    """(name, scalar) pairs of a nested settings dict; lists and multi-line text are skipped."""
    for k, x in v.items():
        name = f"{prefix}{k}"
        if isinstance(x, dict):
            # an optimizer's "defaults" are its hyperparameters: name them plainly
            yield from _flat_items(x, "" if k == "defaults" else f"{name}.")
        elif isinstance(x, (list, tuple)) or (isinstance(x, str) and ("\n" in x or len(x) > 60)):
            continue
        else:
            yield name, x


def setting_text(v, limit: int = 150) -> str:
    """One setting as one line of at most ~``limit`` characters, cut between items, never
    inside one: a dict shows its scalar entries as ``key=value`` (nested keys dotted; long text
    and lists left out), and what does not fit ends in ``... (+N more)``."""
    if isinstance(v, dict):
        parts = [f"{k}={x}" for k, x in _flat_items(v)]
        sep = ", "
    elif isinstance(v, (list, tuple)):
        parts, sep = [str(x) for x in v], ", "
    else:
        text = str(v)
        parts, sep = text.split(" "), " "
    out, used = [], 0
    for i, part in enumerate(parts):
        cost = len(part) + (len(sep) if out else 0)
        if out and used + cost > limit:
            return sep.join(out) + f" ... (+{len(parts) - i} more; gradtrace info --json shows all)"
        out.append(part)
        used += cost
    return sep.join(out)


def format_info(info: dict) -> str:
    """Human-readable text of :func:`store_info`."""
    lines = [f"store:     {info['path']} (format v{info['format_version']}, "
             f"{'closed cleanly' if info['closed_cleanly'] else 'NOT closed cleanly: recovered up to the last committed step'})"]
    if info["n_gradient_steps"]:
        gaps = info["step_gaps"]
        lines.append(f"steps:     {info['n_gradient_steps']} gradient steps, {info['first_step']}..{info['last_gradient_step']}"
                     + (f" (gaps between recorded steps: {', '.join(map(str, gaps))})" if gaps and gaps != [1] else " (every step)"))
    else:
        lines.append("steps:     none recorded")
    fin = info["final_iterate_step"]
    lines.append(f"final:     {'weights after the last update at step ' + str(fin) if fin is not None else 'no final iterate recorded'}")
    sched = info["schedule"]
    lines.append(f"schedule:  {sched.get('describe', sched) if isinstance(sched, dict) else sched}")
    lines.append("tiers:     " + ", ".join(f"{k} {v['tier']}" + (f" (keepbits {v['keepbits']})" if 'keepbits' in v else "")
                                          + (f" (k={v['sketch_dim']}, seed {v['seed']})" if 'sketch_dim' in v else "")
                                          for k, v in info["tiers"].items()))
    ratio = info["compression_ratio"]
    lines.append(f"size:      {_human(info['bytes_on_disk'])} on disk; gradient/weight data {_human(info['data_bytes_on_disk'])} "
                 f"for {_human(info['raw_float32_bytes'])} raw float32"
                 + (f" (compression {ratio:.2f}x)" if ratio else ""))
    lines.append(f"params:    {info['n_params']:,} in {len(info['layers'])} tensors")
    for t in info["layers"][:40]:
        lines.append(f"  {t['name']:40s} {str(tuple(t['shape'])):>22s} {t['size']:>12,}")
    if len(info["layers"]) > 40:
        lines.append(f"  ... {len(info['layers']) - 40} more")
    if info["flagged_steps"]:
        for name, steps in info["flagged_steps"].items():
            lines.append(f"flags:     {name} at {len(steps)}{'+' if len(steps) >= 50 else ''} steps: {steps[:10]}")
    else:
        lines.append("flags:     none (no NaN/Inf, no missing gradients)")
    s = info["settings"] or {}
    keys = [k for k in ("optimizer", "optimizer_hparams", "lr", "weight_decay", "clip", "seed", "torch", "device", "model",
                        "n_params", "recipe") if k in s]
    for k in keys or list(s)[:12]:
        lines.append(f"setting:   {k} = {setting_text(s[k])}")
    idx = info.get("index")
    if idx is None:
        lines.append("index:     none (`gradtrace index STORE` makes correlations, sign shifts and RSI instant)")
    else:
        what = "every pair of rows" if idx["band"] is None else f"lags 0..{idx['band']} (rows)"
        state = ("up to date" if idx["up_to_date"] else
                 f"covers {idx['valid_rows']} of {idx['store_rows']} rows: run `gradtrace index` to update")
        lines.append(f"index:     {what}, {state}; {_human(idx['bytes_on_disk'])} on disk")
    if info.get("parent"):
        lines.append(f"parent:    {info['parent']}")
    return "\n".join(lines)
