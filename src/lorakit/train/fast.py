"""The GPU fast path: torch.compile where it measured faster, with the eager code kept as the reference.

- `compile_layers`: each decoder layer (LoRA and 4-bit linears included) compiled whole. Inductor
  fuses RMSNorm, RoPE, SwiGLU and LoRA's scale-and-add, and AOTAutograd's partitioner recomputes
  some cheap pointwise results in backward instead of keeping them (more under the activation budget).
  With gradient checkpointing on, the checkpoint is traced into the compiled layer and becomes
  selective: the outputs of the 4-bit matmuls (custom ops the partitioner does not recompute) are
  kept, the rest recomputed.
- `compile_blocks`: each layer's children compiled, the layer not; eager checkpointing around the
  layer then keeps only the layer's input, as uncompiled checkpointing does, and recomputes in
  compiled code. What `speedups` uses when checkpointing is on: it holds the memory the user asked for.
- The partitioner's activation budget (ACTIVATION_BUDGET, models over LARGE_MODEL parameters): cheap
  results recomputed in backward instead of kept.
- `train.fp8`: `speedups` routes the frozen base's matmuls through train/fp8.py before compiling.
- `cache_dequantized` (`quant.dequant_cache`, qlora): bf16 copies of 4-bit weights, made once, in GPU
  memory the step leaves free. bitsandbytes dequantizes a whole weight for each 4-bit matmul, in the
  forward and again in the backward of every micro-batch (8B QLoRA mb4: 890 dequantizations, 40 ms of a
  1,010 ms step); a cached layer runs F.linear on the same bf16 numbers. 8B QLoRA on packed rows:
  15,862 → 16,196 tok/s with 6 GiB of copies (peak 32.4 → 39.4 GiB), 16,517 with all 14 GiB.
- `SeededDropout` (CUDA, compiled): LoRA dropout whose mask is a hash of a seed drawn before each
  forward of the decoder, so the compiled backward recomputes it from the seed instead of keeping it
  (8B QLoRA mb4 at dropout 0.05: 32.4 GiB, as at dropout 0, against 42.0 with a kept mask) and gets
  the forward's mask; torch's dropout under an activation budget below 1 may be recomputed with fresh
  random numbers (pytorch/pytorch#190758). Dropout 0.05 costs the 8B 1.5% (benchmarks/NOTES.md).
- `compiled`: one compiled copy of a function (train/loss.py compiles its per-chunk CE step with it).
- `segment_attention` (packed rows): causal attention within each example instead of over the whole
  row under a block-diagonal mask, which SDPA takes as a dense mask and computes in full. On the CPU
  example by example (one 8 x 512 packed batch of SmolLM2-135M spent 5 of 28 s of a step in
  attention); on CUDA one call of torch's varlen flash-attention. transformers' SDPA with the mask
  stays the reference (tests/unit/test_fast.py, tests/gpu/test_fast_gpu.py).
- `cheap_dropout` (CPU): LoRA dropout with its mask drawn from random 16-bit integers. torch's CPU
  dropout draws a float per element, 86 ms for one [4096 x 1536] input on the 2-core test machine,
  and PEFT drops each LoRA layer's input apart (7 per decoder layer): 26 of 140 s of a profiled
  3-step run. Random int64 words cut into four 16-bit draws take 5 ms for that input (numpy's SFC64,
  seeded from torch's generator; 15 ms from torch's), the mask kept for the backward is bool, not
  float, and the dropout's scale is applied to LoRA A's r outputs instead of its input (one pass less
  over the input forward and over its gradient backward). `nn.Dropout` stays the reference
  (tests/unit/test_fast.py).

The module tree, state dict and adapter files stay those of the eager model. tests/gpu/test_fast_gpu.py
compares each compiled path with the eager reference on fresh random inputs; benchmarks/NOTES.md has
the measurements.
"""

import contextlib
import functools
import inspect
import re

import numpy as np
import torch
import torch._functorch.config
import torch.nn.functional as F

from lorakit.train import fp8 as fp8_path

