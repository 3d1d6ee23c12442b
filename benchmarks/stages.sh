# Sourced by the GPU benchmark scripts (gpu.sh, gpu_localizer.sh).
#
# `stages_begin DEFAULT_OUT "$@"` reads the scripts' arguments, [--dry]
# [OUT], and sets dry (1 with --dry), out (OUT or DEFAULT_OUT, made), py
# ($PYTHON or python), budget ($GPU_BUDGET_S or 600 s), start and failed,
# and starts $out/stages.tsv.
#
# `stage NAME LIMIT_S COMMAND...` runs one stage in its own process, its log
# in $out/NAME.log, cut at LIMIT_S or at what is left of $budget seconds
# since $start (unless $dry), and appends its outcome and seconds to
# $out/stages.tsv. A stage that fails or runs out of time sets failed=1 and
# shows the end of its log; the next one runs. A stage with under 30 s of
# the budget left is skipped.
stage() {  # stage NAME LIMIT_S COMMAND...: above
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - start))) t0=$SECONDS rc=0 outcome=ok
  (( dry )) && left=$limit
  if (( left < 30 )); then
    echo "== $name skipped: ${left} s of the ${budget} s budget left"
    printf '%s\tskipped\t0\n' "$name" >> "$out/stages.tsv"
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (at most $limit s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
  if (( rc == 124 || rc == 137 )); then
    outcome=timed_out
  elif (( rc != 0 )); then
    outcome=failed
  fi
  printf '%s\t%s\t%d\n' "$name" "$outcome" $((SECONDS - t0)) >> "$out/stages.tsv"
  if [[ $outcome != ok ]]; then
    failed=1
    echo "== $name $outcome after $((SECONDS - t0)) s; the end of its log:"
    tail -15 "$out/$name.log"
  else
    echo "== $name: $((SECONDS - t0)) s"
  fi
}

stages_begin() {
  local default=$1; shift
  dry=0
  if [[ "${1:-}" == "--dry" ]]; then dry=1; shift; fi
  out="${1:-$default}"
  mkdir -p "$out"
  py="${PYTHON:-python}"
  budget="${GPU_BUDGET_S:-600}"
  start=$SECONDS
  failed=0
  printf 'stage\toutcome\tseconds\n' > "$out/stages.tsv"
}
