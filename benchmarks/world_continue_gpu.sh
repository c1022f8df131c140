#!/usr/bin/env bash
# The world's UNet and text encoders continued from the shipped weights on one GPU (the lent H200), then measured:
# the inpainting gate, the generator's class/colour accuracy, two-object binding, VAE PSNR. The new UNet and text
# encoders come back as $OUT/unet.tar and $OUT/text_encoders.tar (each under the device's 16 MiB per file).
# Usage on the device machine: bash benchmarks/world_continue_gpu.sh LABEL STEPS LR [trainer options...]
#   close-ups (2026-12-02, not shipped):  bash benchmarks/world_continue_gpu.sh closeups 3000 2e-4 --closeups 20000
#   inpainting pairs (2026-12-03):        bash benchmarks/world_continue_gpu.sh pairs 3000 2e-4 --inpaint-pairs 0.5
#   both (2026-12-04, not shipped):      bash benchmarks/world_continue_gpu.sh both 4000 3e-4 --closeups 20000 --inpaint-pairs 0.5
# MEASURE_SHIPPED=1 measures the committed weights first.
set -eu
python3 -m pip install -q --no-deps .device-wheels/*.whl 2>/dev/null
OUT=${OUT:-/tmp/out}
LABEL=$1 STEPS=$2 LR=$3
shift 3
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
measure() {
  python3 -c "
from helpers.notebook import make_config; from helpers.models import load_models; from helpers.scoring import ClipScorer
from helpers.world import evaluate as we
config = make_config('world', output_dir='/tmp/ev/gate')
models = load_models(config, device='cuda'); scorer = ClipScorer.for_config(config, device='cuda')
from dataclasses import replace
for k, v in we.inpaint_accuracy(models, config, scorer, seeds=8).items(): print('$1 inpaint', k, v)
for k, v in we.inpaint_accuracy(models, replace(config, inpaint_strength=1.0), scorer, seeds=8).items():
    print('$1 inpaint at strength 1.0', k, v)
for k, v in we.generator_accuracy(models, config, scorer, 64).items(): print('$1 generator', k, v)
print('$1 two-object binding', we.two_object_binding(models, config, scorer))
print('$1 vae psnr', round(we.vae_psnr(models), 2))
" | tee -a "$OUT/measures.txt"
}
[ "${MEASURE_SHIPPED:-0}" = 1 ] && measure shipped
python3 -m helpers.world.train --out /tmp/w --stages data,unet --vae-from models/world/pipeline/vae \
  --unet-from models/world/pipeline --unet-steps "$STEPS" --unet-lr "$LR" --unet-continue-steps 0 "$@" \
  > "$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
tail -3 "$OUT/train.log"
cp /tmp/w/training_report.json "$OUT/"
for part in unet text_encoder text_encoder_2; do rm -rf "models/world/pipeline/$part"; cp -r "/tmp/w/pipeline/$part" models/world/pipeline/; done
# the weights first: a call that runs out of time while measuring still brings them back
tar cf "$OUT/unet.tar" -C /tmp/w/pipeline unet
tar cf "$OUT/text_encoders.tar" -C /tmp/w/pipeline text_encoder text_encoder_2
measure "$LABEL"
grep -E "all|generator class|binding" "$OUT/measures.txt"
