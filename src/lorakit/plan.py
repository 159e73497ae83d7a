"""Before training: will it fit, how long will it take, and what to change.

The memory model follows lorakit's own training step (`train/loop.py`, `train/loss.py`,
`models.load_base` / `attach_lora`) tensor by tensor, from the model's config alone:

* base weights: in the run's precision for lora (16-bit under bf16/fp16, on the CPU too); for qlora
  NF4 (0.5 byte/param) plus its absmax constants (1 byte per 64 weights double-quantized, 4 without)
  on the decoder's linear layers, while embeddings, norms and lm_head stay in the compute dtype;
* the adapter: fp32 LoRA weights and their AdamW moments; gradients at the optimizer step;
* activations autograd keeps per token and layer (`_layer_activations`): what PEFT's LoRA path
  saves (its own casts and dropout masks; frozen weights save nothing for the backward), the
  RMSNorms' fp32 inputs, SDPA's q/k/v/output/logsumexp (k and v repeated to every head and a
  float mask per layer when a mask is materialised), the gated MLP's three intermediates. With
  gradient checkpointing only each layer's input stays, and one layer is recomputed in the backward;
* the loss (`_loss_peak`): lorakit projects only trained positions to the vocabulary, in chunks,
  so its peak is a few vocab-wide buffers per chunk, not the logits of the whole batch;
* one layer's backward (`_layer_backward`), whichever of the two is larger;
* what the allocator does not count: the CUDA context and cache slack, or on CPU the process
  itself. Those figures are in `RUNTIME`.

On CUDA with `train.compile` on, train compiles each decoder layer (`train/fast.py`), and AOTAutograd
keeps another set of tensors for the backward than eager autograd does: `Step.compiled` selects that
model (`_compiled_layer_activations`, `_compiled_layer_backward`, the fused loss step in `_loss_peak`),
with the partitioner's activation budget derived from the model's size as `fast.speedups` derives it
(`activation_budget`). Measured against the H200 peaks in docs/plan.md ("Compiled layers").

Predicted vs measured: docs/plan.md and benchmarks/results/plan_memory_*.json (within 1.4% of
torch.cuda.max_memory_allocated on 13 H200 configurations).

Throughput comes from `MEASURED` (lorakit's own tokens/s on an H200 and a 2-core CPU), turned into
a hardware efficiency and carried to other models by FLOPs per token and to other devices by
their peak (`GPUS`); every figure says whether it was measured or extrapolated.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

from lorakit.errors import LorakitError
from lorakit.train import fast

GiB = 2**30


class PlanError(LorakitError):
    """A model or device the planner cannot describe."""


# ---------------------------------------------------------------------------------------------
# Architecture: what the model config says, in the numbers the memory and FLOP counts need.

@dataclass(frozen=True)
class Linear:
    name: str  # module name, as LoRA target_modules use it
    n_in: int
    n_out: int
    group: str  # attn_in | attn_out | mlp_in | mlp_out: linears of a group read the same input


@dataclass(frozen=True)
class Arch:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    linears: tuple[Linear, ...]  # one decoder layer's linear layers
    bias_params: int  # per layer (qkv bias of Qwen2 and attention_bias models)
    norms: int = 2  # RMSNorms per layer
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    full_logits: bool = False  # final logit softcapping: lorakit's loss takes the full-logits path
    checkpoint_bytes: int = 2  # bytes per weight in the checkpoint files (config `dtype`; 2 if unset)
    note: str = ""  # set when the architecture is approximated

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        return sum(l.n_in * l.n_out for l in self.linears)

    @property
    def params(self) -> int:
        """Every parameter of the base model, lm_head counted once when tied."""
        norms = self.norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = self.layer_linear_params + self.bias_params + norms
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + head + self.hidden

    def lora_params(self, r: int, targets) -> int:
        return self.layers * sum(r * (l.n_in + l.n_out) for l in self.targeted(targets))

    def targeted(self, targets) -> list[Linear]:
        if targets == "all-linear":
            return list(self.linears)
        names = {targets} if isinstance(targets, str) else set(targets)
        return [l for l in self.linears if l.name in names]


_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2",
               "smollm3", "phi3", "cohere", "starcoder2", "ministral"}


def arch_from_config(config) -> Arch:
    """The Arch of a transformers config (a PretrainedConfig, or a dict with `model_type`)."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        fields_ = {k: v for k, v in config.items() if k != "model_type"}
        config = AutoConfig.for_model(config["model_type"], **fields_)
    config = getattr(config, "text_config", None) or config
    kind = config.model_type
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise PlanError(f"model_type {kind!r} is a mixture of experts; lorakit plan models dense decoders only.")
    d, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    q, k = heads * hd, kv * hd
    if kind == "phi3":  # fused projections: one LoRA per fused matrix
        linears = (Linear("qkv_proj", d, q + 2 * k, "attn_in"), Linear("o_proj", q, d, "attn_out"),
                   Linear("gate_up_proj", d, 2 * i, "mlp_in"), Linear("down_proj", i, d, "mlp_out"))
    else:
        linears = (Linear("q_proj", d, q, "attn_in"), Linear("k_proj", d, k, "attn_in"),
                   Linear("v_proj", d, k, "attn_in"), Linear("o_proj", q, d, "attn_out"),
                   Linear("gate_proj", d, i, "mlp_in"), Linear("up_proj", d, i, "mlp_in"),
                   Linear("down_proj", i, d, "mlp_out"))
    bias = kind == "qwen2" or bool(getattr(config, "attention_bias", False))
    return Arch(
        model_type=kind, hidden=d, intermediate=i, layers=config.num_hidden_layers, heads=heads, kv_heads=kv,
        head_dim=hd, vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
        linears=linears, bias_params=(q + 2 * k) if bias else 0,
        norms=4 if kind in ("gemma2", "gemma3_text") else 2,
        qk_norm=kind in ("qwen3", "gemma3_text"),
        full_logits=bool(getattr(config, "final_logit_softcapping", None)),
        checkpoint_bytes=4 if "float32" in str(getattr(config, "dtype", None) or "") else 2,
        note="" if kind in _LLAMA_LIKE else f"model_type {kind!r} is modelled as a Llama-style dense decoder",
    )


def load_arch(model: str, trust_remote_code: bool = False) -> Arch:
    """The Arch of a config name lorakit resolves (embedded name, local dir, hub id): config only."""
    from transformers import AutoConfig

    from lorakit import models

    return arch_from_config(AutoConfig.from_pretrained(models.resolve_model(model),
                                                       trust_remote_code=trust_remote_code))


# ---------------------------------------------------------------------------------------------
# Memory of one training step.

