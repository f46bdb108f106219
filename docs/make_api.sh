#!/usr/bin/env bash
# Writes the API reference, generated from the docstrings with pdoc, to docs/api/ (or to $1).
#   pip install -e ".[docs]"   # pdoc
#   bash docs/make_api.sh && open docs/api/index.html
# analysis/ and gradtrace_format/ never import torch; capture/, experiments/ and gradtrace/ do
# (pdoc imports the modules it documents).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/api}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONWARNINGS=ignore
rm -rf "$out"
# every public module by name: the packages' __all__ lists functions, so pdoc would not
# find the submodules by itself
modules() { for f in "$1"/*.py; do b=$(basename "$f" .py); [[ $b == _* ]] || echo "$1.$b"; done; }
"$PY" -m pdoc --docformat google --no-search --no-show-source --footer-text "gradtrace $(git describe --always --dirty 2>/dev/null || echo)" \
  -o "$out" gradtrace_format capture analysis experiments gradtrace \
  $(modules gradtrace_format) $(modules capture) $(modules analysis) $(modules experiments) $(modules gradtrace)
echo "API reference: $out/index.html ($(du -sh "$out" | cut -f1))"
