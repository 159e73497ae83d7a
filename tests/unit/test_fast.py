"""The fast path's CPU side: nothing is compiled off CUDA, the CPU loss keeps its eager reference step,
and the compiler-friendly CE step computes the reference's numbers (checked here in eager mode; the
compiled version is checked against it in tests/gpu/test_fast_gpu.py)."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import models
from lorakit.train import fast
from lorakit.train.loss import (chunk_loss_and_grad, chunked_cross_entropy_sum, columns_loss_and_grad,
                                fused_chunk_loss_and_grad)


def _tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))


def test_dequant_cache_trains_on_the_numbers_bitsandbytes_computes(tiny_model_dir):
    """A cached 4-bit layer (fast.cache_dequantized) gives the loss and LoRA gradients of bitsandbytes'
    own matmul, caches whole weights only while the budget lasts, runs bitsandbytes' path in eval mode,
    and leaves the state dict as it was."""
    from lorakit.config import load_config

    cfg = load_config(overrides={"model": tiny_model_dir, "method": "qlora", "lora.dropout": 0.0},
                      require_train=False)
    model = models.attach_lora(models.load_base(cfg, tiny_model_dir, models.resolve_precision("fp32", torch.device("cpu")),
                                                  torch.device("cpu")), cfg, False)
    with models.dequantizing_4bit(model):  # as train runs it: no CPU repacking in eval mode
        _check_dequant_cache(model)


def _check_dequant_cache(model):
    from lorakit.train.loss import reference_loss_sum

    for name, p in model.named_parameters():  # B = 0 would hide the adapter from the loss
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def loss_and_grads():
        model.train()
        value = reference_loss_sum(model, batch)
        value.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return value.detach(), grads

    want_loss, want_grads = loss_and_grads()
    model.eval()
    with torch.no_grad():
        want_eval = model(**batch).logits
    keys = list(model.state_dict())
    layers = fast.decoder_layers(model)
    bases = [[m.base_layer for m in layer.modules() if hasattr(m, "lora_A")] for layer in layers]
    nbytes = [b.in_features * b.out_features * 4 for b in bases[0]]  # fp32 compute dtype on the CPU
    # room for the two largest kinds (gate_proj and up_proj, 32 x 128) in every layer, and some to spare
    budget = len(layers) * (sorted(nbytes)[-1] + sorted(nbytes)[-2]) + min(nbytes)
    assert fast.cache_dequantized(model, budget) == budget - min(nbytes)
    cached = [[fast._cached(b) for b in layer] for layer in bases]
    assert cached[0] == cached[1] and sum(cached[0]) == 2  # the same projections in every layer
    assert fast.cache_dequantized(model, float("inf")) == len(layers) * sum(nbytes) - (budget - min(nbytes))
    assert all(fast._cached(b) for layer in bases for b in layer)  # the rest, none cached twice
    got_loss, got_grads = loss_and_grads()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want_eval)
    assert list(model.state_dict()) == keys


def test_speedups_leave_a_cpu_model_untouched():
    model = _tiny_lora()
    assert fast.speedups(model, torch.device("cpu")) is model
    assert len(fast.decoder_layers(model)) == 2
    assert all(layer._compiled_call_impl is None for layer in fast.decoder_layers(model))


@pytest.mark.parametrize("checkpointing,form", [(False, "layers"), (True, "blocks")])
def test_speedups_compile_blocks_when_checkpointing(monkeypatch, checkpointing, form):
    """Checkpointing asks for memory: the layer stays eager so its checkpoint keeps only its input."""
    chosen = []
    monkeypatch.setattr(fast, "compile_layers", lambda model, mode, budget: chosen.append(("layers", mode, budget)))
    monkeypatch.setattr(fast, "compile_blocks", lambda model, mode, budget: chosen.append(("blocks", mode, budget)))
    model = _tiny_lora()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert fast.checkpointing(model) == checkpointing
    fast.speedups(model, torch.device("cuda"))  # the choice only; compiling itself is tested in tests/gpu
    fast.speedups(model, torch.device("cuda"), cudagraphs=True)
    monkeypatch.setattr(fast, "LARGE_MODEL", model.num_parameters() - 1)  # large models recompute cheap results
    fast.speedups(model, torch.device("cuda"))
    assert chosen == [(form, None, 1.0), (form, "reduce-overhead", 1.0), (form, None, fast.ACTIVATION_BUDGET)]


def test_cpu_cross_entropy_never_compiles(monkeypatch):
    def refuse(fn):
        raise AssertionError("the CPU path must not compile")

    monkeypatch.setattr(fast, "compiled", refuse)
    hidden = torch.randn(10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    target = torch.randint(0, 30, (10,))
    got = chunked_cross_entropy_sum(head, hidden, target, chunk=4)
    torch.testing.assert_close(got, F.cross_entropy(head(hidden), target, reduction="sum"))


def test_cpu_chunk_step_writes_the_reference_gradient_over_transposed_logits():
    logits = torch.randn(37, 301) * 3 + 40  # large logits: the max must be taken out before exp
    target = torch.randint(0, 301, (37,))
    want_loss, want_grad = chunk_loss_and_grad(logits, target)
    buffer = torch.zeros(301, 50)  # [vocab, tokens], wider than the chunk, as _cpu_chunks reuses it
    columns = buffer[:, :37]
    columns.copy_(logits.t())
    got_loss = columns_loss_and_grad(columns, target)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(columns.t(), want_grad, rtol=1e-5, atol=1e-7)  # written over the logits
    assert (buffer[:, 37:] == 0).all()


def test_cpu_cross_entropy_over_a_real_vocabulary_in_small_chunks():
    """49,152 entries (SmolLM2): chunks of 256 tokens and a short last one; loss and gradient as the
    full computation."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    head = torch.nn.Linear(16, 49152, bias=False).requires_grad_(False)
    target = torch.randint(0, 49152, (300,))
    got = chunked_cross_entropy_sum(head, hidden, target)
    (got_grad,) = torch.autograd.grad(got, hidden)
    want = F.cross_entropy(head(hidden), target, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chunk_step_computes_the_reference(dtype):
    logits = (torch.randn(37, 301) * 3).to(dtype)
    target = torch.randint(0, 301, (37,))
    want_loss, want_grad = chunk_loss_and_grad(logits, target)
    got_loss, got_grad = fused_chunk_loss_and_grad(logits, target)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad.float(), want_grad.to(dtype).float(), rtol=1e-2, atol=1e-6)