@dataclass(frozen=True)
class Step:
    """One micro-batch and the setup that decides what memory and time it takes."""

    method: str  # lora | qlora
    device: str  # cuda | cpu
    precision: str  # bf16 | fp16 | fp32
    checkpointing: bool
    rows: int  # sequences in the micro-batch
    seq: int  # row width in tokens, padding included
    trained: int  # tokens in the micro-batch that carry a loss
    masked: bool = True  # an attention mask is materialised (padded rows, packed rows); False: full rows
    r: int = 16
    dropout: float = 0.05
    targets: str | tuple = "all-linear"
    double_quant: bool = True
    compiled: bool = False  # decoder layers compiled (CUDA, train.compile on); False: the eager step
    packed: bool = False  # rows of several examples (data.packing): on the CPU, attention example by example

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


# Figures the allocator does not see. CUDA: the context (driver, kernels, cuBLAS handles) and the
# caching allocator's unused reserve; CPU: the Python process with torch, transformers and peft
# imported, and what glibc keeps of freed activation memory. Measured values in docs/plan.md.
RUNTIME = {
    "cuda_workspace": 64 * 2**20,  # measured (H200): cuBLAS/cuBLASLt workspaces, inside the allocator
    "cuda_context": 0.75 * GiB,  # measured (H200, torch 2.11, CUDA 13): device use outside the allocator
    "cuda_slack": 0.10,  # measured (H200): reserved exceeds the allocated peak by 0.4-10%, most with checkpointing
    "cpu_process": 0.43 * GiB,  # measured: RSS of lorakit with torch, transformers, peft loaded, no weights
    # measured: what glibc's heap keeps of the step's memory. As train runs (glibc defaults):
    # smollm2-135m, demo config, 3.71 GB peak RSS after 2 steps and 3.73 after 8, for 1.54 GB of
    # activations + loss buffers. With limit_cpu_heap (benchmarks/plan_memory.py): 0.03.
    "cpu_retained": 0.70,
    "cpu_retained_heap_limited": 0.03,
}


@dataclass
class Memory:
    """Bytes, by component. `allocated` is what torch.cuda.max_memory_allocated would report;
    `total` adds the runtime and must fit the device."""

    weights: float  # the frozen base (+ cuBLAS workspaces on CUDA)
    adapter: float  # LoRA weights + AdamW moments
    activations: float  # kept for the backward at the peak
    transient: float  # the loss buffers, one layer's backward (and recompute) or the optimizer step
    runtime: float  # CUDA context + allocator slack; CPU: the process, retained heap, file pages
    peak_at: str  # loss | backward | optimizer

    @property
    def allocated(self) -> float:
        return self.weights + self.adapter + self.activations + self.transient

    @property
    def total(self) -> float:
        return self.allocated + self.runtime


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def base_weight_bytes(arch: Arch, step: Step) -> float:
    """The frozen base as load_base holds it for training."""
    if step.method == "lora":
        return arch.params * _bytes(step.precision)
    compute = _bytes(step.precision)
    quantized = arch.layers * arch.layer_linear_params
    per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if step.double_quant else 4 / 64)
    constants = arch.layers * len(arch.linears) * 2 * 256 * 4  # NF4 and absmax code books
    return quantized * per_weight + constants + (arch.params - quantized) * compute


def _resident_checkpoint(arch: Arch, step: Step) -> float:
    """CPU qlora: file pages of the checkpoint that stay in RSS outside any tensor. The kept
    non-quantized tensors are views of transformers' mapping of the safetensors file when its dtype
    is the compute dtype, so the pages read to quantize the linear weights stay resident too
    (measured: +0.44 GiB RSS for smollm2-135m's fp32 cache). On CUDA, for lora (whose weights are
    those pages), or when loading converts the dtype (measured on a bf16 file), nothing stays."""
    compute = _bytes(step.precision)
    if step.device != "cpu" or step.method != "qlora" or arch.checkpoint_bytes != compute:
        return 0
    return arch.layers * arch.layer_linear_params * compute


def _layer_activations(arch: Arch, step: Step) -> tuple[float, float]:
    """(bytes per token, bytes per layer independent of tokens) autograd keeps for one layer."""
    a = _bytes(step.precision)  # activation dtype: 16-bit under autocast (the base is 16-bit too)
    autocast = a == 2
    cuda = step.device == "cuda"
    d, i, q, kv, h = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim, arch.heads
    per_token = arch.norms * (4 * d + 4)  # RMSNorm keeps its fp32 input and the 1/rms per row
    if arch.qk_norm:
        per_token += 4 * (q + kv) + 4 * (h + arch.kv_heads)
    repeated = step.masked and arch.kv_heads != h  # transformers repeats k/v for SDPA when given a mask
    per_token += a * (2 * q + 2 * (q if repeated else kv)) + 4 * h  # q, k, v, output, logsumexp
    if step.masked:
        per_token += a * step.seq  # SDPA turns the bool mask into a float one per layer and keeps it
    per_token += 3 * a * i  # gate output, act(gate), up output
    if step.packed and not cuda and autocast:  # examples up to fast.MATH_SEGMENT tokens: SDPA's math kernel
        per_token += 4 * (3 * q + h * min(step.seq, fast.MATH_SEGMENT))  # fp32 q, k, v per head, and weights

    # What each LoRA layer keeps: the input of lora_A (and the dropout mask), and lora_A's output.
    # method lora under autocast on CUDA: PEFT casts x to fp32 for the fp32 adapter, autocast casts it
    # back to 16-bit, a new tensor per LoRA layer (train's CPU loop turns PEFT's cast off). Otherwise
    # x itself is kept, shared by the layers of a group, unless dropout makes a new tensor per layer.
    # Dropout keeps a bool mask (CUDA's, and lorakit's BytesDropout on CPU).
    per_layer = 0.0
    for group in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        targeted = [l for l in arch.targeted(step.targets) if l.group == group]
        if not targeted:
            continue
        n = targeted[0].n_in
        cast = step.method == "lora" and autocast and cuda
        mask = 1 if step.dropout > 0 else 0
        if cast or step.dropout > 0:
            per_token += len(targeted) * n * (a + mask)
        elif group != "attn_out":  # attn_out's input is SDPA's output, already counted
            per_token += n * a
        per_token += len(targeted) * step.r * a
        if autocast:  # autocast's 16-bit copies of the fp32 LoRA weights, kept for the backward
            per_layer += 2 * sum(step.r * (l.n_in + l.n_out) for l in targeted)
    return per_token, per_layer


def _layer_backward(arch: Arch, step: Step) -> float:
    """Gradient buffers alive at once in one layer's backward, per token. The largest moment is the
    down projection's LoRA backward: the gradient runs back through autocast's cast (16-bit), PEFT's
    fp32 cast (CUDA; train's CPU loop turns it off) and the dropout, so 2 + 4 + 4 bytes per intermediate
    feature are alive together. Measured on CPU with the allocator's own events for each regime
    (docs/plan.md)."""
    d, i = arch.hidden, arch.intermediate
    drop = step.dropout > 0
    if _bytes(step.precision) == 4:
        return 4 * i + 16 * d if drop else 6 * i + 8 * d
    if step.method == "lora" and step.device == "cuda":  # PEFT's fp32 cast of x under autocast
        return 10 * i + 6 * d if drop else 6 * i + 10 * d
    return max(2 * i + 10 * d, 20 * d) if drop else max(4 * i, 20 * d)


