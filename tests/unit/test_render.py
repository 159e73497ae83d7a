"""Exact assistant-only masks on real chat templates (SmolLM2's own, and Llama 3, Qwen 2.5 and Gemma
from TRL), checked by decoding the trained tokens; plus the length policy and the data report."""

import copy
import importlib.resources
import itertools
import json
import re

import pytest

from lorakit.data import IGNORE, DataError, RenderError, eot_token_ids, prepare, render


def _trl_template(name: str) -> str:
    return (importlib.resources.files("trl") / "chat_templates" / name).read_text()


def _variant(smol, template: str, specials: list[str], *, bos: str | None = None, eos: str | None = None):
    """The SmolLM2 tokenizer with another family's template and its markers as single special tokens.

    With `bos`, it also adds BOS on its own, as the Llama 3 and Gemma tokenizers do.
    """
    tok = copy.deepcopy(smol)
    extra = {"additional_special_tokens": specials}
    if bos:
        extra["bos_token"] = bos
    if eos:
        extra["eos_token"] = eos
    tok.add_special_tokens(extra)
    if bos:
        tok.add_bos_token = True
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def llama3_tokenizer(smol_tokenizer):
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    template = _trl_template("llama3.jinja")
    return _variant(smol_tokenizer, template, specials, bos="<|begin_of_text|>", eos="<|eot_id|>")


@pytest.fixture(scope="session")
def qwen_tokenizer(smol_tokenizer):
    return _variant(smol_tokenizer, _trl_template("qwen2_5.jinja"), [])


@pytest.fixture(scope="session")
def gemma_tokenizer(smol_tokenizer):
    specials = ["<start_of_turn>", "<end_of_turn>"]
    return _variant(smol_tokenizer, _trl_template("gemma.jinja"), specials, bos="<bos>")


SINGLE = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": " It is 4.\n"},
]
MULTI = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, please."},
    {"role": "assistant", "content": "Green, like grass."},
    {"role": "user", "content": "And a number?"},
    {"role": "assistant", "content": "Seven\n\nis my pick."},
]
SYSTEM = [{"role": "system", "content": "You answer in one short sentence."}]


def _trained_runs(tok, rendered) -> list[str]:
    """Decoded text of each run of consecutive trained tokens."""
    runs = []
    pairs = zip(rendered.input_ids, rendered.labels)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE):
        if trained:
            runs.append(tok.decode([i for i, _ in run], skip_special_tokens=False))
    return runs


def _untrained_text(tok, rendered) -> str:
    return tok.decode([i for i, lab in zip(rendered.input_ids, rendered.labels) if lab == IGNORE])


def _assert_exact(tok, messages, eot: str, *, trims: bool):
    rendered = render(tok, messages)
    assert len(rendered.input_ids) == len(rendered.labels)
    assert all(lab in (IGNORE, i) for i, lab in zip(rendered.input_ids, rendered.labels))
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    want = [(c.strip() if trims else c) + eot for c in contents]
    assert _trained_runs(tok, rendered) == want
    untrained = _untrained_text(tok, rendered)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    eot_id = tok.convert_tokens_to_ids(eot)
    assert [lab for lab in rendered.labels if lab == eot_id] == [eot_id] * len(contents)
    return rendered


# --- SmolLM2: ChatML-like, no {% generation %} markers, injects a default system prompt ---------------


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "three-turn"])
def test_smollm2_default_system_prompt_is_masked(smol_tokenizer, messages):
    rendered = _assert_exact(smol_tokenizer, messages, "<|im_end|>", trims=False)
    assert "You are a helpful AI assistant named SmolLM" in _untrained_text(smol_tokenizer, rendered)
    assert "SmolLM" not in "".join(_trained_runs(smol_tokenizer, rendered))


@pytest.mark.parametrize("messages", [SYSTEM + SINGLE, SYSTEM + MULTI], ids=["single", "three-turn"])
def test_smollm2_with_system_message(smol_tokenizer, messages):
    rendered = _assert_exact(smol_tokenizer, messages, "<|im_end|>", trims=False)
    assert "SmolLM" not in smol_tokenizer.decode(rendered.input_ids)


