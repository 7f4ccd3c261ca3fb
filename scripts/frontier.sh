#!/usr/bin/env bash
# The accuracy-vs-size map (README "The frontier"): every model of frontier/<solution>.json trained with the
# improved recipe on the fresh seeds 1-5, each run tested once (`sweep PLAN --final NAMES`), then
# `frontier` over their final.json files and the other points named below, into frontier/.
#
#   scripts/frontier.sh [solution...]        # default: conv separable inception
#
# Environment: JOBS (runs at once, default 2), SEEDS (default 1,2,3,4,5), OUT (run folders, default
# runs/frontier), BIN_DIR (our binaries; default target/release, built first), MNIST_DIR (default
# ../shared/data/mnist). Finished runs are reused: rerunning goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export MNIST_DIR=${MNIST_DIR:-$(pwd)/../shared/data/mnist}
jobs=${JOBS:-2}
seeds=${SEEDS:-1,2,3,4,5}
out=${OUT:-runs/frontier}
solutions=("$@")
if [ ${#solutions[@]} -eq 0 ]; then
  solutions=(conv separable inception)
fi
bin=${BIN_DIR:-}
if [ -z "$bin" ]; then
  cargo build --release -p solution-conv -p solution-separable -p solution-inception
  bin=target/release
fi
for s in "${solutions[@]}"; do
  plan=frontier/$s.json
  # Every recipe of the plan: its baseline (the improved variant) and its candidates; the improved model (the
  # wide-early design) already has its final runs on these seeds, from the sweep that chose it (below), so it
  # is not trained again.
  names=$(grep -o '"name": *"[^"]*"' "$plan" | sed 's/.*"\([^"]*\)"$/\1/' | paste -sd, -)
  names=${names#improved,}
  echo "== $s: solution-$s sweep $plan --final $names --seeds $seeds --jobs $jobs --out $out/$s" >&2
  "$bin"/solution-"$s" sweep "$plan" --final "$names" --seeds "$seeds" --jobs "$jobs" --out "$out/$s"
  for d in "$out/$s"/final/*/; do
    name=$(basename "$d")
    mkdir -p "frontier/results/$s/$name"
    cp "$d/final.json" "$d/final.txt" "frontier/results/$s/$name/"
  done
done
# The improved conv (8,184 params) is the final run of sweeps/wide-early/conv-more.json, the improved separable
# (4,763) that of sweeps/full-budget/separable.json, the improved inception (3,066) that of
# sweeps/recipe-and-head/inception.json.
"$bin"/solution-conv frontier frontier/results sweeps/wide-early/results/conv-more/final \
  sweeps/full-budget/results/separable/final sweeps/recipe-and-head/results/inception/final --out frontier
