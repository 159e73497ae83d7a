"""The fast path's CPU side: nothing is compiled off CUDA, the CPU loss keeps its eager reference step,
and the compiler-friendly CE step computes the reference's numbers (checked here in eager mode; the
compiled version is checked against it in tests/gpu/test_fast_gpu.py)."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import models
from lorakit.train import fast
from lorakit.train.loss import chunk_loss_and_grad, chunked_cross_entropy_sum, fused_chunk_loss_and_grad


def _tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))


def test_speedups_leave_a_cpu_model_untouched():
    model = _tiny_lora()
    assert models.speedups(model, torch.device("cpu")) is model
    assert len(fast.decoder_layers(model)) == 2
    assert all(layer._compiled_call_impl is None for layer in fast.decoder_layers(model))


@pytest.mark.parametrize("checkpointing,form", [(False, "layers"), (True, "blocks")])
def test_speedups_compile_blocks_when_checkpointing(monkeypatch, checkpointing, form):
    """Checkpointing asks for memory: the layer stays eager so its checkpoint keeps only its input."""
    chosen = []
    monkeypatch.setattr(fast, "compile_layers", lambda model: chosen.append("layers"))
    monkeypatch.setattr(fast, "compile_blocks", lambda model: chosen.append("blocks"))
    model = _tiny_lora()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert fast.checkpointing(model) == checkpointing
    fast.speedups(model, torch.device("cuda"))  # the choice only; compiling itself is tested in tests/gpu
    assert chosen == [form]


def test_cpu_cross_entropy_never_compiles(monkeypatch):
    def refuse(fn):
        raise AssertionError("the CPU path must not compile")

    monkeypatch.setattr(fast, "compiled", refuse)
    hidden = torch.randn(10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    target = torch.randint(0, 30, (10,))
    got = chunked_cross_entropy_sum(head, hidden, target, chunk=4)
    torch.testing.assert_close(got, F.cross_entropy(head(hidden), target, reduction="sum"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chunk_step_computes_the_reference(dtype):
    logits = (torch.randn(37, 301) * 3).to(dtype)
    target = torch.randint(0, 301, (37,))
    want_loss, want_grad = chunk_loss_and_grad(logits, target)
    got_loss, got_grad = fused_chunk_loss_and_grad(logits, target)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad.float(), want_grad.to(dtype).float(), rtol=1e-2, atol=1e-6)