def test_smollm2_trains_eot_although_it_is_the_pad_token(smol_tokenizer):
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id == 2
    rendered = render(smol_tokenizer, MULTI)
    assert rendered.labels.count(2) == 3
    # the "\n" after each <|im_end|> belongs to the template, not to the reply
    for k, lab in enumerate(rendered.labels):
        if lab == 2:
            assert rendered.labels[k + 1] == IGNORE


def test_smollm2_adds_no_bos_when_the_tokenizer_does_not(smol_tokenizer):
    rendered = render(smol_tokenizer, SINGLE)
    text = smol_tokenizer.apply_chat_template(SINGLE, tokenize=False)
    assert rendered.input_ids == smol_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_repeated_content_is_located_per_turn(smol_tokenizer):
    messages = [
        {"role": "user", "content": "Yes."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Yes."},
        {"role": "assistant", "content": "Yes."},
    ]
    _assert_exact(smol_tokenizer, messages, "<|im_end|>", trims=False)


# --- other families' templates from TRL ---------------------------------------------------------------


@pytest.mark.parametrize("messages", [SINGLE, SYSTEM + MULTI], ids=["single", "three-turn"])
def test_llama3(llama3_tokenizer, messages):
    rendered = _assert_exact(llama3_tokenizer, messages, "<|eot_id|>", trims=True)
    bos = llama3_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert llama3_tokenizer("x")["input_ids"][0] == bos  # the tokenizer adds BOS on its own...
    assert rendered.input_ids[0] == bos and rendered.input_ids.count(bos) == 1  # ...the template has one
    assert rendered.labels[0] == IGNORE


@pytest.mark.parametrize("messages", [SINGLE, SYSTEM + MULTI], ids=["single", "three-turn"])
def test_qwen2_5(qwen_tokenizer, messages):
    rendered = _assert_exact(qwen_tokenizer, messages, "<|im_end|>", trims=False)
    default_system = "You are Qwen, created by Alibaba Cloud."
    assert (default_system in _untrained_text(qwen_tokenizer, rendered)) == (messages[0]["role"] != "system")


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "three-turn"])
def test_gemma(gemma_tokenizer, messages):
    rendered = _assert_exact(gemma_tokenizer, messages, "<end_of_turn>", trims=True)
    bos = gemma_tokenizer.convert_tokens_to_ids("<bos>")
    assert rendered.input_ids[0] == bos and rendered.input_ids.count(bos) == 1
    assert "model\n" in _untrained_text(gemma_tokenizer, rendered)


@pytest.mark.parametrize("messages", [SINGLE, SYSTEM + MULTI], ids=["single", "three-turn"])
def test_phi3_closing_eos_after_the_last_turn(smol_tokenizer, messages):
    # Phi-3 writes eos after the last message only, so messages[:i+1] is not a prefix of the whole
    # conversation; that closing tail is allowed, and the eos there is not trained.
    specials = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = _variant(smol_tokenizer, _trl_template("phi3.jinja"), specials, eos="<|endoftext|>")
    rendered = _assert_exact(tok, messages, "<|end|>", trims=False)
    assert tok.decode(rendered.input_ids).endswith("<|end|>\n<|endoftext|>")
    assert rendered.labels[-1] == IGNORE
    assert eot_token_ids(tok) == [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]


def test_bos_is_prepended_untrained_when_the_template_has_none(llama3_tokenizer):
    template = _trl_template("llama3.jinja").replace("bos_token + content", "content")
    bos = llama3_tokenizer.bos_token_id
    rendered = render(llama3_tokenizer, SINGLE, template=template)
    text = llama3_tokenizer.apply_chat_template(SINGLE, tokenize=False, chat_template=template)
    assert not text.startswith("<|begin_of_text|>")
    assert rendered.input_ids == [bos] + llama3_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rendered.labels[0] == IGNORE
    assert _trained_runs(llama3_tokenizer, rendered) == ["It is 4.<|eot_id|>"]


def test_plain_text_turn_end_trains_content_not_the_blank_lines(smol_tokenizer):
    template = (
        "{% for m in messages %}{% if m.role == 'user' %}User:\n{{ m.content }}\n\n"
        "{% else %}Assistant:\n{{ m.content }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:\n{% endif %}"
    )
    rendered = render(smol_tokenizer, MULTI, template=template)
    assert _trained_runs(smol_tokenizer, rendered) == ["Blue.", "Green, like grass.", "Seven\n\nis my pick."]
    assert eot_token_ids(smol_tokenizer, template) == [smol_tokenizer.eos_token_id]


