"""Micro-benchmarks of single pieces of a compiled 8B / Qwen3-0.6B QLoRA layer on the GPU machine:
SDPA's backends on the attention shapes, and SeededDropout's mask in the kernels it fuses into.
Each case runs forward + backward; the figure is the median over `--iters` of CUDA-event time.

    python benchmarks/gpu_kernels.py --out results/gpu_kernels_DATE.json
"""

import argparse
import datetime
import json
import platform
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lorakit.train import fast

# (name, micro-batch rows, query heads, kv heads, head dim, length)
ATTENTION = [("llama-8b mb4", 4, 32, 8, 128, 2048), ("qwen3-0.6b mb8", 8, 16, 8, 128, 2048)]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, iters: int) -> float:
    """Median ms of fn() over iters runs, after three warm-ups."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_cases(iters: int) -> list[dict]:
    out = []
    for name, b, h, kvh, d, length in ATTENTION:
        q = torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, kvh, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, kvh, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
        flops = 4 * b * h * length * length * d / 2 * 3.5  # causal forward + backward (2.5x)
        reference = None
        for backend, kind in BACKENDS.items():
            for gqa in (True, False):
                def step():
                    kk, vv = (k, v) if gqa else (k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1))
                    with sdpa_kernel([kind]):
                        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                    o.backward(g)
                    return o
                row = {"case": name, "backend": backend, "enable_gqa": gqa}
                try:
                    o = step()
                    if reference is None:
                        reference = o.detach().float()
                    row["max_diff"] = (o.detach().float() - reference).abs().max().item()
                    ms = timed(step, iters)
                    row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
                except Exception as err:  # a backend that does not take these inputs
                    row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
                print(row, flush=True)
                out.append(row)
                q.grad = k.grad = v.grad = None
        out.append(_flex(name, q, k, v, g, reference, flops, iters))
        q.grad = k.grad = v.grad = None
    return out


def _flex(name, q, k, v, g, reference, flops, iters) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    row = {"case": name, "backend": "flex (compiled)", "enable_gqa": True}
    try:
        length = q.shape[2]
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, length, length, device="cuda")
        flex = torch.compile(flex_attention)

        def step():
            o = flex(q, k, v, block_mask=mask, enable_gqa=True)
            o.backward(g)
            return o

        o = step()
        row["max_diff"] = (o.detach().float() - reference).abs().max().item()
        ms = timed(step, iters)
        row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
    print(row, flush=True)
    return row


def dropout_cases(iters: int) -> list[dict]:
    """The two kernel patterns the 8B profile spends its dropout in: RMSNorm feeding three dropped LoRA
    inputs (q, k, v), and SwiGLU feeding the down projection's dropped input."""
    tokens, hidden, inter = 8192, 4096, 14336
    out = []
    # fast.seeded_keep's two index forms, chosen by the mask size up to which the index is int32
    variants = {"none": None, "int64 index (lorakit until session 7)": 0, "int32 index": fast.INT32_INDEX}
    original = fast.INT32_INDEX
    for variant, limit in variants.items():
        keep = limit is not None
        fast.INT32_INDEX = original if limit is None else limit
        drops = [fast.SeededDropout(0.05).cuda() for _ in range(4)]
        for salt, drop in enumerate(drops[:3]):
            drop.salt = salt
        for drop in drops:
            drop.seed.fill_(12345)

        def norm_qkv(x, w):
            y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w
            if not keep:
                return y.sum(-1) * 3
            return sum(d(y).float().sum(-1) for d in drops[:3])

        def swiglu_down(gate, up):
            h = F.silu(gate) * up
            return drops[3](h) if keep else h

        torch._dynamo.reset()
        f1, f2 = torch.compile(norm_qkv), torch.compile(swiglu_down)
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gate = torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g1 = torch.randn(tokens, device="cuda", dtype=torch.float32)
        g2 = torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16)
        for case, fn in (("rmsnorm + q/k/v dropout", lambda: f1(x, w).backward(g1)),
                         ("swiglu + down dropout", lambda: f2(gate, up).backward(g2))):
            row = {"case": case, "variant": variant, "ms": round(timed(fn, iters), 3)}
            print(row, flush=True)
            out.append(row)
        if keep:
            drop = drops[3]
            kept = fast.seeded_keep(drop.seed, (tokens, inter), drop.cutoff, drop.salt).float().mean().item()
            out[-1]["kept"] = round(kept, 5)
    fast.INT32_INDEX = original
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(), "iters": args.iters,
              "attention": attention_cases(args.iters), "dropout": dropout_cases(args.iters)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
