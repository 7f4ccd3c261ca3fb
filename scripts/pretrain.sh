#!/usr/bin/env bash
# Regenerates the shipped models in crates/mnist-models/pretrained/: each built-in model (three solutions x
# seed/improved) trained once with its README recipe on seed $SEED (default 1), 10 epochs, on the first
# 54,000 training images; then its weights (<solution>-<variant>.safetensors) and what it is
# (<solution>-<variant>.json: model config, seed, command, date and commit, parameters, validation
# accuracy, test images right) are copied there. Rebuild afterwards: the crate embeds the files, and its
# tests check that each model still scores exactly what its JSON records.
#
#   scripts/pretrain.sh [solution-variant...]      # default: all six, e.g. conv-improved separable-seed
#
# Environment: SEED (default 1), MNIST_DIR (default ../shared/data/mnist), OUT (run folders, default
# runs/pretrain), BIN_DIR (our binaries; default target/release, built first).
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${SEED:-1}
export MNIST_DIR=${MNIST_DIR:-$(pwd)/../shared/data/mnist}
out=${OUT:-runs/pretrain}
dest=crates/mnist-models/pretrained
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(conv-seed conv-improved separable-seed separable-improved inception-seed inception-improved)
fi
bin=${BIN_DIR:-}
if [ -z "$bin" ]; then
  cargo build --release -p solution-conv -p solution-separable -p solution-inception
  bin=target/release
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$dest"
for m in "${models[@]}"; do
  s=${m%-*}
  v=${m#*-}
  run=$out/$m-seed$seed
  cmd="cargo run --release -p solution-$s -- train --variant $v --seed $seed"
  echo "== $m: $cmd --out $run" >&2
  "$bin"/solution-"$s" train --variant "$v" --seed "$seed" --quiet --overwrite --out "$run"
  python3 - "$run" "$cmd" "$(date -u +%Y-%m-%d) at commit $commit" > "$dest/$m.json.tmp" <<'PY'
import json, sys
run, cmd, made = sys.argv[1:4]
cfg = json.load(open(f"{run}/config.json"))
res = json.load(open(f"{run}/results.json"))
conf = res["confusion"]
info = {
    "model": cfg["model"],
    "seed": res["seed"],
    "command": cmd,
    "made": made,
    "params": res["params_total"],
    "val_accuracy": res["final_val_accuracy"],
    "test_correct": sum(conf[i][i] for i in range(len(conf))),
    "test_images": sum(map(sum, conf)),
}
print(json.dumps(info, indent=2))
PY
  cp "$run/model.safetensors" "$dest/$m.safetensors.tmp"
  mv "$dest/$m.safetensors.tmp" "$dest/$m.safetensors"
  mv "$dest/$m.json.tmp" "$dest/$m.json"
  python3 -c "import json,sys; d=json.load(open('$dest/$m.json')); print('$m: test %.2f%% (%d/%d), val %.2f%%' % (100*d['test_correct']/d['test_images'], d['test_correct'], d['test_images'], 100*d['val_accuracy']))"
done
