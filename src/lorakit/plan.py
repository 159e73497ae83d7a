"""Before training: will it fit, how long will it take, and what to change.

The memory model follows lorakit's own training step (`train/loop.py`, `train/loss.py`,
`models.load_base` / `attach_lora`) tensor by tensor, from the model's config alone:

* base weights: 16-bit on CUDA (fp32 on CPU) for lora; for qlora NF4 (0.5 byte/param) plus its
  absmax constants (1 byte per 64 weights double-quantized, 4 without) on the decoder's linear
  layers, while embeddings, norms and lm_head stay in the compute dtype;
* the adapter: fp32 LoRA weights, their AdamW moments (8 bytes/param) and, at the optimizer step,
  their gradients;
* activations autograd keeps per token and layer (see `_layer_activations`): what PEFT's LoRA path
  saves (its own casts and dropout masks; frozen weights save nothing for the backward), the
  RMSNorms' fp32 inputs, SDPA's q/k/v/output/logsumexp (k and v repeated to every head and a
  float mask per layer when a mask is materialised), the gated MLP's three intermediates. With
  gradient checkpointing only each layer's input stays, and one layer is recomputed in the backward;
* the loss: lorakit projects only trained positions to the vocabulary, so the peak there is
  logits + log-softmax + their gradient, 12 bytes x vocab per trained token, all fp32;
* what the allocator does not count: the CUDA context and cache slack, or on CPU the process
  itself and the memory glibc keeps after frees. Those figures are stated in `RUNTIME`.

Throughput comes from `MEASURED` (lorakit's and the plain PyTorch loop's tokens/s on real
hardware), turned into a hardware efficiency and carried to other models by FLOPs per token and to
other GPUs by their bf16 peak (`GPUS`); every figure says whether it was measured or extrapolated.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

from lorakit.errors import LorakitError

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

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


# Figures the allocator does not see. CUDA: the context (driver, kernels, cuBLAS handles) and the
# caching allocator's unused reserve; CPU: the Python process with torch, transformers and peft
# imported, and what glibc keeps of freed activation memory. Measured values in docs/plan.md.
RUNTIME = {
    "cuda_context": 0.55 * GiB,  # assumed; torch 2.x on Hopper: 0.5-0.6 GiB outside the allocator
    "cuda_slack": 0.05,  # assumed share of the allocated peak the caching allocator reserves on top
    "cpu_process": 0.43 * GiB,  # measured: RSS of lorakit with torch, transformers, peft loaded, no weights
    "cpu_retained": 0.35,  # measured: glibc keeps ~this share of the step's transient memory resident
}


@dataclass
class Memory:
    """Bytes, by component. `allocated` is what torch.cuda.max_memory_allocated would report;
    `total` adds the runtime and must fit the device."""

    weights: float
    adapter: float  # LoRA weights + AdamW moments (+ gradients at the optimizer step)
    activations: float  # kept for the backward at the peak
    transient: float  # the loss buffers or one layer's backward (and recompute), whichever is larger
    runtime: float  # CUDA context + allocator slack, or the CPU process + retained heap
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
    """The frozen base as load_base holds it."""
    w = _bytes(step.precision) if step.device == "cuda" else 4  # CPU lora loads fp32 weights
    if step.method == "lora":
        return arch.params * w
    compute = _bytes(step.precision)
    quantized = arch.layers * arch.layer_linear_params
    per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if step.double_quant else 4 / 64)
    constants = arch.layers * len(arch.linears) * 2 * 256 * 4  # NF4 and absmax code books
    return quantized * per_weight + constants + (arch.params - quantized) * compute


def _layer_activations(arch: Arch, step: Step) -> tuple[float, float]:
    """(bytes per token, bytes per layer independent of tokens) autograd keeps for one layer."""
    a = _bytes(step.precision)  # activation dtype: autocast/16-bit base on CUDA, fp32 on CPU
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

    # What each LoRA layer keeps: the input of lora_A (and the dropout mask), and lora_A's output.
    # method lora under autocast: PEFT casts x to fp32 for the fp32 adapter, autocast casts it back
    # to 16-bit, a new tensor per LoRA layer. Otherwise x itself is kept, shared by the layers of a
    # group, unless dropout makes a new tensor per layer. CUDA dropout keeps a bool mask, the CPU
    # one a noise tensor of the input's dtype.
    per_layer = 0.0
    for group in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        targeted = [l for l in arch.targeted(step.targets) if l.group == group]
        if not targeted:
            continue
        n = targeted[0].n_in
        cast = step.method == "lora" and autocast
        x_bytes = 4 if (cast or not autocast) else 2  # the dtype dropout sees
        mask = (1 if cuda else x_bytes) if step.dropout > 0 else 0
        if cast or step.dropout > 0:
            per_token += len(targeted) * n * (a + mask)
        elif group != "attn_out":  # attn_out's input is SDPA's output, already counted
            per_token += n * a
        per_token += len(targeted) * step.r * a
        if autocast:  # autocast's 16-bit copies of the fp32 LoRA weights, kept for the backward
            per_layer += 2 * sum(step.r * (l.n_in + l.n_out) for l in targeted)
    return per_token, per_layer


def _layer_backward(arch: Arch, step: Step) -> float:
    """Gradient buffers alive at once in one layer's backward, per token (the MLP's, the largest)."""
    a = _bytes(step.precision)
    fp32_lora_grad = 4 * arch.intermediate if (step.method == "lora" and a == 2) else 0
    return a * (4 * arch.intermediate + 2 * arch.hidden) + fp32_lora_grad


def step_memory(arch: Arch, step: Step) -> Memory:
    """Peak memory of one optimizer step of lorakit's loop on `step`'s micro-batch."""
    weights = base_weight_bytes(arch, step)
    lora = arch.lora_params(step.r, step.targets)
    adapter = 12 * lora  # fp32 weights + AdamW exp_avg and exp_avg_sq
    per_token, per_layer = _layer_activations(arch, step)
    a = _bytes(step.precision)
    T = step.tokens
    final_norm = (4 * arch.hidden + 4) * T
    mask = T * step.seq if step.masked else 0  # the bool [rows, 1, seq, seq] mask, shared by all layers
    trained = T if arch.full_logits else step.trained
    loss = 12 * arch.vocab * trained + (2 * arch.vocab * T if arch.full_logits else 0)
    dequant = 0
    if step.method == "qlora":  # bitsandbytes dequantizes one whole weight for each 4-bit matmul
        dequant = max(l.n_in * l.n_out for l in arch.linears) * a
    layer_work = _layer_backward(arch, step) * T + dequant
    if step.checkpointing:
        kept = arch.layers * a * arch.hidden * T  # each layer's input
        backward = per_token * T + per_layer + layer_work  # one layer recomputed, then its backward
    else:
        kept = arch.layers * (per_token * T + per_layer)
        backward = layer_work
    activations = kept + final_norm + mask
    # The optimizer step: no activations, gradients present, foreach AdamW's temporaries.
    optimizer = 4 * lora + 8 * lora
    candidates = {"loss": loss, "backward": backward, "optimizer": optimizer - activations}
    peak_at = max(candidates, key=candidates.get)
    transient = candidates[peak_at]
    if step.device == "cuda":
        runtime = RUNTIME["cuda_context"] + RUNTIME["cuda_slack"] * (weights + adapter + activations + transient)
    else:
        runtime = RUNTIME["cpu_process"] + RUNTIME["cpu_retained"] * (activations + transient)
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
    """A measured steady-state throughput: the anchor every estimate is scaled from."""

    device: str  # a GPUS key, or "cpu"
    model: str  # an ARCHS key
    method: str
    checkpointing: bool
    rows: int
    seq: int
    tok_s: float
    source: str


# Architectures of the measured anchors (random-init models of these configs; sizes from
# reference/perf-anchors.md).
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
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5),
}

_README = "H200, 2026-11-29, plain PyTorch+PEFT+bnb loop (shared/gpu/README.md)"
MEASURED = [
    Measured("H200", "qwen3-0.6b", "qlora", False, 8, 2048, 46978, _README),
    Measured("H200", "qwen3-0.6b", "qlora", True, 8, 2048, 33663, _README),
    Measured("H200", "llama-3.1-8b", "qlora", False, 8, 2048, 12496, _README),
    Measured("H200", "llama-3.1-8b", "qlora", True, 8, 2048, 8759, _README),
    Measured("H200", "llama-3.1-8b", "qlora", False, 2, 2048, 11364, _README),
    Measured("cpu", "smollm2-135m", "lora", False, 8, 128, 160, "2-core AMD EPYC, fp32, lorakit step"),
    Measured("cpu", "smollm2-135m", "qlora", False, 8, 128, 60, "2-core AMD EPYC, fp32, lorakit step"),
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


def _efficiency(m: Measured) -> float:
    arch = arch_from_config(ARCHS[m.model])
    step = Step(m.method, "cuda" if m.device != "cpu" else "cpu", "bf16" if m.device != "cpu" else "fp32",
                m.checkpointing, m.rows, m.seq, m.rows * (m.seq - 1), masked=False)
    return m.tok_s * step_flops(arch, step) / step.tokens / _peak(m.device)


def _peak(device: str) -> float:
    if device == "cpu":
        return 1e12 * CPU_CORES_MEASURED  # a nominal unit: CPU figures scale with cores only
    return GPUS[device].bf16_tflops * 1e12


def throughput(arch: Arch, step: Step, device: str) -> tuple[float, str]:
    """(tokens/s, how it was obtained) for `step` on `device` (a GPUS key or "cpu")."""
    table = "cpu" if device == "cpu" else "H200"
    anchors = [m for m in MEASURED if m.device == table and m.method == step.method] or \
              [m for m in MEASURED if m.device == table]
    exact = [m for m in anchors if m.device == device and m.checkpointing == step.checkpointing
             and m.rows == step.rows and m.seq == step.seq and ARCHS[m.model] and _same(arch, m.model)]
    if exact:
        return exact[0].tok_s, f"measured ({exact[0].source})"
    # Hardware efficiency changes with model size and tokens per micro-batch, little with
    # checkpointing (recompute is counted as work): interpolate it in log(size), log(tokens).
    size = math.log(arch.layers * arch.layer_linear_params)
    tokens = math.log(max(step.tokens, 1))

    def distance(m):
        a = arch_from_config(ARCHS[m.model])
        return abs(math.log(a.layers * a.layer_linear_params) - size) + 0.5 * abs(math.log(m.rows * m.seq) - tokens)

    nearest = sorted(anchors, key=distance)[:2]
    weights = [1 / (distance(m) + 1e-3) for m in nearest]
    eff = sum(w * _efficiency(m) for w, m in zip(weights, nearest)) / sum(weights)
    peak = _peak(device)
    if device == "cpu":
        peak *= (os.cpu_count() or CPU_CORES_MEASURED) / CPU_CORES_MEASURED
    tok_s = eff * peak * step.tokens / step_flops(arch, step)
    how = "extrapolated by FLOPs from " + ", ".join(sorted({f"{m.model} {m.method}" for m in nearest}))
    if device not in ("cpu", "H200"):
        how += f" on H200, scaled by bf16 peak ({GPUS[device].bf16_tflops:g} vs 989 TFLOP/s)"
    return tok_s, how


def _same(arch: Arch, name: str) -> bool:
    return arch == replace(arch_from_config(ARCHS[name]), note=arch.note)


# ---------------------------------------------------------------------------------------------
# The device, the data, and the plan.

@dataclass(frozen=True)
class Device:
    kind: str  # cuda | cpu
    name: str  # GPUS key for throughput, or "cpu"
    label: str  # as detected or given
    memory: float  # bytes
    bf16: bool


def detect_device(gpu_mem_bytes: float | None = None, gpu_name: str | None = None) -> Device:
    """The device to plan for: `gpu_name` (a GPU family, e.g. "A100", "RTX 4090") or the CUDA
    device present, else this machine's CPU; `gpu_mem_bytes` overrides its memory."""
    import torch

    if gpu_name is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        family = _gpu_family(props.name) or "H100"
        memory = gpu_mem_bytes or props.total_memory
        return Device("cuda", family, props.name, memory, torch.cuda.is_bf16_supported())
    if gpu_name is not None:
        family = _gpu_family(gpu_name)
        if family is None:
            raise PlanError(f"--gpu {gpu_name!r}: unknown GPU; known: {', '.join(GPUS)}. Give the closest one "
                            f"and --gpu-mem for its memory.")
        gpu = GPUS[family]
        return Device("cuda", family, gpu_name, gpu_mem_bytes or gpu.memory_gib * 1e9, gpu.bf16)
    if gpu_mem_bytes is not None:  # a GPU of this size, throughput of the nearest measured one
        return Device("cuda", "H100", f"GPU with {gpu_mem_bytes / GiB:.0f} GiB", gpu_mem_bytes, True)
    from lorakit.models import cpu_has_fast_bf16

    return Device("cpu", "cpu", f"CPU ({os.cpu_count()} cores)", _machine_ram(), cpu_has_fast_bf16())


