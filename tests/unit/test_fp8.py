"""train/fp8.py on CPU (torch._scaled_mm has a CPU kernel): the weight cast from bitsandbytes' storage,
the FP8 matmul against its fp32 reference, training mode only, and what the compiled layer keeps for
the backward. tests/gpu runs the same on the tensor cores."""

import pytest
import torch

from lorakit.train import fast, fp8


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_dequantize_reads_bitsandbytes_storage_exactly(quant_type, nested):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(48, 1024, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(weight, quant_type=quant_type, compress_statistics=nested, blocksize=64)
    layer = bnb.nn.Linear4bit(1024, 48, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
    assert torch.equal(fp8.dequantize(*fp8.stored_weight(layer)), F.dequantize_4bit(packed, state).to(torch.bfloat16))


def test_fp8_linear_matches_its_reference_and_is_close_to_bf16():
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 96, bias=False, dtype=torch.bfloat16)
    frozen = fp8._FrozenFP8(base)
    x = torch.randn(2, 37, 256, dtype=torch.bfloat16, requires_grad=True)  # 74 rows: padded to 80 inside
    dy = torch.randn(2, 37, 96, dtype=torch.bfloat16)
    results = []
    for fn in (fp8.fp8_linear, fp8.reference_linear):
        y = fn(x, frozen.stored, frozen.row_scale, frozen.col_scale)
        (dx,) = torch.autograd.grad(y, x, dy)
        results.append((y.float(), dx.float()))
    exact_y = x.detach().float() @ base.weight.float().t()
    exact_dx = dy.float() @ base.weight.float()
    for got, want, exact in zip(results[0], results[1], (exact_y, exact_dx)):
        assert got.shape == exact.shape
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # same e4m3 operands, other summation order
        error = ((got - exact).norm() / exact.norm()).item()
        assert 1e-3 < error < 0.08  # e4m3 keeps 3 mantissa bits: not exact, not far


def test_fp8_runs_in_training_mode_only_and_leaves_the_module_as_it_was():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    keys = list(base.state_dict())
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    before = base(x)
    fp8._FrozenFP8(base)
    assert list(base.state_dict()) == keys
    base.eval()
    assert torch.equal(base(x), before)
    base.train()
    after = base(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, before, rtol=0.1, atol=0.05)
    assert base.float()(x.float()).dtype == torch.float32  # an fp32 model gets fp32 back (its attention needs it)


def test_compiled_fp8_layer_keeps_no_weight_copy_and_recomputes_cheap_results(tmp_path):
    """One compiled LoRA + NF4 Llama layer: what it saves for the backward. Neither the FP8 weights
    (they would be 1 byte per base parameter, held from forward to backward) nor the cheap results
    the activation budget recomputes (normed inputs, SwiGLU's product, attention output re-laid out)."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model

    hidden, inter, tokens = 128, 448, 80
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=128)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    assert fp8.attach(model) == 7
    layer = fast.decoder_layers(model)[0]
    fast.compile_layers(model)
    model.train()
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    position = torch.arange(tokens)[None]
    rotary = model.get_base_model().model.rotary_emb(x, position)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, attention_mask=None, position_ids=position, position_embeddings=rotary)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not [t.shape for t in saved if t.dtype == torch.float8_e4m3fn]
    per_token = sum(t.numel() for t in saved if tokens in t.shape and t.dtype == torch.bfloat16) / tokens
    # kept: layer input, q, k, v, attention output, residual, gate and up, LoRA's rank-8 middles (7),
    # and rotary cos and sin (shared by every layer); not the normed inputs, the SwiGLU product or the
    # re-laid-out attention output (another 2 * hidden + hidden + inter: 1.5x as much)
    kept = hidden + hidden + 64 + 64 + hidden + hidden + 2 * inter + 7 * 8 + 2 * 64
    assert per_token <= kept
