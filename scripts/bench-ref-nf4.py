#!/usr/bin/env python3
"""The reference stack's figures for `gristmill bench nf4 --reference FILE`, and a parity file.

    python3 scripts/bench-ref-nf4.py --out ref.json [--parity parity.safetensors]

Runs on the GPU machine with PyTorch and bitsandbytes (its wheel goes along: see docs/gpu.md).
For every shape of kernels/src/nf4.rs's benchmark (BENCH_TRAIN, BENCH_DECODE, BENCH_RANK) it
times, on the same kind of random data (x uniform in [-1, 1), W in [-0.05, 0.05) quantized to NF4
with bitsandbytes: blocksize 64, double-quantized scales):

  cublas_s  torch's bf16 matmul (cuBLAS) on the dequantized weight: y = x Wᵀ, dx = dy W;
  bnb_s     bitsandbytes: bnb.matmul_4bit for the forward and decoding (its fused 4-bit kernel
            for small M, dequantize + matmul above), and what its autograd backward runs,
            dequantize + matmul, for dx;
  for the LoRA rows, the same plus a PEFT-style adapter in torch (dropout, x Aᵀ, · Bᵀ, · s; the
  backward through autograd).

Each figure is the median of 20 timed samples after 5 warm-up calls, with CUDA events; a sample
times enough back-to-back calls to last about half a millisecond, as gristmill's own timer does.
The JSON holds {"device", "torch", "bitsandbytes", "rows": [{"key", "cublas_s", "bnb_s"}]} with
the keys gristmill's rows carry.

--parity FILE quantizes a random (512, 1024) weight with bitsandbytes and writes its packed
bytes and quant state (bitsandbytes' safetensors layout, under "w.weight"), its dequantized
weight ("w_dequantized"), an input x (40, 1024) and y = x · dequantized(W)ᵀ (bf16 matmul):
the test bitsandbytes_parity in kernels/tests/nf4.rs (GRISTMILL_NF4_PARITY=FILE) checks that
gristmill decodes those bytes to the same values and computes the same y.
"""
import argparse
import json
import math

import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F

TRAIN = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)]
DECODE = [(1, 4096, 4096), (4, 4096, 4096), (16, 4096, 4096), (1, 14336, 4096), (4, 14336, 4096), (16, 14336, 4096)]
RANK, SCALE, DROPOUT = 16, 2.0, 0.1
SAMPLE_S = 5e-4


def key(op, m, n, k):
    return f"{op} M={m} N={n} K={k}"


def median_time(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample(reps):
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / reps

    reps = min(200, max(1, math.ceil(SAMPLE_S / max(sample(1), 1e-7))))
    s = sorted(sample(reps) for _ in range(iters))
    return s[len(s) // 2]


def uniform(shape, scale, gen):
    return ((torch.rand(shape, generator=gen, device="cuda") * 2 - 1) * scale).to(torch.bfloat16)


def quantized(n, k, gen):
    w = uniform((n, k), 0.05, gen)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, qs, F.dequantize_4bit(packed, qs).to(torch.bfloat16)


def lora_adapter(x, a, b, train):
    return torch.nn.functional.dropout(x, DROPOUT, training=train) @ a.t() @ b.t() * SCALE


def bench(rows):
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for m, n, k in TRAIN:
            packed, qs, deq = quantized(n, k, gen)
            x, dy = uniform((m, k), 1.0, gen), uniform((m, n), 1.0, gen)
            rows.append({
                "key": key("fwd", m, n, k),
                "cublas_s": median_time(lambda: x @ deq.t()),
                "bnb_s": median_time(lambda: bnb.matmul_4bit(x, packed.t(), qs)),
            })
            rows.append({
                "key": key("bwd", m, n, k),
                "cublas_s": median_time(lambda: dy @ deq),
                "bnb_s": median_time(lambda: dy @ F.dequantize_4bit(packed, qs).to(torch.bfloat16)),
            })
            a, b = uniform((RANK, k), 0.02, gen), uniform((n, RANK), 0.02, gen)
            lkey = f"{key('lora-fwd', m, n, k)} r={RANK} p={DROPOUT}"
            rows.append({
                "key": lkey,
                "cublas_s": median_time(lambda: x @ deq.t() + lora_adapter(x, a, b, True)),
                "bnb_s": median_time(lambda: bnb.matmul_4bit(x, packed.t(), qs) + lora_adapter(x, a, b, True)),
            })
            del deq
        for m, n, k in DECODE:
            packed, qs, deq = quantized(n, k, gen)
            x = uniform((m, k), 1.0, gen)
            rows.append({
                "key": key("decode", m, n, k),
                "cublas_s": median_time(lambda: x @ deq.t()),
                "bnb_s": median_time(lambda: bnb.matmul_4bit(x, packed.t(), qs)),
            })
    # The LoRA backward through autograd (dx, dA, dB; W frozen), the forward graph kept.
    for m, n, k in TRAIN:
        packed, qs, deq = quantized(n, k, gen)
        x, dy = uniform((m, k), 1.0, gen).requires_grad_(), uniform((m, n), 1.0, gen)
        a = uniform((RANK, k), 0.02, gen).requires_grad_()
        b = uniform((n, RANK), 0.02, gen).requires_grad_()
        y_bnb = bnb.matmul_4bit(x, packed.t(), qs) + lora_adapter(x, a, b, True)
        y_cub = x @ deq.t() + lora_adapter(x, a, b, True)
        rows.append({
            "key": f"{key('lora-bwd', m, n, k)} r={RANK} p={DROPOUT}",
            "cublas_s": median_time(lambda: torch.autograd.grad(y_cub, (x, a, b), dy, retain_graph=True)),
            "bnb_s": median_time(lambda: torch.autograd.grad(y_bnb, (x, a, b), dy, retain_graph=True)),
        })
        del y_bnb, y_cub, deq


def parity(path):
    from safetensors.torch import save_file

    gen = torch.Generator(device="cuda").manual_seed(1)
    n, k, m = 512, 1024, 40
    packed, qs, deq = quantized(n, k, gen)
    x = uniform((m, k), 1.0, gen)
    y = torch.nn.functional.linear(x, deq)
    tensors = {"w.weight": packed}
    tensors.update({f"w.weight.{name}": t for name, t in qs.as_dict(packed=True).items()})
    tensors.update({"w_dequantized": deq, "x": x, "y": y})
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, path)
    print(f"parity: wrote {path} (W {n}×{k} nf4 double-quant, x {m}×{k})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="where to write the JSON of reference figures")
    ap.add_argument("--parity", help="where to write the bitsandbytes parity safetensors")
    args = ap.parse_args()
    if args.parity:
        parity(args.parity)
    if args.out:
        rows = []
        bench(rows)
        report = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "bitsandbytes": bnb.__version__,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        for r in rows:
            print(f"{r['key']:<44} cuBLAS {r['cublas_s'] * 1e3:9.3f} ms   bitsandbytes {r['bnb_s'] * 1e3:9.3f} ms")


if __name__ == "__main__":
    main()
