"""Golden fixtures from the reference stack (transformers + bitsandbytes), run on the GPU machine.

Writes, under OUT (default $OUT):
  tiny_llama/config.json, model.safetensors   a random-weight Llama (GQA, 2 layers, llama3 rope
                                              scaling, awkward sizes), saved by transformers in bf16
  tiny_llama/golden.safetensors               input_ids (as f32) and the logits transformers
                                              computes for them in float32 on the CPU
  tiny_llama_bnb4/config.json, model.safetensors
                                              the same model loaded with BitsAndBytesConfig (nf4,
                                              double quant) and saved by transformers: a real
                                              "bnb-4bit" checkpoint
  tiny_llama_bnb4/golden.safetensors          the logits of that 4-bit model on the GPU (compute
                                              dtype float32, the rest of the model in bf16)
  tiny_llama_bnb4_f32/...                     the same with the whole model in float32
  nf4_golden.safetensors                      inputs and outputs of bnb.functional.quantize_4bit
                                              (nf4, blocksize 64, compress_statistics) on CUDA:
                                              a bf16 weight with a ragged last block and a zero
                                              block, and an f32 vector sitting on the decision
                                              thresholds (ties)

Run (on the GPU machine, with the bitsandbytes wheel installed; scripts/gpu-fixtures does it):
  python3 tests/golden/make_tiny_llama.py OUT_DIR
"""

import json
import os
import shutil
import sys
import tempfile

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ["OUT"]
torch.manual_seed(3407)

# ---------------------------------------------------------------------------------------------
# NF4 quantization of raw tensors, bit for bit.
w = (torch.randn(257, 513) * 0.02).to(torch.bfloat16)
w[0, :64] = 0.0  # block 0: all zeros (absmax 0)
w[3, 5] = 0.5  # an outlier
# f32 values on the NF4 decision thresholds and one f32 ulp either side, absmax 1 per block.
thresholds = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
              -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
              0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
              0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
t = torch.tensor(thresholds, dtype=torch.float32)
ties = torch.cat([t, torch.nextafter(t, torch.full_like(t, 2.0)), torch.nextafter(t, torch.full_like(t, -2.0))])
ties = torch.cat([torch.tensor([1.0]), ties, torch.zeros(64 * 2 - 1 - ties.numel())])
ties[64] = -1.0  # second block: absmax 1 too

golden = {"w_bf16": w, "ties_f32": ties}
for name, x in [("w", w), ("ties", ties)]:
    q, st = bnbf.quantize_4bit(x.cuda(), blocksize=64, quant_type="nf4", compress_statistics=True)
    golden[f"{name}.packed"] = q.cpu().contiguous()
    golden[f"{name}.absmax_q8"] = st.absmax.cpu().contiguous()
    golden[f"{name}.nested_absmax"] = st.state2.absmax.cpu().contiguous()
    golden[f"{name}.nested_code"] = st.state2.code.cpu().contiguous()
    golden[f"{name}.code"] = st.code.cpu().contiguous()
    golden[f"{name}.offset"] = st.offset.reshape(1).float().cpu()
    golden[f"{name}.dequant"] = bnbf.dequantize_4bit(q, st).float().cpu().contiguous()
    # The absmax bitsandbytes computed before double quantization.
    _, st_plain = bnbf.quantize_4bit(x.cuda(), blocksize=64, quant_type="nf4", compress_statistics=False)
    golden[f"{name}.absmax_f32"] = st_plain.absmax.float().cpu().contiguous()
save_file(golden, os.path.join(OUT, "nf4_golden.safetensors"))

# ---------------------------------------------------------------------------------------------
# A tiny random Llama.
cfg = LlamaConfig(
    vocab_size=300,
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32},
    tie_word_embeddings=False,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
model = LlamaForCausalLM(cfg)
with torch.no_grad():
    # Norm weights are 1 at init: make them random so a bug in applying them shows.
    for n, p in model.named_parameters():
        if n.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
model = model.to(torch.bfloat16)

tmp = tempfile.mkdtemp()
src = os.path.join(tmp, "tiny_llama")
model.save_pretrained(src, safe_serialization=True)
dst = os.path.join(OUT, "tiny_llama")
os.makedirs(dst, exist_ok=True)
for f in ["config.json", "model.safetensors"]:
    shutil.copy(os.path.join(src, f), dst)

ids = torch.randint(0, cfg.vocab_size, (2, 13))
ids[1, :4] = torch.tensor([1, 5, 5, 5])
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

m32 = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager")
m32.eval()
with torch.no_grad():
    logits = m32(ids).logits.float()
save_file({"input_ids": ids.float().contiguous(), "logits": logits.contiguous()}, os.path.join(dst, "golden.safetensors"))

# ---------------------------------------------------------------------------------------------
# The same model as bitsandbytes 4-bit checkpoints: with the rest of the model in bf16 (what
# published "bnb-4bit" models are), and in float32 throughout (quant state dtype float32), so
# that the 4-bit path can be matched tightly, without bf16 activations in the way.
qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                          bnb_4bit_compute_dtype=torch.float32)


def save_4bit(name, dtype):
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, torch_dtype=dtype,
                                             attn_implementation="eager", device_map={"": 0})
    m.eval()
    with torch.no_grad():
        out = m(ids.cuda()).logits.float().cpu()
    saved = os.path.join(tmp, name)
    m.save_pretrained(saved, safe_serialization=True)
    dst = os.path.join(OUT, name)
    os.makedirs(dst, exist_ok=True)
    for f in ["config.json", "model.safetensors"]:
        shutil.copy(os.path.join(saved, f), dst)
    save_file({"input_ids": ids.float().contiguous(), "logits": out.contiguous()}, os.path.join(dst, "golden.safetensors"))
    return out, dst


logits4, dst4 = save_4bit("tiny_llama_bnb4", torch.bfloat16)
logits4f, _ = save_4bit("tiny_llama_bnb4_f32", torch.float32)

print("versions: torch", torch.__version__, "transformers", transformers.__version__, "bitsandbytes", bnb.__version__)
print("gpu:", torch.cuda.get_device_name(0))
print("logits f32 range", logits.min().item(), logits.max().item(), "bnb4 vs f32 max diff", (logits4 - logits).abs().max().item(), "bnb4 bf16 vs bnb4 f32", (logits4 - logits4f).abs().max().item())
for k in sorted(os.listdir(dst4)):
    print("bnb4:", k, os.path.getsize(os.path.join(dst4, k)))