def _gpu_family(name: str) -> str | None:
    upper = name.upper().replace("NVIDIA", "").replace("GEFORCE", "").strip()
    if "A100" in upper and ("40G" in upper or "40 G" in upper):
        return "A100-40GB"
    for key in sorted(GPUS, key=len, reverse=True):
        if key.upper() in upper:
            return key
    return None


def _machine_ram() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
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


@dataclass
class Workload:
    """The rows one epoch trains on, as the schedule will draw them."""

    rows: int  # rows per epoch (examples, or packed rows)
    tokens: int  # real tokens per epoch
    trained: int  # trained tokens per epoch
    width: int  # the longest row (the widest micro-batch pads to it)
    row_trained: int  # the most trained tokens in one row
    processed: int  # tokens per epoch the model runs, padding included
    masked: bool  # the model gets a materialised attention mask
    from_data: bool
    mean_width: float = 0.0


def workload(cfg, rows=None) -> Workload:
    """From the training rows (`Prepared.rows`; read with the tokenizer when None), or, when the
    data cannot be read, full rows of data.max_length with every token trained."""
    if rows is None:
        rows = _read_rows(cfg)
    if rows is None:
        n = max(cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else 8, 1)
        L = cfg.data.max_length
        return Workload(n, n * L, n * L, L, L, n * L, True, False, L)
    from lorakit.train.batches import Schedule

    lengths, trained = [], []
    for row in rows:
        parts = [row] if hasattr(row, "input_ids") else list(row)
        lengths.append(sum(len(e.input_ids) for e in parts))
        trained.append(sum(sum(1 for t in e.labels[1:] if t != -100) for e in parts))
    batch = cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else 8
    schedule = Schedule(len(rows), batch, cfg.train.grad_accum, cfg.seed)
    processed, widths = 0, []
    for s in range(schedule.steps_per_epoch):
        for idx in schedule.step_indices(s):
            w = max(lengths[i] for i in idx)
            processed += w * len(idx)
            widths.append(w)
    masked = cfg.data.packing or len(set(lengths)) > 1
    return Workload(len(rows), sum(lengths), sum(trained), max(lengths), max(trained), processed, masked, True,
                    sum(widths) / len(widths))


