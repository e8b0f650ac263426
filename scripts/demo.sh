#!/usr/bin/env bash
# `make demo`: the whole training process on the built-in Shakespeare corpus.
#   prepare (char, byte and BPE tokenizers) -> train a small char model (~4 minutes on 2 CPU cores)
#   -> evaluate on the test split -> generate a sample -> show where the loss plot is.
# Re-running continues the same run (--resume auto), so a finished demo replays in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
LM=.venv/bin/lmforge

for kind in char byte bpe; do
  echo "== lmforge prepare --dataset shakespeare --tokenizer $kind"
  $LM prepare --dataset shakespeare --tokenizer "$kind" --vocab-size 4096 --out "data/shakespeare-$kind" --force
done

echo "== lmforge train --config shakespeare-char"
$LM train --config shakespeare-char --data data/shakespeare-char --run-dir runs/demo --resume auto

echo "== lmforge eval runs/demo --split test"
$LM eval runs/demo --split test

echo "== lmforge generate runs/demo --prompt 'ROMEO:'"
$LM generate runs/demo --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 40 --seed 7

echo
echo "loss curves: runs/demo/loss.png   (TensorBoard: .venv/bin/tensorboard --logdir runs/demo/tb)"
