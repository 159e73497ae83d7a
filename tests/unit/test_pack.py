"""Packing: Best-Fit-Decreasing rows, per-example position ids, and proof that a packed example's
logits and loss equal its unpacked ones on two architectures (fp32, CPU, eager and sdpa)."""

import json
import random

import pytest
import torch

import lorakit
from lorakit.data import Rendered
from lorakit.data.pack import efficiency, pack
from lorakit.train.batches import IGNORE, Schedule, collate, trained_tokens
from lorakit.train.loss import loss_sum, model_inputs, reference_loss_sum


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation, which stalls badly when
    the machine is busy (34 s instead of 2 s for the equivalence tests on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_best_fit_decreasing_fills_the_fullest_row_that_fits():
    lengths = [6, 5, 4, 3, 2]  # capacity 10: 6 opens A, 5 opens B, 4 fits A exactly, 3 -> B, 2 -> B
    rows = pack(lengths, 10)
    assert rows == [[0, 2], [1, 3, 4]]
    assert efficiency(lengths, rows, 10) == 1.0


def test_packing_keeps_every_example_once_within_capacity_and_is_deterministic():
    lengths = [random.Random(i).randint(1, 100) for i in range(500)]
    rows = pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert rows == pack(list(lengths), 128)
    assert efficiency(lengths, rows, 128) > 0.95  # a lower bound BFD reaches on uniform lengths
    with pytest.raises(ValueError, match="longer than the row capacity"):
        pack([129], 128)


def _examples(lengths, seed=1, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Rendered(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def test_collate_packed_rows():
    a, b, c = _examples([3, 2, 4])
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch["input_ids"][0].tolist() == a.input_ids + b.input_ids
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # padding is its own segment
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9, 10]
    # b's first token is not predicted from a's last one
    assert batch["labels"][0].tolist() == [IGNORE, *a.labels[1:], IGNORE, *b.labels[1:]]
    assert trained_tokens(batch["labels"]) == 2 + 1 + 3
    assert batch["max_seqlen"] == 4
    # the loss's positions, worked out on the CPU: each one's next label is trained, in row order
    labels = batch["labels"]
    index = batch["trained_index"]
    assert labels.flatten()[index + 1].tolist() == labels[:, 1:][labels[:, 1:] != IGNORE].tolist()
    assert len(index) == trained_tokens(labels) and (index % labels.shape[1] < labels.shape[1] - 1).all()
    assert "position_ids" not in collate([a, b], pad_id=0)  # single examples: the plain padded batch


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("build", [_llama, _qwen3], ids=["llama", "qwen3"])
def test_packed_logits_and_loss_equal_unpacked(build, attn):
    torch.manual_seed(0)
    model = build().train()  # train mode: the default KV cache must not switch packing detection off
    model.config._attn_implementation = attn
    examples = _examples([12, 7, 20, 5, 9, 1, 30, 2])
    rows = [[examples[i] for i in row] for row in pack([len(e.input_ids) for e in examples], 32)]
    assert any(len(row) > 2 for row in rows)
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for r, row in enumerate(rows):
            at = 0
            for e in row:
                n = len(e.input_ids)
                alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
                torch.testing.assert_close(logits[r, at:at + n], alone, rtol=1e-5, atol=1e-5)
                packed_loss = _span_loss(logits[r], batch["labels"][r], at, n)
                torch.testing.assert_close(packed_loss, loss_sum(model, collate([e], 0)), rtol=1e-5, atol=1e-5)
                at += n
        separate = sum(loss_sum(model, collate([e], 0)) for e in examples)
        torch.testing.assert_close(loss_sum(model, batch), separate, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reference_loss_sum(model, batch), separate, rtol=1e-5, atol=1e-5)
        # the control: the same rows without per-example positions do attend across examples
        leaky = model(input_ids=batch["input_ids"]).logits
        assert (leaky - logits).abs().max() > 1e-3


def _span_loss(logits, labels, at, n):
    target = labels[at + 1:at + n]
    return torch.nn.functional.cross_entropy(logits[at:at + n - 1], target, ignore_index=IGNORE, reduction="sum")


def test_packed_loss_through_peft_matches_the_reference(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    examples = _examples([40, 17, 33, 8, 25], vocab=base.config.vocab_size)
    batch = collate([[examples[i] for i in row] for row in pack([len(e.input_ids) for e in examples], 64)], 2)
    packed = loss_sum(model, batch)
    separate = sum(loss_sum(model, collate([e], 2)) for e in examples)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(reference_loss_sum(model, batch), separate, rtol=1e-5, atol=1e-4)


def test_schedule_draws_packed_rows_as_a_pure_function_of_step():
    rows = pack([random.Random(i).randint(1, 60) for i in range(200)], 64)
    s = Schedule(len(rows), batch_size=4, grad_accum=2, seed=7)
    epoch = [i for step in range(s.steps_per_epoch) for mb in s.step_indices(step) for i in mb]
    assert sorted(epoch) == list(range(len(rows)))
    assert Schedule(len(rows), 4, 2, 7).step_indices(3) == s.step_indices(3)


def test_train_packs_rows(tmp_path, tiny_model_dir):
    lines = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{2 * i}."}]} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = lorakit.load_config(overrides=[f"data.train={tmp_path / 'train.jsonl'}", f"model={tiny_model_dir}",
                                         f"output_dir={tmp_path / 'run'}", "data.max_length=128", "data.packing=true",
                                         "train.max_steps=2", "train.batch_size=2", "train.precision=fp32",
                                         "eval.after_train=false"])
    result = lorakit.train(cfg)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    packing = report["train"]["packing"]
    assert packing["enabled"] and packing["rows"] < 24 and packing["efficiency"] > 0.5
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and steps[0]["tokens"] > 128  # two packed rows hold more than two examples
