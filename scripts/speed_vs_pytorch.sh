#!/usr/bin/env bash
# Training speed of this project against PyTorch (and optionally Keras) on the same architecture and recipe,
# (improved: scripts/torch_spec.py builds the peer from the spec our binary trains; seed: torch_seed.py),
# in one sitting: each configuration trains for 2 epochs in ours and in the peer, and the epoch-2 training
# seconds (validation excluded) and their ratio are printed; then inference throughput at batch 1,000 (ours from
# `cargo bench --bench models`, the peer's from its own timing) and the speed-up.
#
#   scripts/speed_vs_pytorch.sh [CONFIG...]     # default: every configuration, e.g. conv-improved seed-inception
#
# CONFIG is <solution>-<variant> (conv-improved, separable-seed, ...). Environment:
#   THREADS      threads for both sides (default 2: RAYON_NUM_THREADS and torch.set_num_threads)
#   ANCHORS      the peer programs (default ../shared/anchors beside the repository)
#   MNIST_DIR    the MNIST files (default ../shared/data/mnist)
#   VENV         PyTorch's virtual environment, made the first time (default ~/.cache/mnist-challenge/venv-torch)
#   KERAS=1      also time the Keras anchor for the seed configurations (its own venv, tensorflow-cpu 2.21.0)
#   BIN_DIR      where our binaries are (default target/release; built if missing)
#   OUT          where the logs go (default a temporary folder, printed)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
threads=${THREADS:-2}
anchors=${ANCHORS:-$root/../shared/anchors}
export MNIST_DIR=${MNIST_DIR:-$root/../shared/data/mnist}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/mnist-challenge
venv=${VENV:-$cache/venv-torch}
bin=${BIN_DIR:-$root/target/release}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
  configs=(conv-improved separable-improved inception-improved conv-seed separable-seed inception-seed)
fi

[ -d "$anchors" ] || { echo "error: no anchors folder at $anchors (set ANCHORS)" >&2; exit 2; }
[ -d "$MNIST_DIR" ] || { echo "error: no MNIST folder at $MNIST_DIR (set MNIST_DIR)" >&2; exit 2; }
if [ ! -x "$bin/solution-conv" ]; then
  cargo build --release -p solution-conv -p solution-separable -p solution-inception
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, numpy" 2>/dev/null; then
  echo "making PyTorch's virtual environment in $venv (python3 -m venv, pip install torch numpy; once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch numpy
fi
if [ "${KERAS:-0}" = 1 ]; then
  kvenv=$cache/venv-keras
  if [ ! -x "$kvenv/bin/python" ] || ! "$kvenv/bin/python" -c "import tensorflow" 2>/dev/null; then
    echo "making Keras's virtual environment in $kvenv (pip install tensorflow-cpu==2.21.0 numpy; once)" >&2
    python3 -m venv "$kvenv"
    "$kvenv/bin/pip" install -q tensorflow-cpu==2.21.0 numpy
  fi
fi

# The second `train_s` of a peer's log ("epoch 2 ... train_s S ..."), or the second epoch's seconds.
peer_epoch2() { sed -n 's/^epoch 2 .*train_s \([0-9.]*\).*/\1/p' "$1" | head -n 1; }
keras_epoch2() { sed -n 's/^epoch 2 .*s \([0-9.]*\).*/\1/p' "$1" | head -n 1; }
peer_ips() { sed -n 's/^infer batch 1000 .*imgs_per_s \([0-9.]*\).*/\1/p' "$1" | head -n 1; }

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$threads threads each; logs in $out"
printf '%-24s %10s %10s %8s\n' "training, epoch 2" "ours s" "peer s" ratio
for c in "${configs[@]}"; do
  s=${c%-*} v=${c#*-}
  case "$s/$v" in conv/*|separable/*|inception/*) ;; *) echo "error: unknown configuration '$c'" >&2; exit 2 ;; esac
  case "$v" in seed|improved) ;; *) echo "error: unknown configuration '$c'" >&2; exit 2 ;; esac
  run="$out/ours-$c"
  RAYON_NUM_THREADS=$threads "$bin/solution-$s" train --variant "$v" --epochs 2 --seed 1 --quiet --overwrite \
    --out "$run" >"$out/ours-$c.log" 2>&1
  ours=$(python3 -c "import json,sys; print('%.1f' % json.load(open(sys.argv[1]))['epoch_seconds'][1])" \
    "$run/results.json")
  if [ "$v" = improved ]; then
    # The peer is built (scripts/torch_spec.py) from the spec our binary itself trains (`summary --spec`), so it
    # is always the same architecture; its parameter count must match ours.
    spec=$out/$c.spec.json
    "$bin/solution-$s" summary --variant "$v" --spec >"$spec"
    (cd "$anchors" && PYTHONPATH=$anchors SEED=1 THREADS=$threads "$venv/bin/python" "$root/scripts/torch_spec.py" \
      "$spec" "$s" 2) >"$out/torch-$c.log" 2>&1
    ours_params=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['params_total'])" "$run/results.json")
    peer_params=$(sed -n 's/.* params \([0-9]*\) trainable.*/\1/p' "$out/torch-$c.log" | head -n 1)
    if [ "$ours_params" != "$peer_params" ]; then
      echo "error: $c has $ours_params params here but $peer_params in the PyTorch peer ($out/torch-$c.log)" >&2
      exit 1
    fi
  else
    (cd "$anchors" && SEED=1 "$venv/bin/python" torch_seed.py "$s" 2) >"$out/torch-$c.log" 2>&1
  fi
  peer=$(peer_epoch2 "$out/torch-$c.log")
  name="$c (torch)"
  if [ "$v" = seed ] && [ "${KERAS:-0}" = 1 ]; then
    (cd "$anchors" && "$kvenv/bin/python" keras_seed.py "$s" 2) >"$out/keras-$c.log" 2>&1 || true
    keras=$(keras_epoch2 "$out/keras-$c.log")
    if [ -n "$keras" ] && python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)" "$keras" "$peer"; then
      peer=$keras name="$c (keras)"
    fi
  fi
  python3 - "$name" "$ours" "$peer" <<'EOF'
import sys
name, ours, peer = sys.argv[1:]
print(f"{name:<24} {ours:>10} {peer or '-':>10} {float(ours) / float(peer) if peer else float('nan'):>8.2f}")
EOF
done
echo "# ratio: our seconds / the peer's (lower is faster)"
# Inference: `cargo bench --bench models` (batch 1,000 forward passes) against the peers' throughput.
RAYON_NUM_THREADS=$threads cargo bench -q --bench models -- --quick --no-reference --filter "fwd b1000" \
  >"$out/bench.log" 2>&1
printf '%-24s %12s %12s %8s\n' "inference, batch 1000" "ours img/s" "peer img/s" "speed-up"
for c in "${configs[@]}"; do
  s=${c%-*} v=${c#*-}
  ours=$(awk -v m="$s/$v" '$1 == m && $2 == "fwd" && $3 == "b1000" { print $4 }' "$out/bench.log")
  peer=$(peer_ips "$out/torch-$c.log")
  python3 - "$c (torch)" "$ours" "$peer" <<'EOF'
import sys
name, ours, peer = sys.argv[1:]
x = f"{float(ours) / float(peer):.1f}x" if ours and peer else "-"
print(f"{name:<24} {ours or '-':>12} {peer or '-':>12} {x:>8}")
EOF
done