def activation_budget(arch: Arch, step: Step) -> float:
    """The partitioner's activation budget train compiles the layers with (fast.activation_budget), for
    the parameters `model.num_parameters()` counts (transformers counts NF4 weights whole; the LoRA
    weights are included)."""
    return fast.activation_budget(arch.params + arch.lora_params(step.r, step.targets))


def _compiled_layer_activations(arch: Arch, step: Step) -> tuple[float, float]:
    """(bytes per token, bytes per layer independent of tokens) a compiled decoder layer keeps for the
    backward (fast.compile_layers). Listed with saved-tensor hooks on one compiled LoRA layer (inductor
    on the CPU; Llama at two widths, Qwen3; qlora and lora; dropout, mask), then checked against the
    whole step's peak on an H200: docs/plan.md, "Compiled layers".

    AOTAutograd's partitioner keeps, at any budget: the layer input and the residual after attention;
    q, k, v (k and v once per kv head, even when a mask makes transformers repeat them: the copies are
    recomputed) and, with q/k norms, q and k before them; SDPA's output and logsumexp; the gate and up
    projections (matmul outputs are not recomputed; for qlora they are bitsandbytes' custom ops);
    each RMSNorm's 1/rms; and lora_A's outputs. No dropout masks: fast.SeededDropout's are recomputed
    from their seeds in the backward.
    At budget 1.0 it also keeps what is cheap to recompute: the inputs LoRA's A matrices read (the normed
    inputs, SwiGLU's product, the dropped hidden-wide inputs), SDPA's float mask, autocast's 16-bit copies
    of the LoRA weights, and for lora o_proj's input a second time (PEFT's fp32 cast and autocast's
    cast back). The CPU listing has that copy for qlora too, since SDPA's CPU output is head-major; on
    the H200 the 8B's peak grew by 139.4 KB per token and layer from micro-batch 2 to 4 for qlora and
    147.5 KB for lora, against 139.6 and 147.8 here. At fast.ACTIVATION_BUDGET those are recomputed."""
    a = _bytes(step.precision)
    d, i, q, kv, h = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim, arch.heads
    targeted = arch.targeted(step.targets)
    groups = {l.group for l in targeted}
    drop = step.dropout > 0
    per_token = a * (2 * d + 2 * q + 2 * kv + 2 * i) + 4 * h + 4 * arch.norms
    if arch.qk_norm:
        per_token += a * (q + kv) + 4 * (h + arch.kv_heads)
    per_token += a * step.r * len(targeted)
    per_layer = 0
    if activation_budget(arch, step) >= 1.0:
        per_token += a * d * (("attn_in" in groups) + ("mlp_in" in groups)) + a * i * ("mlp_out" in groups)
        if step.masked:
            per_token += a * step.seq
        if drop:  # the CPU listing keeps three of them; the H200 (Qwen3-0.6B, mb8) all of them
            per_token += a * d * sum(l.n_in == d for l in targeted)
        if step.method == "lora" and a == 2 and "attn_out" in groups:
            per_token += a * q
        if a == 2:
            per_layer = 2 * sum(step.r * (l.n_in + l.n_out) for l in targeted)
    return per_token, per_layer


def _compiled_layer_backward(arch: Arch, step: Step) -> float:
    """Bytes per token one compiled layer's backward holds above what its forward kept: gradient
    buffers and what it recomputes. The allocator's peak (torch profiler memory events) during the
    backward of one compiled LoRA layer on the CPU, at two widths and two row lengths: 7 intermediate-
    wide 16-bit buffers at fast.ACTIVATION_BUDGET (qlora or lora, dropout or not), 5 at budget 1.0;
    the same on top of the recomputed layer under checkpointing (docs/plan.md)."""
    return (5 if activation_budget(arch, step) >= 1.0 else 7) * _bytes(step.precision) * arch.intermediate


LOSS_CHUNK = 4096  # tokens per chunk of lorakit.train.loss.chunked_cross_entropy_sum (CUDA)
CPU_CHUNK_BYTES = 48 << 20  # the fp32 logits buffer of that loss on CPU


