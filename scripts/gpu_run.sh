#!/usr/bin/env bash
# Run quantplug's GPU tests and `quantplug bench` on a CUDA machine; results under $OUT.
#
#   OUT=/tmp/out scripts/gpu_run.sh [env] [tests] [bench] [model]    (default: all four)
#
# Wheels the machine lacks (bitsandbytes, hqq, peft, torchao, ...) may be
# carried unpacked in .gpu/site (pip install --target .gpu/site ...): it is put
# first on PYTHONPATH. quantplug and the plugins are installed editable,
# without dependencies and without an index. 2026-12-04 (H200): .gpu/site held
# bitsandbytes 0.50.2 (only libbitsandbytes_cuda130.so and _cpu.so kept: 4 MB),
# torchao 0.18.0, hqq 0.2.8.post1 with termcolor, and the core's
# importlib_metadata with lazy_importer and zipp (the image lacks them): 25 MB.
# Stage "fused": scripts/tune_fused.py (fused GEMV + LoRA kernels, graph time); "profile": ncu on them;
# "host": scripts/profile_host.py (the Python of an eager one-token call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=${*:-env tests bench model}
BENCH_ARGS=${BENCH_ARGS:-}
MODEL_ARGS=${MODEL_ARGS:-}

if [ -d .gpu/site ]; then export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"; fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    $(for p in bnb hqq torchao gptqmodel; do [ -f plugins/$p/pyproject.toml ] && echo -e plugins/$p; done) \
    >"$OUT/install.log" 2>&1 || { echo "install failed:"; tail -20 "$OUT/install.log"; }

qp() { $PY -c 'import sys; from quantplug.apps.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

for stage in $STAGES; do
  case $stage in
    fused)
      timeout ${FUSED_TIMEOUT:-300} $PY scripts/tune_fused.py "$OUT/fused.json" ${FUSED_ARGS:-} 2>&1 | tee "$OUT/fused.log" | tail -30 ;;
    profile)  # Nsight Compute on one call of each fused kernel (PROFILE_ARGS="OUT IN [TOKENS]", default 4096 4096 1;
      # PROFILE_KERNELS: the kernel-name pattern, gemv_kernel for one token, lora_kernel for the tensor-core ones)
      timeout ${PROFILE_TIMEOUT:-120} ncu --clock-control none -k regex:${PROFILE_KERNELS:-gemv_kernel} -c ${PROFILE_COUNT:-5} --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section LaunchStats --section InstructionStats \
        --section MemoryWorkloadAnalysis $PY scripts/profile_fused.py ${PROFILE_ARGS:-} \
        >"$OUT/ncu.txt" 2>&1; tail -5 "$OUT/ncu.txt" ;;
    host)  # where an eager one-token call's host time goes (HOST_ARGS, e.g. "--formats bnb --shape 4096x4096")
      timeout ${HOST_TIMEOUT:-200} $PY scripts/profile_host.py "$OUT/host.json" ${HOST_ARGS:-} 2>&1 | tee "$OUT/host.log" | tail -30 ;;
    trainprof)  # where a training step's time goes (torch.profiler), quantplug and PEFT, per backend
      for b in ${TRAINPROF_BACKENDS:-bnb}; do
        timeout ${TRAINPROF_TIMEOUT:-200} $PY scripts/profile_training.py "$OUT/train_profile.txt" --backend $b \
          >>"$OUT/train_profile.log" 2>&1
      done; cat "$OUT/train_profile.txt" ;;
    tune)
      timeout ${TUNE_TIMEOUT:-300} $PY scripts/tune_triton.py "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | grep -v "^skip" | tail -30 ;;
    env)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
        $PY - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    dst.copy_(src)
end.record()
torch.cuda.synchronize()
print(f"copy bandwidth (read+write) {2 * src.numel() * 10 / start.elapsed_time(end) / 1e6:.0f} GB/s")
del src, dst
for name in ("triton", "bitsandbytes", "peft", "hqq", "torchao", "transformers", "accelerate", "matplotlib"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "FAILED", type(exc).__name__, str(exc)[:200])
PY
        qp doctor; } 2>&1 | tee "$OUT/env.txt" ;;
    tests)
      timeout ${TEST_TIMEOUT:-300} $PY -m pytest ${TEST_PATHS:-tests/gpu} -q --no-header -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} \
        2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 ;;
    bench)
      timeout ${BENCH_TIMEOUT:-420} $PY -c "import sys; from quantplug.apps.cli import main; sys.exit(main(sys.argv[1:]))" bench --out "$OUT/bench.json" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
    model)  # MODEL_BACKENDS="bnb hqq": one run each (model-bnb.json, ...); MODEL_TIMEOUT is per run
      for b in ${MODEL_BACKENDS:-_}; do
        [ "$b" = _ ] && b=
        timeout ${MODEL_TIMEOUT:-400} $PY -c "import sys; from quantplug.apps.cli import main; sys.exit(main(sys.argv[1:]))" bench --model --no-layers --out "$OUT/model${b:+-$b}.json" ${b:+--backends $b} $MODEL_ARGS 2>&1 | tee "$OUT/model${b:+-$b}.log" | tail -30
      done ;;
  esac
done
