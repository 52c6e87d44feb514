#!/usr/bin/env bash
# The README's random-initialisation timings, on this machine (CPU): InternVL3-1B/2B-shaped
# models with and without bilinear:2, and a CLIP ViT-B/32-shaped dual encoder.
# The 2B-shaped model needs ~9 GB RAM in fp32; workers run one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
export OMP_NUM_THREADS=1  # on a shared, busy machine two spinning threads run several times slower than one
mkdir -p "$OUT"
nice -n 10 .venv/bin/magic-mm bench --compression "" --archs internvl3-1b,internvl3-2b,clip-vit-b32 \
    --arch-compression none,bilinear:2 --arch-reps 3 --arch-items 1 --threads 1 \
    --save "$OUT/bench-random-archs.json" --quiet
