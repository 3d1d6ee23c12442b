#!/usr/bin/env bash
# Every koajax benchmark with a GPU mode, in one go, on one GPU; then one JSON
# and one Markdown table (benchmarks/gpu_report.py) with the share of the
# GPU's peak each step reaches and the targets met or missed.
#
#   benchmarks/gpu.sh [OUT]          # on a GPU host, in about 8 minutes
#   benchmarks/gpu.sh --dry [OUT]    # CPU only: tiny sizes, no PyTorch
#
# OUT (default /tmp/koajax-gpu) receives one JSON per benchmark, gpu.json,
# gpu.md and each benchmark's log. The dry mode runs every stage the same
# way at sizes a 2-core CPU does in about a minute, without PyTorch, so the
# script is exercised in CI and cannot rot; its figures mean nothing.
# Environment: PEAK_TFLOPS overrides the peak (default: by device kind).
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry" ]]; then dry=1; shift; fi
out="${1:-/tmp/koajax-gpu}"
mkdir -p "$out"
py="${PYTHON:-python}"
start=$SECONDS

stage() {  # stage NAME COMMAND...: runs one benchmark, its log in OUT
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if ! "$@" > "$out/$name.log" 2>&1; then
    echo "== $name failed; the end of its log ($out/$name.log):"
    tail -20 "$out/$name.log"
    return 1
  fi
  echo "== $name: $((SECONDS - t0)) s"
}

if (( dry )); then
  # One CPU device, tiny networks and batches, the PyTorch sides off. The
  # method steps' sizes are tests/test_benchmarks.py's, so under the tests'
  # compilation cache they compile once.
  export JAX_PLATFORMS=cpu
  steps=(--steps=1 --rounds=1 --torch=false --cpu_devices=1)
  stage train_step_b2 "$py" benchmarks/train_step.py "${steps[@]}" \
      --methods=supervised --batch_size=2 --dtype=float32,bfloat16 \
      --width=2 --out="$out/train_step_b2.json"
  stage mc_dropout "$py" benchmarks/mc_dropout_sweep.py --torch=false \
      --pool=4 --chunk=2 --samples=2 --width=2 --rounds=1 --cpu_devices=1 \
      --out="$out/mc_dropout.json"
  stage pipeline "$py" benchmarks/pipeline_throughput.py --num_knees=32 \
      --roi_px=160 --batch_size=4 --workers=0,1 --warmup=1 --batches=2 \
      --repeats=1 --aug_batch_sizes=2 --aug_calls=1 --out="$out/pipeline.json"
  stage oarsi_step "$py" benchmarks/oarsi_step.py "${steps[@]}" \
      --networks=resnet18 --batch_size=4 --size=32 --out="$out/oarsi_step.json"
  stage confidence_step "$py" benchmarks/confidence_step.py "${steps[@]}" \
      --losses=hybrid --batch_size=4 --size=32 --out="$out/confidence_step.json"
  stage coherence_step "$py" benchmarks/coherence_step.py "${steps[@]}" \
      --backbone=resnet18 --batch_size=2 --size=64 \
      --out="$out/coherence_step.json"
else
  steps=(--steps=5 --rounds=2)
  # SL and Semixup at both batch sizes and precisions against PyTorch eager;
  # torch.compile (a minute of compiling per step) at batch 256 only.
  stage train_step_b32 "$py" benchmarks/train_step.py "${steps[@]}" \
      --batch_size=32 --dtype=float32,bfloat16 --out="$out/train_step_b32.json"
  stage train_step_b256 "$py" benchmarks/train_step.py "${steps[@]}" \
      --batch_size=256 --dtype=float32,bfloat16 --compile \
      --out="$out/train_step_b256.json"
  # The paper's pool (8,050 knees) rounded up to whole chunks.
  stage mc_dropout "$py" benchmarks/mc_dropout_sweep.py --torch=false \
      --pool=8064 --chunk=64 --samples=50 --rounds=1 \
      --out="$out/mc_dropout.json"
  stage pipeline "$py" benchmarks/pipeline_throughput.py --batch_size=256 \
      --workers=0,1,2,4,8 --batches=10 --repeats=2 \
      --out="$out/pipeline.json"
  stage oarsi_step "$py" benchmarks/oarsi_step.py "${steps[@]}" \
      --networks=resnet50 --batch_size=32 --dtype=bfloat16 \
      --out="$out/oarsi_step.json"
  stage confidence_step "$py" benchmarks/confidence_step.py "${steps[@]}" \
      --batch_size=256 --dtype=bfloat16 --out="$out/confidence_step.json"
  stage coherence_step "$py" benchmarks/coherence_step.py "${steps[@]}" \
      --backbone=resnet50 --batch_size=16 --size=320 --dtype=bfloat16 \
      --out="$out/coherence_step.json"
fi

"$py" benchmarks/gpu_report.py "$out" ${PEAK_TFLOPS:+--peak_tflops=$PEAK_TFLOPS}
echo "== all stages: $((SECONDS - start)) s; $out/gpu.md, $out/gpu.json"
