#!/usr/bin/env bash
# The full world evaluation on one GPU (the lent H200): python -m helpers evaluate for each named configuration,
# timed, its report and per-run JSON packed into $OUT/<name>.tar.gz; then the world's inpainting gate.
# Usage on the device machine: bash benchmarks/world_evaluation_gpu.sh main two-cats no-ghost-cleanup flips inpaint-gate
# CELLS=N: N processes share the GPU, each making every N-th cell (benchmarks/world_evaluation_cells.py), the report
# then reads them back; CELL_LIMIT: their seconds (default 520; cells left unmade come back in $OUT/<name>.runs*.tar
# for a later call); CARRY=<folder>: <folder>/<name> (its loras/, runs/) is copied in first, so carried LoRAs are
# used and finished cells resume; EXTRA: more arguments for every evaluation, e.g. "-p eval_seed_start 7000000".
set -eu
python3 -m pip install -q --no-deps .device-wheels/*.whl 2>/dev/null
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
for name in "$@"; do
  case "$name" in
    main) extra=() ;;
    two-cats) extra=(--preset two-cats) ;;
    no-ghost-cleanup) extra=(-p ghost_cleanup_rounds 0) ;;
    flips) extra=(-p random_flip True) ;;  # main with the LoRAs' training views mirrored half of the time
    two-cats-flips) extra=(--preset two-cats -p random_flip True) ;;
    cat-mirrored)  # main with the cat's views mirrored, as mirror-check advises (the mug's not)
      extra=(-p subjects "[{'name': 'cat', 'token': 'sks', 'class_name': 'cat', 'data_dir': 'data/world/cat',
        'mirror': True}, {'name': 'mug', 'token': 'zwx', 'class_name': 'mug', 'data_dir': 'data/world/mug'}]") ;;
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
  read -r -a more <<< "${EXTRA:-}"
  extra+=("${more[@]}")
  if [ -n "${CARRY:-}" ] && [ -d "$CARRY/$name" ]; then
    mkdir -p "/tmp/ev/$name" && cp -r "$CARRY/$name/." "/tmp/ev/$name/"
  fi
  if [ "${CELLS:-1}" -gt 1 ]; then
    python3 -m helpers train --profile world --out "/tmp/ev/$name" --device cuda "${extra[@]}" > "$OUT/$name.log" 2>&1
    for rank in $(seq 0 $((CELLS - 1))); do
      timeout "${CELL_LIMIT:-520}" python3 benchmarks/world_evaluation_cells.py "$rank" "$CELLS" "/tmp/ev/$name" \
        "${extra[@]}" >> "$OUT/$name.cells.log" 2>&1 &
    done
    wait || true
    made=$(ls "/tmp/ev/$name"/runs/*.json 2>/dev/null | wc -l)
    echo "$name: $made cells after $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"
    (cd "/tmp/ev/$name" && tar czf "$OUT/$name.loras.tar.gz" loras)  # to carry into a later call
    if [ "$made" -lt 96 ]; then  # of 3 scenes x 32 seeds; unfinished: the cells come back to carry into the next call
      for k in 0 1 2; do
        (cd "/tmp/ev/$name" && tar cf "$OUT/$name.runs$k.tar" runs/scene${k}_* 2>/dev/null || true)
      done
      continue
    fi
  fi
  python3 -m helpers evaluate --profile world --scenes 3 --seeds 32 --out "/tmp/ev/$name" --device cuda "${extra[@]}" \
    > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log"; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s wall (training included)" | tee -a "$OUT/timing.txt"
  (cd "/tmp/ev/$name" && tar czf "$OUT/$name.tar.gz" report/*.md report/*.csv report/figures/methods_grid.png \
     report/figures/stages.png runs/*.json)
  tail -16 "$OUT/$name.log" | cut -c1-220
done