def cpu_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of the loss on CPU (lorakit.train.loss uses this too): CPU_CHUNK_BYTES of fp32
    logits, 256 tokens at a 49k vocabulary, in one buffer that every chunk reuses. Measured on the
    2-core test machine: 256 and 512 tokens ran alike, 128 ~2% slower (benchmarks/NOTES.md, session 7)."""
    return max(16, CPU_CHUNK_BYTES // (4 * vocab))


def _loss_peak(arch: Arch, step: Step, trained: int) -> float:
    """Bytes alive on top of the saved activations while the loss runs.

    lorakit's loss (`train/loss.py`) projects only trained positions and, for the frozen lm_head,
    works in chunks of LOSS_CHUNK tokens, computing d loss / d hidden in the forward. Per chunk of c
    tokens, in units of vocab x c: the 16-bit logits (2) and their fp32 copy (4), then logsumexp's
    temporary (4) or the softmax gradient (4), then its 16-bit copy (2); from the second chunk on the
    previous chunk's fp32 logits and gradient (4 + 4) are still bound while the next is computed.
    On CPU one fp32 buffer of CPU_CHUNK_BYTES (at most) holds every chunk's logits and then their
    gradient (4); 16-bit hidden states add the 16-bit logits before they are copied in, or the
    gradient's 16-bit copy (2).
    The compiled step (`Step.compiled`) runs the fused chunk step (loss.fused_chunk_loss_and_grad): the
    16-bit logits and their 16-bit gradient (2 + 2), plus the previous chunk's gradient from the second
    chunk on; that matches the H200 peaks of compiled layers (docs/plan.md). The eager model keeps the
    eager chunk step it was measured with, although train compiles that step on CUDA whatever
    train.compile says: for compile: false it overstates the loss by up to 8 x vocab x 4096 bytes.
    Plus the gathered hidden states and their gradient (2 x bytes x hidden per trained token)."""
    a = _bytes(step.precision)
    V = arch.vocab
    if arch.full_logits:  # softcapping: full logits of every position, plain cross-entropy
        return V * step.tokens * (a + 12)
    chunk = LOSS_CHUNK if step.device == "cuda" else min(LOSS_CHUNK, cpu_chunk_tokens(V))
    first = min(chunk, trained)
    later = min(chunk, trained - first)
    if step.compiled:
        return V * a * max(2 * first, first + 2 * later) + 2 * a * arch.hidden * trained
    if step.device == "cpu":  # one fp32 buffer, the gradient written over the logits (loss._cpu_chunks)
        units = 6 * first if a == 2 else 4 * first
    elif a == 2:
        units = max(10 * first, 8 * first + 6 * later if later else 0, 4 * first + 8 * later)
    else:
        units = max(8 * first, 8 * first + 4 * later if later else 0, 4 * first + 8 * later)
    return V * units + 2 * a * arch.hidden * trained


def step_memory(arch: Arch, step: Step) -> Memory:
    """Peak memory of one optimizer step of lorakit's loop on `step`'s micro-batch: eager, or with
    compiled layers (`step.compiled`; with checkpointing, the layers' children compiled and the
    checkpoint eager, as fast.compile_blocks does)."""
    weights = base_weight_bytes(arch, step) + (RUNTIME["cuda_workspace"] if step.device == "cuda" else 0)
    lora = arch.lora_params(step.r, step.targets)
    adapter = 12 * lora  # fp32 weights + AdamW exp_avg and exp_avg_sq
    # under checkpointing the recomputed layer is counted as the compiled layer keeps it; its compiled
    # children keep within 8% of that (measured the same way)
    per_token, per_layer = (_compiled_layer_activations if step.compiled else _layer_activations)(arch, step)
    a = _bytes(step.precision)
    T = step.tokens
    final_norm = (4 * arch.hidden + 4) * T
    mask = T * step.seq if step.masked else 0  # the bool [rows, 1, seq, seq] mask, shared by all layers
    loss = _loss_peak(arch, step, step.trained)
    dequant = 0
    if step.method == "qlora":  # bitsandbytes dequantizes one whole weight for each 4-bit matmul
        dequant = max(l.n_in * l.n_out for l in arch.linears) * a
    layer_work = (_compiled_layer_backward if step.compiled else _layer_backward)(arch, step) * T + dequant
    if step.checkpointing:
        kept = arch.layers * a * arch.hidden * T  # each layer's input
        backward = per_token * T + per_layer + layer_work  # one layer recomputed, then its backward
    else:
        kept = arch.layers * (per_token * T + per_layer)
        backward = layer_work
    activations = kept + final_norm + mask
    # The optimizer step: no activations left; fp32 gradients and foreach AdamW's sqrt temporaries.
    optimizer = 8 * lora - activations
    candidates = {"loss": loss, "backward": backward, "optimizer": optimizer}
    peak_at = max(candidates, key=candidates.get)
    transient = candidates[peak_at]
    if step.device == "cuda":
        runtime = RUNTIME["cuda_context"] + RUNTIME["cuda_slack"] * (weights + adapter + activations + transient)
    else:
        runtime = (RUNTIME["cpu_process"] + RUNTIME["cpu_retained"] * (activations + transient)
                   + _resident_checkpoint(arch, step))
    return Memory(weights, adapter, activations, transient, runtime, peak_at)


# ---------------------------------------------------------------------------------------------
# Throughput.

@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense datasheet peak (fp16 where the card has no bf16)
    bandwidth_tbs: float
    bf16: bool = True


GPUS = {  # matched against the device name, longest key first
    "H200": Gpu("H200", 141, 989, 4.8),
    "H100": Gpu("H100", 80, 989, 3.35),
    "B200": Gpu("B200", 180, 2250, 8.0),
    "A100-40GB": Gpu("A100-40GB", 40, 312, 1.56),
    "A100": Gpu("A100", 80, 312, 2.04),
    "L40S": Gpu("L40S", 48, 362, 0.86),
    "L4": Gpu("L4", 24, 121, 0.3),
    "A10": Gpu("A10", 24, 125, 0.6),
    "RTX 6000 Ada": Gpu("RTX 6000 Ada", 48, 364, 0.96),
    "A6000": Gpu("A6000", 48, 155, 0.77),
    "RTX 4090": Gpu("RTX 4090", 24, 165, 1.0),
    "RTX 3090": Gpu("RTX 3090", 24, 71, 0.94),
    "T4": Gpu("T4", 16, 65, 0.32, bf16=False),
    "V100": Gpu("V100", 32, 125, 0.9, bf16=False),
}


@dataclass(frozen=True)
class Measured:
    """A measured steady-state throughput of lorakit's own step: what every estimate scales from."""

    device: str  # a GPUS key, or "cpu"
    model: str  # an ARCHS key
    method: str
    checkpointing: bool
    rows: int
    seq: int
    tok_s: float
    source: str
    compiled: bool = False  # the compiled CUDA step (fast.speedups) rather than the eager one
    precision: str = ""  # "" = bf16 on CUDA, fp32 on the CPU


# Architectures of the measured anchors (random-init models of these configs; sizes from
# reference/perf-anchors.md, parameter counts checked against transformers in the tests).
ARCHS = {
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=1e5,
                         rms_norm_eps=1e-5, dtype="float32"),  # lorakit's cache of the embedded GGUF
}

_H200 = "H200 2026-11-29, benchmarks/results/plan_memory_2026-11-29.json"
_RUNS = "H200 2026-11-29, benchmarks/results/gpu_throughput_2026-11-29_{}.json"
_DEMO = "2-core AMD EPYC, fp32: the demo's 24 steps x 8 rows in ~2.5 min (examples/support_tickets)"
_DEMO_BF16 = "2-core AMD EPYC with AVX-512 BF16, bf16: the demo's steps 3-24 in 2026-11-30's fresh-clone run"
MEASURED = [  # tokens/s over optimizer steps 3-6, random tokens, every token trained, dropout 0.05
    Measured("H200", "qwen3-0.6b", "lora", False, 4, 512, 11463, _H200),
    Measured("H200", "qwen3-0.6b", "lora", False, 4, 2048, 36380, _H200),
    Measured("H200", "qwen3-0.6b", "lora", True, 4, 2048, 19620, _H200),
    Measured("H200", "qwen3-0.6b", "qlora", False, 4, 512, 7494, _H200),
    Measured("H200", "qwen3-0.6b", "qlora", False, 4, 2048, 29765, _H200),
    Measured("H200", "llama-3.1-8b", "lora", False, 4, 512, 8724, _H200),
    Measured("H200", "llama-3.1-8b", "lora", False, 4, 2048, 10463, _H200),
    Measured("H200", "llama-3.1-8b", "qlora", False, 4, 512, 6508, _H200),
    Measured("H200", "llama-3.1-8b", "qlora", False, 4, 2048, 11427, _H200),
    Measured("H200", "llama-3.1-8b", "qlora", True, 4, 2048, 7996, _H200),
    Measured("cpu", "smollm2-135m", "lora", False, 8, 128, 150, _DEMO),
    Measured("cpu", "smollm2-135m", "lora", False, 8, 128, 338, _DEMO_BF16, precision="bf16"),
    # the compiled step (train.compile on, the default on CUDA): benchmarks/gpu_throughput.py, steps 4-8,
    # random full rows, 16,384 tokens per optimizer step, dropout 0.05 but where the file says 0
    Measured("H200", "llama-3.1-8b", "qlora", False, 4, 2048, 15632,
             _RUNS.format("s6c_hash32_d0.05_llama-qlora-mb4-fast"), True),
    Measured("H200", "llama-3.1-8b", "qlora", False, 8, 2048, 15836,
             _RUNS.format("s6d_hash32_d0.05_llama-qlora-mb8-fast"), True),
    Measured("H200", "llama-3.1-8b", "qlora", True, 8, 2048, 10454,
             _RUNS.format("s6b_hash64_d0.05_llama-qlora-mb8-ckpt-fast"), True),
    Measured("H200", "llama-3.1-8b", "lora", False, 8, 2048, 16443, _RUNS.format("s4_lora_a, dropout 0"), True),
    Measured("H200", "qwen3-0.6b", "qlora", False, 8, 2048, 77977,
             _RUNS.format("s6d_hash32_d0.05_qwen-qlora-mb8-fast"), True),
]
CPU_CORES_MEASURED = 2


