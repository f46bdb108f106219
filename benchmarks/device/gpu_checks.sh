#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE, in the repository root, as one device call (at most ~9.5 min):
#   run(command="bash benchmarks/device/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# after `bash benchmarks/device/fetch_wheels.sh` here. Installs the carried wheels into
# /tmp/site, then: the CUDA tests and the capture-overhead benchmark on the GPU (the ~1M CNN
# as in the README, a longer-step CNN and ResNet-18 with 8 writer threads), each log in $OUT
# (partial logs come back too when a step times out).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, zarr, dask, numcodecs; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'zarr', zarr.__version__)"; } 2>&1 | tee "$OUT/env.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.txt"
B="python3 benchmarks/capture_overhead.py --device cuda --steps 20 --repeats 4"
# the README's CPU table on the GPU (a ~1M CNN's step is a few ms there: the writer's throughput,
# 8 MB per step, is what the ratio measures)
timeout 150 $B --hw 8 32 --tiers lossless lossless:raw sketch:4096 2>&1 | tee "$OUT/cnn.txt"
# longer steps and 8 writer threads (16 cores there): where every-step recording should vanish
timeout 120 $B --hw 32 --batch 1024 --tiers lossless lossless:raw --writer-threads 8 2>&1 | tee "$OUT/cnn_b1024_wt8.txt"
timeout 150 $B --model resnet18 --tiers lossless lossless:raw --writer-threads 8 2>&1 | tee "$OUT/resnet18_wt8.txt"
echo "gpu checks done"
