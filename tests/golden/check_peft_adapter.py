"""PEFT loads an adapter written by gristmill: run on the GPU machine with the adapter directory
and the tiny fixture model. Writes OUT/peft_adapter_logits.safetensors: input_ids (as f32) and
the logits of transformers + PEFT (float32, eager attention, CPU) with that adapter, which the
golden test compares with gristmill's own forward with the same adapter.

  python3 tests/golden/check_peft_adapter.py tests/fixtures/tiny_llama ADAPTER_DIR OUT_DIR
"""

import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(7)
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, adapter_dir)
model.eval()
ids = torch.randint(0, base.config.vocab_size, (2, 11))
with torch.no_grad():
    logits = model(ids).logits.float()
with model.disable_adapter(), torch.no_grad():
    base_logits = model(ids).logits.float()
print("adapter changes the logits by up to", (logits - base_logits).abs().max().item())
save_file({"input_ids": ids.float().contiguous(), "logits": logits.contiguous()}, os.path.join(out, "peft_adapter_logits.safetensors"))
