"""The loop's parts on a tiny random model: loss fast path, step schedule, checkpoints, lr schedule."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from lorakit.config import load_config
from lorakit.data.render import Rendered
from lorakit.train import checkpoint
from lorakit.train.batches import IGNORE, Schedule, collate, trained_tokens
from lorakit.train.loop import _lr_lambda, update_before_wait
from lorakit.train.loss import loss_sum, model_inputs, reference_loss_sum


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def _batch(pad_id: int) -> dict:
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, start in ((12, 5), (7, 3), (20, 15)):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        examples.append(Rendered(ids, [IGNORE] * start + ids[start:]))
    return collate(examples, pad_id)


def test_fast_loss_matches_full_logits_reference(lora_model):
    batch = _batch(pad_id=2)
    fast = loss_sum(lora_model, batch)
    fast.backward()
    fast_grads = [p.grad.clone() for p in lora_model.parameters() if p.requires_grad]
    lora_model.zero_grad()
    ref = reference_loss_sum(lora_model, batch)
    ref.backward()
    ref_grads = [p.grad for p in lora_model.parameters() if p.requires_grad]
    assert torch.allclose(fast, ref, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(fast_grads, ref_grads))


def test_padded_batches_need_no_attention_mask(lora_model):
    """loss_sum calls the model without the padding mask (right padding: no real token sees a pad);
    the loss and gradients are those of the model given the mask."""
    batch = _batch(pad_id=2)
    assert "attention_mask" not in model_inputs(batch)
    loss_sum(lora_model, batch).backward()
    grads = [p.grad.clone() for p in lora_model.parameters() if p.requires_grad]
    lora_model.zero_grad()
    logits = lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    masked = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                               ignore_index=IGNORE, reduction="sum")
    masked.backward()
    assert torch.allclose(loss_sum(lora_model, batch), masked, rtol=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4)
               for a, p in zip(grads, [p for p in lora_model.parameters() if p.requires_grad]))


def test_update_before_wait_skips_a_non_finite_step_on_the_device():
    """The loop queues fused AdamW before reading the loss; a non-finite loss or norm changes nothing."""
    accelerator = SimpleNamespace(num_processes=1, scaler=None)
    weights = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([weights], lr=0.1, fused=True)
    for loss, norm, moved in ((1.0, math.nan, False), (math.inf, 1.0, False), (1.0, 1.0, True), (math.nan, 1.0, False)):
        weights.grad = torch.full((3,), 0.5)
        before = weights.detach().clone()
        assert update_before_wait(accelerator, opt, torch.tensor(loss), torch.tensor(norm))
        assert weights.grad is None and not hasattr(opt, "found_inf")
        assert (not torch.equal(weights.detach(), before)) == moved
    assert float(opt.state[weights]["step"]) == 1  # skipped steps are not counted
    plain = torch.optim.AdamW([weights], lr=0.1)  # not fused: the loop steps after its wait, as before
    assert not update_before_wait(accelerator, plain, torch.tensor(1.0), torch.tensor(1.0))
    assert not update_before_wait(SimpleNamespace(num_processes=2, scaler=None), opt, torch.tensor(1.0),
                                  torch.tensor(1.0))


def test_collate_pads_right_and_masks_padding():
    batch = _batch(pad_id=2)
    assert batch["input_ids"].shape == (3, 20)
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 13
    assert (batch["labels"][1, 7:] == IGNORE).all()
    assert trained_tokens(batch["labels"]) == (12 - 5) + (7 - 3) + (20 - 15)


def test_schedule_covers_each_epoch_once_and_is_a_pure_function_of_step():
    s = Schedule(n_examples=10, batch_size=2, grad_accum=2, seed=3)
    assert s.steps_per_epoch == 3
    epoch0 = [i for step in range(3) for mb in s.step_indices(step) for i in mb]
    assert sorted(epoch0) == list(range(10))
    assert s.step_indices(4) == Schedule(10, 2, 2, 3).step_indices(4)  # resume replays the same samples
    assert s.step_indices(3) != s.step_indices(0)  # a new shuffle each epoch
    assert s.total_steps(epochs=2, max_steps=None) == 6 and s.total_steps(1, max_steps=4) == 4


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = load_config(overrides=["train.warmup_ratio=0.1", "train.scheduler=cosine"], require_train=False)
    f = _lr_lambda(cfg, total=100)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(99) < 0.01
    assert _lr_lambda(load_config(overrides=["train.scheduler=constant"], require_train=False), 100)(50) == 1.0


def test_checkpoint_roundtrip_manifest_and_rotation(tmp_path, lora_model):
    opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_sum(lora_model, _batch(2)).backward()
    opt.step()
    for step in (1, 2, 3):
        torch.manual_seed(123)
        checkpoint.save(tmp_path, step, lora_model, opt, sched, {"note": "x"}, keep=2)
    expected_next = torch.rand(3)
    kept = checkpoint.complete_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-2", "step-3"]
    assert checkpoint.verify(kept[-1]) is None
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    for p in lora_model.parameters():
        if p.requires_grad:
            p.data.zero_()
    state = checkpoint.load(kept[-1], lora_model, opt, sched)
    assert state["step"] == 3 and state["note"] == "x"
    assert all(torch.equal(before[n], p) for n, p in lora_model.named_parameters() if p.requires_grad)
    assert torch.equal(torch.rand(3), expected_next)  # RNG state restored
    (kept[-1] / "adapter.safetensors").write_bytes(b"corrupt")
    assert "checksum" in checkpoint.verify(kept[-1])
    assert set(json.loads((kept[0] / "manifest.json").read_text())) == {"adapter.safetensors", "trainer.pt",
                                                                         "state.json"}


def test_chunked_cross_entropy_matches_plain_value_and_gradient():
    from lorakit.train.loss import chunked_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)  # frozen, as under LoRA
    hidden = torch.randn(37, 16, requires_grad=True)
    target = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(head(hidden), target, reduction="sum")
    (2.5 * plain).backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    chunked = chunked_cross_entropy_sum(head, hidden, target, chunk=8)  # 5 chunks, the last one short
    (2.5 * chunked).backward()  # the upstream gradient is applied in backward
    assert torch.allclose(plain, chunked, rtol=1e-6)
    assert torch.allclose(expected, hidden.grad, atol=1e-6)


def test_cudagraphs_needs_one_micro_batch_per_step(overfit_config, tiny_model_dir, tmp_path):
    """train.compile: cudagraphs with accumulation is refused on every device, before anything loads."""
    from lorakit.errors import LorakitError
    from lorakit.train.loop import train

    cfg = load_config(overfit_config, overrides=[f"model={tiny_model_dir}", "train.compile=cudagraphs",
                                                 "train.grad_accum=2", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(LorakitError, match=r"needs train.grad_accum: 1 \(it is 2\)"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    (["train.fp8=true", "train.compile=false"], r"train.fp8 runs inside the compiled layers, so it needs"),
    (["train.fp8=true", "train.distributed=fsdp"], r"train.fp8 is not available with train.distributed: fsdp"),
])
def test_fp8_refuses_settings_it_cannot_run_with(overfit_config, tiny_model_dir, tmp_path, overrides, message):
    from lorakit.errors import LorakitError
    from lorakit.train.loop import train

    cfg = load_config(overfit_config, overrides=[f"model={tiny_model_dir}", *overrides,
                                                 f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(LorakitError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_fp8_is_ignored_on_cpu_with_a_note(overfit_config, capsys):
    from lorakit.train.loop import _fast_path

    cfg = load_config(overfit_config, overrides=["train.fp8=true"])
    assert _fast_path(cfg, torch.device("cpu")) == (False, False)
    assert "train.fp8: ignored on cpu" in capsys.readouterr().err


def test_collate_pads_to_a_fixed_width():
    rows = [Rendered([1, 2, 3], [IGNORE, 2, 3]), Rendered([4, 5], [IGNORE, 5])]
    batch = collate(rows, pad_id=0, width=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum().item() == 5 and trained_tokens(batch["labels"]) == 3
    assert collate(rows, pad_id=0, width=2)["input_ids"].shape == (2, 3)  # never cuts a row


def test_resume_ignores_the_dequant_cache_but_not_the_quantization(tiny_model_dir):
    """quant.dequant_cache changes speed, not numbers: a run may resume with another value (and from a
    checkpoint written before the key existed); quant.type still must match."""
    from lorakit.train.loop import _changes, run_fingerprint

    def fingerprint(**quant):
        cfg = load_config(overrides={"model": tiny_model_dir, **{f"quant.{k}": v for k, v in quant.items()}},
                          require_train=False)
        return run_fingerprint(cfg, {"fingerprint": "sha256:x"}, tiny_model_dir)

    saved = fingerprint()
    assert _changes(saved, fingerprint(dequant_cache=6)) == []
    assert _changes(saved, fingerprint(type="fp4")) == ["quant.type: 'nf4' → 'fp4'"]


def test_cpu_bf16_training_lets_autocast_cast_lora_inputs_with_the_same_numbers(tiny_model_dir):
    """train's CPU bf16 step: the frozen base in bf16, and LoRA layers given their bf16 input as it is
    (autocast casts it for lora_A) instead of PEFT's fp32 copy. Loss and gradients equal PEFT's path
    to the bit; the input cast is back on after the loop, so the trained model runs outside autocast."""
    from lorakit import models
    from lorakit.train import fast
    from lorakit.train.loop import _training_forward

    cpu = torch.device("cpu")
    precision = models.resolve_precision("bf16", cpu)
    cfg = load_config(overrides={"model": tiny_model_dir, "lora.dropout": 0.2}, require_train=False)
    base = models.load_base(cfg, tiny_model_dir, precision, cpu, training=True)
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    model = models.attach_lora(base, cfg, False)
    seen = []
    for m in model.modules():
        if isinstance(m, fast.BytesDropout):
            m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    batch = _batch(pad_id=2)

    def step(skip_cast: bool):
        seen.clear()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                _training_forward(model, cpu, precision if skip_cast else models.resolve_precision("fp32", cpu)):
            loss = loss_sum(model, batch)
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        return loss, grads, set(seen)

    peft_loss, peft_grads, peft_inputs = step(False)
    loss, grads, inputs = step(True)
    assert peft_inputs == {torch.float32} and inputs == {torch.bfloat16}  # PEFT upcasts every one
    assert torch.equal(loss, peft_loss) and all(torch.equal(a, b) for a, b in zip(grads, peft_grads))
    with torch.no_grad():  # outside autocast: PEFT casts the bf16 input for the fp32 adapter again
        model(input_ids=batch["input_ids"])


def test_qlora_trains_the_same_after_an_evaluation(tiny_model_dir):
    """An eval-mode forward (evaluate_loss) must not change how the 4-bit layers train. bitsandbytes on a
    CPU with AVX512-BF16 repacks the weight then, for a kernel that computes in bf16 and gives the layer's
    input no gradient; train's loop turns that off while it runs (this test fails without it on such a
    CPU, and passes trivially on others)."""
    from lorakit import models
    from lorakit.train.loop import _training_forward

    cpu = torch.device("cpu")
    cfg = load_config(overrides={"model": tiny_model_dir, "method": "qlora", "lora.dropout": 0.0},
                      require_train=False)
    model = models.attach_lora(models.load_base(cfg, tiny_model_dir, models.resolve_precision("fp32", cpu), cpu,
                                                training=True), cfg, False)
    batch = _batch(pad_id=2)

    def loss_and_grads():
        model.train()
        loss = loss_sum(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    with _training_forward(model, cpu, models.resolve_precision("fp32", cpu)):
        before = loss_and_grads()
        model.eval()
        with torch.no_grad():
            loss_sum(model, batch)
        after = loss_and_grads()
    assert torch.equal(before[0], after[0]) and all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