# The partitioner's memory budget for compiled layers, as a fraction of what it would keep by default.
# At 0.8 it recomputes in the backward the cheap results it would otherwise keep beside their inputs
# (the normed inputs of the projections, SwiGLU's product, attention's output in a second layout):
# a third less activation memory per layer (tests/unit/test_fp8.py counts the saved tensors). Below
# that it starts recomputing matmuls. Measured on one H200 (benchmarks/NOTES.md, session 4): the 8B
# at micro-batch 4 went from 43.5 to 32.4 GiB at the same speed; Qwen3-0.6B, whose memory was never
# short, lost 3-5%. So `speedups` applies it above LARGE_MODEL parameters only.
ACTIVATION_BUDGET = 0.8
LARGE_MODEL = 1e9


def speedups(model, device: torch.device, cudagraphs: bool = False, fp8: bool = False, dequant_cache: float = 0):
    """Apply the fast path to a model with LoRA attached (call it after checkpointing is set up);
    on any device but CUDA it does nothing, so CPU training computes exactly what it did. Returns the
    model (the same object). `cudagraphs` (train.compile: cudagraphs): the compiled code also runs as
    recorded CUDA graphs, one launch per layer instead of one per kernel; each recorded graph reuses
    its output memory, so the caller marks every micro-batch with `new_graph_step`, needs one
    micro-batch per optimizer step, and keeps batch shapes fixed (each new shape records again).
    `fp8` (train.fp8): the frozen base's matmuls run in FP8 (train/fp8.py). `dequant_cache`: bytes
    of bf16 copies of 4-bit weights to keep (`cache_dequantized`; not with fp8, which casts from the
    4-bit codes itself). LoRA dropout becomes SeededDropout."""
    if device.type != "cuda":
        return model
    if fp8:
        fp8_path.attach(model)
    elif dequant_cache:
        cache_dequantized(model, dequant_cache)
    cheap_dropout(model, SeededDropout)
    reseed(model)
    mode = "reduce-overhead" if cudagraphs else None
    budget = activation_budget(model.num_parameters())
    if checkpointing(model):
        compile_blocks(model, mode, budget)
    else:
        compile_layers(model, mode, budget)
    return model


def cache_dequantized(model, max_bytes: float) -> int:
    """Give 4-bit LoRA base layers a bf16 copy of their weight that their training-mode forward
    multiplies by (`_Dequantized`), while `max_bytes` allows; returns the bytes held. The same
    projections in every decoder layer (the largest kinds that fit, e.g. every layer's gate_proj,
    q_proj and o_proj), so all layers stay one compiled graph: a layer with other cached projections
    than its neighbours would be traced and compiled again."""
    kinds: dict[str, list] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A") and fp8_path._is_4bit(base) and not _cached(base):
            kinds.setdefault(re.sub(r"\.\d+\.", ".#.", name), []).append(base)

    def size(bases):
        return sum(b.in_features * b.out_features * _compute_dtype(b).itemsize for b in bases)

    held = 0
    for bases in sorted(kinds.values(), key=size, reverse=True):
        if held + size(bases) <= max_bytes:
            for base in bases:
                _Dequantized(base)
            held += size(bases)
    return held


def _cached(base) -> bool:
    return isinstance(getattr(base.forward, "__self__", None), _Dequantized)


def _compute_dtype(base) -> torch.dtype:
    return base.compute_dtype or base.weight.quant_state.dtype


class _Dequantized:
    """Replaces a 4-bit linear's `forward` in training mode by F.linear on its weight dequantized once,
    by bitsandbytes' own `dequantize_4bit`: what bitsandbytes' matmul does for rows of tokens at every
    call (dequantize the whole weight to the compute dtype, then F.linear), so outputs and gradients are
    the same numbers. Evaluation and generation keep bitsandbytes' path (its one-row kernels). The
    module's parameters and state dict are untouched; the copy is held here, outside them, so adapters
    and checkpoints never see it."""

    def __init__(self, base):
        from bitsandbytes.functional import dequantize_4bit

        self.base = base
        self.eager_forward = base.forward
        with torch.no_grad():
            self.weight = dequantize_4bit(base.weight.data, base.weight.quant_state).to(_compute_dtype(base))
        base.forward = self.forward

    def forward(self, x, *args, **kwargs):
        if not self.base.training:
            return self.eager_forward(x, *args, **kwargs)
        bias = None if self.base.bias is None else self.base.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def activation_budget(params: float) -> float:
    """The budget `speedups` compiles a model of `params` parameters with (lorakit.plan predicts with it)."""
    return ACTIVATION_BUDGET if params > LARGE_MODEL else 1.0


