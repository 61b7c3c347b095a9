#!/usr/bin/env bash
# GRIT's overhead over AdamW at the Llama-3.2-1B shape, on the GPU machine, in one run:
# the seeds' conservative recipe (examples/grit-conservative.toml) and its AdamW twin on the same
# random-weight model, data and seed; step time from metrics.jsonl, peak device memory sampled by
# nvidia-smi while each run trains. Needs python3 with torch + safetensors (to write the random
# checkpoint) and a release `gristmill` binary (GRISTMILL=path, default target/release/gristmill).
#
#   bench/grit-overhead.sh [STEPS]        (default 30 optimizer steps per run)
#
# GRIT_SETS="grit.kfac_update_freq=1 ..." adds --set overrides to the GRIT run only (e.g. to make
# every part act every step: the worst case of the overhead).
#
# Writes $OUT (or bench/out) /grit-overhead/{model,adamw,grit,*.mem} and prints a table last.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
g=${GRISTMILL:-target/release/gristmill}
out=${OUT:-bench/out}/grit-overhead
mkdir -p "$out"
model=$out/model
if [ ! -f "$model/model.safetensors" ]; then
  python3 - "$model" <<'PY'
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
# Llama-3.2-1B's shape (tied embeddings); the vocabulary is the fixture tokenizer's size rounded
# up, so the token ids of its tokenizer are valid and the LM head stays realistic in width.
cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
           num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
           vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
           tie_word_embeddings=True, hidden_act="silu", torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
json.dump(cfg, open(out / "config.json", "w"), indent=1)
g = torch.Generator().manual_seed(0)
def w(*s): return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
t = {"model.embed_tokens.weight": w(128256, 2048), "model.norm.weight": torch.ones(2048, dtype=torch.bfloat16)}
for i in range(16):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = torch.ones(2048, dtype=torch.bfloat16)
    t[p + "post_attention_layernorm.weight"] = torch.ones(2048, dtype=torch.bfloat16)
    t[p + "self_attn.q_proj.weight"] = w(2048, 2048)
    t[p + "self_attn.k_proj.weight"] = w(512, 2048)
    t[p + "self_attn.v_proj.weight"] = w(512, 2048)
    t[p + "self_attn.o_proj.weight"] = w(2048, 2048)
    t[p + "mlp.gate_proj.weight"] = w(8192, 2048)
    t[p + "mlp.up_proj.weight"] = w(8192, 2048)
    t[p + "mlp.down_proj.weight"] = w(2048, 8192)
save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
PY
  cp tests/fixtures/tiny_llama/tokenizer.json tests/fixtures/tiny_llama/tokenizer_config.json "$model/"
fi
"$g" synth --n 2000 --seed 1 --out "$out/train.jsonl"
for opt in adamw grit; do
  recipe=examples/grit-conservative.toml
  [ "$opt" = adamw ] && recipe=examples/grit-baseline-adamw.toml
  rm -rf "${out:?}/$opt"
  extra=()
  if [ "$opt" = grit ]; then
    for kv in ${GRIT_SETS:-}; do extra+=(--set "$kv"); done
  fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/$opt.mem" &
  smi=$!
  "$g" train --config "$recipe" --model "$model" --data "$out/train.jsonl" --out "$out/$opt" \
    --max-steps "$steps" --set data.packing=true --set data.template=plain --set train.eval_every=0 \
    --set train.save_every=0 --set train.device=cuda "${extra[@]}" > "$out/$opt.log" 2>&1
  kill "$smi"
done
python3 - "$out" "$steps" <<'PY'
import json, statistics, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for opt in ("adamw", "grit"):
    recs = [json.loads(l) for l in open(out / opt / "metrics.jsonl") if l.strip()]
    # The first steps include the driver's module loads and the allocator's growth.
    times = []
    prev = None
    for r in recs:
        if "elapsed_s" in r and "loss" in r:
            if prev is not None and r["step"] > 3:
                times.append(r["elapsed_s"] - prev)
            prev = r["elapsed_s"]
    toks = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] > 3]
    mem = max(int(x) for x in open(out / f"{opt}.mem").read().split() if x.strip().isdigit())
    last = [r for r in recs if "loss" in r][-1]
    rows[opt] = dict(step_s=statistics.median(times), tok_s=statistics.median(toks), mem_mib=mem, loss=last["loss"],
                     ng=[r.get("grit_ng_ratio") for r in recs if r.get("grit_ng_ratio") is not None][-1:] or None)
events = [json.loads(l) for l in open(out / "grit" / "grit.jsonl") if l.strip()]
recs = [json.loads(l) for l in open(out / "grit" / "metrics.jsonl") if l.strip()]
ng = [r["grit_ng_ratio"] for r in recs if "grit_ng_ratio" in r]
rows["grit_acted"] = dict(preconditioned_steps=len(ng), ng_ratio_median=statistics.median(ng) if ng else None,
                          inversions=sum(e["event"] == "invert" for e in events),
                          reprojections=sum(e["event"] == "reproject" for e in events))
print("GRIT acted:", rows["grit_acted"])
json.dump(rows, open(out / "summary.json", "w"), indent=1)
a, g = rows["adamw"], rows["grit"]
print(f"{'run':6} {'step s':>8} {'tok/s':>9} {'peak MiB':>9} {'last loss':>10}")
for k, r in ((k, rows[k]) for k in ("adamw", "grit")):
    print(f"{k:6} {r['step_s']:8.3f} {r['tok_s']:9.0f} {r['mem_mib']:9d} {r['loss']:10.4f}")
print(f"GRIT / AdamW: step time {g['step_s'] / a['step_s']:.3f}x, peak memory {g['mem_mib'] / a['mem_mib']:.3f}x")
PY
