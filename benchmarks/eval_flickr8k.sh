#!/usr/bin/env bash
# The README's eval table: magic-mm-tiny on the flickr8k-1k test tasks of tasks.yaml.
# A second run is free (embeddings are cached per model); pass --no-cache to recompute.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-magic-mm-tiny}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: two spinning threads crawl on a busy shared CPU
.venv/bin/magic-mm eval --tasks tasks.yaml --model "$MODEL" --out "benchmarks/results/eval-${MODEL//\//_}" "$@"
