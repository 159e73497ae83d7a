"""Steady-state training throughput and peak memory of lorakit's training step on one GPU.

Runs lorakit's own pieces — models.load_base (bf16 or NF4 double-quant base), models.attach_lora
(r=16, alpha=32, all-linear), train.loss.loss_sum (vocabulary projection of trained positions only),
bf16 autocast, fused-free AdamW, clipping — on random-init models of real architectures with random
full rows of 2,048 tokens, 16,384 tokens per optimizer step (micro-batch x accumulation), the
settings of the seed/TRL table in ../shared/gpu/README.md.

usage: python benchmarks/gpu_throughput.py [--steps N] [--only NAME ...] [--out FILE]
Prints one JSON line per arm and writes them all to --out.
"""

import argparse
import datetime
import json
import math
import os
import platform
import time

import torch

from lorakit import models
from lorakit.config import load_config
from lorakit.train.loss import loss_sum

ARCHS = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1000000, tie_word_embeddings=True),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=131072, rope_theta=500000, tie_word_embeddings=False),
}
# name: (arch, method, micro-batch, gradient checkpointing)
ARMS = {
    "qwen-qlora-mb8": ("qwen3-0.6b", "qlora", 8, False),
    "qwen-qlora-mb8-ckpt": ("qwen3-0.6b", "qlora", 8, True),
    "qwen-lora-mb8": ("qwen3-0.6b", "lora", 8, False),
    "llama-qlora-mb8": ("llama-8b", "qlora", 8, False),
    "llama-qlora-mb4": ("llama-8b", "qlora", 4, False),
    "llama-qlora-mb2": ("llama-8b", "qlora", 2, False),
    "llama-qlora-mb1": ("llama-8b", "qlora", 1, False),
    "llama-qlora-mb8-ckpt": ("llama-8b", "qlora", 8, True),
    "llama-lora-mb4": ("llama-8b", "lora", 4, False),
    "llama-lora-mb2": ("llama-8b", "lora", 2, False),
}
SEQ, TOKENS_PER_STEP = 2048, 16384


def random_model_dir(arch: str) -> str:
    """Save a random-init bf16 model once, so it loads the way a user's checkpoint does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = f"/tmp/rand-{arch}"
    if not os.path.exists(os.path.join(path, "config.json")):
        spec = dict(ARCHS[arch])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def run_arm(name: str, steps: int) -> dict:
    arch, method, micro, ckpt = ARMS[name]
    path = random_model_dir(arch)
    cfg = load_config(overrides={"model": path, "method": method, "lora.dropout": 0.0, "train.precision": "bf16",
                                 "train.gradient_checkpointing": ckpt}, require_train=False)
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    precision = models.resolve_precision("bf16", device)
    model = models.attach_lora(models.load_base(cfg, path, precision, device), cfg, ckpt)
    model.train()  # as the loop does: checkpointing (and dropout) act only in train mode
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    accum = TOKENS_PER_STEP // (micro * SEQ)
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab = ARCHS[arch]["vocab_size"]
    times, losses = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, SEQ), device=device, generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_sum(model, batch) / (accum * micro * (SEQ - 1))
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total)
    warm = min(3, steps - 1)
    tok_s = TOKENS_PER_STEP * (steps - warm) / sum(times[warm:])
    result = dict(arm=name, arch=arch, method=method, micro_batch=micro, grad_accum=accum, checkpointing=ckpt,
                  steps=steps, tokens_per_s=round(tok_s), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
                  mfu_4n=round(tok_s * 4 * _params(model) / 790e12, 3))
    del model, opt
    torch.cuda.empty_cache()
    return result


def _params(model) -> int:
    """Parameters of the base counted as the 4N FLOPs/token rule counts them (4-bit packs 2 per byte)."""
    n = 0
    for p in model.parameters():
        n += p.numel() * (2 if p.dtype == torch.uint8 else 1)
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=list(ARMS))
    parser.add_argument("--out", default=f"benchmarks/results/gpu_throughput_{datetime.date.today()}.json")
    args = parser.parse_args()
    import bitsandbytes
    import peft
    import transformers

    meta = dict(date=str(datetime.date.today()), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
                python=platform.python_version(), seq=SEQ, tokens_per_step=TOKENS_PER_STEP)
    results = []
    for name in args.only:
        try:
            results.append(run_arm(name, args.steps))
        except torch.OutOfMemoryError as e:
            results.append(dict(arm=name, error=f"OOM: {str(e)[:200]}"))
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    if not all(math.isfinite(r.get("last_loss", 0.0)) for r in results):
        raise SystemExit("a run produced a non-finite loss")


if __name__ == "__main__":
    main()
