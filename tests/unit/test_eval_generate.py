"""The eval decode loop on a tiny random model: greedy equals transformers' generate, rows that stop
leave the batch without changing the others (however the prefill is grouped and the batch compacted),
the reference loss is the training loss, reference tokens taken as a draft give the same answers in
fewer decoding steps, the folded adapter gives PEFT's logits and leaves the base weights as they were,
sampling is seeded, the adapter switch works."""

import importlib

import pytest
import torch

from lorakit.data.render import IGNORE, render
from lorakit.eval.generate import Prompt, Sampling, generate
from lorakit.train.batches import collate, trained_tokens
from lorakit.train.loss import loss_sum

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("Hi.", "What is the capital of France?", "Count to three.", "Say something long about the sea.")]


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # init_lora_weights=False: a random (non-zero) adapter, so base and tuned differ
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _prompts(tokenizer) -> list[Prompt]:
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    return [Prompt(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _reference(model, tokenizer, stop_ids, max_new_tokens):
    """transformers' own batched greedy generate over the same left-padded batch."""
    enc = [p.ids for p in _prompts(tokenizer)]
    width, pad = max(map(len, enc)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_ids, pad_token_id=pad)
    rows = []
    for row in out[:, width:].tolist():
        end = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return rows


def _ids(tokenizer, gens):
    return [tokenizer(g.text, add_special_tokens=False)["input_ids"] for g in gens]


generate_module = importlib.import_module("lorakit.eval.generate")


# prefill: one forward for all rows, or one per row; compaction: at the first row that stops, or never
# (stopped rows ride along to the end); the adapter folded into the weights, or through PEFT
@pytest.mark.parametrize("prefill_tokens,compact,fold", [(1024, 8, True), (16, 1, False)])
def test_greedy_matches_transformers_generate_also_when_rows_stop(peft_model, smol_tokenizer, monkeypatch,
                                                                  prefill_tokens, compact, fold):
    monkeypatch.setattr(generate_module, "_PREFILL_TOKENS", prefill_tokens)
    monkeypatch.setattr(generate_module, "_COMPACT", compact)
    monkeypatch.setattr(generate_module, "_foldable", lambda model: fold)
    never = [len(smol_tokenizer) - 1]
    ref = _reference(peft_model, smol_tokenizer, never, 12)
    gens = generate(peft_model, smol_tokenizer, _prompts(smol_tokenizer), stop_ids=never, max_new_tokens=12, batch_size=4)
    assert [g.new_tokens for g in gens] == [12] * 4 and not any(g.stopped for g in gens)
    assert _ids(smol_tokenizer, gens) == [smol_tokenizer(smol_tokenizer.decode(r, skip_special_tokens=True),
                                                         add_special_tokens=False)["input_ids"] for r in ref]

    stop = [ref[1][2]]  # the token row 1 emits third: row 1 (and any row emitting it) leaves the batch early
    ref = _reference(peft_model, smol_tokenizer, stop, 12)
    gens = generate(peft_model, smol_tokenizer, _prompts(smol_tokenizer), stop_ids=stop, max_new_tokens=12, batch_size=4)
    assert gens[1].stopped and gens[1].new_tokens == 2
    assert [g.new_tokens for g in gens] == [len(r) for r in ref]
    assert [g.text for g in gens] == [smol_tokenizer.decode(r, skip_special_tokens=True) for r in ref]


def test_adapter_switch_and_batching(peft_model, smol_tokenizer):
    kwargs = dict(stop_ids=[smol_tokenizer.eos_token_id], max_new_tokens=8)
    tuned = generate(peft_model, smol_tokenizer, _prompts(smol_tokenizer), batch_size=4, **kwargs)
    base = generate(peft_model, smol_tokenizer, _prompts(smol_tokenizer), batch_size=4, adapter=False, **kwargs)
    assert [g.text for g in base] != [g.text for g in tuned]
    one_by_one = generate(peft_model, smol_tokenizer, _prompts(smol_tokenizer), batch_size=1, **kwargs)
    assert [g.text for g in one_by_one] == [g.text for g in tuned]  # results come back in input order


def test_sampling_is_seeded(peft_model, smol_tokenizer):
    def run(seed):
        return [g.text for g in generate(peft_model, smol_tokenizer, _prompts(smol_tokenizer), stop_ids=[smol_tokenizer.eos_token_id],
                                         max_new_tokens=8, batch_size=2,
                                         sampling=Sampling(temperature=1.0, top_p=0.9, seed=seed))]

    assert run(1) == run(1) and run(1) != run(2)


def test_reference_loss_is_the_training_loss_and_leaves_generation_unchanged(peft_model, smol_tokenizer):
    answers = ["Hello there.", "Paris.", "One, two, three.", "The sea is wide and deep and full of fish."]
    prompts, expected = [], []
    for messages, answer in zip(PROMPTS, answers):
        rendered = render(smol_tokenizer, [*messages, {"role": "assistant", "content": answer}])
        start = rendered.turn_starts[-1]
        prompts.append(Prompt(rendered.input_ids[:start], rendered.input_ids[start:],
                              [label != IGNORE for label in rendered.labels[start:]]))
        batch = collate([rendered], smol_tokenizer.pad_token_id)
        with torch.no_grad():
            expected.append((loss_sum(peft_model, batch).item(), trained_tokens(batch["labels"])))
    kwargs = dict(stop_ids=[smol_tokenizer.eos_token_id], max_new_tokens=8, batch_size=4)
    gens = generate(peft_model, smol_tokenizer, prompts, **kwargs)
    assert [g.loss_tokens for g in gens] == [n for _, n in expected]
    assert [g.loss for g in gens] == pytest.approx([loss for loss, _ in expected], rel=1e-4)
    plain = generate(peft_model, smol_tokenizer, [Prompt(p.ids) for p in prompts], **kwargs)
    assert [g.text for g in gens] == [g.text for g in plain] and all(g.loss_tokens == 0 for g in plain)


def _decoded_rows(model) -> list[int]:
    """Counts the rows of every one-token forward of `model` (a decoding step) into the returned list."""
    rows = []
    model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])) if kwargs["input_ids"].shape[1] == 1
        else None, with_kwargs=True)
    return rows