def test_loss_on_all_trains_everything_but_a_prepended_bos(smol_tokenizer, llama3_tokenizer):
    rendered = render(smol_tokenizer, MULTI, loss_on="all")
    assert rendered.labels == rendered.input_ids
    template = _trl_template("llama3.jinja").replace("bos_token + content", "content")
    rendered = render(llama3_tokenizer, MULTI, loss_on="all", template=template)
    assert rendered.labels[0] == IGNORE and rendered.labels[1:] == rendered.input_ids[1:]


def test_eot_token_ids(smol_tokenizer, llama3_tokenizer, gemma_tokenizer):
    assert eot_token_ids(smol_tokenizer) == [2]
    assert eot_token_ids(llama3_tokenizer) == [llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    assert eot_token_ids(gemma_tokenizer) == [gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>"), 2]


# --- what must fail loudly --------------------------------------------------------------------------

# Like Qwen3's template: earlier assistant turns lose their reasoning once a later turn follows.
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REASONING = [
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "<think>add them</think>4"},
    {"role": "user", "content": "3 + 3?"},
    {"role": "assistant", "content": "<think>add again</think>6"},
]


def test_template_that_rewrites_earlier_turns_is_refused(smol_tokenizer):
    render(smol_tokenizer, REASONING[:2], template=REWRITING)  # one turn: nothing rewritten, fine
    with pytest.raises(RenderError, match=r"^train\.jsonl:3: assistant turn messages\[1\]: .*rewrites"):
        render(smol_tokenizer, REASONING, template=REWRITING, source="train.jsonl:3")


def test_last_turn_closed_differently_without_an_end_of_turn_is_refused(smol_tokenizer):
    # like gpt-oss: the last turn ends in one marker, earlier turns in another, which is not special here
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% if loop.last and m.role == 'assistant' %}<|endoftext|>{% else %}[end]{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    render(smol_tokenizer, SINGLE, template=template)  # the last turn alone is fine
    with pytest.raises(RenderError, match=r"^f\.jsonl:1: assistant turn messages\[1\]: .*only when it is the last"):
        render(smol_tokenizer, MULTI, template=template, source="f.jsonl:1")


def test_template_that_changes_the_content_is_refused(smol_tokenizer):
    template = REWRITING.replace("{% else %}{{ m.content }}", "{% else %}{{ m.content | upper }}")
    with pytest.raises(RenderError, match=r"^a\.jsonl:1: assistant turn messages\[1\]: the template changes"):
        render(smol_tokenizer, SINGLE, template=template, source="a.jsonl:1")


def test_token_across_the_mask_edge_is_refused(smol_tokenizer):
    glued = (
        "{% for m in messages %}{% if m.role == 'assistant' %}Rep{{ m.content }}<|im_end|>"
        "{% else %}{{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Rep{% endif %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ort"}]
    with pytest.raises(RenderError, match=r"^b\.jsonl:2: .*'Report'"):
        render(smol_tokenizer, messages, template=glued, source="b.jsonl:2")


def test_leading_whitespace_merged_with_the_header_is_refused(smol_tokenizer):
    # "\n" ends the header, but the tokenizer makes one token of "\n " + " It": no exact mask exists
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  It is 4."}]
    with pytest.raises(RenderError, match=r"^e\.jsonl:5: .*\('\\n '\).*\(strip the content\)"):
        render(smol_tokenizer, messages, source="e.jsonl:5")