def new_graph_step() -> None:
    """Tell CUDA-graph replay that a new forward and backward begins (the last one's outputs are done with)."""
    torch.compiler.cudagraph_mark_step_begin()


def decoder(model) -> torch.nn.Module:
    """The transformer stack of a (PEFT-wrapped) causal LM; a model without one is its own."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else base


def decoder_layers(model) -> torch.nn.ModuleList:
    return decoder(model).layers


def checkpointing(model) -> bool:
    # transformers' GradientCheckpointingLayer carries the flag; remote-code layers may not
    return any(getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(model))


def compile_layers(model, mode: str | None = None, budget: float | None = None) -> int:
    """Compile every decoder layer in place (`Module.compile`, so parameter names do not change);
    returns how many. Layers share their code, so one compiled graph serves all of them; a second
    sequence length or batch size compiles once more, with symbolic shapes, and then serves all.
    `mode`: torch.compile's ("reduce-overhead": CUDA graphs, see `speedups`); `budget`: the
    partitioner's (None: ACTIVATION_BUDGET)."""
    _compile_settings(ACTIVATION_BUDGET if budget is None else budget)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


def compile_blocks(model, mode: str | None = None, budget: float | None = None) -> int:
    """Compile each decoder layer's children (attention, MLP, norms) in place; returns how many."""
    _compile_settings(ACTIVATION_BUDGET if budget is None else budget)
    blocks = [child for layer in decoder_layers(model) for child in layer.children()]
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)


def _compile_settings(budget: float) -> None:
    # Every transformers decoder layer runs through one code object (the checkpointing wrapper of
    # transformers.modeling_layers), and its graphs multiply: first layer or not (its input needs no
    # grad), train or eval, checkpointing on or off, static then symbolic shapes. Past dynamo's
    # default limit of 8 the layers would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._functorch.config.activation_memory_budget = budget


@functools.cache
def compiled(fn):
    """One compiled copy of `fn`. A dimension seen with a second size (a short last chunk) is made
    symbolic on the recompile, so varying row counts cost one extra compile, not one each."""
    return torch.compile(fn)


class BytesDropout(torch.nn.Module):
    """nn.Dropout(p) with the mask drawn from 16-bit random integers: an element is dropped when its
    draw is below round(p * 65536), so the rate is p to within 1/131072, and kept elements are scaled
    by 1 / (1 - that rate). Draws come from `random_words`, seeded from torch's default generator, so
    seeding and resume restore them like any other random op. `scaled=False`: kept elements are passed
    as they are, and the caller scales later (`cheap_dropout`: LoRA A's output)."""

    def __init__(self, p: float, scaled: bool = True):
        super().__init__()
        self.p = p
        self.cutoff = round(p * 65536)  # draws below it are dropped
        self.scale = 1 / (1 - self.cutoff / 65536)
        self.scaled = scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cutoff == 0:
            return x
        n = x.numel()
        draws = random_words((n + 3) // 4).to(x.device).view(torch.int16)[:n].view(x.shape)  # on [-32768, 32767]
        return _KeepScaled.apply(x, draws >= self.cutoff - 32768, self.scale if self.scaled else 1.0)

    def extra_repr(self) -> str:
        return f"p={self.p}" + ("" if self.scaled else ", scaled by the caller")


def random_words(count: int) -> torch.Tensor:
    """`count` uniformly random int64 words (on the CPU) from numpy's SFC64 generator, seeded by one draw
    from torch's default generator, so torch.manual_seed and a resumed run's RNG state fix them as
    they fix torch's own draws. Twice as fast as torch's CPU generator over the full int64 range (the
    2-core test machine: 7.4 -> 3.6 ms for one [4096 x 576] BytesDropout, benchmarks/NOTES.md)."""
    seed = int(torch.randint(0, 2**63 - 1, (1,)))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))