def test_bytes_dropout_matches_nn_dropout_in_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(512, 1024, requires_grad=True)
    drop = fast.BytesDropout(0.1)
    out = drop(x)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.002  # the rate nn.Dropout(0.1) draws
    assert torch.equal(out[kept], x[kept] * drop.scale) and drop.scale == pytest.approx(1 / 0.9, rel=1e-5)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, kept * drop.scale)  # gradient flows through the kept elements only
    reference = torch.nn.Dropout(0.1)(torch.ones(512, 1024))
    assert reference.mean().item() == pytest.approx(drop(torch.ones(512, 1024)).mean().item(), abs=0.01)


def test_bytes_dropout_is_seeded_and_off_in_eval():
    x = torch.randn(64, 33)
    drop = fast.BytesDropout(0.5)
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    assert torch.equal(a, drop(x)) and not torch.equal(a, drop(x))
    assert drop.eval()(x) is x and fast.BytesDropout(0.0)(x) is x


def test_random_words_give_uniform_16_bit_draws():
    """Each 16-bit quarter of the words, and each of its bits, is uniform (the draws BytesDropout cuts)."""
    torch.manual_seed(0)
    draws = fast.random_words(1 << 18).view(torch.int16).view(-1, 4).int()
    for quarter in draws.unbind(1):
        top = torch.bincount(((quarter + 32768) >> 12).flatten(), minlength=16).float() / quarter.numel()
        assert (top - 1 / 16).abs().max() < 0.003
        bits = torch.stack([(quarter >> b) & 1 for b in range(16)]).float().mean(1)
        assert (bits - 0.5).abs().max() < 0.01


