"""Golden QLoRA training steps from the reference stack (transformers + PEFT + bitsandbytes), run on
the GPU machine after make_tiny_llama.py (it reads tests/fixtures/tiny_llama).

The base is the tiny Llama quantized by bitsandbytes (nf4, double quant) with everything else in
float32, so the comparison is not blurred by bf16. PEFT LoRA r=4, alpha=8, dropout 0, on all seven
projections, A and B both random (init_lora_weights=False) so that the first step's gradients of
A are not zero. Ten optimizer steps of 2 micro-batches of 2 sequences (12 tokens, some prompt
tokens masked with -100, some rows right-padded), torch AdamW (lr 5e-3, betas 0.9/0.999, eps 1e-8,
weight decay 0.01), gradient clipping to norm 1.0, linear schedule with 3 warmup steps over 10.

The loss of an optimizer step is the token-weighted mean over its two micro-batches: each
micro-batch's summed cross-entropy is divided by the target count of the whole step before the
backward, so splitting a batch into micro-batches does not change its gradient.

Writes OUT/peft_steps.safetensors: input_ids, labels, attention_mask (steps, accum, B, T) as f32;
the initial and final LoRA factors under PEFT's saved names; step-1 gradients (before clipping)
as `grad.<name>`; losses (steps) and grad_norms (steps, before clipping); lrs (steps).
"""

import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_linear_schedule_with_warmup

SRC = sys.argv[1]
OUT = sys.argv[2]
STEPS, ACCUM, B, T = 10, 2, 2, 12

torch.manual_seed(1234)
torch.backends.cuda.matmul.allow_tf32 = False
qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                          bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(SRC, quantization_config=qcfg, dtype=torch.float32,
                                             attn_implementation="eager", device_map={"": 0})
lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=False,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, lcfg)
model.train()
params = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
assert len(params) == 2 * 7 * 2, sorted(params)

V = model.config.vocab_size
ids = torch.randint(3, V, (STEPS, ACCUM, B, T))
labels = ids.clone()
mask = torch.ones_like(ids)
for s in range(STEPS):
    for a in range(ACCUM):
        labels[s, a, 0, :4] = -100  # a prompt: not predicted
        pad = (s + a) % 4  # right padding of the second row
        if pad:
            mask[s, a, 1, T - pad:] = 0
            labels[s, a, 1, T - pad:] = -100
            ids[s, a, 1, T - pad:] = 0

init = {n: p.detach().float().cpu().clone() for n, p in params.items()}
opt = torch.optim.AdamW(list(params.values()), lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=STEPS)
losses, norms, lrs, grads1 = [], [], [], {}
for s in range(STEPS):
    # Targets of the whole step: each micro-batch's sum is divided by this.
    n_tok = int((labels[s, :, :, 1:] != -100).sum())
    total = 0.0
    for a in range(ACCUM):
        x, y, am = ids[s, a].cuda(), labels[s, a].cuda(), mask[s, a].cuda()
        logits = model(input_ids=x, attention_mask=am).logits.float()
        lsum = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        (lsum / n_tok).backward()
        total += lsum.item()
    losses.append(total / n_tok)
    if s == 0:
        grads1 = {f"grad.{n}": p.grad.detach().float().cpu().clone() for n, p in params.items()}
    lrs.append(sched.get_last_lr()[0])
    norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)

out = {"input_ids": ids.float(), "labels": labels.float(), "attention_mask": mask.float(),
       "losses": torch.tensor(losses), "grad_norms": torch.tensor(norms), "lrs": torch.tensor(lrs)}
out.update({f"init.{n}": t.contiguous() for n, t in init.items()})
out.update({f"final.{n}": p.detach().float().cpu().contiguous() for n, p in params.items()})
out.update({n: g.contiguous() for n, g in grads1.items()})
save_file(out, os.path.join(OUT, "peft_steps.safetensors"))
print("losses", [round(v, 5) for v in losses])
print("grad norms", [round(v, 4) for v in norms])
print("lrs", lrs)