def _read_rows(cfg):
    from lorakit import data, models

    if not cfg.data.train:
        return None
    tokenizer = models.load_tokenizer(models.resolve_model(cfg.model), cfg.trust_remote_code)
    train, _, _ = data.prepare_run(cfg, tokenizer)
    return train.rows


@dataclass
class Option:
    method: str
    checkpointing: bool
    batch_size: int
    peak_bytes: float  # total: allocated + runtime
    allocated_bytes: float
    memory: dict  # components, bytes
    fits: bool
    max_batch: int  # largest micro-batch that fits (0: not even one row)
    tok_s: float
    tok_s_source: str
    epoch_s: float

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
    change: str  # the one-line config change ("" when none is needed)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        for o, opt in zip(d["options"], self.options):
            o["label"] = opt.label
        return json.dumps(d, indent=1)


MAX_ROWS = 4096


def plan(cfg, gpu_mem_bytes: float | None = None, gpu_name: str | None = None, rows=None) -> Plan:
    """lora / qlora x gradient checkpointing off / on for `cfg` on the given or detected device:
    peak memory, fit, largest micro-batch, tokens/s, time per epoch, and what to change."""
    arch = load_arch(cfg.model, cfg.trust_remote_code)
    device = detect_device(gpu_mem_bytes, gpu_name)
    work = workload(cfg, rows)
    precision = _precision(cfg.train.precision, device)
    batch = cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else 8
    options = [_option(arch, cfg, device, precision, work, batch, method, gc)
               for method in ("lora", "qlora") for gc in (False, True)]
    configured = _configured(cfg, arch, device, options)
    recommendation, change = _recommend(cfg, options, configured, batch)
    notes = [arch.note] if arch.note else []
    if not work.from_data:
        notes.append(f"no readable data.train: assumed {work.rows} full rows of data.max_length="
                     f"{cfg.data.max_length}, every token trained")
    if device.kind == "cpu":
        notes.append("CPU: memory is peak RSS of the process; time scales the measured 2-core figure by cores")
    return Plan(cfg.model, {"model_type": arch.model_type, "layers": arch.layers, "hidden": arch.hidden,
                            "vocab": arch.vocab}, arch.params, arch.lora_params(cfg.lora.r, _targets(cfg)),
                device.label, device.kind, device.memory, precision, asdict(work), options, configured.label,
                recommendation, change, notes)


