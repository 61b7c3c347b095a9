#!/usr/bin/env bash
# GRIT vs AdamW on GSM8K: SmolLM2-135M-Instruct (NF4 base, LoRA r = alpha = 16 on all seven
# projections), the seeds' conservative recipe and its AdamW twin from the same seed and data,
# 200 steps each; both loss curves on one plot (gristmill compare); exact match on held-out problems.
#
#   bench/grit-gsm8k.sh GSM8K_TRAIN_JSONL [HELD_OUT=64] [DEVICE=cuda]
#
# Splits the file into train (all but the last 264 lines), validation (200) and held-out (the last
# 64, or HELD_OUT); imports SmolLM2 from its GGUF (scripts/fetch-smollm2) unless MODEL is set.
# Writes $OUT (or bench/out) /grit-gsm8k and prints the compare table and both exact-match scores.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$1; held=${2:-64}; device=${3:-cuda}
g=${GRISTMILL:-target/release/gristmill}
out=${OUT:-bench/out}/grit-gsm8k
mkdir -p "$out"
model=${MODEL:-}
if [ -z "$model" ]; then
  model=.cache/smollm2
  [ -f "$model/model.safetensors" ] || "$g" import-gguf "$(scripts/fetch-smollm2)" --out "$model"
fi
n=$(wc -l < "$src")
head -n $((n - 200 - held)) "$src" > "$out/train.jsonl"
sed -n "$((n - 200 - held + 1)),$((n - held))p" "$src" > "$out/val.jsonl"
tail -n "$held" "$src" > "$out/test.jsonl"
for opt in adamw grit; do
  recipe=examples/grit-conservative.toml
  [ "$opt" = adamw ] && recipe=examples/grit-baseline-adamw.toml
  "$g" train --config "$recipe" --model "$model" --data "$out/train.jsonl" --eval-data "$out/val.jsonl" \
    --set data.template=chat --set data.max_seq_len=512 --set train.eval_every=25 --set train.save_every=0 \
    --set "train.device=$device" --out "$out/$opt" > "$out/$opt.train.log" 2>&1
  tail -1 "$out/$opt.train.log"
done
"$g" compare "$out/adamw" "$out/grit" --out "$out/compare.png" | tee "$out/compare.txt"
for opt in adamw grit; do
  "$g" eval --model "$model" --adapter "$out/$opt" --data "$out/test.jsonl" --template chat \
    --max-new-tokens 256 --device "$device" --show 0 --json "$out/$opt.eval.json" | tee "$out/$opt.eval.txt"
done
