#!/usr/bin/env bash
# The README's bench table and plot, on this machine (CPU): magic-mm-tiny with four compression
# variants, repetitions interleaved, plus the text→image quality of each variant.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
export OMP_NUM_THREADS=1  # on a shared, busy machine two spinning threads run several times slower than one
mkdir -p "$OUT"
nice -n 10 .venv/bin/magic-mm bench --model magic-mm-tiny --compression none,bilinear:2,bilinear:4,avgpool:4 \
    --reps 3 --items 3 --batch 8 --threads 1 --tasks benchmarks/flickr8k-t2i.yaml \
    --plot "$OUT/bench-magic-mm-tiny.png" --save "$OUT/bench-magic-mm-tiny.json" --quiet
