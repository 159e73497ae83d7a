"""The batched renderer (`render_examples`, what `prepare` and `check` use) against the straightforward
one (`render_example`, one example at a time): the same input_ids, labels and answer starts, and the
same error, example by example, on several templates and every loss_on."""

import copy
import importlib.resources
import json
import random

import pytest

from lorakit import data
from lorakit.data import DataError, Example, prepare, render_example
from lorakit.data.render import render_examples

SYSTEM = {"role": "system", "content": "Be brief."}
WORDS = "the order arrived late é 日本 🙂 twice refund {json} <tag> please".split()


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def _examples(n: int = 60, seed: int = 0) -> list[Example]:
    """Every shape render_example takes: system or not, multi-turn, tool turns, prompt/completion
    (plain and conversational), text, and answers no exact mask exists for (leading whitespace)."""
    rng, out = random.Random(seed), []
    for i in range(n):
        user = {"role": "user", "content": _text(rng)}
        answer = {"role": "assistant", "content": _text(rng)}
        shape = i % 7
        if shape == 0:
            ex = Example(f"t:{i}", [SYSTEM, user, answer])
        elif shape == 1:
            ex = Example(f"t:{i}", [user, answer, {"role": "user", "content": _text(rng)},
                                    {"role": "assistant", "content": answer["content"]}])  # repeated answer
        elif shape == 2:
            ex = Example(f"t:{i}", [user, {"role": "assistant", "content": '{"name": "f", "arguments": {}}'},
                                    {"role": "tool", "content": "42"}, answer])
        elif shape == 3:
            ex = Example(f"t:{i}", None, prompt=user["content"], completion=answer["content"])
        elif shape == 4:
            ex = Example(f"t:{i}", [SYSTEM, user, answer, {"role": "user", "content": "more?"}, answer],
                         train_from=3)
        elif shape == 5:
            ex = Example(f"t:{i}", None, text=_text(rng))
        else:
            ex = Example(f"t:{i}", [user, {"role": "assistant", "content": "  " + answer["content"]}])
        out.append(ex)
    return out


def _reference(tokenizer, example, loss_on, template):
    try:
        return render_example(tokenizer, example, loss_on=loss_on, template=template)
    except DataError as e:
        return e


def _same(a, b) -> bool:
    if isinstance(a, DataError) or isinstance(b, DataError):
        return type(a) is type(b) and str(a) == str(b)
    return (a.input_ids, a.labels, a.turn_starts) == (b.input_ids, b.labels, b.turn_starts)


def _trl(name: str) -> str:
    return (importlib.resources.files("trl") / "chat_templates" / name).read_text()


@pytest.fixture(scope="module")
def bos_tokenizer(smol_tokenizer):
    """Llama 3's template and markers on the SmolLM2 tokenizer, which then adds BOS on its own."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                            "bos_token": "<|begin_of_text|>"})
    tok.add_bos_token = True
    tok.chat_template = _trl("llama3.jinja")
    return tok


# SmolLM2's own template; Qwen 3's rewrites earlier turns (refused per multi-turn example); Gemma's
# raises on a system turn (the batch's template call fails and each example is rendered alone).
@pytest.mark.parametrize("template", [None, "qwen3.jinja", "gemma.jinja"])
@pytest.mark.parametrize("loss_on", ["assistant", "completion", "all"])
def test_batched_rendering_equals_one_at_a_time(smol_tokenizer, template, loss_on):
    text = _trl(template) if template else None
    examples = _examples()
    batched = render_examples(smol_tokenizer, examples, loss_on=loss_on, template=text)
    for example, got in zip(examples, batched, strict=True):
        want = _reference(smol_tokenizer, example, loss_on, text)
        assert _same(got, want), example.source
    kinds = {type(r).__name__ for r in batched}
    assert "Rendered" in kinds and (loss_on == "all" or "RenderError" in kinds)


def test_batched_rendering_adds_bos_as_one_at_a_time(bos_tokenizer):
    examples = _examples(seed=1)
    batched = render_examples(bos_tokenizer, examples)
    assert all(_same(got, _reference(bos_tokenizer, ex, "assistant", None)) for ex, got in zip(examples, batched))
    assert any(not isinstance(r, DataError) and r.input_ids[0] == bos_tokenizer.bos_token_id for r in batched)


def test_prepare_reports_the_same_whatever_the_batch(tmp_path, smol_tokenizer, monkeypatch):
    """Bad rows, refused examples and good ones interleaved: problems stay in file order, and the
    report, fingerprint and token dump do not depend on how many examples render together."""
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    lines = [json.dumps({"messages": good}), "{not json", json.dumps({"messages": [SYSTEM, *good]}),
             json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
             json.dumps({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "  padded"}]}),
             json.dumps({"messages": good})]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(lines) + "\n")
    runs = []
    for batch in (1, 2, 512):
        monkeypatch.setattr(data, "BATCH", batch)
        dump = tmp_path / f"tokens{batch}.jsonl"
        p = prepare(str(f), smol_tokenizer, max_length=128, raise_errors=False, dump_tokens=dump)
        runs.append((p.report, p.problems.report(), dump.read_text()))
    assert runs[0] == runs[1] == runs[2]
    lines_named = [int(m.split(":")[1]) for m in runs[0][1]["messages"]]
    assert lines_named == [2, 4, 5] and runs[0][0]["examples_kept"] == 3


def test_conversation_starting_with_the_assistant_is_reported_not_crashed(smol_tokenizer):
    from lorakit.data.render import RenderError, render

    with pytest.raises(RenderError, match=r"x.jsonl:3: assistant turn messages\[0\]: the conversation starts with"):
        render(smol_tokenizer, [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hey"}],
               source="x.jsonl:3")
