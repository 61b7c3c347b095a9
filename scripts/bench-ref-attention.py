#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the shapes of `gristmill bench attention`.

    scripts/bench-ref-attention.py [--out FILE]     time SDPA (bf16, is_causal, enable_gqa) and
                                                    write the rows as JSON (stdout without --out)
    scripts/bench-ref-attention.py --parity FILE    write small random cases with SDPA's o and
                                                    gradients to a safetensors file for the
                                                    `sdpa_parity` GPU test (GRISTMILL_SDPA_PARITY)

Runs on the GPU machine (torch with CUDA). Tensors are laid out as gristmill's: q, o as
(B, T, H, D) and k, v as (B, T, Hkv, D), handed to SDPA as transposed views, so both sides read
the same memory. Timing: CUDA events, five warm-up calls, then the median of twenty samples, each
sample as many back-to-back calls as fill about half a millisecond (as gristmill's time_median).
Rows carry the same kernel and shape names as `gristmill bench attention`, which divides by them
with --reference FILE.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

# (B, Tq, Tk, H, Hkv, D): kernels/src/attention.rs BENCH_TRAIN and BENCH_DECODE.
TRAIN = [(2, 2048, 2048, 32, 8, 128), (1, 8192, 8192, 32, 8, 128), (8, 2048, 2048, 9, 3, 64)]
DECODE = [(1, 1, 4096, 32, 8, 128), (8, 1, 2048, 9, 3, 64)]
SAMPLE_S = 5e-4


def describe(s):
    b, tq, tk, h, hkv, d = s
    return f"B={b} Tq={tq} Tk={tk} H={h} Hkv={hkv} D={d}"


def time_median(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample(reps):
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / reps

    one = sample(1)
    reps = min(200, max(1, math.ceil(SAMPLE_S / max(one, 1e-7))))
    s = sorted(sample(reps) for _ in range(iters))
    return s[len(s) // 2]


def tensors(s, grad, gen):
    b, tq, tk, h, hkv, d = s
    opts = dict(device="cuda", dtype=torch.bfloat16)
    q = (torch.rand(b, tq, h, d, generator=gen, device="cuda") * 2 - 1).to(**opts)
    k = (torch.rand(b, tk, hkv, d, generator=gen, device="cuda") * 2 - 1).to(**opts)
    v = (torch.rand(b, tk, hkv, d, generator=gen, device="cuda") * 2 - 1).to(**opts)
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v


def sdpa(q, k, v, causal):
    # (B, T, H, D) → (B, H, T, D) views; the output back to (B, T, H, D).
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    )
    return o.transpose(1, 2)


def bench():
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for s in TRAIN:
        b, tq, tk, h, hkv, d = s
        flops = 4.0 * b * h * tq * tk * d / 2.0
        q, k, v = tensors(s, True, gen)
        d_o = torch.rand_like(q) * 2 - 1
        with torch.no_grad():
            t = time_median(lambda: sdpa(q, k, v, True))
        rows.append(dict(kernel="attention_fwd_bf16", shape=describe(s), seconds=t, rate=flops / t / 1e12, unit="TFLOP/s"))

        def step():
            o = sdpa(q, k, v, True)
            torch.autograd.grad(o, (q, k, v), d_o)

        t = time_median(step, warmup=3, iters=10)
        rows.append(dict(kernel="attention_fwd+bwd_bf16", shape=describe(s), seconds=t, rate=3.5 * flops / t / 1e12,
                         unit="TFLOP/s"))
        del q, k, v, d_o
        torch.cuda.empty_cache()
    for s in DECODE:
        b, tq, tk, h, hkv, d = s
        q, k, v = tensors(s, False, gen)
        # One query at the last position sees every key: no mask (SDPA's is_causal aligns the
        # mask to the top left when Tq < Tk).
        t = time_median(lambda: sdpa(q, k, v, False))
        nq, nkv, nl = b * tq * h * d, b * tk * hkv * d, b * h * tq
        bytes_ = 2 * (nq + 2 * nkv + nq) + 4 * nl
        rows.append(dict(kernel="attention_fwd_bf16", shape=describe(s), seconds=t, rate=bytes_ / t / 1e9, unit="GB/s"))
    return rows


def parity(path):
    from safetensors.torch import save_file

    gen = torch.Generator(device="cuda").manual_seed(1)
    out = {}
    for c, s in enumerate([(2, 300, 300, 8, 2, 128), (3, 129, 129, 9, 3, 64), (1, 37, 37, 4, 4, 128)]):
        q, k, v = tensors(s, True, gen)
        # Wider q than k: a less uniform softmax.
        with torch.no_grad():
            q.mul_(2)
        d_o = (torch.rand_like(q) * 2 - 1).detach()
        o = sdpa(q, k, v, True)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), d_o)
        key = f"case{c}."
        out[key + "shape"] = torch.tensor(list(s), dtype=torch.int64)
        for name, t in [("q", q), ("k", k), ("v", v), ("do", d_o), ("o", o), ("dq", dq), ("dk", dk), ("dv", dv)]:
            out[key + name] = t.detach().contiguous().cpu()
    save_file(out, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    ap.add_argument("--parity", metavar="FILE", help="write parity cases to FILE (safetensors) and exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench-ref-attention: no CUDA device")
    if args.parity:
        parity(args.parity)
        print(f"wrote {args.parity}", file=sys.stderr)
        return
    report = dict(
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        reference="torch.nn.functional.scaled_dot_product_attention (is_causal, enable_gqa, bf16)",
        rows=bench(),
    )
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
