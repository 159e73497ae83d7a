"""The longest single sequence lorakit's CUDA training step takes: one row of L random tokens (batch 1,
every position trained), the 8B or Qwen architecture of gpu_throughput.py, QLoRA r16/alpha32
all-linear, gradient checkpointing on (as `gradient_checkpointing: true` runs it: each layer's input
kept, the layer recomputed in compiled blocks), bf16 autocast, the training loop's own step.

For each length in --lengths, in order: --steps optimizer steps, seconds per step and peak allocated
memory; a length that runs out of memory is recorded as such and ends the run, as does the next
length when the time left (--budget-s) is less than this length's step time scaled by the attention's
L² for --steps steps.

usage: python benchmarks/long_context.py [--arch llama-8b] [--lengths 16384 65536 ...] [--steps N]
                                         [--budget-s S] [--out FILE]
"""

import argparse
import datetime
import json
import platform
import time

import torch
from accelerate import Accelerator

from gpu_throughput import ARCHS, Setup, micro_batches
from lorakit.train import loop, loss


def run_length(setup: Setup, length: int, steps: int) -> dict:
    model = setup.model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = loop.adamw(trainable, 1e-4, 0.0, fused=True)
    wrapped = loss.TokenLoss(model, loss.loss_sum)
    accelerator = Accelerator(mixed_precision="bf16")
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for step in range(steps):
        batch = micro_batches(torch.randint(0, setup.vocab, (1, length), generator=g), 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = loop._accumulate(accelerator, wrapped, batch, length - 1, step + 1)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        losses.append(float(total))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del opt
    return dict(length=length, steps=steps, step_seconds=[round(t, 1) for t in times],
                tokens_per_s=round(length / min(times)), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                losses=[round(x, 4) for x in losses])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama-8b", choices=list(ARCHS))
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=500)
    parser.add_argument("--out", default=f"benchmarks/results/long_context_{datetime.date.today()}.json")
    args = parser.parse_args()
    start = time.monotonic()
    import bitsandbytes
    import peft
    import transformers

    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                bitsandbytes=bitsandbytes.__version__, python=platform.python_version(), arch=args.arch,
                method=args.method, settings="batch 1, every position trained, r16 alpha32 all-linear, dropout 0, "
                "gradient checkpointing (compiled blocks), bf16 autocast, fused AdamW, clip 1.0")
    setup = Setup(args.arch, args.method)
    setup.prepare(ckpt=True, path="fast")
    results = []
    for length in args.lengths:
        left = args.budget_s - (time.monotonic() - start)
        if results and "step_seconds" in results[-1]:
            last = results[-1]
            needed = min(last["step_seconds"]) * (length / last["length"]) ** 2 * args.steps
            if needed > left:
                results.append(dict(length=length, skipped=f"~{needed:.0f} s needed, {left:.0f} s left"))
                _write(args.out, meta, results)
                break
        try:
            result = run_length(setup, length, args.steps)
        except torch.OutOfMemoryError as e:
            result = dict(length=length, error="out of memory", detail=str(e).splitlines()[0],
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        results.append(result)
        print(json.dumps(result), flush=True)
        _write(args.out, meta, results)
        if "error" in result:
            break


def _write(path: str, meta: dict, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(dict(meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
