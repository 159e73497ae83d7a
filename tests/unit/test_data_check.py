"""`check`: the streaming data report, the token dump, every problem at once, and the length policy."""

import json

import pytest

import lorakit
from lorakit import data
from lorakit.data import IGNORE, DataError, prepare

Q, A = {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}


def _jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def _cfg(train, *more):
    return lorakit.load_config(overrides=[f"data.train={train}", *more])


def test_check_reports_what_was_found(tmp_path, smol_tokenizer):
    f = _jsonl(tmp_path / "train.jsonl", [
        [Q, A],
        [Q, A],  # exact duplicate of line 1
        [{"role": "user", "content": "what is 2+2"}, A],  # near duplicate: same words
        [{"role": "user", "content": " "}, Q, A, Q],  # empty turn, two user turns in a row, ends on a user turn
        [{"role": "system", "content": "Be brief."}, Q, {"role": "assistant", "content": "Four, " * 40}],
    ])
    dump = tmp_path / "tokens.jsonl"
    report = data.check(_cfg(f, "data.max_length=64", "data.too_long=drop"), smol_tokenizer, dump_tokens=dump)
    r = report["train"]
    assert report["errors"] == {"count": 0, "messages": []}
    assert (r["examples_read"], r["examples_kept"], r["over_max_length"]) == (5, 4, 1)
    assert r["dropped"] == {"count": 1, "sources": [f"{f}:5"], "reasons": {"longer than max_length": 1}}
    assert r["inputs"] == [{"file": str(f), "rows": 5, "format": "messages", "columns": {}}]
    assert r["duplicates"]["exact"] == {"count": 1, "pairs": [[f"{f}:2", f"{f}:1"]]}
    assert r["duplicates"]["near"]["count"] == 2
    assert {k: v["sources"] for k, v in r["warnings"].items()} == {
        "empty_turn": [f"{f}:4"], "two_user_turns_in_a_row": [f"{f}:4"], "ends_with_user_turn": [f"{f}:4"]}
    lengths = r["lengths"]
    assert lengths["total"]["max"] == r["max_len"] <= 64
    assert lengths["answer"]["min"] == 6  # "It is 4." (5 tokens) + eot
    assert r["tokens_trained"] == sum(lengths_of(dump, "trained")) and r["trained_share"] < 0.5
    assert r["pad"]["pad_is_stop_token"] and r["pad"]["stop_tokens_trained"] == 4
    assert [p["source"] for p in r["preview"]] == [f"{f}:1", f"{f}:2"]
    assert "[[It is 4.<|im_end|>]]" in r["preview"][0]["text"]
    assert r["packing"] == {"enabled": True, "rows": 4, "capacity": 64,  # each example fills most of a row
                            "efficiency": round(r["tokens_total"] / (4 * 64), 4)}
    lines = data.summary_lines(report)
    assert lines[0].startswith("train: 4 of 5 examples (messages 4)") and any("packing: 4 rows" in x for x in lines)


def lengths_of(dump, what):
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert all(len(row["input_ids"]) == len(row["labels"]) for row in rows)
    if what == "trained":
        return [sum(label != IGNORE for label in row["labels"]) for row in rows]
    return [len(row["input_ids"]) for row in rows]


def test_dump_tokens_is_what_training_sees(tmp_path, smol_tokenizer):
    f = _jsonl(tmp_path / "train.jsonl", [[Q, A], [Q, A, Q, A]])
    dump = tmp_path / "tokens.jsonl"
    data.check(_cfg(f), smol_tokenizer, dump_tokens=dump)
    train, _, _ = data.prepare_run(_cfg(f, "data.packing=false"), smol_tokenizer)
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [row["source"] for row in rows] == train.sources
    assert [(row["input_ids"], row["labels"]) for row in rows] == [(e.input_ids, e.labels) for e in train.examples]


def test_check_and_train_agree_on_fingerprint_split_and_packing(tmp_path, smol_tokenizer):
    f = _jsonl(tmp_path / "train.jsonl", [[Q, {"role": "assistant", "content": f"It is {i}."}] for i in range(20)])
    cfg = _cfg(f, "data.eval_split=0.25", "data.max_length=128")
    checked = data.check(cfg, smol_tokenizer)
    train, held_out, report = data.prepare_run(cfg, smol_tokenizer)
    assert checked["fingerprint"] == report["fingerprint"]
    assert (checked["train"]["examples_kept"], checked["eval"]["examples_kept"]) == (15, 5)
    assert checked["train"]["packing"] == report["train"]["packing"]
    assert sorted(i for row in train.packed for i in row) == list(range(15))
    assert train.rows[0] == [train.examples[i] for i in train.packed[0]]


def test_every_problem_of_both_splits_is_reported_at_once(tmp_path, smol_tokenizer):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [Q, A]}) + "\n{broken\n" + json.dumps({"messages": [Q]}) + "\n")
    held = tmp_path / "eval.jsonl"
    held.write_text(json.dumps({"messages": [Q, {"role": "assistant", "content": ""}]}) + "\n")
    cfg = _cfg(train, f"data.eval={held}")
    with pytest.raises(DataError) as err:
        data.prepare_run(cfg, smol_tokenizer)
    message = str(err.value)
    assert message.startswith("3 problems in the data")
    assert f"{train}:2: invalid JSON" in message and f"{train}:3: no assistant" in message
    assert f"{held}:1: messages[1]: the assistant turn is empty" in message
    report = data.check(cfg, smol_tokenizer)  # check reports instead of raising
    assert report["errors"]["count"] == 3 and report["train"]["examples_kept"] == 1


LONG = "word " * 60


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_truncate_never_cuts_an_answer_off_entirely(tmp_path, smol_tokenizer, loss_on):
    f = _jsonl(tmp_path / "train.jsonl", [
        [Q, {"role": "assistant", "content": LONG}],  # the cut goes through the answer: kept, truncated
        [Q, A, {"role": "user", "content": LONG}, A],  # the cut would remove the second answer: dropped
    ])
    prepared = prepare(str(f), smol_tokenizer, max_length=60, too_long="truncate", loss_on=loss_on)
    assert prepared.report["truncated"] == {"count": 1, "sources": [f"{f}:1"]}
    assert prepared.report["dropped"]["reasons"] == {"truncation would cut an answer off entirely": 1}
    (cut,) = prepared.examples
    assert len(cut.input_ids) == 60 and cut.labels[-1] != IGNORE


def test_all_dropped_is_an_error(tmp_path, smol_tokenizer):
    f = _jsonl(tmp_path / "train.jsonl", [[Q, {"role": "assistant", "content": LONG}]])
    with pytest.raises(DataError, match=r"all 1 examples were dropped as longer than data.max_length=20"):
        prepare(str(f), smol_tokenizer, max_length=20, too_long="drop")


def test_raise_for_errors_after_check(tmp_path, smol_tokenizer):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"messages": [Q, A]}) + "\n")
    data.raise_for_errors(data.check(_cfg(f), smol_tokenizer))  # no problem: nothing raised
    f.write_text("{\n")
    with pytest.raises(DataError, match=rf"^{f}:1: invalid JSON"):
        data.raise_for_errors(data.check(_cfg(f), smol_tokenizer))
