#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE, in the repository root, as one device call (at most ~9.5 min):
#   run(command="bash benchmarks/device/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# after `bash benchmarks/device/fetch_wheels.sh` here. Installs the carried wheels into
# /tmp/site, then: the CUDA tests, and the capture-overhead benchmark on the device path
# (parameters on the GPU: per-step scalars, rounding, sketch and sign bits computed there, copies
# on a side stream) for the fast MLP, ResNet-18 and a 185M-parameter transformer, each log in
# $OUT (partial logs come back too when a step times out). Targets (issue 12): ResNet-18 every
# step, rounded:7 <= 1.05x and sketch <= 1.02x.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no registry from there
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, zarr, dask, numcodecs; import numpy, xarray, numba; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'zarr', zarr.__version__, 'numpy', numpy.__version__, 'xarray', xarray.__version__, 'numba', numba.__version__)"; } 2>&1 | tee "$OUT/env.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.txt"
B="python3 benchmarks/capture_overhead.py --device cuda --writer-threads 8 --floor-repeats 3"
timeout 80 $B --model mlp --steps 40 --repeats 4 --tiers lossless rounded:7 sketch:16384 2>&1 | tee "$OUT/mlp.txt"
timeout 150 $B --model resnet18 --steps 20 --repeats 4 --tiers lossless:raw rounded:7 sketch:16384 2>&1 | tee "$OUT/resnet18.txt"
timeout 190 $B --model transformer --steps 10 --repeats 3 --tiers rounded:7 sketch:16384 2>&1 | tee "$OUT/transformer.txt"
echo "gpu checks done"
