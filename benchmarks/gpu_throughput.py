"""Steady-state training throughput and peak memory of lorakit's training step on one GPU.

Runs lorakit's own pieces — models.load_base (bf16 or NF4 double-quant base), models.attach_lora
(r=16, alpha=32, all-linear), bf16 autocast, AdamW, clipping — on random-init models of real
architectures with random full rows of 2,048 tokens, 16,384 tokens per optimizer step (micro-batch x
accumulation), the settings of the seed/TRL table in ../shared/gpu/README.md. Each arm takes one path:

  reference  the plain PyTorch path: eager layers, full logits, F.cross_entropy (train.loss.reference_loss_sum)
  eager      lorakit as of session 1: eager layers, frozen-head chunked CE with the eager chunk step
  ce         eager layers, the compiled CE step (lorakit on CUDA without fast.speedups)
  fast       lorakit's default on CUDA: fast.speedups + the compiled CE step. Without checkpointing
             each decoder layer is compiled whole; with it, each layer's children (eager checkpoint)
  selective  whole layers compiled with checkpointing traced inside them (fast.compile_layers):
             the 4-bit matmul outputs are kept, the rest recomputed
  cudagraphs whole layers compiled with mode="reduce-overhead" (CUDA graphs): train.compile: cudagraphs
  fast-torchdrop  `fast` keeping torch's dropout inside the compiled layers (lorakit before session 5;
             `fast` swaps in fast.SeededDropout). Differs from `fast` only with --dropout > 0
  fp8        `fast` with train.fp8: the frozen base's matmuls in FP8 (train/fp8.py)
  cg-fp8     `cudagraphs` with train.fp8

Each step is the training loop's own (train.loop: micro-batches from pinned CPU memory, the trained
positions worked out on the CPU, the loss kept on the GPU until the step ends, fused AdamW). Arms
ending in `-s2` run session 2's step for comparison: the host waited for the GPU at every micro-batch
(its loss, the trained positions) and AdamW ran as foreach kernels.

Compiling cannot be undone, so one model serves one compiled form: a --only list that needs both
(fast arms with and without checkpointing, or fast and selective) records the later ones as errors;
run those in another invocation. Session-2 result files name arms as they were then: in
gpu_throughput_2026-11-29_s2.json "-ckpt-fast" is today's "-sel"; the "-ckpt-blocks" arms of
gpu_throughput_2026-11-29_s2_blocks.json are today's "-ckpt-fast".

Every arm of an architecture starts from the same LoRA initialisation and sees the same rows, so
each step's loss is comparable across arms; fast arms report the largest relative difference from
the first reference arm of their architecture ("loss within 1%").

The TRL arms (TRL_ARMS: the seed guide's script and tuned TRL, benchmarks/trl_baseline.py) run first,
each in a child process, so one command gives the whole table.

usage: python benchmarks/gpu_throughput.py [--steps N] [--only NAME ...] [--out FILE] [--trl-steps N --tokenizer DIR]
                                          [--profile NAME ... --profile-dir DIR] [--budget-s S]
Arms run in --only order, grouped by model (one load each), a model's reference and eager arms first.
Prints one JSON line per arm and a table, and writes them all to --out (after every arm); arms not
started within --budget-s seconds are recorded as skipped. --profile ARM runs one more, untimed step
of that arm under the torch profiler and writes profile_ARM.txt (GPU busy time, idle gaps by size and
the largest ones, kernel time by kind, top kernels) and profile_ARM.trace.json (a Chrome trace) to
--profile-dir.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from unittest import mock

import torch
from accelerate import Accelerator

from lorakit import models
from lorakit.config import load_config
from lorakit.data.render import Rendered
from lorakit.train import batches, fast, loop, loss

ARCHS = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1000000, tie_word_embeddings=True),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=131072, rope_theta=500000, tie_word_embeddings=False),
}
# name: (arch, method, micro-batch, gradient checkpointing, path)
ARMS = {
    "qwen-qlora-mb8-ref": ("qwen3-0.6b", "qlora", 8, False, "reference"),
    "qwen-qlora-mb8": ("qwen3-0.6b", "qlora", 8, False, "eager"),
    "qwen-qlora-mb8-ckpt": ("qwen3-0.6b", "qlora", 8, True, "eager"),
    "qwen-qlora-mb8-ce": ("qwen3-0.6b", "qlora", 8, False, "ce"),
    "qwen-qlora-mb8-fast": ("qwen3-0.6b", "qlora", 8, False, "fast"),
    "qwen-qlora-mb8-fast-s2": ("qwen3-0.6b", "qlora", 8, False, "fast"),
    "qwen-qlora-mb8-cg": ("qwen3-0.6b", "qlora", 8, False, "cudagraphs"),
    "qwen-qlora-mb8-ckpt-fast": ("qwen3-0.6b", "qlora", 8, True, "fast"),
    "llama-qlora-mb2-ref": ("llama-8b", "qlora", 2, False, "reference"),
    "llama-qlora-mb8": ("llama-8b", "qlora", 8, False, "eager"),
    "llama-qlora-mb4": ("llama-8b", "qlora", 4, False, "eager"),
    "llama-qlora-mb2": ("llama-8b", "qlora", 2, False, "eager"),
    "llama-qlora-mb8-ckpt": ("llama-8b", "qlora", 8, True, "eager"),
    "llama-qlora-mb2-fast": ("llama-8b", "qlora", 2, False, "fast"),
    "llama-qlora-mb4-fast": ("llama-8b", "qlora", 4, False, "fast"),
    "llama-qlora-mb4-fast-s2": ("llama-8b", "qlora", 4, False, "fast"),
    "llama-qlora-mb8-fast": ("llama-8b", "qlora", 8, False, "fast"),
    "llama-qlora-mb4-fast-torchdrop": ("llama-8b", "qlora", 4, False, "fast-torchdrop"),
    "llama-qlora-mb8-ckpt-fast": ("llama-8b", "qlora", 8, True, "fast"),
    "llama-qlora-mb4-ckpt-fast": ("llama-8b", "qlora", 4, True, "fast"),
    "llama-qlora-mb8-sel": ("llama-8b", "qlora", 8, True, "selective"),
    "llama-qlora-mb4-sel": ("llama-8b", "qlora", 4, True, "selective"),
    "llama-qlora-mb2-cg": ("llama-8b", "qlora", 2, False, "cudagraphs"),
    "llama-qlora-mb4-cg": ("llama-8b", "qlora", 4, False, "cudagraphs"),
    "llama-qlora-mb4-sel-cg": ("llama-8b", "qlora", 4, True, "cudagraphs"),
    "llama-qlora-mb8-sel-cg": ("llama-8b", "qlora", 8, True, "cudagraphs"),
    "llama-lora-mb4-cg": ("llama-8b", "lora", 4, False, "cudagraphs"),
    "llama-lora-mb2-ref": ("llama-8b", "lora", 2, False, "reference"),
    "llama-lora-mb2-fast": ("llama-8b", "lora", 2, False, "fast"),
    "llama-lora-mb4-fast": ("llama-8b", "lora", 4, False, "fast"),
    "llama-lora-mb8-fast": ("llama-8b", "lora", 8, False, "fast"),
    "llama-lora-mb4-sel": ("llama-8b", "lora", 4, True, "selective"),
    "llama-lora-mb8-ref": ("llama-8b", "lora", 8, False, "reference"),
    "llama-qlora-mb4-fp8": ("llama-8b", "qlora", 4, False, "fp8"),
    "llama-qlora-mb8-fp8": ("llama-8b", "qlora", 8, False, "fp8"),
    "llama-qlora-mb8-ckpt-fp8": ("llama-8b", "qlora", 8, True, "fp8"),
    "llama-lora-mb4-fp8": ("llama-8b", "lora", 4, False, "fp8"),
    "llama-lora-mb8-fp8": ("llama-8b", "lora", 8, False, "fp8"),
    "qwen-qlora-mb8-fp8": ("qwen3-0.6b", "qlora", 8, False, "fp8"),
    "qwen-qlora-mb8-cg-fp8": ("qwen3-0.6b", "qlora", 8, False, "cg-fp8"),
}
# name: (arch, variant of benchmarks/trl_baseline.py): the seed guide's script through TRL, run first,
# each in a child process (Liger patches transformers' model classes for the whole process)
TRL_ARMS = {
    "qwen-trl-seed": ("qwen3-0.6b", "seed"),
    "qwen-trl-tuned": ("qwen3-0.6b", "tuned"),
    "llama-trl-seed": ("llama-8b", "seed"),
    "llama-trl-tuned": ("llama-8b", "tuned"),
    "llama-trl-lora-tuned": ("llama-8b", "lora-tuned"),
}
SEQ, TOKENS_PER_STEP = 2048, 16384
PATH_ORDER = {"reference": 0, "eager": 1, "ce": 2, "fast": 3, "fast-torchdrop": 3, "selective": 4, "cudagraphs": 5, "fp8": 6, "cg-fp8": 7}
COMPILED = ("fast", "fast-torchdrop", "selective", "cudagraphs", "fp8", "cg-fp8")  # compiling is one-way: eager arms of a model run first


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


class Skipped(Exception):
    """An arm this model cannot run now (an earlier compile failed, or its layers are compiled in
    another form)."""


class Setup:
    """One base model with LoRA attached, shared by the arms of its (arch, method); each arm starts
    from the same LoRA weights."""

    def __init__(self, arch: str, method: str, dropout: float = 0.0):
        self.arch, self.method = arch, method
        path = random_model_dir(arch)
        cfg = load_config(overrides={"model": path, "method": method, "lora.dropout": dropout,
                                     "train.precision": "bf16"}, require_train=False)
        self.device = torch.device("cuda")
        base = models.load_base(cfg, path, models.resolve_precision("bf16", self.device), self.device)
        self.model = models.attach_lora(base, cfg, gradient_checkpointing=False)
        torch.manual_seed(1)
        for name, p in self.model.named_parameters():  # B = 0 would hide the adapter from the loss
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
        self.init = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.vocab = ARCHS[arch]["vocab_size"]
        self.compiled = None  # "layers" or "blocks", once compiled
        self.compile_error = None  # a failed compile is not retried by the next fast arm

    def _compile(self, path: str, ckpt: bool):
        form = "blocks" if path in ("fast", "fast-torchdrop", "fp8") and ckpt else "layers"
        form += {"cudagraphs": "-cudagraphs", "fp8": "-fp8", "cg-fp8": "-cudagraphs-fp8",
                 "fast-torchdrop": "-torchdrop"}.get(path, "")
        if self.compile_error:
            raise Skipped(f"compiling this model failed in an earlier arm ({self.compile_error})")
        if not self.compiled:
            cudagraphs = path in ("cudagraphs", "cg-fp8")
            if path == "selective" or (cudagraphs and ckpt):  # checkpointing traced into the compiled layer
                fast.compile_layers(self.model, mode="reduce-overhead" if cudagraphs else None)
            else:  # as train does; speedups picks the form from the checkpointing state
                torch_dropout = mock.patch.object(fast, "cheap_dropout", lambda model, kind: 0)
                with torch_dropout if path == "fast-torchdrop" else contextlib.nullcontext():
                    cache = {"dequant_cache": DEQUANT_CACHE_GIB * 2**30} if DEQUANT_CACHE_GIB else {}  # older src: none
                    fast.speedups(self.model, self.device, cudagraphs=cudagraphs, fp8=path in ("fp8", "cg-fp8"), **cache)
            self.compiled = form
        if self.compiled != form:
            raise Skipped(f"this model's layers are compiled as {self.compiled}, this arm needs {form}: "
                          f"run it in another invocation")

    def prepare(self, ckpt: bool, path: str):
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(self.init[n])
        base = self.model.get_base_model()
        if ckpt:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        else:
            base.gradient_checkpointing_disable()
        if path in COMPILED:
            self._compile(path, ckpt)
        elif self.compiled:
            raise Skipped("this model is compiled already: run reference/eager/ce arms before compiled ones")
        self.model.train()  # as the loop does: checkpointing (and dropout) act only in train mode


def step_loss_fn(path: str):
    if path == "reference":
        return loss.reference_loss_sum, contextlib.nullcontext()
    if path == "eager":  # the session-1 CE step: the eager chunk function on CUDA too
        return loss.loss_sum, mock.patch.object(fast, "compiled", lambda fn: loss.chunk_loss_and_grad)
    return loss.loss_sum, contextlib.nullcontext()


PACKED = 0  # --packed: mean example length of packed rows (0: each row one example)
DEQUANT_CACHE_GIB = 0.0  # --dequant-cache: quant.dequant_cache of the compiled arms


def micro_batches(ids: torch.Tensor, micro: int, g: torch.Generator) -> list[dict]:
    """One optimizer step's rows (on the CPU) cut into micro-batches as `batches.collate` gives them.
    With PACKED, each row is cut into examples of uniformly drawn lengths (PACKED/2 to 3*PACKED/2, the
    last one what is left) and collated as packed rows: position ids, segment offsets, every token
    trained but each example's first; the segment offsets padded as the loop pads them for CUDA graphs."""
    if not PACKED:
        return [{"input_ids": part, "attention_mask": torch.ones_like(part), "labels": part,
                 "trained_index": batches.trained_index(part)} for part in ids.split(micro)]
    rows = []
    for row in ids.tolist():
        examples, at = [], 0
        while at < len(row):
            n = min(int(torch.randint(PACKED // 2, PACKED * 3 // 2 + 1, (1,), generator=g)), len(row) - at)
            examples.append(Rendered(row[at:at + n], row[at:at + n]))
            at += n
        rows.append(examples)
    return [batches.collate(rows[i:i + micro], pad_id=0, width=SEQ) for i in range(0, len(rows), micro)]


def run_arm(setup: Setup, name: str, steps: int, profile_to: str | None) -> dict:
    """The training loop's own step (train.loop: `_accumulate`, `adamw`, clipping, one wait for the GPU
    per step). `-s2` arms redo session 2's step instead: the host waited for the GPU at each
    micro-batch (its loss, the positions to train) and AdamW was not fused."""
    arch, method, micro, ckpt, path = ARMS[name]
    legacy = name.endswith("-s2")
    setup.prepare(ckpt, path)
    model = setup.model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = loop.adamw(trainable, 1e-4, 0.0, fused=not legacy)
    rows = TOKENS_PER_STEP // SEQ
    accum = rows // micro
    g = torch.Generator().manual_seed(0)
    loss_fn, context = step_loss_fn(path)
    wrapped = loss.TokenLoss(model, loss_fn)
    accelerator = Accelerator(mixed_precision="bf16")
    times, losses, norms = [], [], []

    def one_step(step: int) -> None:
        micros = micro_batches(torch.randint(0, setup.vocab, (rows, SEQ), generator=g), micro, g)
        trained = sum(batches.trained_tokens(b["labels"]) for b in micros)
        if legacy:
            for b in micros:
                del b["trained_index"]  # loss_sum then finds the positions on the GPU, and waits
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if path in ("cudagraphs", "cg-fp8"):  # a new step: the last step's graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        if legacy:
            total = sum(loop._accumulate(accelerator, wrapped, [b], trained, step + 1).item() for b in micros)
        else:
            total = loop._accumulate(accelerator, wrapped, micros, trained, step + 1)
        norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        updated = loop.update_before_wait(accelerator, opt, total, norm)
        total, norm = float(total), float(norm)  # the loop's one wait per step
        if not updated:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total)
        norms.append(norm)

    with context:
        for step in range(steps):
            one_step(step)
        if profile_to:  # one more step, not timed
            try:
                _profile(lambda: one_step(steps), times, profile_to)
            except Exception as e:  # a profiler that cannot start must not cost the arm its numbers
                with open(profile_to, "w") as f:
                    f.write(f"profiling failed: {type(e).__name__}: {e}\n")
            del times[steps:], losses[steps:], norms[steps:]
    warm = min(3, steps - 1)
    tok_s = TOKENS_PER_STEP * (steps - warm) / sum(times[warm:])
    result = dict(arm=name, arch=arch, method=method, path=path, micro_batch=micro, grad_accum=accum,
                  checkpointing=ckpt, steps=steps, tokens_per_s=round(tok_s),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  first_step_s=round(times[0], 1), step_s=[round(t, 3) for t in times],
                  tokens_per_s_median=round(TOKENS_PER_STEP / sorted(times[warm:])[(steps - warm) // 2]),
                  losses=[round(x, 6) for x in losses],
                  grad_norms=[round(x, 5) for x in norms],
                  mfu_4n=round(tok_s * 4 * _params(model) / 790e12, 3))
    if path in ("ce", *COMPILED):  # cumulative over the process: did anything fall back to eager?
        from torch._dynamo.utils import counters

        result.update(dynamo_graphs=counters["stats"]["unique_graphs"],
                      dynamo_graph_breaks=sum(counters["graph_break"].values()))
    del opt
    return result


KERNEL_KINDS = [  # (kind, substrings of kernel names), first match wins
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "scaled_mm")),
    ("nf4 dequant", ("dequantize", "kdequant")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton", ("triton_",)),
]


def _profile(step, times: list, out: str) -> None:
    """One whole training step under the profiler (CUDA graphs replay included): wall time, the time
    the GPU was busy (union of kernel intervals), kernel time by kind, and the top kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy, end, gaps, before = 0.0, -math.inf, [], None
    for e in kernels:
        a, b = e.time_range.start, e.time_range.end
        if before is not None and a > end:
            gaps.append((a - end, end - kernels[0].time_range.start, before.name, e.name))
        if b > end:
            busy += b - max(a, end)
            end, before = b, e
    by_kind = {}
    for e in kernels:
        name = e.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.time_range.elapsed_us()
    total = sum(by_kind.values())
    timed = sorted(times[:-1])[len(times[:-1]) // 2] if len(times) > 1 else float("nan")
    lines = [f"profiled step wall {times[-1] * 1e3:.1f} ms (timed steps' median {timed * 1e3:.1f} ms); "
             f"GPU busy {busy / 1e3:.1f} ms; kernel time {total / 1e3:.1f} ms in {len(kernels)} kernels"]
    lines += [f"  {k:12} {v / 1e3:8.1f} ms  {v / max(total, 1e-9):6.1%}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    for low, high in ((0, 20), (20, 100), (100, 1000), (1000, math.inf)):
        sized = [g[0] for g in gaps if low <= g[0] < high]
        lines.append(f"  GPU idle in gaps of {low}-{high} us: {len(sized)} gaps, {sum(sized) / 1e3:.1f} ms")
    lines.append("largest gaps (us, at ms into the step, kernel before -> kernel after):")
    lines += [f"  {g:8.0f} {at / 1e3:8.2f}  {a[:70]} -> {b[:70]}" for g, at, a, b in sorted(gaps, reverse=True)[:30]]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n\n")
        f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=160))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=100))
    prof.export_chrome_trace(out.removesuffix(".txt") + ".trace.json")


def _params(model) -> int:
    """Parameters of the base counted as the 4N FLOPs/token rule counts them (4-bit packs 2 per byte)."""
    n = 0
    for p in model.parameters():
        n += p.numel() * (2 if p.dtype == torch.uint8 else 1)
    return n


def check_losses(results: list[dict]) -> None:
    """Each non-reference arm against the first reference arm of its architecture and method."""
    refs = {}
    for r in results:
        if "losses" not in r:
            continue
        key = (r["arch"], r["method"])
        if r["path"] == "reference":
            refs.setdefault(key, r)
        elif key in refs:
            ref = refs[key]["losses"]
            diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref))
            r["loss_max_rel_diff"] = round(diff, 7)
            r["loss_within_1pct"] = diff <= 0.01
            r["grad_norm_max_rel_diff"] = round(max(abs(a - b) / abs(b) for a, b in
                                                    zip(r["grad_norms"], refs[key]["grad_norms"])), 5)
            r["loss_reference_arm"] = refs[key]["arm"]


def run_trl_arm(name: str, steps: int, tokenizer: str) -> dict:
    arch, variant = TRL_ARMS[name]
    random_model_dir(arch)
    torch.cuda.empty_cache()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trl_baseline.py")
    try:
        done = subprocess.run([sys.executable, script, arch, variant, str(steps), tokenizer], capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return dict(arm=name, error="timed out after 900 s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return dict(arm=name, error=f"exit {done.returncode}: {done.stderr[-400:]}")
    out = json.loads(lines[-1])
    return dict(arm=name, path="trl-" + variant, method="lora" if variant.startswith("lora") else "qlora",
                mfu_4n=None, **out)


def table(results: list[dict]) -> str:
    lines = [f"{'arm':28} {'tok/s':>8} {'peak GiB':>9} {'MFU 4N':>7}  loss vs reference"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['arm']:28} {r['error'][:90]}")
            continue
        check = (f"within 1% over {r['steps']} steps: {r['loss_within_1pct']} (max rel diff "
                 f"{r['loss_max_rel_diff']:.1e}; grad norm {r['grad_norm_max_rel_diff']:.1e})"
                 if "loss_within_1pct" in r else "")
        mfu = f"{r['mfu_4n']:>7.3f}" if r.get("mfu_4n") is not None else f"{'':>7}"
        lines.append(f"{r['arm']:28} {r['tokens_per_s']:>8,} {r['peak_gib']:>9.2f} {mfu}  {check}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=[*TRL_ARMS, *ARMS], choices=[*TRL_ARMS, *ARMS], metavar="ARM")
    parser.add_argument("--out", default=f"benchmarks/results/gpu_throughput_{datetime.date.today()}.json")
    parser.add_argument("--profile", nargs="*", default=[], help="arms to profile: one more (untimed) step, kernel time by kind and the top kernels")
    parser.add_argument("--profile-dir", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, default=math.inf)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="LoRA dropout (the seed guide's 0.05; 0 keeps every arm's loss comparable with the reference)")
    parser.add_argument("--activation-budget", type=float, default=fast.ACTIVATION_BUDGET,
                        help="the compiled layers' activation memory budget (fast.ACTIVATION_BUDGET; 1.0 = keep all)")
    parser.add_argument("--packed", type=int, default=0, metavar="MEAN",
                        help="pack each row with examples of MEAN tokens on average (0: one example per row)")
    parser.add_argument("--dequant-cache", type=float, default=0, metavar="GIB",
                        help="quant.dequant_cache for the compiled arms: GiB of bf16 copies of 4-bit weights (0: none)")
    parser.add_argument("--trl-steps", type=int, default=6, help="optimizer steps of each TRL arm")
    parser.add_argument("--tokenizer", default=os.environ.get("TOK", ".tok"),
                        help="folder with tokenizer.json + tokenizer_config.json, for the TRL arms")
    args = parser.parse_args()
    fast.ACTIVATION_BUDGET = args.activation_budget
    global PACKED, DEQUANT_CACHE_GIB
    PACKED, DEQUANT_CACHE_GIB = args.packed, args.dequant_cache
    import bitsandbytes
    import peft
    import transformers

    meta = dict(date=str(datetime.date.today()), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
                python=platform.python_version(), activation_budget_over_1e9_params=args.activation_budget,
                seq=SEQ, tokens_per_step=TOKENS_PER_STEP, dequant_cache_gib=args.dequant_cache,
                lora=f"r=16 alpha=32 dropout={args.dropout} all-linear, lora_B ~ N(0, 1e-3)", optimizer="AdamW lr=1e-4 (fused; -s2 arms: foreach), clip 1.0",
                data="random full rows, the same for every arm" + (f", packed with examples of {args.packed // 2}-{args.packed * 3 // 2} tokens" if args.packed else ""), timing="steps 4..N, each from a synchronised start to a synchronised end",
                step="train.loop._accumulate + clip_grad_norm_ + fused AdamW queued before the one host wait per step (loop.update_before_wait; -s2: a wait per micro-batch, AdamW after it)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results, started = [], time.time()
    for name in [n for n in args.only if n in TRL_ARMS]:
        results.append(run_trl_arm(name, args.trl_steps, args.tokenizer) if time.time() - started <= args.budget_s
                       else dict(arm=name, error=f"skipped: --budget-s {args.budget_s:.0f} spent"))
        print(json.dumps(results[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    ours = [n for n in args.only if n not in TRL_ARMS]
    models_in_order = list(dict.fromkeys(ARMS[n][:2] for n in ours))
    order = sorted(ours, key=lambda n: (models_in_order.index(ARMS[n][:2]), PATH_ORDER[ARMS[n][4]]))
    setup, unloadable = None, {}
    for name in order:
        arch, method = ARMS[name][:2]
        if time.time() - started > args.budget_s:
            results.append(dict(arm=name, error=f"skipped: --budget-s {args.budget_s:.0f} spent"))
            continue
        if (arch, method) in unloadable:
            results.append(dict(arm=name, error=f"skipped: the model failed to load ({unloadable[arch, method]})"))
            continue
        try:
            if setup is None or (setup.arch, setup.method) != (arch, method):
                setup = None
                torch.cuda.empty_cache()
                unloadable[arch, method] = "loading"
                setup = Setup(arch, method, args.dropout)
                del unloadable[arch, method]
            profile_to = os.path.join(args.profile_dir, f"profile_{name}.txt") if name in args.profile else None
            results.append(run_arm(setup, name, args.steps, profile_to))
        except Exception as e:  # an arm that fails (OOM, a compile error) is recorded; the others still run
            results.append(dict(arm=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
            if (arch, method) in unloadable:
                unloadable[arch, method] = type(e).__name__
            if setup is not None:
                setup.model.zero_grad(set_to_none=True)
                if ARMS[name][4] in COMPILED and not isinstance(e, (torch.OutOfMemoryError, Skipped)):
                    setup.compile_error = setup.compile_error or type(e).__name__
            torch.cuda.empty_cache()
        check_losses(results)
        print(json.dumps(results[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    print(table(results))
    if not all(math.isfinite(x) for r in results for x in r.get("losses", [])):
        raise SystemExit("a run produced a non-finite loss")


if __name__ == "__main__":
    main()