class _KeepScaled(torch.autograd.Function):
    """x * keep * scale, keeping only the bool mask for the backward."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale if scale != 1 else x, 0)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale if ctx.scale != 1 else grad, 0), None, None


class SeededDropout(BytesDropout):
    """BytesDropout whose 16-bit draws are a hash of (seed, element index), for the compiled CUDA path
    (`speedups`). The seed is a buffer that `reseed` refills before every forward of the decoder, outside
    the compiled code, so the mask is a function of the seed and the element's index only: the compiled
    backward recomputes it (`seeded_keep` is written so the partitioner does) and gets the forward's
    mask. With torch's dropout inside a compiled layer that is not guaranteed: under an activation
    budget below 1 the partitioner may recompute the dropout in the backward with fresh random numbers
    (pytorch/pytorch#190758), and otherwise keeps a bool mask per LoRA layer (for Llama-3.1-8B, 39 KB
    per token per layer)."""

    def __init__(self, p: float):
        super().__init__(p)
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64), persistent=False)
        self.salt = 0  # set by `reseed`: its place among the decoder layer's dropouts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cutoff == 0:
            return x
        return _SeededKeep.apply(x, self.seed, self.cutoff, self.scale, self.salt)


def reseed(model) -> int:
    """Give every SeededDropout of `model` a fresh seed before each forward of its decoder (one random
    draw for all of them, from torch's generator, so seeding and resume restore them); returns how many.
    A second call changes nothing."""
    drops = [m for m in model.modules() if isinstance(m, SeededDropout)]
    if not drops or getattr(model, "_lorakit_reseed", None) is not None:
        return len(drops)
    params = list(model.parameters())  # the seeds go where the model is; new modules start on the CPU
    seeds = torch.zeros(len(drops), dtype=torch.int64, device=params[0].device if params else "cpu")
    for i, drop in enumerate(drops):
        drop.seed = seeds[i]
    for layer in decoder_layers(model) if hasattr(decoder(model), "layers") else []:
        salted = [m for m in layer.modules() if isinstance(m, SeededDropout)]
        for salt, drop in enumerate(salted):  # the same in every layer: the layers share one compiled graph
            drop.salt = salt

    def refill(module, args) -> None:
        seeds.random_(0, 2**62)

    # on the decoder: train's loss calls it directly, past the model's own forward (train/loss.py)
    model._lorakit_reseed = decoder(model).register_forward_pre_hook(refill)
    return len(drops)


def _signed32(c: int) -> int:
    return c - 2**32 if c >= 2**31 else c


_FOLD, _MIX1, _MIX2 = _signed32(0x9E3779B9), _signed32(0x7FEB352D), _signed32(0x846CA68B)
INT32_INDEX = 2**31  # masks of up to this many elements (plus the salt) hash an int32 index


def seeded_keep(seed: torch.Tensor, shape, cutoff: int, salt: int = 0) -> torch.Tensor:
    """The bool keep mask of SeededDropout: a 32-bit hash (lowbias32: two multiply-xorshift rounds) of
    the element's index plus the seed, both folded to 32 bits; an element is kept when the hash's low
    16 bits are >= cutoff. 32-bit, not 64-bit, arithmetic: the GPU multiplies int64 in several int32
    instructions, and the mask is computed in the forward and again in the backward for every LoRA
    input (dropout 0.05 cost an 8B QLoRA step 2.8% with splitmix64, 1.5% with this hash: benchmarks/NOTES.md,
    session 6). Below INT32_INDEX elements the index itself is int32 and the seed is folded once
    (benchmarks/gpu_kernels.py: the SwiGLU and RMSNorm kernels the masks fuse into, forward and
    backward, 15% faster on the H200 than with an int64 index folded per element); past it, rows past
    2**32 elements fold their index's high bits in too.
    int32 arithmetic wraps; >> is arithmetic on signed integers, so each shift is masked to the
    logical one.

    Written so that AOTAutograd's partitioner recomputes the mask in the backward from the seed instead
    of keeping it (1 byte per element of every LoRA input; tests/unit/test_fast.py counts what is saved):
    - the low 16 bits are compared as int32: an op whose output is under a quarter of its input's
      bytes counts as a reduction, which the partitioner never recomputes;
    - the index range starts at `salt`, a different one for each dropout of a layer: one index tensor
      shared by the layer's dropouts would be used "far apart", which also bans recomputing."""
    n = 1
    for size in shape:
        n *= size
    if salt + n <= INT32_INDEX:
        folded = seed.to(torch.int32) ^ ((seed >> 32).to(torch.int32) * _FOLD)
        h = torch.arange(salt, salt + n, dtype=torch.int32, device=seed.device).view(shape) + folded
    else:
        x = torch.arange(salt, salt + n, dtype=torch.int64, device=seed.device).view(shape) + seed
        h = x.to(torch.int32) ^ ((x >> 32).to(torch.int32) * _FOLD)
    h = (h ^ ((h >> 16) & 0xFFFF)) * _MIX1
    h = (h ^ ((h >> 15) & 0x1FFFF)) * _MIX2
    h = h ^ ((h >> 16) & 0xFFFF)
    return (h & 0xFFFF) >= cutoff


class _SeededKeep(torch.autograd.Function):
    """x * keep * scale with keep recomputed from the seed in the backward."""

    @staticmethod
    def forward(ctx, x, seed, cutoff, scale, salt):
        ctx.save_for_backward(seed)
        ctx.cutoff, ctx.scale, ctx.salt = cutoff, scale, salt
        return torch.where(seeded_keep(seed, x.shape, cutoff, salt), x * scale, 0)

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        keep = seeded_keep(seed, grad.shape, ctx.cutoff, ctx.salt)
        return torch.where(keep, grad * ctx.scale, 0), None, None, None, None


def cheap_dropout(model, kind: type = BytesDropout) -> int:
    """Swap every LoRA layer's nn.Dropout for `kind` (BytesDropout: CPU training; SeededDropout: the
    compiled CUDA path); returns how many. BytesDropout leaves its kept elements unscaled and a hook
    on the LoRA A projection scales A's output instead (lora_B(lora_A(x * keep) * scale) is the same
    update): r numbers per token instead of every input feature, and no scaling pass over the input in
    the forward or over its gradient in the backward. PEFT computes lora_B(lora_A(dropout(x))); the
    layers tests/unit/test_fast.py checks give the update and gradients of nn.Dropout's mask."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                if kind is BytesDropout:
                    drops[name] = BytesDropout(drop.p, scaled=False)
                    module.lora_A[name].register_forward_hook(functools.partial(_scale_output, drops[name]))
                else:
                    drops[name] = kind(drop.p)
                swapped += 1
    return swapped


def _scale_output(drop: BytesDropout, module, args, output):
    """A forward hook on LoRA A: the scale its unscaled BytesDropout input skipped."""
    return output * drop.scale if drop.training and drop.cutoff else None


SEGMENT_ATTENTION = "lorakit_segments"  # the attention implementation's name in transformers' registry
try:  # torch's varlen flash-attention (torch >= 2.10) and the names of its arguments, which have changed
    from torch.nn.attention.varlen import varlen_attn as _VARLEN

    _VARLEN_ARGS = set(inspect.signature(_VARLEN).parameters)
    if not _VARLEN_ARGS & {"window_size", "is_causal"}:  # no way to ask it for causal attention
        _VARLEN = None
except ImportError:
    _VARLEN, _VARLEN_ARGS = None, set()
_VARLEN_READY = None  # set by `varlen_ready`: varlen attention runs on every visible GPU


def varlen_ready() -> bool:
    """Whether packed rows on CUDA can take torch's varlen flash-attention: torch has it, and every
    visible GPU is Ampere (compute capability 8.0) or newer, as flash-attention needs."""
    global _VARLEN_READY
    if _VARLEN_READY is None:
        _VARLEN_READY = _VARLEN is not None and torch.cuda.is_available() and all(
            torch.cuda.get_device_capability(i) >= (8, 0) for i in range(torch.cuda.device_count()))
    return _VARLEN_READY


def use_segment_attention(model) -> bool:
    """Make a model with SDPA attention run packed rows through `segment_attention` (on the CPU, and on
    CUDA where `varlen_ready`); returns whether it did. Other attention implementations and devices
    are left alone."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    varlen_ready()  # now, outside compiled code: segment_attention reads the answer on CUDA
    if getattr(base.config, "_attn_implementation", None) != "sdpa" or not _segments_on(base.device):
        return False
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)  # unpacked batches: SDPA's own masks
    base.set_attn_implementation(SEGMENT_ATTENTION)
    return base.config._attn_implementation == SEGMENT_ATTENTION


