"""Each accepted format is detected or declared, normalized to the same conversation, and rendered
with an exact mask; `data.columns` maps other shapes; ambiguity and bad rows are errors naming the row."""

import copy
import json
import re

import pytest

from lorakit.data import IGNORE, DataError, RenderError, read_examples, render, render_example
from lorakit.data.errors import Problems
from lorakit.data.formats import detect, normalize

USER, REPLY = "What is 2 + 2?", "It is 4."
CHAT = [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]
SHAPES = {
    "messages": {"messages": CHAT},
    "prompt_completion": {"prompt": USER, "completion": REPLY},
    "alpaca": {"instruction": USER, "input": "", "output": REPLY},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": REPLY}]},
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", SHAPES)
def test_each_format_is_detected_and_renders_like_messages(tmp_path, smol_tokenizer, fmt):
    (example,) = read_examples(_jsonl(tmp_path / "a.jsonl", [{**SHAPES[fmt], "id": 9}]))
    assert example.format == fmt and example.conversation() == CHAT and example.meta == {"id": 9}
    assert render_example(smol_tokenizer, example) == render(smol_tokenizer, CHAT)


def test_text_trains_every_token_and_ends_with_eos(tmp_path, smol_tokenizer):
    (example,) = read_examples(_jsonl(tmp_path / "a.jsonl", [{"text": "Once upon a time."}]))
    r = render_example(smol_tokenizer, example, loss_on="assistant")  # text: loss_on does not apply
    assert r.labels == r.input_ids and r.input_ids[-1] == smol_tokenizer.eos_token_id
    assert smol_tokenizer.decode(r.input_ids) == "Once upon a time.<|im_end|>"


def test_alpaca_input_system_and_history():
    row = {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief.",
           "history": [["Hi", "Hello."]]}
    assert normalize(row, "alpaca", "f:1").messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Translate.\n\nchat"},
        {"role": "assistant", "content": "cat"}]


def test_sharegpt_roles_and_system_column():
    row = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    assert [m["role"] for m in normalize(row, "sharegpt", "f:1").messages] == [
        "system", "user", "assistant", "tool", "assistant"]
    with pytest.raises(DataError, match=r"^f:2: conversations\[0\]: unknown speaker 'bot'"):
        normalize({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "f:2")


def test_tool_calls_and_results_are_kept_as_text(smol_tokenizer):
    call = {"type": "function", "function": {"name": "lookup", "arguments": '{"order": "A1"}'}}
    row = {"messages": [{"role": "user", "content": "Where is A1?"},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "shipped"},
                        {"role": "assistant", "content": [{"type": "text", "text": "It shipped."}]}]}
    messages = normalize(row, "messages", "f:1").messages
    assert messages[1] == {"role": "assistant", "content": '{"name": "lookup", "arguments": {"order": "A1"}}'}
    assert messages[3]["content"] == "It shipped."
    r = render(smol_tokenizer, messages)
    trained = smol_tokenizer.decode([i for i, lab in zip(r.input_ids, r.labels) if lab != IGNORE])
    assert trained == messages[1]["content"] + "<|im_end|>" + "It shipped.<|im_end|>"


def test_conversational_prompt_completion_trains_only_the_completion_with_loss_on_completion(smol_tokenizer):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": USER}]
    example = normalize({"prompt": prompt, "completion": [{"role": "assistant", "content": REPLY}]},
                        "prompt_completion", "f:1")
    assert example.train_from == 3
    only = render_example(smol_tokenizer, example, loss_on="completion")
    both = render_example(smol_tokenizer, example, loss_on="assistant")
    decode = lambda r: smol_tokenizer.decode([i for i, lab in zip(r.input_ids, r.labels) if lab != IGNORE])  # noqa
    assert decode(only) == REPLY + "<|im_end|>"
    assert decode(both) == "Hello.<|im_end|>" + REPLY + "<|im_end|>"
    assert only.turn_starts == both.turn_starts[1:]


