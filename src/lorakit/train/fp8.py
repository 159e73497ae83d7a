"""FP8 matmuls for the frozen base (`train.fp8: true`, opt-in; CUDA GPUs with FP8 tensor cores).

LoRA trains small matrices beside a frozen base, so most of a step is the base's matmuls: y = x Wᵀ
forward, dx = dy W backward (no weight gradient). With `train.fp8` both run in float8 (e4m3) on the
tensor cores, about twice the bf16 rate on Hopper, with one scale per row of each operand:

- x and dy: scaled per token (row) when they are cast, inside the compiled layer;
- W: scaled per output channel for the forward and per input channel for the backward. The base is
  frozen, so these scales are computed once (`attach`), from the weight itself.

W is cast from its stored form (NF4 codes or bf16) at every use, in the forward and again in the
backward, so no fp8 copy is kept between them: memory stays that of the bf16/NF4 path. Everything else
keeps its precision: LoRA's A and B, norms, attention, the loss (fp32), the optimizer.

FP8 is not exact: each cast keeps 3 mantissa bits (a rounding error of up to 1/16 of the value), so
outputs differ from bf16 by a few percent per element and the loss curve by a little (benchmarks/NOTES.md
has the 50-step comparison). That is why it is a setting and not the default. Only training mode takes
the fp8 path; evaluation and generation run the base as stored.

`reference_linear` is the same arithmetic without FP8 kernels (dequantize, then matmul in fp32): the
tests compare the two.
"""

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def attach(model) -> int:
    """Route the frozen base linear of every LoRA layer through `fp8_linear` in training mode; returns
    how many. Call it before compiling (the compiled layers then trace the fp8 path)."""
    count = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A") or not _castable(base):
            continue
        _FrozenFP8(base)
        count += 1
    return count


def _castable(base) -> bool:
    """Shapes the FP8 kernels take (multiples of 16), and whole 4-bit blocks in every row."""
    if base.in_features % 16 or base.out_features % 16:
        return False
    if _is_4bit(base):
        return base.in_features % base.weight.quant_state.blocksize == 0
    return isinstance(base, torch.nn.Linear) and base.weight.is_floating_point()


def _is_4bit(base) -> bool:
    return getattr(base.weight, "quant_state", None) is not None


class _FrozenFP8:
    """Replaces `base.forward` (the module's state dict and parameters are untouched) and holds the
    per-channel scales: `row_scale` [out] for the forward, `col_scale` [in] for the backward."""

    def __init__(self, base):
        self.base = base
        self.eager_forward = base.forward
        self.stored = stored_weight(base)
        with torch.no_grad():
            weight = dequantize(*self.stored).float()
            self.row_scale = (weight.abs().amax(1).clamp_min(1e-12) / E4M3_MAX).contiguous()
            self.col_scale = (weight.abs().amax(0).clamp_min(1e-12) / E4M3_MAX).contiguous()
        base.forward = self.forward

    def forward(self, x, *args, **kwargs):
        if not self.base.training:
            return self.eager_forward(x, *args, **kwargs)
        y = fp8_linear(x, self.stored, self.row_scale, self.col_scale).to(x.dtype)  # fp32 models stay fp32
        return y if self.base.bias is None else y + self.base.bias.to(y.dtype)


def stored_weight(base) -> tuple:
    """The frozen weight as `dequantize` takes it: the tensor itself, or bitsandbytes' 4-bit codes
    with their block scales (and those scales' own codes under double quant)."""
    weight = base.weight
    if not _is_4bit(base):
        return (weight,)
    state = weight.quant_state
    if not state.nested:
        return (weight.data, state.code, state.absmax, state.blocksize, tuple(state.shape))
    nested = state.state2
    absmax = (state.absmax, nested.code, nested.absmax, nested.blocksize, state.offset)
    return (weight.data, state.code, absmax, state.blocksize, tuple(state.shape))