def _segments_on(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and varlen_ready())


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: for a packed batch (segment offsets `cu_seq_lens_q`, which
    train's loss passes with position ids; see loss.model_inputs) causal attention within each example
    (and each row's padding) alone, which is what the block-diagonal mask computes: on CUDA one varlen
    flash-attention call over the flattened rows, on the CPU SDPA example by example. Anything else
    goes to transformers' SDPA attention: unpacked batches, dropout, tensors on another device (a model
    moved after `use_segment_attention`), GPUs older than Ampere, fp32 or heads over 256 wide on CUDA
    (flash-attention's limits), calls that are not causal, and layers with a sliding window, logit softcapping, sinks or a
    position bias."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    special = any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))
    causal = kwargs.get("is_causal")  # as transformers' SDPA reads it: the call's, else the layer's
    causal = getattr(module, "is_causal", True) if causal is None else causal
    flash = query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
    cuda = query.device.type == "cuda" and bool(_VARLEN_READY) and flash  # read, not asked: compiled code
    if cu is None or dropout or special or not causal or not (cuda or query.device.type == "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, length, _ = query.shape
    if cuda:
        return _varlen_segments(query, key, value, cu, scaling), None
    out = _attend_segments(query, key, value, [n for n in (cu[1:] - cu[:-1]).tolist() if n], scaling)
    return out.view(heads, rows, length, -1).permute(1, 2, 0, 3).contiguous(), None  # [rows, length, heads, dim]


def _varlen_segments(query, key, value, cu, scaling) -> torch.Tensor:
    """[rows, length, heads, dim] of causal attention within the segments `cu` of the flattened rows, by
    torch's varlen flash-attention. Its longest-segment argument is the row length, an upper bound
    known from the shapes: the batch's own would be a new constant, and a new compile, per batch."""
    rows, heads, length, dim = query.shape

    def tokens(x):  # [rows, heads, length, dim] -> [rows * length, heads, dim]
        return x.transpose(1, 2).reshape(rows * length, x.shape[1], dim)

    k, v = tokens(key), tokens(value)
    extra = {"window_size": (-1, 0)} if "window_size" in _VARLEN_ARGS else {"is_causal": True}
    if key.shape[1] != heads:
        if "enable_gqa" in _VARLEN_ARGS:
            extra["enable_gqa"] = True
        else:  # torch 2.11 takes fewer k/v heads too (same losses), but its speed is unmeasured (NOTES, session 9)
            k, v = (x.repeat_interleave(heads // key.shape[1], 1) for x in (k, v))
    out = _VARLEN(tokens(query), k, v, cu, cu, length, length, scale=scaling, **extra)
    return out.view(rows, length, heads, dim)


# In 16 bits, examples up to this many tokens take SDPA's math kernel on the CPU: torch's CPU flash
# kernel is slow in bf16 for short examples (its backward above all), and the math kernel computes in
# fp32. A bf16 step of SmolLM2-135M on 8 packed rows of ~100-200-token examples: 12.75 -> 10.98 s
# (benchmarks/NOTES.md, session 10). Longer examples keep the flash kernel, which is faster there and
# keeps no [length x length] weights (the math kernel keeps fp32 q, k, v and weights: plan.py counts them).
MATH_SEGMENT = 128


def _attend_segments(query, key, value, lengths: list[int], scaling) -> torch.Tensor:
    """[heads, tokens, dim] of causal attention within each run of `lengths` tokens of the flattened rows.
    split, not slicing: the backward of one split is one cat; each slice's would fill a zero tensor of
    the whole batch (measured: 150 against 92 ms per layer for 8 x 512 tokens of SmolLM2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pieces(x):
        return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1]).split(lengths, 1)

    def attend(q, k, v):
        short = q.dtype != torch.float32 and q.shape[1] <= MATH_SEGMENT
        with sdpa_kernel(SDPBackend.MATH) if short else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling,
                                                  enable_gqa=True)[0]

    return torch.cat([attend(q, k, v) for q, k, v in zip(pieces(query), pieces(key), pieces(value))], 1)