def step_flops(arch: Arch, step: Step) -> float:
    """Hardware FLOPs of one micro-batch: LoRA's forward + backward (no weight gradient for the
    frozen base, so 4 per weight instead of 6), attention, lm_head on trained tokens only, and the
    recomputed forward under gradient checkpointing."""
    T = step.tokens
    layer = arch.layer_linear_params
    lora = sum(step.r * (l.n_in + l.n_out) for l in arch.targeted(step.targets))
    attn_fwd = 4 * arch.q_dim * (step.seq / 2)  # QK^T and PV over the causal half, per token and layer
    per_layer = 4 * layer + 6 * lora + 3 * attn_fwd
    if step.checkpointing:
        per_layer += 2 * (layer + lora) + attn_fwd
    trained = T if arch.full_logits else step.trained
    return arch.layers * per_layer * T + 4 * arch.vocab * arch.hidden * trained


def _anchor_step(m: Measured) -> tuple[Arch, Step]:
    device = "cpu" if m.device == "cpu" else "cuda"
    step = Step(m.method, device, m.precision or ("fp32" if device == "cpu" else "bf16"), m.checkpointing, m.rows,
                m.seq, m.rows * (m.seq - 1), masked=False, compiled=m.compiled)
    return arch_from_config(ARCHS[m.model]), step


def _peak_flops(device: str, cores: int | None = None) -> float:
    """The device's bf16 peak; for the CPU a nominal 0.5 TFLOP/s per core, so that CPU figures
    scale with the number of cores (`cores`, default this machine's)."""
    if device == "cpu":
        return 0.5e12 * (cores or os.cpu_count() or CPU_CORES_MEASURED)
    return GPUS[device].bf16_tflops * 1e12


def throughput(arch: Arch, step: Step, device: str) -> tuple[float, str]:
    """(tokens/s, how it was obtained) for `step` on `device` (a GPUS key or "cpu").

    The measured anchors of the same step (compiled or eager) give a hardware efficiency (FLOPs done /
    peak). It changes with model size and tokens per micro-batch and little with checkpointing, whose
    recompute counts as work; the two nearest anchors (log size, log tokens, same method and
    checkpointing preferred) are averaged and applied to this step's FLOPs and this device's peak."""
    table = "cpu" if device == "cpu" else "H200"
    anchors = [m for m in MEASURED if m.device == table and m.compiled == step.compiled]
    if table == "cpu":  # anchors of the step's precision: the demo ran 2.3x faster in bf16 (AVX-512 BF16)
        anchors = [m for m in anchors if _anchor_step(m)[1].precision == step.precision] or anchors
    method = step.method if table != "cpu" else "lora"  # CPU: qlora has no anchor of its own
    for m in anchors:
        a, s = _anchor_step(m)
        if device == m.device and a == replace(arch, note="") and s == step:
            return m.tok_s, f"measured ({m.source})"
    size = math.log(arch.layers * arch.layer_linear_params)

    def distance(m: Measured) -> float:
        a, s = _anchor_step(m)
        return (abs(math.log(a.layers * a.layer_linear_params) - size) + 0.5 * abs(math.log(s.tokens / step.tokens))
                + 0.3 * (m.method != method) + 0.3 * (m.checkpointing != step.checkpointing))

    nearest = sorted(anchors, key=distance)[:2]
    weights = [1 / (distance(m) + 1e-3) for m in nearest]
    efficiency = sum(w * _efficiency(m) for w, m in zip(weights, nearest)) / sum(weights)
    tok_s = efficiency * _peak_flops(device) * step.tokens / step_flops(arch, step)
    how = f"extrapolated by FLOPs from {'compiled ' if step.compiled else ''}" + " and ".join(
        f"{m.model} {m.method}{' +gc' if m.checkpointing else ''} {m.rows}x{m.seq}" for m in nearest)
    if device == "cpu":
        how += f" ({step.precision}) on {CPU_CORES_MEASURED} cores, scaled to {os.cpu_count()}"
        if step.method == "qlora":
            how += " (qlora on CPU: as fast as lora, not measured apart)"
    elif device != "H200":
        how += f" on the H200, scaled by bf16 peak ({GPUS[device].bf16_tflops:g} vs 989 TFLOP/s)"
    return tok_s, how


def _efficiency(m: Measured) -> float:
    arch, step = _anchor_step(m)
    return m.tok_s * step_flops(arch, step) / step.tokens / _peak_flops(m.device, CPU_CORES_MEASURED)


# ---------------------------------------------------------------------------------------------
# The device, the data, and the plan.

@dataclass(frozen=True)
class Device:
    kind: str  # cuda | cpu
    name: str  # GPUS key for throughput, or "cpu"
    label: str  # as detected or given
    memory: float  # bytes
    bf16: bool


def detect_device(gpu_mem_bytes: float | None = None, gpu_name: str | None = None, index: int = 0) -> Device:
    """The device to plan for: the GPU family `gpu_name` (e.g. "A100", "RTX 4090"), else CUDA device
    `index` when there is one, else this machine's CPU and RAM. `gpu_mem_bytes` sets the memory (a
    GPU of that size when nothing else names one)."""
    import torch

    if gpu_name is not None:
        family = _gpu_family(gpu_name)
        if family is None:
            raise PlanError(f"--gpu {gpu_name!r}: unknown GPU; known: {', '.join(GPUS)}. Give the closest one "
                            f"and --gpu-mem for its memory.")
        gpu = GPUS[family]
        return Device("cuda", family, gpu_name, gpu_mem_bytes or gpu.memory_gib * 1e9, gpu.bf16)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(index)
        return Device("cuda", _gpu_family(props.name) or "H100", props.name, gpu_mem_bytes or props.total_memory,
                      props.major >= 8)
    if gpu_mem_bytes is not None:
        return Device("cuda", "H100", "a GPU at H100 speed", gpu_mem_bytes, True)
    from lorakit.models import cpu_has_fast_bf16

    return Device("cpu", "cpu", f"CPU ({os.cpu_count()} cores)", _machine_ram(), cpu_has_fast_bf16())