def test_verification_catches_a_mask_that_does_not_decode_to_the_reply(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    real_decode = tok.decode
    tok.decode = lambda ids, **kw: real_decode(ids, **kw).replace("Blue", "Blew")
    with pytest.raises(RenderError, match=r"^c\.jsonl:4: .*decode to 'Blew\.<\|im_end\|>'"):
        render(tok, MULTI, source="c.jsonl:4")


def test_template_error_names_the_example(gemma_tokenizer):
    with pytest.raises(RenderError, match=r"^d\.jsonl:9: .*System role not supported"):
        render(gemma_tokenizer, SYSTEM + SINGLE, source="d.jsonl:9")


# --- prepare: length policy and the report ------------------------------------------------------------


def _write(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
LONG_PROMPT = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Ok."}]
LONG_REPLY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]


def test_too_long_error_lists_the_examples_and_the_fix(smol_tokenizer, tmp_path):
    f = _write(tmp_path / "train.jsonl", [SHORT, LONG_PROMPT, SHORT, LONG_REPLY])
    with pytest.raises(DataError) as err:
        prepare(str(f), smol_tokenizer, max_length=100, too_long="error")
    message = str(err.value)
    assert message.startswith("2 of 4 examples are longer than data.max_length=100")
    assert f"{f}:2 (" in message and f"{f}:4 (" in message and f"{f}:1 " not in message
    assert "data.too_long: drop|truncate" in message


def test_too_long_drop(smol_tokenizer, tmp_path):
    f = _write(tmp_path / "train.jsonl", [SHORT, LONG_PROMPT, SHORT, LONG_REPLY])
    prepared = prepare(str(f), smol_tokenizer, max_length=100, too_long="drop")
    assert prepared.sources == [f"{f}:1", f"{f}:3"]
    assert prepared.report["dropped"] == {"count": 2, "sources": [f"{f}:2", f"{f}:4"],
                                          "reasons": {"longer than max_length": 2}}
    assert prepared.report["truncated"]["count"] == 0
    assert prepared.report["examples_read"] == 4 and prepared.report["examples_kept"] == 2


def test_too_long_truncate_drops_what_is_left_untrained(smol_tokenizer, tmp_path):
    f = _write(tmp_path / "train.jsonl", [SHORT, LONG_PROMPT, LONG_REPLY])
    prepared = prepare(str(f), smol_tokenizer, max_length=100, too_long="truncate")
    assert prepared.report["dropped"] == {"count": 1, "sources": [f"{f}:2"],  # the cut left no reply
                                          "reasons": {"truncation would cut an answer off entirely": 1}}
    assert prepared.report["truncated"] == {"count": 1, "sources": [f"{f}:3"]}
    assert prepared.sources == [f"{f}:1", f"{f}:3"]
    cut = prepared.examples[1]
    assert len(cut.input_ids) == len(cut.labels) == 100 and cut.labels[-1] != IGNORE
    assert prepared.report["max_len"] == 100


def test_report(smol_tokenizer, tmp_path):
    f = _write(tmp_path / "train.jsonl", [SHORT, MULTI])
    prepared = prepare(str(f), smol_tokenizer, max_length=512, too_long="error", loss_on="assistant")
    report = prepared.report
    json.dumps(report)  # it is written to data_report.json
    assert report["files"] == [str(f)]
    lengths = [len(e.input_ids) for e in prepared.examples]
    assert report["tokens_total"] == sum(lengths) and report["max_len"] == max(lengths)
    assert report["tokens_trained"] == sum(lab != IGNORE for e in prepared.examples for lab in e.labels)
    assert 0 < report["tokens_trained"] < report["tokens_total"]
    assert report["template"] == "tokenizer" and report["eot_tokens"] == ["<|im_end|>"]
    assert report["sample_source"] == f"{f}:1"
    assert "[[Hello.<|im_end|>]]\n" in report["sample"] and "[[" not in report["sample"].split("assistant")[0]


def test_fingerprint_follows_data_and_template(smol_tokenizer, tmp_path):
    def fingerprint(conversations, template=None):
        f = _write(tmp_path / "train.jsonl", conversations)
        return prepare(str(f), smol_tokenizer, max_length=512, too_long="error", template=template).report[
            "fingerprint"
        ]

    base = fingerprint([SHORT, MULTI])
    assert base.startswith("sha256:") and fingerprint([SHORT, MULTI]) == base
    changed = [SHORT[:1] + [{"role": "assistant", "content": "Hello!"}], MULTI]
    assert fingerprint(changed) != base
    template = tmp_path / "smol.jinja"
    template.write_text(smol_tokenizer.chat_template + "{# same output, other template #}")
    assert fingerprint([SHORT, MULTI], template) != base


def test_prepare_names_the_bad_example(smol_tokenizer, tmp_path):
    f = _write(tmp_path / "train.jsonl", [SHORT, REASONING])
    template = tmp_path / "rewriting.jinja"
    template.write_text(REWRITING)
    with pytest.raises(RenderError, match=rf"^{re.escape(str(f))}:2: assistant turn messages\[1\]"):
        prepare(str(f), smol_tokenizer, max_length=512, too_long="error", template=template)