def _targets(cfg):
    t = cfg.lora.target_modules
    return t if isinstance(t, str) else tuple(t)


def _precision(setting: str, device: Device) -> str:
    if setting != "auto":
        return setting
    if device.kind == "cuda":
        return "bf16" if device.bf16 else "fp16"
    return "bf16" if device.bf16 else "fp32"


def _step(arch, cfg, device: Device, precision, work: Workload, rows: int, method: str, gc: bool) -> Step:
    return Step(method, device.kind, precision, gc, rows, work.width,
                min(rows * work.row_trained, rows * work.width), work.masked, cfg.lora.r, cfg.lora.dropout,
                _targets(cfg), cfg.quant.double_quant)


def _option(arch, cfg, device, precision, work, batch, method, gc) -> Option:
    mem = step_memory(arch, _step(arch, cfg, device, precision, work, batch, method, gc))
    max_batch = _largest_batch(arch, cfg, device, precision, work, method, gc)
    mean = Step(method, device.kind, precision, gc, batch, max(1, round(work.mean_width)),
                max(1, round(batch * work.trained / max(work.rows, 1))), work.masked, cfg.lora.r, cfg.lora.dropout,
                _targets(cfg), cfg.quant.double_quant)
    tok_s, source = throughput(arch, mean, device.name)
    components = {"weights": mem.weights, "adapter": mem.adapter, "activations": mem.activations,
                  "transient": mem.transient, "runtime": mem.runtime, "peak_at": mem.peak_at}
    return Option(method, gc, batch, mem.total, mem.allocated, components, mem.total <= device.memory, max_batch,
                  tok_s, source, work.processed * math.ceil(cfg.train.epochs) / tok_s if tok_s else math.inf)