def test_cpu_lora_layers_scale_lora_a_output_as_dropout_would(tiny_model_dir):
    """On CPU the dropout leaves kept inputs unscaled and LoRA A's output is scaled: each layer's
    output and gradients are those of PEFT's lora_B(lora_A(x * keep / (1 - p))) with the same mask."""
    from lorakit.config import Config

    cfg = Config(model=tiny_model_dir)
    base = models.load_base(cfg, tiny_model_dir, models.resolve_precision("fp32", torch.device("cpu")),
                            torch.device("cpu"))
    model = models.attach_lora(base, cfg, gradient_checkpointing=False)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    drop, scale = layer.lora_dropout["default"], layer.lora_dropout["default"].scale
    dropped = []
    handle = drop.register_forward_hook(lambda m, args, out: dropped.append(out))
    model.train()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    handle.remove()
    keep = dropped[0] != 0
    assert 0 < keep.float().mean() < 1 and torch.equal(dropped[0][keep], x[keep])  # unscaled
    grads = torch.autograd.grad(out.square().sum(), [x, layer.lora_A["default"].weight])
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    lora_a = torch.nn.functional.linear(torch.where(keep, x * scale, 0), a.weight)  # a() itself would scale
    want = layer.base_layer(x) + b(lora_a) * layer.scaling["default"]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, torch.autograd.grad(want.square().sum(), [x, a.weight])):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    model.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + b(a(x)) * layer.scaling["default"])


def test_cpu_training_gets_bytes_dropout(tiny_model_dir):
    from lorakit.config import Config

    cfg = Config(model=tiny_model_dir)
    base = models.load_base(cfg, tiny_model_dir, models.resolve_precision("fp32", torch.device("cpu")),
                            torch.device("cpu"))
    model = models.attach_lora(base, cfg, gradient_checkpointing=False)
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(isinstance(d, fast.BytesDropout) and d.p == cfg.lora.dropout for d in drops)


def test_seeded_dropout_matches_nn_dropout_in_rate_scale_and_gradient():
    torch.manual_seed(0)
    drop = fast.SeededDropout(0.1)
    drop.seed.fill_(12345)
    x = torch.randn(512, 1024, requires_grad=True)
    out = drop(x)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.002
    assert torch.equal(out[kept], x[kept] * drop.scale)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, kept * drop.scale)
    assert drop.eval()(x) is x and fast.SeededDropout(0.0)(x) is x


@pytest.mark.parametrize("index", ["int32", "int64"])
def test_seeded_dropout_mask_is_a_function_of_its_seed_only(monkeypatch, index):
    """Eager and compiled code draw the same mask from the same seed (the compiler may recompute it in
    the backward); neighbouring elements and seeds are uncorrelated; reseed refills the seeds from torch's
    generator before every forward of the model. `index`: the int32 index of masks under INT32_INDEX
    elements, and the int64 one of larger masks (the limit lowered to reach it)."""
    if index == "int64":
        monkeypatch.setattr(fast, "INT32_INDEX", 0)
    seed = torch.tensor(7 + (5 << 40))  # seeds use 62 bits
    assert abs(fast.seeded_keep(seed, (1 << 20,), 3277).float().mean().item() - (1 - 3277 / 65536)) < 0.002
    mask = fast.seeded_keep(seed, (64, 1000), 3277)
    assert torch.equal(torch.compile(lambda s: fast.seeded_keep(s, (64, 1000), 3277))(seed), mask)
    flat = fast.seeded_keep(seed, (1 << 20,), 3277).float()
    other = fast.seeded_keep(seed + 1, (1 << 20,), 3277).float()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([flat, other]))[0, 1].item()) < 0.01

    model = torch.nn.Sequential(fast.SeededDropout(0.5), fast.SeededDropout(0.5))
    assert fast.reseed(model) == 2
    x = torch.ones(4, 8)
    torch.manual_seed(3)
    first = model(x)
    seeds = [d.seed.item() for d in model]
    assert seeds[0] != seeds[1]
    assert not torch.equal(model(x), first)  # a new forward, new seeds
    torch.manual_seed(3)
    assert torch.equal(model(x), first)


