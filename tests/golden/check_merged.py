"""A model merged by `gristmill merge` loads in transformers: run on the GPU machine with the merged
directory (from tests/fixtures/tiny_llama + tests/fixtures/peft_adapter). Writes
OUT/merged_logits.safetensors: transformers' float32 logits of the merged model on the input ids
of tests/fixtures/peft_adapter/peft_adapter_logits.safetensors, and prints how far they are from
PEFT's unmerged base + adapter logits there (the merged weights are rounded to bf16).

  python3 tests/golden/check_merged.py MERGED_DIR OUT_DIR
"""

import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

merged_dir, out = sys.argv[1], sys.argv[2]
ref = load_file("tests/fixtures/peft_adapter/peft_adapter_logits.safetensors")
ids = ref["input_ids"].long()
model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="eager")
model.eval()
with torch.no_grad():
    logits = model(ids).logits.float()
print("merged (transformers) vs base + adapter (PEFT): max |dlogit|", (logits - ref["logits"]).abs().max().item(),
      "of logits up to", ref["logits"].abs().max().item())
save_file({"input_ids": ids.float().contiguous(), "logits": logits.contiguous()}, os.path.join(out, "merged_logits.safetensors"))
