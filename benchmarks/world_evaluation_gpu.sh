#!/usr/bin/env bash
# The full world evaluation on one GPU (the lent H200): python -m helpers evaluate for each named configuration,
# timed, its report and per-run JSON packed into $OUT/<name>.tar.gz; then the world's inpainting gate.
# Usage on the device machine: bash benchmarks/world_evaluation_gpu.sh main two-cats no-ghost-cleanup inpaint-gate
set -eu
python3 -m pip install -q --no-deps .device-wheels/*.whl 2>/dev/null
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
for name in "$@"; do
  case "$name" in
    main) extra=() ;;
    two-cats) extra=(--preset two-cats) ;;
    no-ghost-cleanup) extra=(-p ghost_cleanup_rounds 0) ;;
    inpaint-gate)
      python3 -c "
from helpers.notebook import make_config; from helpers.models import load_models; from helpers.scoring import ClipScorer
from helpers.world import evaluate as we
config = make_config('world', output_dir='/tmp/ev/gate')
models = load_models(config, device='cuda'); scorer = ClipScorer.for_config(config, device='cuda')
for k, v in we.inpaint_accuracy(models, config, scorer, seeds=8).items(): print('inpaint gate', k, v)
" | tee "$OUT/inpaint_gate.txt"; continue ;;
    *) echo "unknown configuration $name"; exit 2 ;;
  esac
  start=$(date +%s)
  python3 -m helpers evaluate --profile world --scenes 3 --seeds 32 --out "/tmp/ev/$name" --device cuda "${extra[@]}" \
    > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log"; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s wall (training included)" | tee -a "$OUT/timing.txt"
  (cd "/tmp/ev/$name" && tar czf "$OUT/$name.tar.gz" report/*.md report/*.csv report/figures/methods_grid.png \
     report/figures/stages.png runs/*.json)
  tail -16 "$OUT/$name.log" | cut -c1-220
done