def _largest_batch(arch, cfg, device, precision, work, method, gc) -> int:
    def fits(rows):
        return step_memory(arch, _step(arch, cfg, device, precision, work, rows, method, gc)).total <= device.memory

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


def _configured(cfg, arch: Arch, device: Device, options: list[Option]) -> Option:
    gc = cfg.train.gradient_checkpointing
    if gc == "auto":  # the rule of train/loop.py: on for CUDA models over 3B parameters
        gc = device.kind == "cuda" and arch.params > 3e9
    method = cfg.method
    if method == "auto":
        method = "lora" if _find(options, "lora", gc).fits else "qlora"
    return _find(options, method, gc)


def _find(options, method, gc) -> Option:
    return next(o for o in options if o.method == method and o.checkpointing == gc)


def _recommend(cfg, options: list[Option], configured: Option, batch: int) -> tuple[str, str]:
    fitting = [o for o in options if o.fits]
    if fitting:
        best = max(fitting, key=lambda o: o.tok_s)
        if configured.fits and (best is configured or configured.tok_s >= 0.95 * best.tok_s):
            spare = (configured.max_batch and f"; micro-batch up to {configured.max_batch} fits") or ""
            return f"{configured.label} fits as configured{spare}", ""
        why = "the configured setup does not fit" if not configured.fits else \
            f"{best.tok_s / configured.tok_s:.1f}x the tokens/s of {configured.label}"
        return f"use {best.label}: {why}", best.change
    usable = [o for o in options if o.max_batch > 0]
    if not usable:
        return "nothing fits even one row: use a smaller model, a shorter data.max_length or a larger device", ""
    best = max(usable, key=lambda o: (o.max_batch, o.tok_s))
    rows = _pow2_below(best.max_batch)
    accum = cfg.train.grad_accum * math.ceil(batch / rows)
    return (f"use {best.label} with micro-batch {rows} x {accum} accumulation (the same rows per step)",
            f"{best.change} train.batch_size={rows} train.grad_accum={accum}")


