#!/usr/bin/env bash
# Run HERE (a machine with the package registries), in the repository root, before a GPU check:
# downloads the Python 3.12 x86-64 wheels that the lent GPU machine lacks (it has python3 3.12
# with torch, numpy, xarray, pandas, numba, pytest, but no zarr/dask; it cannot reach a registry)
# into .whl/ (git-ignored), for `run(carry=[".whl"], ...)` with benchmarks/device/gpu_checks.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
PKGS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 zarrs==0.2.3
dask==2026.8.0 distributed==2026.8.0 tornado==6.6.1 tblib==3.2.2 zict==3.0.0 partd==1.4.2
locket==1.0.0 mnist1d==0.0.2.post1"
for p in $PKGS; do
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_34_x86_64 -d .whl "$p"
done
du -sh .whl && ls .whl
