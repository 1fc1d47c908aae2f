#!/usr/bin/env bash
# Every GPU measurement in one go, at most 9.2 minutes (the sum of the steps' time limits)
# on one H200: the CUDA tests, then with --device cuda the SmoothnessMonitor overhead, peak
# memory against steps (torch.cuda.max_memory_allocated; recursive and checkpoint targets),
# inference latency of the export against the source (resnet50, resnet152, ode_resnet; 224x224,
# batch 64), the adjoint's gradient error and memory, depth-flexible inference, and the
# deployed programs under torch.compile against the source compiled (ode_resnet, resnet152). Each
# benchmark writes its own results/*_cuda.* files; this script also writes results/gpu.md, the
# log of the whole run (the last 40 lines of each step's output), for the README.
#
#   bash benchmarks/gpu.sh            # uses .venv/bin/python when present, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1
LOG=benchmarks/results/gpu.md
mkdir -p benchmarks/results

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to measure')" || exit 1

run() {  # run NAME TIMEOUT_S COMMAND...: one step, its output appended to the log
  local name=$1 limit=$2; shift 2
  echo "## $name" >>"$LOG"; echo '```' >>"$LOG"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  echo '```' >>"$LOG"
  echo "exit $status after $((SECONDS - started)) s" | tee -a "$LOG"; echo >>"$LOG"
}

{
  echo "# GPU measurements"
  echo
  "$PY" -c "import torch; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
  date -u +"%Y-%m-%d %H:%M UTC"
  echo
} >"$LOG"

# time limits in seconds: 45 + 75 + 80 + 80 + 60 + 110 + 100 = 550 (the deploy step last: it
# writes its results after each model, ode_resnet first, so a cut-off run keeps what it measured)
run "CUDA tests" 45 "$PY" -m pytest -q -p no:xdist -p no:cacheprovider -k "cuda or gpu" tests
run "SmoothnessMonitor overhead (resnet50, batch 16, 224x224)" 75 "$PY" benchmarks/monitor_overhead.py --device cuda --rounds 2 --steps 100
run "Peak memory vs steps (width 64, 32x32, batch 32)" 80 "$PY" benchmarks/memory.py --device cuda --width 64 --size 32 --batch 32
run "Inference latency: exported neural ODE vs source (224x224, batch 64)" 80 "$PY" benchmarks/speed.py --device cuda --size 224 --batch 64
run "Adjoint gradient error and memory" 60 "$PY" benchmarks/adjoint.py --device cuda
run "Depth-flexible inference on digits" 110 "$PY" benchmarks/depth.py --device cuda
run "Deployed programs under torch.compile vs source (224x224, batch 64)" 100 "$PY" benchmarks/deploy.py --device cuda --toolchains compile --models ode_resnet resnet152 --size 224 --batch 64 --rounds 20 --output benchmarks/results/deploy_cuda.json
echo "total $SECONDS s" | tee -a "$LOG"
echo "wrote $LOG"
