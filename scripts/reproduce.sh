#!/usr/bin/env bash
# Reproduces the README's results table: the three solutions, each as the faithful `seed` variant and as the
# `improved` variant, 5 seeds each, 10 epochs (the recipes' defaults), then prints `compare`'s table.
#
#   scripts/reproduce.sh [OUT_DIR]          # default OUT_DIR: runs/reproduce
#
# Environment: JOBS = runs in parallel (default 1); RAYON_NUM_THREADS = threads per run (default: all cores);
# SEEDS (default "1 2 3 4 5"); VARIANTS (default "seed improved"); SOLUTIONS (default "conv separable inception");
# BIN_DIR = where the binaries are (default target/release; built if missing); MNIST_DIR as usual.
# On 2 cores with JOBS=1 the 30 runs take about 60 minutes; with many cores use JOBS=cores/2 and
# RAYON_NUM_THREADS=2.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/reproduce}
bin=${BIN_DIR:-target/release}
jobs=${JOBS:-1}
if [ ! -x "$bin/solution-conv" ]; then
  cargo build --release -p solution-conv -p solution-separable -p solution-inception
fi
mkdir -p "$out"
# Seed-major order: an interrupted reproduction still has every configuration on the first seeds.
for seed in ${SEEDS:-1 2 3 4 5}; do
  for s in ${SOLUTIONS:-conv separable inception}; do
    for v in ${VARIANTS:-seed improved}; do
      echo "$s $v $seed"
    done
  done
done | xargs -P "$jobs" -L 1 sh -c '
  dir="$0/$2-$3-seed$4"
  if [ -f "$dir/results.json" ]; then exit 0; fi
  mkdir -p "$dir"
  # A run cut short earlier continues from its last checkpoint.
  if [ -f "$dir/checkpoint.safetensors" ]; then
    "$1/solution-$2" train --resume "$dir" --quiet >"$dir/stdout.log" 2>>"$dir/train.log"
  else
    "$1/solution-$2" train --variant "$3" --seed "$4" --quiet --out "$dir" >"$dir/stdout.log" 2>"$dir/train.log"
  fi
  if [ $? -eq 0 ]; then
    tail -n 1 "$dir/stdout.log"
  else
    echo "FAILED: $2 $3 seed $4 (see $dir/train.log)"
  fi' "$out" "$bin"
"$bin/solution-conv" compare "$out"
