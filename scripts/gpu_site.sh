#!/usr/bin/env bash
# Build .gpu/site: the packages the GPU machine's Python 3.12 lacks, unpacked for scripts/gpu_run.sh (which puts the
# folder first on PYTHONPATH; the device call carries it: carry [".gpu"]). It is git-ignored: each new checkout
# builds it again, here, with the dev venv active (requirements-dev.txt), from the package index and that venv:
#
#   bash scripts/gpu_site.sh          # about 1 minute, ~50 MB
#
# - wheels for any Python (bitsandbytes keeps only its CUDA 13 and CPU libraries: the machine runs CUDA 13);
# - pure-Python packages the venv built from sdists (hqq, gptqmodel and what gptqmodel imports), copied from it;
# - pypcre has no CPython 3.12 wheel: a stand-in module gives the standard library's `re` under its names
#   (docs/backends.md, gptq). gptqmodel's layers, buffers and forwards stay gptqmodel's own.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.gpu/site
rm -rf "$SITE"
mkdir -p "$SITE"
python -m pip install -q --target "$SITE" --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform any bitsandbytes==0.50.2 torchao==0.18.0 termcolor importlib_metadata zipp lazy_importer 2>&1 |
  grep -v "^WARNING: Location" || true
find "$SITE/bitsandbytes" -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*_cpu*' -delete
PURE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for pkg in hqq gptqmodel gptqmodel_ext datasets dill multiprocess _multiprocess device_smi logbar tokenicer defuser; do
  cp -r "$PURE/$pkg" "$SITE/"
done
cp -r "$PURE"/gptqmodel-*.dist-info "$PURE"/hqq-*.dist-info "$SITE/"  # their versions, for the plugins' checks
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$SITE/pcre"
cat >"$SITE/pcre/__init__.py" <<'PY'
"""Stand-in for pypcre on the GPU machine (no CPython 3.12 wheel): the standard library's re under its names."""

import enum
import re
from re import Pattern, compile, escape, split  # noqa: F401


class Flag(enum.IntFlag):
    CASELESS = re.IGNORECASE
    MULTILINE = re.MULTILINE
    DOTALL = re.DOTALL
PY
du -sh "$SITE"