def test_reference_as_draft_gives_the_same_answers_in_fewer_steps(tiny_model_dir, smol_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    rows = _decoded_rows(model)
    never = [len(smol_tokenizer) - 1]
    kwargs = dict(stop_ids=never, max_new_tokens=12, batch_size=4)
    prompts = _prompts(smol_tokenizer)
    plain = generate(model, smol_tokenizer, prompts, **kwargs)
    plain_rows = sum(rows)
    answers = _reference(model, smol_tokenizer, never, 12)  # the same answers, as token ids
    assert [g.text for g in plain] == [smol_tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    references = [answers[0] + never,  # all of it: no decoding step at all
                  answers[1][:5] + [answers[1][5] + 1] + answers[1][6:],  # the first 5, then a wrong token
                  [answers[2][0] + 1] + answers[2][1:],  # wrong from the first token
                  answers[3][:7]]  # shorter than the answer
    drafted = [Prompt(p.ids, r, [True] * len(r)) for p, r in zip(prompts, references)]
    rows.clear()
    gens = generate(model, smol_tokenizer, drafted, **kwargs)
    assert [(g.text, g.new_tokens, g.stopped) for g in gens] == [(g.text, g.new_tokens, g.stopped) for g in plain]
    # decoding steps per row: 11 without a draft; with it, 0, 12 - 6, 11 and 12 - 7 (compacted as rows end)
    assert plain_rows == 4 * 11 and sum(rows) == 0 + 6 + 11 + 5


def test_accept_takes_the_picks_that_match_the_draft():
    accept = generate_module._accept
    stop = {0}
    assert accept([5, 6, 7, 9], [5, 6, 7, 8], stop, 10) == ([5, 6, 7, 9], False, True)  # all taken, last differs
    assert accept([5, 4, 7, 9], [5, 6, 7, 8], stop, 10) == ([5, 4], False, True)  # decoding goes on after 4
    assert accept([5, 6, 0, 9], [5, 6, 0, 8], stop, 10) == ([5, 6], True, False)  # stopped as the draft does
    assert accept([0], [], stop, 10) == ([], True, False)
    assert accept([5, 6, 7, 9], [5, 6, 7, 8], stop, 2) == ([5, 6], False, False)  # at the token limit
    assert accept([5, 6], [5, 6], stop, 0) == ([], False, False)


def test_folded_adapter_gives_peft_logits_and_leaves_the_base_weights(smol_dir, smol_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    for name, param in model.named_parameters():  # a trained adapter's scale, not init_lora_weights=False's
        if "lora_B" in name:
            param.data.mul_(0.01)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    ids = torch.tensor([p.ids for p in _prompts(smol_tokenizer)[:1]])
    with torch.inference_mode():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        peft = model(input_ids=ids).logits
        assert generate_module._foldable(model)
        with generate_module._folded(model):
            folded = model(input_ids=ids).logits
    assert (peft - off).abs().max() > 0.1  # the adapter changes the logits...
    assert torch.allclose(folded, peft, rtol=1e-5, atol=1e-4)  # ...and folded, only by rounding
    generate(model, smol_tokenizer, _prompts(smol_tokenizer), stop_ids=[smol_tokenizer.eos_token_id],
             max_new_tokens=4, batch_size=4)
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    assert not generate_module._foldable(model.to(torch.bfloat16))  # 16-bit weights keep PEFT's path
