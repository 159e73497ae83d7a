"""Every reader streams rows with a `file:line` (or `file:row N`) name, and names bad ones exactly."""

import json
import re

import pytest

from lorakit.data import DataError, read_examples, resolve_files
from lorakit.data import readers
from lorakit.data.readers import read_rows

ROWS = [{"prompt": "2 + 2?", "completion": " 4", "id": 1}, {"prompt": "3 + 3?", "completion": " 6", "id": 2}]


def _rows(path):
    return [(where, row if isinstance(row, dict) else str(row)) for where, row in read_rows(path)]


def test_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert _rows(f) == [(f"{f}:1", ROWS[0]), (f"{f}:2", ROWS[1])]


@pytest.mark.parametrize("indent", [None, 2], ids=["one line", "pretty"])
def test_json_array_streams_in_chunks(tmp_path, monkeypatch, indent):
    monkeypatch.setattr(readers, "_CHUNK", 7)  # every value spans several reads
    f = tmp_path / "a.json"
    f.write_text(json.dumps(ROWS * 3, indent=indent))
    got = _rows(f)
    assert [row for _, row in got] == ROWS * 3
    if indent:
        assert [where for where, _ in got][:2] == [f"{f}:2", f"{f}:7"]  # the line each row starts on


def test_json_object_holding_one_list(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_CHUNK", 5)
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"version": 1.25, "meta": {"x": [1, 2]}, "data": ROWS, "n": 2}, indent=1))
    assert [row for _, row in _rows(f)] == ROWS
    f.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(DataError, match=r"holds several lists \('train', 'test'\)"):
        _rows(f)
    f.write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="holds no list of rows"):
        _rows(f)


def test_json_errors_name_the_line(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}\n]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:3: invalid JSON: Expecting ','"):
        _rows(f)
    f.write_text('[{"a": 1}, 7]')
    assert _rows(f)[1] == (f"{f}:1", f"{f}:1: expected a JSON object for row 2, got a number")
    f.write_text("  ")
    with pytest.raises(DataError, match="the file is empty"):
        _rows(f)


def test_csv_and_tsv(tmp_path):
    f = tmp_path / "tickets.csv"
    f.write_text('question,answer,ticket_id\n"Where is\nmy order?",Shipped,T1\n\nRefund?,"Yes, done",T2\n')
    assert _rows(f) == [(f"{f}:2", {"question": "Where is\nmy order?", "answer": "Shipped", "ticket_id": "T1"}),
                        (f"{f}:5", {"question": "Refund?", "answer": "Yes, done", "ticket_id": "T2"})]
    t = tmp_path / "tickets.tsv"
    t.write_text("prompt\tcompletion\nHi\tHello, you\n")
    assert _rows(t) == [(f"{t}:2", {"prompt": "Hi", "completion": "Hello, you"})]


def test_csv_errors(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("prompt,completion\na,b,c\nd,e\n")
    assert _rows(f)[0][1].startswith(f"{f}:2: 3 fields but the header has 2 (prompt, completion)")
    f.write_bytes(b"prompt,completion\na,\xff\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:2: not valid UTF-8"):
        _rows(f)
    f.write_text("")
    with pytest.raises(DataError, match="the file is empty; it needs a header line"):
        _rows(f)


def test_parquet_streams_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS * 1500), f, row_group_size=1000)
    got = _rows(f)
    assert len(got) == 3000 and got[2999] == (f"{f}:row 3000", ROWS[1])
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        _rows(tmp_path / "bad.parquet")


def test_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")  # only to write the fixture: lorakit reads it with pyarrow
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ds = datasets.Dataset.from_list([{"messages": messages, "id": i} for i in range(5)])
    ds.save_to_disk(tmp_path / "ds", num_shards=2)
    got = list(read_examples(tmp_path / "ds"))
    assert [e.source for e in got] == [f"{tmp_path / 'ds'}:row {i}" for i in range(1, 6)]
    assert got[0].messages == messages and got[4].meta == {"id": 4}
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"a DatasetDict with splits train, test; .* data.train: .*dd/train"):
        list(read_examples(tmp_path / "dd"))
    assert resolve_files([str(tmp_path / "d*")]) == [tmp_path / "dd", tmp_path / "ds"]


def test_arrow_null_struct_fields_are_dropped(tmp_path):
    import pyarrow as pa

    rows = [{"messages": [{"role": "user", "content": "Hi", "name": None},
                          {"role": "assistant", "content": "Hello.", "name": None}]},
            {"messages": [{"role": "user", "content": "Yo", "name": "bob"},
                          {"role": "assistant", "content": "Hey.", "name": None}]}]
    f = tmp_path / "a.arrow"
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    got = list(read_examples(f))
    assert got[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert got[1].messages[0] == {"role": "user", "content": "Yo", "name": "bob"}


def test_unknown_suffix_and_plain_directory(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match=r"a\.txt: unknown file type '\.txt'; lorakit reads \.jsonl"):
        _rows(tmp_path / "a.txt")
    with pytest.raises(DataError, match="is a directory but not one written by datasets' save_to_disk"):
        resolve_files(str(tmp_path))


def test_json_with_a_byte_order_mark_and_unicode(tmp_path):
    f = tmp_path / "a.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "caf\u00e9 \u2603"}], ensure_ascii=False).encode())
    assert _rows(f) == [(f"{f}:1", {"text": "caf\u00e9 \u2603"})]
