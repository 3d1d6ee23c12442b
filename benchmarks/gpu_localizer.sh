#!/usr/bin/env bash
# The knee localiser on one GPU, in one go: its default presets trained (the
# accuracy target is theirs), both stages on whole films of another seed
# (radiographs/s and KNEEL's figures), and the cache of those films built
# with their landmarks file and without it, through the localiser (the build
# target: at most 2x). benchmarks/localizer_report.py then writes
# localizer.json and localizer.md.
#
#   benchmarks/gpu_localizer.sh [OUT]        # on a GPU host
#   benchmarks/gpu_localizer.sh --dry [OUT]  # CPU: smoke presets, 8 subjects
#
# OUT (default /tmp/koajax-gpu-localizer) receives the reports, each stage's
# log and stages.tsv; the data and runs go to WORK_DIR (default
# /tmp/koajax-gpu-localizer-work), out of OUT: the training set alone is
# 4.4 GB.
# Environment:
#   LOCALIZER     a trained localiser folder (coarse/ and fine/): no training
#   GPU_BUDGET_S  seconds for all stages together (default 600)
#   PYTHON        the interpreter (default python)
# Not yet run on a GPU: the stage limits are estimates (the default presets'
# 60 epochs of about 2,100 knees at 256 and 400 px, the 4.4 GB training set
# made first on the host's cores).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/stages.sh

stages_begin /tmp/koajax-gpu-localizer "$@"
work="${WORK_DIR:-${TMPDIR:-/tmp}/koajax-gpu-localizer-work}"
mkdir -p "$work"
cores=$(nproc)

if (( dry )); then
  export JAX_PLATFORMS=cpu
  coarse=coarse_smoke fine=smoke subjects=8 sites=()
else
  # JAX takes half the GPU's memory, so the build's worker processes (each
  # loads the localiser) have room; they do not preallocate.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
  coarse=coarse fine=default subjects=560 sites=(--sites=E)
fi
localizer="${LOCALIZER:-}"
if [[ -z $localizer ]]; then
  localizer=$work/localizer
  # Each run makes its training data first when it is not there (the
  # variety-2 set, then the stage's cache).
  stage coarse 240 "$py" -m koajax.main \
      --config=configs/localizer.py:$coarse --workdir="$localizer/coarse" \
      --config.data.root="$work/data"
  stage fine 300 "$py" -m koajax.main \
      --config=configs/localizer.py:$fine --workdir="$localizer/fine" \
      --config.data.root="$work/data"
fi
# Films the localiser never saw, their landmarks set aside as a hospital
# archive comes.
films=$work/films-s1
rm -rf "$films" "$films-landmarks.csv"
stage films 120 "$py" -m koajax.data.synthetic --out="$films" \
    --num_subjects=$subjects --seed=1 --workers="$cores"
mv "$films/landmarks.csv" "$films-landmarks.csv" 2>/dev/null
stage localize 120 "$py" benchmarks/localize_films.py \
    --localizer="$localizer" --manifest="$films/manifest.csv" \
    --landmarks="$films-landmarks.csv" "${sites[@]}" \
    --out="$out/localize_films.json"
stage build_landmarks 120 "$py" -m koajax.data.build \
    --manifest="$films/manifest.csv" --landmarks="$films-landmarks.csv" \
    --out="$work/cache-landmarks" --workers="$cores"
stage build_localizer 240 "$py" -m koajax.data.build \
    --manifest="$films/manifest.csv" --localizer="$localizer" \
    --out="$work/cache-localizer" --workers="$cores"

"$py" benchmarks/localizer_report.py --out="$out" --localizer="$localizer" \
    --caches="$work/cache-landmarks,$work/cache-localizer" || failed=1
echo "== all stages: $((SECONDS - start)) s; $out/localizer.md"
exit $failed
