#!/usr/bin/env bash
# The world's scorer retrained on one GPU (the lent H200) beside the shipped pipeline, then measured: its zero-shot
# gates, the inpainting measure on rendered truth (clean and after a VAE round trip), the generator gate and the
# base model's inpainting gate at the shipped settings and at stronger ones, each variant in its own process.
# The new scorer comes back as $OUT/scorer.tar (packed before measuring).
# Usage on the device machine: bash benchmarks/world_scorer_gpu.sh LABEL [trainer options...]
#   decoded views (2026-12-04, the shipped scorer):  bash benchmarks/world_scorer_gpu.sh decoded
set -eu
python3 -m pip install -q --no-deps .device-wheels/*.whl 2>/dev/null
OUT=${OUT:-/tmp/out}
LABEL=$1
shift
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m helpers.world.train --out /tmp/w --stages data,scorer --vae-from models/world/pipeline/vae "$@" \
  > "$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
tail -3 "$OUT/train.log"
cp /tmp/w/training_report.json "$OUT/"
rm -rf models/world/scorer && cp -r /tmp/w/scorer models/world/scorer
tar cf "$OUT/scorer.tar" -C /tmp/w scorer
measure() {  # measure NAME SETTINGS... (config fields as name=value)
  python3 -c "
import sys
from dataclasses import replace
from helpers.notebook import make_config; from helpers.models import load_models; from helpers.scoring import ClipScorer
from helpers.world import evaluate as we
name, settings = sys.argv[1], dict(a.split('=') for a in sys.argv[2:])
config = make_config('world', output_dir='/tmp/ev/' + name)
config = replace(config, **{k: type(getattr(config, k))(v) for k, v in settings.items()})
models = load_models(config, device='cuda'); scorer = ClipScorer.for_config(config, device='cuda')
if name == 'measures':
    for k, v in we.scorer_accuracy(scorer, 200).items(): print('$LABEL scorer', k, v)
    for k, v in we.inpaint_measure_on_truth(config, scorer, 16).items(): print('$LABEL truth', k, v)
    for k, v in we.inpaint_measure_on_truth(config, scorer, 16, decoded_by=models).items():
        print('$LABEL decoded truth', k, v)
    for k, v in we.generator_accuracy(models, config, scorer, 64).items(): print('$LABEL generator', k, v)
else:
    for k, v in we.inpaint_accuracy(models, config, scorer, seeds=8).items(): print('$LABEL inpaint', name, k, v)
" "$@" > "$OUT/measure_$1.txt" 2>&1
}
measure measures &
measure shipped &
measure s1 inpaint_strength=1.0 &
measure s1_rs5 inpaint_strength=1.0 inpaint_resample=5 &
measure s1_rs5_ra4 inpaint_strength=1.0 inpaint_resample=5 region_attention=4 &
wait
cat "$OUT"/measure_*.txt | grep -E "^$LABEL" | grep -vE "width" ; grep -hE "^$LABEL inpaint" "$OUT"/measure_*.txt | grep width || true