@pytest.fixture
def base_tokenizer(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None  # a base model: no chat template
    return tok


def test_plain_prompt_completion_without_a_template_is_concatenated(base_tokenizer):
    example = normalize({"prompt": "Q: 2 + 2?\nA:", "completion": " 4"}, "prompt_completion", "f:1")
    r = render_example(base_tokenizer, example)
    assert base_tokenizer.decode(r.input_ids) == "Q: 2 + 2?\nA: 4<|im_end|>"
    trained = [i for i, lab in zip(r.input_ids, r.labels) if lab != IGNORE]
    assert base_tokenizer.decode(trained) == " 4<|im_end|>" and r.turn_starts == [r.labels.index(trained[0])]
    assert render_example(base_tokenizer, example, loss_on="all").labels == r.input_ids


def test_plain_prompt_ending_in_a_space_is_refused(base_tokenizer):
    example = normalize({"prompt": "Capital of France? Answer: ", "completion": "Paris"}, "prompt_completion", "f:7")
    with pytest.raises(RenderError, match=r"^f:7: the token ' Paris' is partly prompt and partly completion"):
        render_example(base_tokenizer, example)


def test_columns_map_a_csv_export(tmp_path, smol_tokenizer):
    f = tmp_path / "tickets.csv"
    f.write_text(f'question,answer,ticket_id\n"{USER}",{REPLY},T-1\n')
    with pytest.raises(DataError, match=r"cannot tell the data format from the keys \(answer, question, ticket_id\)"
                                        r".*data.columns: \{prompt: question, completion: answer\}"):
        list(read_examples(f))
    reports = []
    (example,) = read_examples(f, columns={"prompt": "question", "completion": "answer"}, file_reports=reports)
    assert example.conversation() == CHAT and example.meta == {"ticket_id": "T-1"}
    assert reports == [{"file": str(f), "rows": 1, "format": "prompt_completion",
                        "columns": {"prompt": "question", "completion": "answer"}}]
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:2: no column 'query' \(data.columns maps prompt"):
        list(read_examples(f, columns={"prompt": "query", "completion": "answer"}))
    f.write_text("question,answer\n" + "q,a\n" * 5)
    problems = Problems()
    assert list(read_examples(f, problems=problems)) == [] and problems.count == 1  # once per file, not per row
    with pytest.raises(DataError, match="data.columns: unknown field 'question'"):
        list(read_examples(f, columns={"question": "prompt"}))


def test_ambiguous_rows_list_the_candidates():
    with pytest.raises(DataError, match=r"^f:3: the keys \(messages, text\) fit several formats: messages, text; "
                                        r"say which with data.format: messages \(or text\)"):
        detect({"messages": CHAT, "text": "x"}, "f:3")
    assert normalize({"messages": CHAT, "text": "x"}, "messages", "f:3").meta == {"text": "x"}  # declared
    with pytest.raises(DataError, match=r"^f:1: this row is a single message; each row must be a whole"):
        detect(CHAT[0], "f:1")  # e.g. a .json file holding one conversation's message list


BAD = {
    "empty assistant turn": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
                             r"messages\[1\]: the assistant turn is empty"),
    "no assistant": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    "empty completion": ({"prompt": "q", "completion": ""}, "the completion is empty"),
    "mixed prompt/completion": ({"prompt": "q", "completion": CHAT}, "must both be strings or both lists"),
    "empty text": ({"text": "  "}, "the text is empty"),
    "alpaca output not a string": ({"instruction": "q", "output": 4}, '"output" must be a string, got a number'),
    "media content": ({"messages": [{"role": "user", "content": [{"type": "image"}]}, CHAT[1]]}, "images and other"),
}


@pytest.mark.parametrize("row, why", BAD.values(), ids=BAD.keys())
def test_bad_rows(row, why):
    with pytest.raises(DataError, match=rf"^f:4: .*{why}"):
        normalize(row, detect(row, "f:4"), "f:4")


def test_every_bad_row_is_reported_and_reading_goes_on(tmp_path):
    good = json.dumps({"messages": CHAT})
    a = tmp_path / "a.jsonl"
    a.write_bytes(f"{good}\n{{oops\n{good}\n".encode() + b'{"text": "\xff"}\n' + f"{good}\n".encode())
    b = _jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "q"}]}, {"messages": CHAT}])
    (tmp_path / "c.jsonl").write_text("")
    problems = Problems()
    got = list(read_examples([a, b, tmp_path / "c.jsonl"], problems=problems))
    assert [e.source for e in got] == [f"{a}:1", f"{a}:3", f"{a}:5", f"{b}:2"]
    assert problems.count == 4
    assert [m.split(": ")[0] for m in problems.messages] == [f"{a}:2", f"{a}:4", f"{b}:1", str(tmp_path / "c.jsonl")]
    with pytest.raises(DataError, match=r"^4 problems in the data; fix each, then run lorakit check again:\n  "):
        problems.raise_if_any()