def _gpu_family(name: str) -> str | None:
    upper = name.upper().replace("NVIDIA", "").replace("GEFORCE", "").strip()
    if "A100" in upper and "40G" in upper.replace(" ", ""):
        return "A100-40GB"
    for key in sorted(GPUS, key=len, reverse=True):
        if key.upper() in upper:
            return key
    return None


def _machine_ram() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str) -> float:
    """'24GiB', '24G', '80GB', '16000MiB' -> bytes (G and GiB are binary, GB decimal)."""
    units = {"": 1, "B": 1, "K": 2**10, "KIB": 2**10, "KB": 1e3, "M": 2**20, "MIB": 2**20, "MB": 1e6,
             "G": GiB, "GIB": GiB, "GB": 1e9, "T": 2**40, "TIB": 2**40, "TB": 1e12}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    try:
        return float(number) * units[s[len(number):]]
    except (ValueError, KeyError):
        raise PlanError(f"--gpu-mem {text!r}: give a size like 24GiB, 80GB or 16000MiB") from None


def limit_cpu_heap() -> bool:
    """Make freed CPU tensor memory go back to the OS at once (glibc; a no-op elsewhere).

    glibc serves blocks over M_MMAP_THRESHOLD (128 KiB) with mmap and unmaps them on free, but after
    each such free it raises the threshold to that block's size, up to 32 MiB. From the first
    training step on, activations below 32 MiB then come from the heap, which keeps freed memory
    resident: smollm2-135m at 8 x 128 tokens peaked at 5.1 GiB RSS for 2.9 GiB of tensors, and
    still held 4.6 GiB after the step. Fixing the threshold at 128 KiB gave a 3.4 GiB peak, 1.0 GiB
    after the step: RSS = the process + the allocator's peak. `train` does not call it: every
    activation then costs an mmap and page faults, which halved training speed on the demo (95 vs
    175 tok/s); benchmarks/plan_memory.py does, to compare the allocator's peak exactly, and sets
    RUNTIME["cpu_retained"] to the limited figure. Returns whether the setting took."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 128 * 1024))


@dataclass
class Workload:
    """The rows one epoch trains on, as the schedule draws them."""

    rows: int  # rows per epoch (examples, or packed rows)
    tokens: int  # real tokens per epoch
    trained: int  # trained tokens per epoch
    width: int  # the longest row: the widest micro-batch pads to it
    row_trained: int  # the most trained tokens in one row
    processed: int  # tokens per epoch the model runs, padding included, at the configured batch size
    mean_width: float  # mean width of the epoch's micro-batches
    masked: bool  # the model gets a materialised attention mask (padded or packed rows)
    from_data: bool


def workload(cfg, rows=None) -> Workload:
    """The epoch's rows (`Prepared.rows`, read with the tokenizer when None); when data.train is not
    set or names no existing file: rows of data.max_length with every token trained."""
    if rows is None:
        rows = _read_rows(cfg)
    batch = _batch(cfg)
    if rows is None:
        L = cfg.data.max_length
        return Workload(batch, batch * L, batch * L, L, L, batch * L, L, True, False)
    import torch

    lengths, trained = [], []
    for row in rows:
        parts = [row] if hasattr(row, "input_ids") else list(row)
        lengths.append(sum(len(e.input_ids) for e in parts))
        trained.append(sum(sum(1 for t in e.labels[1:] if t != -100) for e in parts))
    # Epoch 0 in the order train/batches.Schedule draws it: a seeded permutation in micro-batches.
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    widths = [max(lengths[i] for i in order[k:k + batch]) for k in range(0, len(order), batch)]
    processed = sum(w * len(order[k * batch:(k + 1) * batch]) for k, w in enumerate(widths))
    masked = cfg.data.packing or len(set(lengths)) > 1
    return Workload(len(rows), sum(lengths), sum(trained), max(lengths), max(trained), processed,
                    sum(widths) / len(widths), masked, True)


def _read_rows(cfg):
    import glob

    from lorakit import data, models

    paths = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train] if cfg.data.train else []
    if not any(glob.glob(p) for p in paths):
        return None
    tokenizer = models.load_tokenizer(models.resolve_model(cfg.model), cfg.trust_remote_code)
    train, _, _ = data.prepare_run(cfg, tokenizer)
    return train.rows


def _batch(cfg) -> int:
    return cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else AUTO_BATCH_MAX


AUTO_BATCH_MAX = 16  # batch_size: auto picks the largest power of two up to this that fits
AUTO_LORA_ROWS = 8  # method and batch_size auto: lora when it fits this many rows (or qlora's count)


@dataclass
class Option:
    method: str
    checkpointing: bool
    batch_size: int
    peak_bytes: float  # allocated + runtime: what must fit the device
    allocated_bytes: float  # what torch.cuda.max_memory_allocated would report
    memory: dict  # components in bytes, and where the peak is
    fits: bool
    max_batch: int  # largest micro-batch that fits (0: not even one row), up to MAX_ROWS
    tok_s: float
    tok_s_source: str
    epoch_s: float  # one pass over the training rows at this option's tokens/s

    @property
    def label(self) -> str:
        return self.method + (" + checkpointing" if self.checkpointing else "")

    @property
    def change(self) -> str:
        return f"method={self.method} train.gradient_checkpointing={str(self.checkpointing).lower()}"


@dataclass
class Plan:
    model: str
    arch: dict
    params: int
    lora_params: int
    device: str
    device_kind: str
    device_memory: float
    precision: str
    workload: dict
    options: list[Option]
    configured: str  # label of the option the config asks for (auto resolved)
    recommendation: str
    change: str  # the one-line config change; "" when none is needed
    notes: list[str] = field(default_factory=list)
    compiled: bool = False  # memory of the compiled decoder layers train runs (CUDA, train.compile)

    def option(self, label: str) -> Option:
        return next(o for o in self.options if o.label == label)

    def to_json(self) -> str:
        d = asdict(self)
        for o, opt in zip(d["options"], self.options):
            o["label"] = opt.label
        return json.dumps(d, indent=1)


MAX_ROWS = 4096


def plan(cfg, gpu_mem_bytes: float | None = None, gpu_name: str | None = None, *, rows=None,
         device: Device | None = None) -> Plan:
    """lora / qlora x gradient checkpointing off / on for `cfg` on the named, given or detected
    device: peak memory, fit, largest micro-batch, tokens/s, time per epoch, and what to change.
    `rows` reuses already prepared training rows (`Prepared.rows`)."""
    arch = load_arch(cfg.model, cfg.trust_remote_code)
    device = device or detect_device(gpu_mem_bytes, gpu_name)
    work = workload(cfg, rows)
    precision = _precision(cfg.train.precision, device)
    batch = _batch(cfg)
    options = [_option(arch, cfg, device, precision, work, batch, method, gc)
               for method in ("lora", "qlora") for gc in (False, True)]
    configured = _configured(cfg, arch, device, options)
    recommendation, change = _recommend(cfg, options, configured, batch)
    compiled = _compiles(cfg, device)
    notes = [arch.note] if arch.note else []
    if not work.from_data:
        notes.append(f"no data.train file found: assumed rows of data.max_length={cfg.data.max_length} tokens, "
                     f"every token trained")
    if device.kind == "cpu":
        notes.append("CPU: memory is the process's peak RSS, including what the C heap keeps of freed activations")
    return Plan(cfg.model, {"model_type": arch.model_type, "layers": arch.layers, "hidden": arch.hidden,
                            "vocab": arch.vocab}, arch.params, arch.lora_params(cfg.lora.r, _targets(cfg)),
                device.label, device.kind, device.memory, precision, asdict(work), options, configured.label,
                recommendation, change, notes, compiled)


def _targets(cfg):
    t = cfg.lora.target_modules
    return t if isinstance(t, str) else tuple(t)


def _precision(setting: str, device: Device) -> str:
    if setting != "auto":  # the rule of models.resolve_precision, for a device that may not be here
        return setting
    if device.kind == "cuda":
        return "bf16" if device.bf16 else "fp16"
    return "bf16" if device.bf16 else "fp32"


def _step(cfg, device: Device, precision: str, work: Workload, rows: int, method: str, gc: bool,
          width: int | None = None, trained: int | None = None) -> Step:
    """The micro-batch of `rows` rows: by default the worst one (every row as wide as the longest,
    with as many trained tokens as the most trained row)."""
    width = width or work.width
    trained = trained or rows * min(work.row_trained, width)
    return Step(method, device.kind, precision, gc, rows, width, trained, work.masked, cfg.lora.r,
                cfg.lora.dropout, _targets(cfg), cfg.quant.double_quant, _compiles(cfg, device), cfg.data.packing)


def _compiles(cfg, device: Device) -> bool:
    """Whether train compiles the decoder layers (train/loop.py): on CUDA with train.compile on
    (true or cudagraphs, which keeps the same tensors), except under FSDP."""
    return device.kind == "cuda" and bool(cfg.train.compile) and cfg.train.distributed != "fsdp"


def _option(arch, cfg, device, precision, work, batch, method, gc) -> Option:
    mem = step_memory(arch, _step(cfg, device, precision, work, batch, method, gc))
    typical = _step(cfg, device, precision, work, batch, method, gc, width=max(1, round(work.mean_width)),
                    trained=max(1, round(batch * work.trained / work.rows)))
    tok_s, source = throughput(arch, typical, device.name)
    parts = {k: getattr(mem, k) for k in ("weights", "adapter", "activations", "transient", "runtime")}
    return Option(method, gc, batch, mem.total, mem.allocated, {**parts, "peak_at": mem.peak_at},
                  mem.total <= device.memory, _largest_batch(arch, cfg, device, precision, work, method, gc),
                  tok_s, source, work.processed / tok_s)


def _largest_batch(arch, cfg, device, precision, work, method, gc) -> int:
    def fits(rows: int) -> bool:
        return step_memory(arch, _step(cfg, device, precision, work, rows, method, gc)).total <= device.memory

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_ROWS and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_ROWS + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# gradient_checkpointing: auto leaves checkpointing off on a GPU when the step without it is predicted
# to take at most this share of the device's memory: the step as train runs it (compiled layers with
# train.compile on), whose peaks the model matches within 4% on an H200 (docs/plan.md); the rest covers
# what varies between batches and the allocator's fragmentation beyond RUNTIME's slack.
CHECKPOINT_HEADROOM = 0.85


def _configured(cfg, arch: Arch, device: Device, options: list[Option]) -> Option:
    gc = cfg.train.gradient_checkpointing
    if gc == "auto":
        gc = _auto_checkpointing(cfg, device, options)
    method = cfg.method
    if method == "auto":
        method = "lora" if _find(options, "lora", gc).fits else "qlora"
    return _find(options, method, gc)


def _auto_checkpointing(cfg, device: Device, options: list[Option]) -> bool:
    """train.gradient_checkpointing: auto. Off on CPU (RAM is rarely the limit there, and recomputing
    costs about 30% of the speed); on a GPU, on only when no configured method's step fits in
    CHECKPOINT_HEADROOM of its memory without it."""
    if device.kind != "cuda":
        return False
    methods = ("lora", "qlora") if cfg.method == "auto" else (cfg.method,)
    return all(_find(options, m, False).peak_bytes > CHECKPOINT_HEADROOM * device.memory for m in methods)


def _find(options: list[Option], method: str, gc: bool) -> Option:
    return next(o for o in options if o.method == method and o.checkpointing == gc)


def _recommend(cfg, options: list[Option], configured: Option, batch: int) -> tuple[str, str]:
    """The fastest option that fits at the configured micro-batch, or, when none does, the one that
    fits the most rows, with the micro-batch split into accumulation steps."""
    fitting = [o for o in options if o.fits]
    if fitting:
        best = max(fitting, key=lambda o: o.tok_s)
        if configured.fits and configured.tok_s >= 0.95 * best.tok_s:
            more = f"; micro-batches up to {configured.max_batch} rows fit" if configured.max_batch > batch else ""
            return f"keep {configured.label}: it fits as configured{more}", ""
        why = (f"{configured.label} does not fit" if not configured.fits
               else f"{best.tok_s / configured.tok_s:.2f}x the tokens/s of {configured.label}")
        return f"use {best.label}: {why}", best.change
    usable = [o for o in options if o.max_batch > 0]
    if not usable:
        return ("nothing fits even one row: use a smaller model, a shorter data.max_length or a larger device", "")
    best = max(usable, key=lambda o: (o.max_batch >= batch, o.tok_s, o.max_batch))
    rows = _pow2_at_most(best.max_batch)
    accum = cfg.train.grad_accum * math.ceil(batch / rows)
    return (f"use {best.label} with micro-batch {rows} x {accum} accumulation steps (as many rows per step)",
            f"{best.change} train.batch_size={rows} train.grad_accum={accum}")


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _plan_device(device, setting: str, keys: str) -> Device:
    if isinstance(device, Device):
        return device
    if device.type == "cuda":
        return detect_device(index=device.index or 0)
    if device.type == "cpu":
        return _cpu_device()
    raise PlanError(f"{setting}: lorakit has no memory model for {device}; set {keys} explicitly.")


def resolve_checkpointing(cfg, device, rows=None) -> tuple[bool, str]:
    """(on, reason) for `train.gradient_checkpointing: auto` on `device` (a torch.device or a
    plan.Device) with `cfg.method` and `cfg.train.batch_size` already settled: see _auto_checkpointing."""
    kind = device.kind if isinstance(device, Device) else device.type
    if kind != "cuda":
        return False, f"off on {kind}"
    target = _plan_device(device, "train.gradient_checkpointing auto", "train.gradient_checkpointing")
    p = plan(cfg, rows=rows, device=target)
    without = _find(p.options, cfg.method, False)
    on = _auto_checkpointing(cfg, target, p.options)
    return on, (f"{'on' if on else 'off'}: {without.label} at micro-batch {without.batch_size} needs "
                f"{_gib(without.peak_bytes)} of {_gib(p.device_memory)} (off up to {CHECKPOINT_HEADROOM:.0%})")


# Peak memory added per byte of bf16 weight copies (fast.cache_dequantized): 7.0 GiB for 6.0 GiB of copies
# on the 8B QLoRA step (H200, benchmarks/NOTES.md session 9; the compiled layer keeps other tensors
# around F.linear than around bitsandbytes' opaque matmul).
CACHE_PEAK_PER_BYTE = 7.0 / 6.0


def resolve_dequant_cache(cfg, device, rows=None) -> tuple[float, str]:
    """(bytes, reason) of bf16 weight copies `quant.dequant_cache` allows on `device` (fast.cache_dequantized),
    with method, batch size and checkpointing settled: a CUDA qlora run gets the 4-bit weights' bf16 size
    or what CHECKPOINT_HEADROOM of the GPU leaves beside the planned peak (over CACHE_PEAK_PER_BYTE),
    whichever is less, capped by a number in the setting."""
    setting = cfg.quant.dequant_cache
    kind = device.kind if isinstance(device, Device) else device.type
    if cfg.method != "qlora" or kind != "cuda" or not setting:
        return 0, "off" if not setting else f"not used ({cfg.method} on {kind})"
    target = _plan_device(device, "quant.dequant_cache auto", "quant.dequant_cache")
    p = plan(cfg, rows=rows, device=target)
    arch = load_arch(cfg.model, cfg.trust_remote_code)
    step = _find(p.options, "qlora", bool(cfg.train.gradient_checkpointing))
    wanted = arch.layers * arch.layer_linear_params * _bytes(p.precision)
    free = max(0.0, CHECKPOINT_HEADROOM * p.device_memory - step.peak_bytes) / CACHE_PEAK_PER_BYTE
    cap = math.inf if setting == "auto" else setting * GiB
    held = min(wanted, free, cap)
    return held, (f"{_gib(held)} of the 4-bit weights' {_gib(wanted)} in bf16: the step needs "
                  f"{_gib(step.peak_bytes)} of {_gib(p.device_memory)}"
                  + ("" if setting == "auto" else f", capped at {setting:g} GiB"))


def resolve_auto(cfg, device, rows=None) -> tuple[str, int, str]:
    """(method, batch_size, reason) for `method: auto` and `train.batch_size: auto` on `device` (the
    torch.device train runs on, or a plan.Device): lora when its micro-batch fits, else qlora; the
    largest power-of-two micro-batch up to AUTO_BATCH_MAX that fits. Values the config sets are
    kept. `rows`: the prepared training rows, so that the data is not read twice."""
    if cfg.method != "auto" and cfg.train.batch_size != "auto":
        return cfg.method, cfg.train.batch_size, "method and train.batch_size are set in the config"
    p = plan(cfg, rows=rows, device=_plan_device(device, "method/batch_size auto", "method and train.batch_size"))
    configured = p.option(p.configured)
    method, gc = configured.method, configured.checkpointing
    if cfg.method == "auto":
        lora, qlora = _find(p.options, "lora", gc), _find(p.options, "qlora", gc)
        needed = cfg.train.batch_size
        if needed == "auto":  # lora when it fits the default micro-batch, or as many rows as qlora
            needed = min(AUTO_LORA_ROWS, _pow2_at_most(qlora.max_batch)) if qlora.max_batch else 1
        method = "lora" if lora.max_batch >= needed else "qlora"
    chosen = _find(p.options, method, gc)
    if chosen.max_batch == 0:
        raise PlanError(f"{chosen.label} does not fit one row of {p.workload['width']} tokens in "
                        f"{_gib(p.device_memory)} of {p.device}; shorten data.max_length or use a smaller model.")
    batch = cfg.train.batch_size
    if batch == "auto":
        batch = min(_pow2_at_most(chosen.max_batch), AUTO_BATCH_MAX)
    parts = []
    if cfg.method == "auto":
        parts.append(f"method {method}: lora fits {_rows(lora.max_batch)} of {p.workload['width']} tokens, "
                     f"qlora {_rows(qlora.max_batch)}")
    if cfg.train.batch_size == "auto":
        parts.append(f"batch_size {batch}: {chosen.label} fits up to {_rows(chosen.max_batch)}")
    return method, batch, "; ".join(parts) + f" in {_gib(p.device_memory)} of {p.device}"


def _rows(n: int) -> str:
    return f"{n} row" + ("" if n == 1 else "s")


def _cpu_device() -> Device:
    from lorakit.models import cpu_has_fast_bf16

    return Device("cpu", "cpu", f"CPU ({os.cpu_count()} cores)", _machine_ram(), cpu_has_fast_bf16())


# ---------------------------------------------------------------------------------------------
# Output.

def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n < 100 * GiB else f"{n / GiB:.0f} GiB"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_plan(p: Plan) -> str:
    """The four options as a table, the memory of the configured one by part, and the advice."""
    w = p.workload
    lines = [
        f"lorakit plan: {p.model} ({p.arch['model_type']}, {p.params / 1e6:,.0f}M params, LoRA "
        f"{p.lora_params / 1e6:.1f}M) on {p.device}, {_gib(p.device_memory)}, {p.precision}"
        + (", compiled layers" if p.compiled else ""),
        f"{'data' if w['from_data'] else 'assumed'}: {w['rows']:,} rows, {w['tokens']:,} tokens "
        f"({w['trained']:,} trained), longest row {w['width']:,}; {w['processed']:,} tokens per epoch with padding",
        "",
        f"   {'option':25} {'peak memory':>11}  {'fits':4}  {'max batch':>9}  {'tokens/s':>9}  {'epoch':>6}",
    ]
    for o in p.options:
        mark = "->" if o.label == p.configured else ""
        tok_s = ("" if o.tok_s_source.startswith("measured") else "~") + f"{o.tok_s:,.0f}"
        lines.append(f"{mark:2} {o.label:25} {_gib(o.peak_bytes):>11}  {'yes' if o.fits else 'NO':4}  "
                     f"{o.max_batch:>9}  {tok_s:>9}  {_duration(o.epoch_s):>6}")
    c = p.option(p.configured)
    m = c.memory
    lines += [
        "",
        f"-> = as configured. At micro-batch {c.batch_size} it needs: weights {_gib(m['weights'])} + adapter and "
        f"AdamW {_gib(m['adapter'])} + activations {_gib(m['activations'])} + {m['peak_at']} "
        f"{_gib(m['transient'])} + runtime {_gib(m['runtime'])}",
        f"tokens/s: {c.tok_s_source}" + ("" if c.tok_s_source.startswith("measured") else " (~: estimated)"),
        "",
        f"recommendation: {p.recommendation}",
    ]
    if p.change:
        lines.append(f"  lorakit train CONFIG {p.change}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
