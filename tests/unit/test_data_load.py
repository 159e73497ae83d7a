"""Reading JSONL conversations: every bad line is reported as file:line with what is wrong."""

import json
import re

import pytest

from lorakit.data import DataError, Example, read_messages, resolve_files
from lorakit.errors import LorakitError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_messages_keeps_extra_keys_and_skips_blank_lines(tmp_path):
    second = {"messages": GOOD["messages"], "id": 7, "tags": ["a"]}
    f = _write(tmp_path / "train.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(second)])
    examples = list(read_messages(f))
    assert examples == [
        Example(f"{f}:1", GOOD["messages"], {}),
        Example(f"{f}:4", GOOD["messages"], {"id": 7, "tags": ["a"]}),
    ]


def test_streams_lines(tmp_path):
    f = _write(tmp_path / "train.jsonl", [json.dumps(GOOD), "{not json"])
    lines = read_messages(f)
    assert next(lines).source == f"{f}:1"  # the good line comes out before the bad one is read
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}:2: invalid JSON"):
        next(lines)


def test_accepts_a_byte_order_mark(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [e.source for e in read_messages(f)] == [f"{f}:1"]


BAD_LINES = {
    "invalid JSON": ('{"messages": [}', r"invalid JSON: Expecting value at column 15"),
    "not an object": ("[1, 2]", r"expected a JSON object, got a list"),
    "no messages key": ('{"conversation": []}', r'no "messages" key \(keys found: conversation\)'),
    "messages not a list": ('{"messages": "hi"}', r'"messages" must be a non-empty list of messages, got a str'),
    "empty messages": ('{"messages": []}', r'"messages" must be a non-empty list of messages, got an empty'),
    "message not an object": ('{"messages": ["hi"]}', r'messages\[0\]: must be an object \{"role"'),
    "message without content": ('{"messages": [{"role": "user"}]}', r"messages\[0\]: must be an object"),
    "content not a string": (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
        r'messages\[1\]: "content" must be a string, got null',
    ),
    "unknown role": (
        '{"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        r"messages\[0\]: unknown role 'human'; allowed roles: system, user, assistant, tool",
    ),
    "no assistant turn": (
        '{"messages": [{"role": "user", "content": "q"}]}',
        r"no assistant message, so there is nothing to train on",
    ),
}


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_names_file_and_line(tmp_path, bad):
    line, why = bad
    f = _write(tmp_path / "train.jsonl", [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:3: {why}") as err:
        list(read_messages(f))
    assert isinstance(err.value, LorakitError) and err.value.exit_code == 2


def test_invalid_utf8_names_the_line(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:2: not valid UTF-8"):
        list(read_messages(f))


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank lines only"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "train.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}: the file is empty"):
        list(read_messages(f))


def test_resolve_files_expands_globs_sorted_without_duplicates(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "c.txt"]:
        (tmp_path / name).write_text("")
    got = resolve_files([str(tmp_path / "*.jsonl"), str(tmp_path / "c.txt"), str(tmp_path / "a.jsonl")])
    assert got == [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.txt"]
    assert resolve_files(str(tmp_path / "c.txt")) == [tmp_path / "c.txt"]


@pytest.mark.parametrize(
    "spec, why",
    [
        ("missing.jsonl", r"missing\.jsonl: file not found"),
        ("*.parquet", r"\*\.parquet: the glob matches no files"),
        (".", r"\.: is a directory"),
    ],
)
def test_resolve_files_errors(tmp_path, monkeypatch, spec, why):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^{why}"):
        resolve_files(spec)
    with pytest.raises(DataError, match="no data files given"):
        resolve_files([])