def test_compiled_layers_with_seeded_dropout_match_eager(tmp_path):
    """With dropout on, the compiled layers give the eager model's loss and gradients: same seeds, same
    masks, though the compiled backward recomputes them from the seeds (it keeps no mask; torch's dropout,
    recomputed under an activation budget below 1, would draw other random numbers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.config import Config
    from lorakit.train.loss import loss_sum, reference_loss_sum

    torch.manual_seed(0)  # one layer: one compiled graph
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)).save_pretrained(tmp_path)
    cfg = Config(model=str(tmp_path))
    cfg.lora.dropout = 0.2
    base = models.load_base(cfg, str(tmp_path), models.resolve_precision("fp32", torch.device("cpu")),
                            torch.device("cpu"))
    model = models.attach_lora(base, cfg, gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    for module in model.modules():  # as speedups does on CUDA
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name in drops:
                drops[name] = torch.nn.Dropout(cfg.lora.dropout)
    assert fast.cheap_dropout(model, fast.SeededDropout) == 7 and fast.reseed(model) == 7
    model.train()
    ids = torch.randint(0, 1000, (2, 48))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def loss_and_grads(loss=reference_loss_sum):
        torch.manual_seed(5)
        value = loss(model, batch)
        value.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return value.detach(), grads

    eager = loss_and_grads()
    fast.compile_layers(model, budget=1.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compiled = loss_and_grads(loss_sum)  # train's loss calls the decoder directly: the seeds are drawn there
    assert saved and not [t.shape for t in saved if t.dtype == torch.bool]  # the masks are recomputed
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled[1], eager[1]):  # chunked against full-logits loss: fp32 rounding
        assert ((got - want).norm() / want.norm()).item() < 1e-4
    torch.manual_seed(6)
    assert not torch.equal(loss_sum(model, batch).detach(), compiled[0])  # other seeds, other masks


def test_varlen_attention_is_used_only_where_every_gpu_runs_flash_attention(monkeypatch):
    """Packed rows on CUDA take varlen flash-attention only when torch has it and every visible GPU is
    Ampere or newer; elsewhere (a T4, a V100, no GPU) they keep SDPA under the block-diagonal mask."""
    def ready(capabilities, available=True):
        monkeypatch.setattr(fast, "_VARLEN_READY", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
        return fast.varlen_ready(), fast._segments_on(torch.device("cuda"))

    has_varlen = fast._VARLEN is not None
    assert ready([(9, 0), (8, 0)]) == (has_varlen, has_varlen)
    assert ready([(9, 0), (7, 5)]) == (False, False)
    assert ready([(9, 0)], available=False) == (False, False)
    assert fast._segments_on(torch.device("cpu"))


def test_segment_attention_leaves_non_causal_calls_to_sdpa():
    """A call marked not causal (transformers passes is_causal over the layer's own flag) attends to the
    whole row, as transformers' SDPA does with it, even when segment offsets come along."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    got, _ = fast.segment_attention(module, q, k, v, None, cu_seq_lens_q=cu, is_causal=False)
    want, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=False)
    torch.testing.assert_close(got, want)
    causal, _ = fast.segment_attention(module, q, k, v, None, cu_seq_lens_q=cu)
    assert not torch.allclose(causal, want)


