"""Cost of the store's integrity features: crc32c per chunk, and ``durable=True`` per step.

    PYTHONPATH=. python benchmarks/integrity.py [--d 1048576] [--steps 30] [--dir /tmp]

Prints (1) the crc32c time per MiB of chunk and per entry, against the lz4 encode it follows,
and (2) the writer's time per committed step (d float32 gradient and weight rows, lossless)
with ``durable=False`` (the default: nothing fsynced) and ``durable=True`` (every chunk, the
per-step blocks and the commit marker fsynced, with their directories). The fsync figure
depends entirely on the disk: run it where the stores will live.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradtrace_format import format as fmt  # noqa: E402
from capture.writer import StoreWriter, chunk_encoder  # noqa: E402


def crc_cost(reps: int = 200) -> dict:
    import google_crc32c
    import zarr

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(2**18) * 1e-3).astype(np.float32)  # one 1 MiB chunk
    raw = x.tobytes()
    t0 = time.perf_counter()
    for _ in range(reps):
        google_crc32c.value(raw)
    crc_s = (time.perf_counter() - t0) / reps
    tmp = Path(tempfile.mkdtemp())
    try:
        arrs = {}
        for name, codecs in (("lz4", fmt._lossless_codecs()[:-1]), ("lz4+crc32c", fmt._lossless_codecs())):
            arrs[name] = zarr.create_array(str(tmp / name), shape=(1, 2**18), chunks=(1, 2**18), dtype="float32",
                                           compressors=codecs)
        out = {"crc32c_us_per_MiB": crc_s * 1e6, "crc32c_ns_per_entry": crc_s / 2**18 * 1e9,
               "implementation": google_crc32c.implementation}
        for name, arr in arrs.items():
            enc = chunk_encoder(arr)
            enc(x)
            t0 = time.perf_counter()
            for _ in range(reps // 4):
                enc(x)
            out[f"encode_{name}_us_per_MiB"] = (time.perf_counter() - t0) / (reps // 4) * 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def durable_cost(d: int, steps: int, where: str | None) -> dict:
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(d) * 1e-3).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    tensors = fmt.tensor_table([("w", (d,))])
    out = {}
    for durable in (False, True):
        tmp = Path(tempfile.mkdtemp(dir=where))
        try:
            sw = StoreWriter(tmp / "b.zarr", tensors, durable=durable, expected_steps=steps + 2)
            sw.append(0, g, w)
            t0 = time.perf_counter()
            for s in range(1, steps + 1):
                sw.append(s, g, w)
            dt = (time.perf_counter() - t0) / steps
            sw.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out[f"ms_per_step_durable_{durable}"] = dt * 1e3
    out["durable_extra_ms_per_step"] = out["ms_per_step_durable_True"] - out["ms_per_step_durable_False"]
    out["durable_extra_ns_per_entry"] = out["durable_extra_ms_per_step"] * 1e6 / d
    return out


def scalar_crc_cost(steps: int = 300) -> dict:
    """Per-step cost of rewriting the per-step blocks' crc32c (11 arrays) at a tiny d, where the
    scalar arrays dominate: the same appends with ``_patch_crc`` replaced by a no-op."""
    from capture import writer as cw

    d = 1024
    tensors = fmt.tensor_table([(f"t{i}", (d // 16,)) for i in range(16)])
    rng = np.random.default_rng(2)
    g, w = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    out = {}
    real = cw._ArrayWriter._patch_crc
    for label, patch in (("with_crc", real), ("without_crc", lambda self, i, data: None)):
        cw._ArrayWriter._patch_crc = patch
        tmp = Path(tempfile.mkdtemp())
        try:
            sw = StoreWriter(tmp / "s.zarr", tensors, expected_steps=steps + 2)
            sw.append(0, g, w)
            t0 = time.perf_counter()
            for s in range(1, steps + 1):
                sw.append(s, g, w)
            out[f"us_per_step_small_d_{label}"] = (time.perf_counter() - t0) / steps * 1e6
            sw.abort()
        finally:
            cw._ArrayWriter._patch_crc = real
            shutil.rmtree(tmp, ignore_errors=True)
    out["scalar_crc_us_per_step"] = out["us_per_step_small_d_with_crc"] - out["us_per_step_small_d_without_crc"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=2**20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dir", default=None, help="directory (disk) of the test stores (default: the temp dir)")
    args = ap.parse_args(argv)
    for k, v in {**crc_cost(), **scalar_crc_cost(), **durable_cost(args.d, args.steps, args.dir)}.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
