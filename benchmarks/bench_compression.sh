#!/usr/bin/env bash
# The README's bench numbers and plot, on this machine (CPU):
#  1. magic-mm-tiny with four compression variants, interleaved, plus text→image quality per variant;
#  2. random-init architectures: InternVL3-1B/2B-shaped (with and without bilinear:2) and a
#     CLIP ViT-B/32-shaped dual encoder.  The 2B-shaped model needs ~9 GB RAM in fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
export OMP_NUM_THREADS=1  # on a shared, busy machine two spinning threads run several times slower than one
mkdir -p "$OUT"
nice -n 10 .venv/bin/magic-mm bench --model magic-mm-tiny --compression none,bilinear:2,bilinear:4,avgpool:2 \
    --reps 3 --items 3 --batch 8 --threads 1 --tasks benchmarks/flickr8k-t2i.yaml \
    --plot "$OUT/bench-magic-mm-tiny.png" --save "$OUT/bench-magic-mm-tiny.json" --quiet
nice -n 10 .venv/bin/magic-mm bench --compression "" --archs internvl3-1b,internvl3-2b,clip-vit-b32 \
    --arch-compression none,bilinear:2 --arch-reps 3 --arch-items 1 --threads 1 \
    --save "$OUT/bench-random-archs.json" --quiet
