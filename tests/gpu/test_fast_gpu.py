"""The CUDA fast path against the plain PyTorch reference, on fresh random inputs: compiled decoder
layers or layer children (fast.speedups, fast.compile_layers) with 4-bit or bf16 base + LoRA, with
and without checkpointing, and the compiled cross-entropy step. Run on the GPU machine: python -m pytest tests/gpu -m gpu."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import models
from lorakit.config import load_config
from lorakit.train import fast, fp8
from lorakit.train.loss import (chunk_loss_and_grad, chunked_cross_entropy_sum, fused_chunk_loss_and_grad,
                                loss_sum, reference_loss_sum)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = {
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=3000, max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=3000,
                  max_position_embeddings=512, tie_word_embeddings=True),
}


def _lora_model(tmp_path, arch: str, method: str, checkpointing: bool, dropout: float = 0.0):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY[arch])
    AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).save_pretrained(tmp_path)
    cfg = load_config(overrides={"model": str(tmp_path), "method": method, "lora.dropout": dropout},
                      require_train=False)
    device = torch.device("cuda")
    base = models.load_base(cfg, str(tmp_path), models.resolve_precision("bf16", device), device)
    model = models.attach_lora(base, cfg, checkpointing)
    for name, p in model.named_parameters():  # B = 0 would hide the adapter from the forward pass
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def _loss_and_grads(model, loss_fn, batch):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss_fn(model, batch)
    value.backward()
    grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return value.detach().float(), grads


@pytest.mark.parametrize("arch,method,checkpointing,compile_fn", [
    ("llama", "qlora", False, "speedups"),  # whole layers compiled
    ("llama", "qlora", True, "speedups"),  # layer children compiled, eager checkpointing around them
    ("llama", "qlora", True, "compile_layers"),  # checkpointing traced into the compiled layer
    ("qwen3", "qlora", False, "speedups"), ("llama", "lora", False, "speedups"),
    ("qwen3", "qlora", False, "cudagraphs"), ("llama", "lora", False, "cudagraphs")])  # train.compile: cudagraphs
def test_fast_path_matches_plain_reference(tmp_path, arch, method, checkpointing, compile_fn):
    model = _lora_model(tmp_path, arch, method, checkpointing)
    ids = torch.randint(0, TINY[arch]["vocab_size"], (2, 300), device="cuda")
    labels = ids.clone()
    labels[:, :40] = -100  # prompt positions: the fast loss skips their vocabulary projection
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ref_loss, ref_grads = _loss_and_grads(model, reference_loss_sum, batch)
    names = list(model.state_dict())

    if compile_fn in ("speedups", "cudagraphs"):
        assert fast.speedups(model, torch.device("cuda"), cudagraphs=compile_fn == "cudagraphs") is model
    else:
        fast.compile_layers(model)
    whole = compile_fn == "compile_layers" or not checkpointing
    for layer in fast.decoder_layers(model):
        assert (layer._compiled_call_impl is not None) == whole
        assert all(child._compiled_call_impl is not None for child in layer.children()) != whole
    for _ in range(3):  # later calls run the cached compiled code (CUDA graphs: recorded, then replayed)
        fast.new_graph_step()
        fast_loss, fast_grads = _loss_and_grads(model, loss_sum, batch)
        torch.testing.assert_close(fast_loss, ref_loss, rtol=2e-3, atol=0)
        for got, want in zip(fast_grads, ref_grads):  # bf16 autocast: rounding differs between fused kernels
            assert ((got - want).norm() / want.norm()).item() < 3e-2
    assert list(model.state_dict()) == names  # checkpoints and adapter files keep their keys


def test_dequant_cache_gives_bitsandbytes_numbers_eager_and_compiled(tmp_path):
    """quant.dequant_cache: 4-bit layers multiplying by their cached bf16 weight give bitsandbytes' own
    loss and gradients in eager mode (the same dequantization and matmul), and the compiled layers
    with the cache stay within the fast path's tolerance of that reference."""
    model = _lora_model(tmp_path, "llama", "qlora", False)
    ids = torch.randint(0, TINY["llama"]["vocab_size"], (2, 300), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ref_loss, ref_grads = _loss_and_grads(model, reference_loss_sum, batch)
    assert fast.cache_dequantized(model, float("inf")) > 0
    loss, grads = _loss_and_grads(model, reference_loss_sum, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fast.speedups(model, torch.device("cuda"), dequant_cache=float("inf"))
    for _ in range(2):
        fast_loss, fast_grads = _loss_and_grads(model, loss_sum, batch)
        torch.testing.assert_close(fast_loss, ref_loss, rtol=2e-3, atol=0)
        for got, want in zip(fast_grads, ref_grads):
            assert ((got - want).norm() / want.norm()).item() < 3e-2


@pytest.mark.parametrize("form", ["layers", "blocks", "cudagraphs"])
def test_fast_path_with_dropout_matches_eager_with_the_same_masks(tmp_path, form):
    """LoRA dropout on: speedups swaps in SeededDropout, whose masks depend on the seeds only, so the
    compiled layers (which recompute the masks in the backward; torch's dropout, recomputed under an
    activation budget below 1, would draw other random numbers) are compared with the eager model
    drawing the same masks. Whole layers, layer children under checkpointing, and CUDA graphs (the
    seeds are refilled in place between replays)."""
    checkpointing = form == "blocks"
    model = _lora_model(tmp_path, "llama", "qlora", checkpointing, dropout=0.1)
    n = 7 * TINY["llama"]["num_hidden_layers"]
    assert fast.cheap_dropout(model, fast.SeededDropout) == n and fast.reseed(model) == n
    ids = torch.randint(0, TINY["llama"]["vocab_size"], (2, 300), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.manual_seed(5)
    ref_loss, ref_grads = _loss_and_grads(model, reference_loss_sum, batch)
    torch.manual_seed(6)
    other_loss, _ = _loss_and_grads(model, reference_loss_sum, batch)
    assert other_loss != ref_loss  # other seeds, other masks
    mode = "reduce-overhead" if form == "cudagraphs" else None
    if checkpointing:
        fast.compile_blocks(model, mode, budget=0.5)
    else:
        fast.compile_layers(model, mode, budget=0.5)
    assert fast.reseed(model) == n  # as speedups calls it again: no second hook
    for _ in range(3):  # CUDA graphs: recorded, then replayed
        fast.new_graph_step()
        torch.manual_seed(5)
        fast_loss, fast_grads = _loss_and_grads(model, loss_sum, batch)
        torch.testing.assert_close(fast_loss, ref_loss, rtol=2e-3, atol=0)
        for got, want in zip(fast_grads, ref_grads):
            assert ((got - want).norm() / want.norm()).item() < 3e-2
    fast.new_graph_step()
    torch.manual_seed(6)
    assert _loss_and_grads(model, loss_sum, batch)[0] != fast_loss  # train's loss draws new seeds too


@pytest.mark.parametrize("arch,compiled", [("llama", False), ("llama", True), ("qwen3", True)])
def test_packed_rows_attend_within_examples_like_the_block_diagonal_mask(tmp_path, monkeypatch, arch, compiled):
    """Packed rows on CUDA: segment_attention's varlen flash-attention gives the loss and gradients of
    transformers' SDPA under the block-diagonal mask (the reference), eager and in compiled layers;
    unpacked batches still take SDPA."""
    from lorakit.data.render import Rendered
    from lorakit.train.batches import collate, to_device

    torch.manual_seed(0)
    model = _lora_model(tmp_path, arch, "qlora", False)
    base = model.get_base_model()
    assert base.config._attn_implementation == fast.SEGMENT_ATTENTION  # attach_lora set it

    def example(n):
        ids = torch.randint(3, TINY[arch]["vocab_size"], (n,)).tolist()
        return Rendered(ids, [-100] * (n // 3) + ids[n // 3:])

    packed = to_device(collate([[example(70), example(120), example(50)], [example(200)],
                                [example(90), example(110), example(30)]], pad_id=0, width=256), torch.device("cuda"))
    # as many trained tokens (the same loss chunks), more examples: 33 segment offsets instead of 17
    more = to_device(collate([[example(70), example(120), example(50)], [example(n) for n in [20] * 8 + [16] * 2],
                              [example(90), example(110), example(30)]], pad_id=0, width=256), torch.device("cuda"))
    assert more["cu_seqlens"].shape != packed["cu_seqlens"].shape
    base.set_attn_implementation("sdpa")
    ref_loss, ref_grads = _loss_and_grads(model, loss_sum, packed)
    ref_more = _loss_and_grads(model, loss_sum, more)[0]
    base.set_attn_implementation(fast.SEGMENT_ATTENTION)
    calls = []
    varlen = fast._VARLEN
    if compiled:
        fast.speedups(model, torch.device("cuda"))
    else:
        monkeypatch.setattr(fast, "_VARLEN", lambda *a, **k: calls.append(a[5]) or varlen(*a, **k))
    for _ in range(2):
        got_loss, got_grads = _loss_and_grads(model, loss_sum, packed)
        torch.testing.assert_close(got_loss, ref_loss, rtol=2e-3, atol=0)
        for got, want in zip(got_grads, ref_grads):  # bf16: flash and SDPA's masked kernel round apart
            assert ((got - want).norm() / want.norm()).item() < 3e-2
    assert compiled or calls == [256] * 2 * TINY[arch]["num_hidden_layers"]  # every layer, the row length
    if compiled:  # another number of examples runs the same compiled layers (loss.model_inputs marks it dynamic)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        torch.testing.assert_close(_loss_and_grads(model, loss_sum, more)[0], ref_more, rtol=2e-3, atol=0)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", False)
    ids = torch.randint(0, TINY[arch]["vocab_size"], (2, 256), device="cuda")
    plain = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    got = _loss_and_grads(model, loss_sum, plain)[0]
    base.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, _loss_and_grads(model, loss_sum, plain)[0], rtol=2e-3, atol=0)
    assert len(calls) in (0, 2 * TINY[arch]["num_hidden_layers"])  # unpacked: no varlen call


def test_compiled_cross_entropy_step_matches_reference():
    rows, vocab = int(torch.randint(1000, 3000, ())), 50_257  # a fresh odd shape: the symbolic path too
    logits = (torch.randn(rows, vocab, device="cuda") * 4).to(torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    ref_loss, ref_grad = chunk_loss_and_grad(logits, target)
    got_loss, got_grad = fast.compiled(fused_chunk_loss_and_grad)(logits, target)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad.float(), ref_grad, rtol=1e-2, atol=1e-6)


def test_chunked_cross_entropy_on_cuda_matches_full_logits():
    hidden = torch.randn(5000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(512, 8000, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    target = torch.randint(0, 8000, (5000,), device="cuda")
    got = chunked_cross_entropy_sum(head, hidden, target, chunk=2048)  # 3 chunks, the last one short
    (got_grad,) = torch.autograd.grad(got, hidden)
    want = F.cross_entropy(head(hidden).float(), target, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert ((got_grad.float() - want_grad.float()).norm() / want_grad.float().norm()).item() < 1e-2


def test_fused_adamw_matches_the_default_implementation():
    """train.loop.adamw(fused=True), the CUDA default, against torch's foreach AdamW: 5 steps from the
    same parameters and gradients (LoRA-shaped fp32 tensors), weight decay on."""
    from lorakit.train.loop import adamw

    torch.manual_seed(0)
    shapes = [(16, 4096), (14336, 16), (16, 1024), (8, 3)]
    start = [torch.randn(s, device="cuda") for s in shapes]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(5)]
    finals = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = adamw(params, 1e-3, 0.01, fused=fused)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        finals.append(params)
    for ref, got in zip(*finals):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_batches_reach_the_gpu_unchanged_without_blocking():
    """batches.to_device copies from pinned memory asynchronously: the values must be the CPU ones."""
    from lorakit.train.batches import to_device

    batch = {"input_ids": torch.randint(0, 1000, (8, 2048)), "max_seqlen": 7}
    moved = to_device(batch, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved["max_seqlen"] == 7 and moved["input_ids"].is_cuda
    assert torch.equal(moved["input_ids"].cpu(), batch["input_ids"])



@pytest.fixture(scope="module")
def gpu_tiny_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer from LORAKIT_TEST_TOKENIZER (the GPU machine
    has no embedded model: carry tokenizer.json, tokenizer_config.json and chat_template.jinja)."""
    import os

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = os.environ.get("LORAKIT_TEST_TOKENIZER")
    if not source:
        pytest.skip("set LORAKIT_TEST_TOKENIZER to a folder with SmolLM2's tokenizer files")
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("gpu-tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("packing", [False, True])
def test_training_with_cuda_graphs_follows_the_eager_run(gpu_tiny_dir, overfit_config, tmp_path, packing):
    """lorakit.train with train.compile false / true / cudagraphs on the same data and seed: the same
    loss per step (bf16 rounding apart), going down; CUDA graphs pad every batch to data.max_length
    (packed rows: their segment offsets to a power of two too)."""
    import json

    from lorakit.api import train

    losses = {}
    for mode in ("false", "true", "cudagraphs", "fp8"):
        cfg = load_config(overfit_config, overrides=[f"model={gpu_tiny_dir}", f"data.packing={packing}",
                                                     f"train.compile={'true' if mode == 'fp8' else mode}",
                                                     f"train.fp8={mode == 'fp8'}",
                                                     "train.precision=bf16", "train.batch_size=4",
                                                     f"output_dir={tmp_path / mode}"])
        train(cfg)
        losses[mode] = [json.loads(line)["loss"] for line in open(tmp_path / mode / "metrics.jsonl")]
    assert losses["false"][-1] < losses["false"][0] - 0.3, losses  # a random 2-layer model: 10.9 -> 10.1 on CPU
    for mode in ("true", "cudagraphs"):
        torch.testing.assert_close(torch.tensor(losses[mode]), torch.tensor(losses["false"]), rtol=2e-2, atol=0,
                                   msg=lambda m: f"{m}\n{losses}")
    assert losses["fp8"][-1] < losses["fp8"][0] - 0.3, losses  # FP8 is not exact: it must still learn
    torch.testing.assert_close(torch.tensor(losses["fp8"]), torch.tensor(losses["false"]), rtol=5e-2, atol=0,
                               msg=lambda m: f"{m}\n{losses}")


def test_qlora_training_with_the_dequant_cache_follows_the_eager_run(gpu_tiny_dir, overfit_config, tmp_path, capsys):
    """lorakit.train on a 4-bit base: compiled with quant.dequant_cache auto (every weight cached on
    this GPU) gives the eager run's loss per step (no cache there: train.compile false)."""
    import json

    from lorakit.api import train

    losses = {}
    for mode in ("false", "true"):
        cfg = load_config(overfit_config, overrides=[f"model={gpu_tiny_dir}", "method=qlora", f"train.compile={mode}",
                                                     "train.precision=bf16", "train.batch_size=4",
                                                     f"output_dir={tmp_path / mode}"])
        train(cfg)
        losses[mode] = [json.loads(line)["loss"] for line in open(tmp_path / mode / "metrics.jsonl")]
    out = capsys.readouterr()
    assert "dequantization cache: " in out.out + out.err
    assert losses["false"][-1] < losses["false"][0] - 0.3, losses
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=2e-2, atol=0,
                               msg=lambda m: f"{m}\n{losses}")


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_fp8_matmul_matches_its_plain_reference(tmp_path, method):
    """torch._scaled_mm on the tensor cores against the same e4m3 operands multiplied in fp32."""
    model = _lora_model(tmp_path, "llama", method, False)
    base = model.get_base_model().model.layers[0].mlp.gate_proj.base_layer
    fp8.attach(model)
    frozen = base.forward.__self__
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # 300: rows padded to 16
    dy = torch.randn(300, 704, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (fp8.fp8_linear, fp8.reference_linear):
        y = fn(x, frozen.stored, frozen.row_scale, frozen.col_scale)
        (dx,) = torch.autograd.grad(y, x, dy)
        outs.append((y.float(), dx.float()))
    for got, want in zip(*outs):
        assert ((got - want).norm() / want.norm()).item() < 2e-3
    exact = x.detach().float() @ fp8.dequantize(*frozen.stored).float().t()
    assert ((outs[0][0] - exact).norm() / exact.norm()).item() < 0.08  # e4m3: 3 mantissa bits per operand


def _relative(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


def test_compiled_fp8_layers_match_eager_fp8_and_stay_near_bf16(tmp_path):
    model = _lora_model(tmp_path, "llama", "qlora", False)
    ids = torch.randint(0, TINY["llama"]["vocab_size"], (2, 300), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    bf16_loss, bf16_grads = _loss_and_grads(model, reference_loss_sum, batch)
    assert fp8.attach(model) == 7 * TINY["llama"]["num_hidden_layers"]
    eager_loss, eager_grads = _loss_and_grads(model, reference_loss_sum, batch)
    fast.speedups(model, torch.device("cuda"))
    for _ in range(2):
        fast_loss, fast_grads = _loss_and_grads(model, loss_sum, batch)
        torch.testing.assert_close(fast_loss, eager_loss, rtol=5e-3, atol=0)
        torch.testing.assert_close(fast_loss, bf16_loss, rtol=1e-2, atol=0)
        # FP8 rounding of every base matmul: on this 256-wide random model the adapter gradient moves by
        # ~9% from bf16 (measured on CPU), up to 15% for single q/k tensors; on the 8B, 0.5%
        assert _relative(_flat(fast_grads), _flat(eager_grads)) < 0.1
        assert _relative(_flat(fast_grads), _flat(bf16_grads)) < 0.15
        assert max(_relative(got, want) for got, want in zip(fast_grads, bf16_grads)) < 0.25
