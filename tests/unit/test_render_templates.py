"""Exact assistant masks on the real chat templates TRL ships (current model families), with the
SmolLM2 tokenizer given each family's markers as special tokens; templates for which no exact mask
exists must fail loudly, naming the example and the reason, never train the wrong tokens."""

import copy
import importlib.resources
import itertools
import re

import pytest

from lorakit.data import IGNORE, RenderError, render

MARKERS = re.compile(r"<\|[^|<>\s]+\|>|<(?:start_of_turn|end_of_turn|bos|eos)>|<turn\|>|<\|turn>|<｜[^｜]+｜>")
SYSTEM = {"role": "system", "content": "Be brief."}
MULTI = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another one, please."}, {"role": "assistant", "content": "Green, like grass."}]

EXACT = [  # template file: the end-of-turn token each assistant turn must end with
    ("cohere.jinja", "<|END_OF_TURN_TOKEN|>"), ("cohere2.jinja", "<|END_RESPONSE|>"),
    ("gemma.jinja", "<end_of_turn>"), ("gemma3.jinja", "<end_of_turn>"), ("gemma4.jinja", "<turn|>"),
    ("gemma4_v5.jinja", "<turn|>"), ("diffusion_gemma.jinja", "<turn|>"), ("lfm2.jinja", "<|im_end|>"),
    ("lfm2_2_5.jinja", "<|im_end|>"), ("llama3.jinja", "<|eot_id|>"), ("llama3_1.jinja", "<|eot_id|>"),
    ("llama3_2.jinja", "<|eot_id|>"), ("muse_glimmer.jinja", "<|eot|>"), ("phi3.jinja", "<|end|>"),
    ("phi3_5.jinja", "<|end|>"), ("qwen2_5.jinja", "<|im_end|>"), ("qwen2_5_vl.jinja", "<|im_end|>"),
    ("qwen3_8.jinja", "<|im_end|>"), ("qwen3_instruct_2507.jinja", "<|im_end|>"), ("qwen3_vl.jinja", "<|im_end|>"),
    # GLM-4 ends an assistant turn with the next turn's header, not an end-of-turn token: the content
    # is trained exactly, and the report's stop_tokens_trained (0) says the model learns no stop token.
    ("glm4moe.jinja", ""),
]
REFUSED = [  # template: why no exact mask exists for a multi-turn conversation
    ("qwen3.jinja", "renders the conversation up to this turn differently"),  # empty <think> on the last turn only
    ("qwen3_6.jinja", "generation prompt is not how it starts this turn"),  # the prompt opens a <think> block
    ("deepseekv3.jinja", "generation prompt is not how it starts this turn"),
    ("nemotron_3_nano.jinja", "generation prompt is not how it starts this turn"),
    ("gptoss.jinja", "only when it is the last one"),  # <|return|> closes the last turn, <|end|> the others
    ("smolvlm.jinja", "the template changes the assistant content"),
]


def _template(name: str) -> str:
    return (importlib.resources.files("trl") / "chat_templates" / name).read_text()


@pytest.fixture(scope="module")
def marked(smol_tokenizer):
    """The SmolLM2 tokenizer with every family's markers as special tokens (one copy: copies are slow)."""
    tok = copy.deepcopy(smol_tokenizer)
    markers = {m for name, _ in EXACT + REFUSED for m in MARKERS.findall(_template(name))}
    tok.add_special_tokens({"additional_special_tokens": sorted(markers)})
    return tok


def _tokenizer(marked, name: str):
    marked.chat_template = _template(name)
    return marked


@pytest.mark.parametrize("name, eot", EXACT, ids=[n for n, _ in EXACT])
def test_trained_tokens_are_exactly_the_answers_and_their_end_of_turn(marked, name, eot):
    tok = _tokenizer(marked, name)
    messages = MULTI if name == "gemma.jinja" else [SYSTEM, *MULTI]  # Gemma 1 refuses a system turn
    r = render(tok, messages)
    runs = [tok.decode([i for i, _ in run], skip_special_tokens=False)
            for trained, run in itertools.groupby(zip(r.input_ids, r.labels), key=lambda p: p[1] != IGNORE)
            if trained]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert runs == [a + eot for a in answers]
    untrained = tok.decode([i for i, lab in zip(r.input_ids, r.labels) if lab == IGNORE], skip_special_tokens=False)
    assert all(m["content"] in untrained for m in messages if m["role"] != "assistant")
    assert len(r.turn_starts) == 2


@pytest.mark.parametrize("name, why", REFUSED, ids=[n for n, _ in REFUSED])
def test_templates_without_an_exact_mask_are_refused_per_example(marked, name, why):
    tok = _tokenizer(marked, name)
    with pytest.raises(RenderError, match=rf"^train\.jsonl:4: assistant turn messages\[\d\]: .*{why}"):
        render(tok, MULTI, source="train.jsonl:4")


def test_a_template_that_trains_no_stop_token_is_flagged_in_the_report(marked, tmp_path):
    import json

    from lorakit.data import prepare

    template = tmp_path / "glm.jinja"
    template.write_text(_template("glm4moe.jinja"))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": MULTI}) + "\n")
    pad = prepare(str(data), marked, max_length=256, template=template).report["pad"]
    assert pad["stop_tokens_trained"] == 0 and pad["note"].startswith("no stop token is trained")