def _pow2_below(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def resolve_auto(cfg, device, rows=None) -> tuple[str, int, str]:
    """(method, batch_size, reason) for `method: auto` and `train.batch_size: auto` on the torch
    device train runs on: lora when it fits, else qlora; the largest micro-batch up to 16 rows that
    fits (a power of two). Values the config fixes are kept."""
    if device.type == "cuda":
        import torch

        dev = detect_device(torch.cuda.get_device_properties(device.index or 0).total_memory)
        dev = detect_device(gpu_name=torch.cuda.get_device_name(device.index or 0), gpu_mem_bytes=dev.memory)
    else:
        dev = detect_device() if device.type == "cpu" else None
    if dev is None:
        raise PlanError(f"method/batch_size auto: no memory model for device {device}; set them explicitly.")
    if cfg.method != "auto" and cfg.train.batch_size != "auto":
        return cfg.method, cfg.train.batch_size, "set in the config"
    p = plan(cfg, dev.memory if dev.kind == "cuda" else None, dev.label if dev.kind == "cuda" else None, rows)
    gc = next(o for o in p.options if o.label == p.configured).checkpointing
    method = cfg.method
    if method == "auto":
        method = "lora" if _find(p.options, "lora", gc).max_batch >= _min_rows(cfg) else "qlora"
    chosen = _find(p.options, method, gc)
    if cfg.train.batch_size == "auto":
        if chosen.max_batch == 0:
            raise PlanError(f"{chosen.label} does not fit one row of {p.workload['width']} tokens in "
                            f"{p.device_memory / GiB:.1f} GiB; shorten data.max_length or use a smaller model.")
        batch = min(_pow2_below(chosen.max_batch), 16)
    else:
        batch = cfg.train.batch_size
    reason = (f"method {method}, micro-batch {batch}: {chosen.label} needs {_gib(chosen.peak_bytes)} at "
              f"micro-batch {chosen.batch_size} of {_gib(p.device_memory)} on {p.device} and fits up to "
              f"{chosen.max_batch} rows")
    if cfg.method == "auto" and method == "qlora":
        lora = _find(p.options, "lora", gc)
        reason += f" (lora fits only {lora.max_batch} rows)"
    return method, batch, reason


def _min_rows(cfg) -> int:
    return cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else 1


# ---------------------------------------------------------------------------------------------
# Output.

def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n < 100 * GiB else f"{n / GiB:.0f} GiB"


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def format_plan(p: Plan) -> str:
    """A readable table of the four options, the memory of the configured one, and the advice."""
    w = p.workload
    source = "data" if w["from_data"] else "assumed"
    lines = [
        f"lorakit plan: {p.model} ({p.arch['model_type']}, {p.params / 1e6:,.0f}M params, {p.arch['layers']} layers, "
        f"LoRA {p.lora_params / 1e6:.1f}M) on {p.device}, {_gib(p.device_memory)}, {p.precision}",
        f"{source}: {w['rows']:,} rows, {w['tokens']:,} tokens ({w['trained']:,} trained), longest row "
        f"{w['width']:,}; {w['processed']:,} tokens per epoch with padding",
        "",
        f"  {'':2}{'option':26}{'peak memory':>12}  {'fits':4}  {'max batch':>9}  {'tokens/s':>9}  {'epoch':>6}",
    ]
    for o in p.options:
        mark = "->" if o.label == p.configured else ""
        est = "" if o.tok_s_source.startswith("measured") else "~"
        lines.append(f"  {mark:2}{o.label:26}{_gib(o.peak_bytes):>12}  {'yes' if o.fits else 'NO':4}  "
                     f"{o.max_batch:>9}  {est + f'{o.tok_s:,.0f}':>9}  {_duration(o.epoch_s):>6}")
    c = next(o for o in p.options if o.label == p.configured)
    m = c.memory
    lines += ["", f"at micro-batch {c.batch_size} ({c.label}): weights {_gib(m['weights'])} + adapter and AdamW "
              f"{_gib(m['adapter'])} + activations {_gib(m['activations'])} + {m['peak_at']} peak "
              f"{_gib(m['transient'])} + runtime {_gib(m['runtime'])}",
              f"tokens/s: {c.tok_s_source}{' (~ = extrapolated)' if not c.tok_s_source.startswith('measured') else ''}",
              "", f"recommendation: {p.recommendation}"]
    if p.change:
        lines.append(f"  lorakit train CONFIG {p.change}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