def dequantize(weight, code=None, absmax=None, blocksize=None, shape=None, *, zero=None) -> torch.Tensor:
    """The frozen weight [out, in] in bf16 from `stored_weight`'s parts: NF4/FP4 codes (two per byte,
    high nibble first, as bitsandbytes packs them) times their block's scale. `zero`: an int tensor
    holding 0 that the result then depends on (see `_FP8Matmul.backward`)."""
    zero = torch.zeros((), dtype=torch.int64, device=weight.device) if zero is None else zero
    if code is None:
        return weight.to(torch.bfloat16) + zero
    if isinstance(absmax, tuple):  # double quant: 8-bit codes, one fp32 scale per group of blocks, offset
        codes8, code8, group_scale, group, offset = absmax
        blocks = torch.arange(codes8.numel(), device=codes8.device)
        absmax = code8[codes8.long()] * group_scale[blocks // group] + offset
    # bitsandbytes' own dequantize_4bit is the reference (tests/unit/test_fp8.py: bit-identical), but
    # it is an opaque op: written out here, inductor fuses unpack, scale and the fp8 cast into one
    # kernel. Index arithmetic only (no stack, no repeat_interleave): the partitioner may then place
    # this in the backward, where it is needed, instead of computing it in the forward and keeping it.
    n = weight.numel() * 2
    index = torch.arange(n, device=weight.device) + zero
    nibble = (weight.reshape(-1)[index // 2].int() >> (4 * (1 - index % 2))) & 15
    values = code[nibble.long()].reshape(-1, blocksize) * absmax.float()[:, None]
    return values.reshape(shape).to(torch.bfloat16)


def _to_fp8(weight: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    return (weight.float() / scale.unsqueeze(dim)).to(E4M3)


def _rows_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] as e4m3 with one fp32 scale per row ([m, 1])."""
    scale = x.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


def _scaled_mm(a: torch.Tensor, b_t: torch.Tensor, a_scale, b_scale) -> torch.Tensor:
    """a [m, k] @ b_tᵀ, b_t [n, k] row-major (the layout the kernels want for the right operand),
    with row scales a_scale [m, 1] and b_scale [n]. Rows are padded to a multiple of 16."""
    m = a.shape[0]
    pad = -m % 16
    if pad:
        a = torch.nn.functional.pad(a.view(torch.uint8), (0, 0, 0, pad)).view(E4M3)
        a_scale = torch.nn.functional.pad(a_scale, (0, 0, 0, pad), value=1.0)
    out = torch._scaled_mm(a, b_t.t(), scale_a=a_scale, scale_b=b_scale.unsqueeze(0), out_dtype=torch.bfloat16)
    return out[:m] if pad else out


class _FP8Matmul(torch.autograd.Function):
    """y = x Wᵀ with W frozen: the weight is cast from its stored form in the forward and again in the
    backward, and nothing of x is kept between them (a frozen weight needs no x for its gradient)."""

    @staticmethod
    def forward(ctx, x, stored, row_scale, col_scale):
        ctx.stored, ctx.col_scale = stored, col_scale
        xq, x_scale = _rows_to_fp8(x)
        w = _to_fp8(dequantize(*stored), row_scale, 1)  # [out, in]
        return _scaled_mm(xq, w, x_scale, row_scale)

    @staticmethod
    def backward(ctx, dy):
        dyq, dy_scale = _rows_to_fp8(dy)
        # The weight depends on the frozen parameters only, so the compiler's partitioner would cast it
        # in the forward and keep it until here (1 byte per parameter of the whole model, held from
        # forward to backward). Making it depend on dy (through a zero it cannot prove is zero) puts
        # the cast here, where it is used.
        zero = (dy_scale.amin() < 0).long()
        w_t = _to_fp8(dequantize(*ctx.stored, zero=zero), ctx.col_scale, 0).t().contiguous()  # [in, out]
        return _scaled_mm(dyq, w_t, dy_scale, ctx.col_scale), None, None, None


def fp8_linear(x: torch.Tensor, stored: tuple, row_scale: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """x Wᵀ (no bias) for the weight `stored_weight` returned, with the matmuls in FP8; x [..., in] in
    any float dtype, y in bf16."""
    flat = x.reshape(-1, x.shape[-1])
    return _FP8Matmul.apply(flat, stored, row_scale, col_scale).reshape(*x.shape[:-1], -1)


def reference_linear(x: torch.Tensor, stored: tuple, row_scale: torch.Tensor,
                     col_scale: torch.Tensor) -> torch.Tensor:
    """`fp8_linear`'s arithmetic in plain PyTorch: every operand rounded to e4m3 the same way, then
    multiplied in fp32. The forward matches fp8_linear up to fp32-vs-tensor-core summation order."""
    flat = x.reshape(-1, x.shape[-1])
    return _Reference.apply(flat, stored, row_scale, col_scale).reshape(*x.shape[:-1], -1)


class _Reference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stored, row_scale, col_scale):
        ctx.stored, ctx.col_scale = stored, col_scale
        xq, x_scale = _rows_to_fp8(x)
        w = _to_fp8(dequantize(*stored), row_scale, 1).float() * row_scale[:, None]
        return ((xq.float() * x_scale) @ w.t()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, dy):
        dyq, dy_scale = _rows_to_fp8(dy)
        w = _to_fp8(dequantize(*ctx.stored), ctx.col_scale, 0).float() * ctx.col_scale[None, :]
        return ((dyq.float() * dy_scale) @ w).to(torch.bfloat16), None, None, None
