"""Fuzzing: arbitrary bytes and JSON shapes through every data reader, the config loader and the
server's request parser. Each must end in its documented error with a message (DataError,
ConfigError, a 4xx BadRequest), never another exception, never a hang (hypothesis deadlines)."""

import io
import json
import math
import os
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.config import ConfigError
from lorakit.data import DataError, read_examples
from lorakit.data.readers import read_rows
from lorakit.serve import BadRequest, parse_request

# LORAKIT_FUZZ_EXAMPLES=2000 for a deeper search than CI's.
FUZZ = settings(max_examples=int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", 60)), deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
# Rows that look like the formats lorakit detects, with values of any shape in their fields.
KEYS = ["messages", "role", "content", "prompt", "completion", "text", "instruction", "input", "output",
        "conversations", "from", "value", "system", "tool_calls", "type"]
shaped = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=5), max_leaves=25)
some_bytes = st.binary(max_size=300) | st.text(max_size=300).map(str.encode)


def _drain(path) -> None:
    """Read every row and every example; only DataError may come out, and each one says something."""
    try:
        for _, row in read_rows(path):
            assert isinstance(row, dict) or (isinstance(row, DataError) and str(row)), row
    except DataError as e:
        assert str(e)
    try:
        for _ in read_examples(path):
            pass
    except DataError as e:
        assert str(e)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow"])
@FUZZ
@given(data=some_bytes)
def test_any_bytes_through_each_reader(tmp_path, suffix, data):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    _drain(path)


@FUZZ
@given(rows=st.lists(shaped, min_size=1, max_size=5))
def test_json_shapes_through_the_json_readers(tmp_path, rows):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    for name in ("a.jsonl", "a.json", "b.json"):
        _drain(tmp_path / name)


@FUZZ
@given(header=st.lists(st.text(max_size=8), min_size=1, max_size=4),
       rows=st.lists(st.lists(st.text(max_size=12), max_size=5), max_size=5))
def test_csv_shapes(tmp_path, header, rows):
    buf = io.StringIO()
    import csv

    csv.writer(buf).writerows([header, *rows])
    (tmp_path / "a.csv").write_text(buf.getvalue())
    _drain(tmp_path / "a.csv")


def _parquet_bytes(rows: list) -> bytes | None:
    buf = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(rows), buf)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None  # pyarrow cannot write these rows; nothing to read
    return buf.getvalue()


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(KEYS), shaped, max_size=3), min_size=1, max_size=4),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
       cut=st.none() | st.integers(0, 10**6))
def test_parquet_shapes_and_damage(tmp_path, rows, flips, cut):
    """Valid Parquet of any row shape, then the same file with bytes flipped or cut short."""
    data = _parquet_bytes(rows)
    if data is None:
        return
    damaged = bytearray(data)
    for at, mask in flips:
        damaged[at % len(damaged)] ^= mask
    if cut is not None:
        damaged = damaged[: cut % len(damaged)]
    for name, content in (("ok.parquet", data), ("bad.parquet", bytes(damaged))):
        (tmp_path / name).write_bytes(content)
        _drain(tmp_path / name)


yaml_docs = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.sampled_from(["model", "data", "train", "lora", "eval", "quant",
                                                            "method", "seed", "output_dir", "trust_remote_code",
                                                            "allow_pickle", "train.lr", "max_length", "r", "columns",
                                                            "lr", "format", "template"])
                                           | st.text(max_size=6), inner, max_size=5), max_leaves=20)


def _load(path=None, overrides=()):
    try:
        cfg = lorakit.load_config(path, overrides, require_train=False)
    except ConfigError as e:
        assert str(e) and e.problems
        return
    assert isinstance(cfg, lorakit.Config)


@FUZZ
@given(data=some_bytes)
def test_config_loader_on_any_bytes(tmp_path, data):
    (tmp_path / "c.yaml").write_bytes(data)
    _load(tmp_path / "c.yaml")


@FUZZ
@given(doc=yaml_docs)
def test_config_loader_on_yaml_shapes(tmp_path, doc):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    _load(tmp_path / "c.yaml")


dotted = st.sampled_from(["train.lr", "train.batch_size", "data.max_length", "lora.r", "model", "seed",
                          "data.columns", "data.train", "method", "allow_pickle", "train.max_steps", "nope.x"])


@FUZZ
@given(texts=st.lists(st.text(max_size=30) | st.tuples(dotted, st.text(max_size=15)).map("=".join), max_size=4),
       mapping=st.dictionaries(dotted | st.text(max_size=8), json_values, max_size=3))
def test_config_overrides_of_any_shape(texts, mapping):
    _load(overrides=texts)
    _load(overrides=mapping)


# Mostly well-formed messages, so that the fields after them are reached too.
good_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)})
any_message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "tool", ""])
                                                  | json_values, "content": json_values}) | json_values
request_fields = st.fixed_dictionaries({}, optional={
    "messages": st.lists(good_message, min_size=1, max_size=3) | st.lists(any_message, max_size=4) | json_values,
    "max_tokens": json_values | st.sampled_from([math.inf, -math.inf, math.nan, 1e300, 10**30]),
    "max_completion_tokens": json_values, "temperature": json_values | st.sampled_from([math.inf, math.nan]),
    "top_p": json_values, "stream": json_values, "n": json_values})


def _parse(body: bytes) -> None:
    try:
        parse_request(body)
    except BadRequest as e:
        assert str(e) and 400 <= e.status < 500


@FUZZ
@given(body=some_bytes | st.text(alphabet=string.printable, max_size=200).map(str.encode))
def test_server_request_parser_on_any_bytes(body):
    _parse(body)


@FUZZ
@given(req=request_fields)
def test_server_request_parser_on_request_shapes(req):
    _parse(json.dumps(req).encode())


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_rows(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" + "[" * 100_000 + "\n" if suffix == ".json" else '{"messages": ' + "[" * 100_000 + "\n")
    _drain(path)


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 50_000, b'{"messages": ' + b"[" * 60_000],
                         ids=["deep list", "deep object", "deep messages"])
def test_server_request_parser_on_deep_nesting(body):
    _parse(body)


@FUZZ
@given(state=some_bytes | json_values.map(lambda v: json.dumps(v).encode())
       | st.lists(st.text(max_size=12) | json_values, max_size=3).map(
           lambda names: json.dumps({"_data_files": [{"filename": n} for n in names]}).encode()),
       as_dict=st.booleans())
def test_save_to_disk_folder_descriptions(tmp_path, state, as_dict):
    """state.json / dataset_dict.json of any content, shard names included (`../x`, absolute paths)."""
    folder = tmp_path / ("dict" if as_dict else "ds")
    folder.mkdir(exist_ok=True)
    (folder / ("dataset_dict.json" if as_dict else "state.json")).write_bytes(state)
    _drain(folder)
