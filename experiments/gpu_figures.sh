#!/usr/bin/env bash
# The README's accelerator figures in one run, on a machine with a GPU and a CUDA build of
# jax already installed (jaxopt2 itself runs from this checkout, nothing is installed):
#
#   bash experiments/gpu_figures.sh [OUT_DIR]      # default OUT_DIR: experiments/results
#
# 1. bench_optimizers.py: every registered optimizer on the digits autoencoder (300 steps,
#    batch 256), mean step time; the CPU figures beside them are bench_optimizers_cpu.jsonl.
# 2. bench_curvature.py --only trace: Hutchinson trace, one vmap over the probes vs a
#    compiled loop (the CPU run is bench_curvature_trace.jsonl).
# 3. bench_probe_groups.py: probe batch size against the plain loop, per case.
# Each writes JSON lines into OUT_DIR (suffix _gpu) and its log (gpu_figures.log); about 5
# minutes on one H100/H200. A part that fails is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-experiments/results}"
mkdir -p "$out"
: > "$out/gpu_figures.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY'
import jax

print({"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()]})
if jax.default_backend() != "gpu":
    raise SystemExit("no GPU backend: these are the accelerator figures")
PY
[ $? -eq 0 ] || exit 1
status=0
part() {
  echo "== $*" | tee -a "$out/gpu_figures.log"
  "$@" 2>&1 | tee -a "$out/gpu_figures.log" || { echo "FAILED: $*" | tee -a "$out/gpu_figures.log"; status=1; }
}
part python3 experiments/bench_optimizers.py --out "$out/bench_optimizers_gpu.jsonl"
part python3 experiments/bench_curvature.py --only trace --no-peer \
  --out "$out/bench_curvature_trace_gpu.jsonl"
part python3 experiments/bench_probe_groups.py --out "$out/bench_probe_groups_gpu.jsonl"
exit $status