def test_segment_attention_matches_the_block_diagonal_mask(tiny_model_dir, monkeypatch):
    """Packed rows on the CPU: attention example by example gives the loss and gradients of transformers'
    SDPA under the block-diagonal mask (the reference), and unpacked batches still take SDPA."""
    from transformers import AutoModelForCausalLM

    from lorakit.data.render import Rendered
    from lorakit.train.batches import collate
    from lorakit.train.loss import loss_sum

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # 4 heads, 2 kv heads
    assert model.config._attn_implementation == "sdpa"
    model.train()

    def example(n):
        ids = torch.randint(3, 300, (n,)).tolist()
        return Rendered(ids, [-100] * (n // 2) + ids[n // 2:])

    rows = [[example(7), example(12), example(5)], [example(20)], [example(9), example(11)]]
    packed = collate(rows, pad_id=0)
    assert packed["cu_seqlens"].tolist() == [0, 7, 19, 24, 44, 48, 57, 68, 72]  # examples, and each padding

    def loss_and_grads(batch):
        value = loss_sum(model, batch)
        value.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return value.detach(), grads

    reference = loss_and_grads(packed)
    plain = collate([example(10), example(6)], pad_id=0)
    plain_reference = loss_and_grads(plain)
    calls = []
    attend = fast._attend_segments
    monkeypatch.setattr(fast, "_attend_segments", lambda *a: calls.append(a[3]) or attend(*a))
    assert fast.use_segment_attention(model)
    got = loss_and_grads(packed)
    assert calls == [[7, 12, 5, 20, 4, 9, 11, 4]] * 2  # both layers: each example and padding alone
    torch.testing.assert_close(got[0], reference[0], rtol=1e-5, atol=1e-5)
    for g, want in zip(got[1], reference[1]):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
    fixed = collate(rows, pad_id=0, width=26)  # a fixed width, as for CUDA graphs: 9 segments, padded to 16
    assert fixed["cu_seqlens"].tolist() == [0, 7, 19, 24, 26, 46, 52, 61, 72, 78] + [78] * 7
    got = loss_and_grads(fixed)
    assert calls[-1] == [7, 12, 5, 2, 20, 6, 9, 11, 6]  # empty segments skipped
    torch.testing.assert_close(got[0], reference[0], rtol=1e-5, atol=1e-5)
    calls.clear()
    got = loss_and_grads(plain)
    assert not calls  # no segments: SDPA with transformers' mask
    torch.testing.assert_close(got[0], plain_reference[0], rtol=0, atol=0)


def test_bf16_segments_take_the_math_kernel_when_short_and_stay_exact():
    """CPU packed rows in bf16: examples up to fast.MATH_SEGMENT tokens go to SDPA's math kernel,
    longer ones to the flash kernel; outputs and gradients stay within bf16 rounding of fp64 causal
    attention computed example by example."""
    from unittest import mock

    torch.manual_seed(0)
    lengths = [5, fast.MATH_SEGMENT, fast.MATH_SEGMENT + 40, 19]
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, 16, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn(4, total, 16, dtype=torch.bfloat16)
    used = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        used.append((query.shape[2], torch._C._get_math_sdp_enabled(), torch._C._get_flash_sdp_enabled()))
        return sdpa(query, *args, **kwargs)

    with mock.patch.object(fast.F, "scaled_dot_product_attention", spy):
        out = fast._attend_segments(q, k, v, lengths, None)
    out.backward(grad)
    assert used == [(n, True, n > fast.MATH_SEGMENT) for n in lengths]  # the math kernel alone for short ones

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    parts, at = [], 0
    for n in lengths:
        s = slice(at, at + n)
        parts.append(F.scaled_dot_product_attention(q64[:, :, s], k64[:, :, s], v64[:, :, s], is_causal=True,
                                                    enable_gqa=True)[0])
        at += n
    want = torch.cat(parts, 1)
    want.backward(grad.double())
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)
