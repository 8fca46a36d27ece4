#!/usr/bin/env bash
# Run quantplug-eetq's tests against an EETQ already installed on a CUDA machine; results under $OUT.
#
#   OUT=/tmp/out scripts/eetq_gpu.sh [extra pytest args]
#
# This script does not build EETQ: install it first (docs/backends.md#eetq says how,
# including the sm_90 caveat). Wheels the machine lacks may be carried unpacked in
# .gpu/site (pip install --target .gpu/site ...): it is put first on PYTHONPATH.
# quantplug and quantplug-eetq are installed editable, without dependencies or an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ -d .gpu/site ]; then export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"; fi
# EETQ's extension (EETQ.*.so) finds libc10 only once torch is imported
if ! $PY -c 'import torch, EETQ, eetq' >"$OUT/eetq_import.log" 2>&1; then
  echo "EETQ is not importable here (see docs/backends.md#eetq):"; tail -5 "$OUT/eetq_import.log"; exit 2
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/eetq \
    >"$OUT/eetq_install.log" 2>&1 || { echo "install failed:"; tail -20 "$OUT/eetq_install.log"; exit 2; }

{ date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  $PY -m pip show eetq 2>/dev/null | grep -E "^(Name|Version|Location)"
} 2>&1 | tee "$OUT/eetq_env.txt"

EETQ_GPU_RESULTS="$OUT/eetq_gpu_results.json" timeout "${TEST_TIMEOUT:-500}" \
  $PY -m pytest tests/gpu/test_eetq_gpu.py plugins/eetq -q -s -rs --no-header -p no:cacheprovider "$@" 2>&1 \
  | tee "$OUT/eetq_gpu_tests.txt" | grep -vE "^(stand-in merge|$)" | tail -80
