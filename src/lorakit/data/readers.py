"""Stream the rows of a data file as (where, row) pairs: JSONL, JSON, CSV/TSV, Parquet, Arrow and
directories written by `datasets.save_to_disk` (read with pyarrow; `datasets` is not needed).

`where` names the row as the user can find it: `file:line` for text files, `file:row N` for Parquet
and Arrow. A row that cannot be parsed comes out as a `DataError` in place of the dict, so that the
caller reports it and goes on with the next row; a file that cannot be read at all raises.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from pathlib import Path

from lorakit.data.errors import DataError
from lorakit.paths import inside

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow")
_JSON_ROW = 64 * 2**20  # a JSON value bigger than this is a broken file, not a row: stop reading it
_CHUNK = 2**20
_DECODER = json.JSONDecoder()

Row = tuple[str, "dict | DataError"]


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of one file or save_to_disk directory, streamed."""
    if path.is_dir():
        return _dataset_dir(path)
    reader = {".jsonl": _jsonl, ".ndjson": _jsonl, ".json": _json, ".csv": _csv, ".tsv": _csv,
              ".parquet": _parquet, ".arrow": _arrow}.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; lorakit reads "
                        f"{', '.join(SUFFIXES)} files and directories written by datasets' save_to_disk")
    return reader(path)


def is_dataset_dir(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` (or a DatasetDict, which holds several)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


# --- text files ---------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """(line number, decoded line) for each line; a line that is not UTF-8 comes out as a DataError."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                # utf-8-sig on the first line: editors on Windows write a byte-order mark.
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); save the file as UTF-8")


def _open(path: Path, mode: str = "rb"):
    try:
        # utf-8-sig: editors on Windows start files with a byte-order mark
        return path.open(mode) if "b" in mode else path.open(mode, encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from e


def _jsonl(path: Path) -> Iterator[Row]:
    seen = False
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        if isinstance(line, DataError):
            yield where, line
        elif line.strip():
            seen = True
            yield where, _parse_line(line, where)
    if not seen:
        raise DataError(f"{path}: the file is empty; it needs one JSON object a line")


def _parse_line(line: str, where: str) -> dict | DataError:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}; each line must be one "
                         "complete JSON object")
    except RecursionError:
        return DataError(f"{where}: the JSON is nested too deeply to be a row; each line must be one JSON object")
    if not isinstance(obj, dict):
        return DataError(f"{where}: expected a JSON object, got {kind(obj)}; each line must be one JSON object")
    return obj


def _csv(path: Path) -> Iterator[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    lines = _csv_lines(path)
    reader = csv.reader((line for _, line in lines), delimiter=delimiter)
    try:
        yield from _csv_records(path, reader, delimiter)
    except csv.Error as e:  # the csv module cannot go on after one: the rest of the file is unreadable
        raise DataError(f"{path}:{reader.line_num}: not valid {'CSV' if delimiter == ',' else 'TSV'} ({e}); "
                        "quote fields that hold line breaks, and end lines with \\n or \\r\\n") from None


def _csv_records(path: Path, reader, delimiter: str) -> Iterator[Row]:
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: the file is empty; it needs a header line naming the columns, then one row a line")
    start = reader.line_num + 1
    for record in reader:
        where, start = f"{path}:{start}", reader.line_num + 1
        if not record:  # a blank line
            continue
        if len(record) != len(header):
            yield where, DataError(f"{where}: {len(record)} fields but the header has {len(header)} "
                                   f"({', '.join(header)}); quote fields that contain {delimiter!r}")
            continue
        yield where, dict(zip(header, record))


def _csv_lines(path: Path) -> Iterator[tuple[int, str]]:
    for lineno, line in _lines(path):
        if isinstance(line, DataError):
            raise line  # the csv module keeps state across lines: a bad line cannot be skipped safely
        yield lineno, line


# --- JSON: an array of rows, or an object holding one ------------------------------------------------


def _json(path: Path) -> Iterator[Row]:
    with _open(path, "r") as f:
        stream = _JsonStream(f, path)
        first = stream.peek()
        if first == "[":
            yield from stream.array()
        elif first == "{":
            yield from stream.holder()
        elif first == "":
            raise DataError(f"{path}: the file is empty; it needs a JSON array of rows, or an object holding one")
        else:
            raise DataError(f"{path}:{stream.line}: a .json file must hold an array of rows or an object holding "
                            "one; for one JSON object a line, name the file .jsonl")


class _JsonStream:
    """Reads one JSON document chunk by chunk, decoding one value at a time, counting lines."""

    def __init__(self, f, path: Path):
        self.f, self.path, self.buf, self.pos, self.line, self.eof = f, path, "", 0, 1, False

    def peek(self) -> str:
        """The next non-blank character ('' at the end), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                self._advance(1)
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos:self.pos + 1]

    def take(self, want: str) -> None:
        got = self.peek()
        if got != want:
            raise self.error(f"expected {want!r}, found {got or 'the end of the file'!r}")
        self._advance(1)

    def value(self):
        """Decode the next JSON value, reading more of the file until it is complete."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.eof or len(self.buf) - self.pos > _JSON_ROW or not _incomplete(e, self.buf):
                    raise self.error(f"invalid JSON: {e.msg}", e.pos) from e
                self._fill()
                continue
            except RecursionError:
                raise self.error("the JSON is nested too deeply to be a row") from None
            if end < len(self.buf) or self.eof:  # a number may go on in the next chunk
                self._advance(end - self.pos)
                return value
            self._fill()

    def array(self) -> Iterator[Row]:
        self.take("[")
        index = 0
        while self.peek() != "]":
            if index:
                self.take(",")
            index += 1
            self.peek()  # to the row's first character, so that its line is counted
            where = f"{self.path}:{self.line}"
            row = self.value()
            yield where, row if isinstance(row, dict) else DataError(
                f"{where}: expected a JSON object for row {index}, got {kind(row)}")
        self.take("]")
        if not index:
            raise DataError(f"{self.path}: the array is empty; it needs one JSON object per row")

    def holder(self) -> Iterator[Row]:
        """The rows of the one list an object holds, e.g. {"version": 1, "data": [...]}."""
        self.take("{")
        lists, first = [], True
        while self.peek() != "}":
            if not first:
                self.take(",")
            first = False
            key = self.value()
            self.take(":")
            if self.peek() == "[":
                lists.append(key)
                if len(lists) > 1:
                    raise self.error(f"the object holds several lists ({', '.join(map(repr, lists))}); "
                                     "give a file with one array of rows")
                yield from self.array()
            else:
                self.value()
        if not lists:
            raise DataError(f"{self.path}: the JSON object holds no list of rows; give an array of rows, "
                            "an object holding one, or one JSON object a line in a .jsonl file")

    def error(self, what: str, at: int | None = None) -> DataError:
        line = self.line + (self.buf.count("\n", self.pos, at) if at is not None and at > self.pos else 0)
        return DataError(f"{self.path}:{line}: {what}")

    def _advance(self, n: int) -> None:
        self.line += self.buf.count("\n", self.pos, self.pos + n)
        self.pos += n

    def _fill(self) -> bool:
        try:
            chunk = self.f.read(_CHUNK)
        except UnicodeDecodeError as e:
            raise self.error(f"not valid UTF-8 (byte {e.start} of the chunk read here); save the file as UTF-8") from e
        if self.pos > _CHUNK:  # drop what was decoded, so memory stays one row plus one chunk
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += chunk
        self.eof = not chunk
        return bool(chunk)


def _incomplete(error: json.JSONDecodeError, buf: str) -> bool:
    """Whether decoding failed only because the value goes on past what was read so far."""
    return error.pos >= len(buf) - 1 or error.msg.startswith("Unterminated string")


# --- Parquet and Arrow (incl. save_to_disk directories) ---------------------------------------------


@contextlib.contextmanager
def _readable(path: Path, kind: str):
    """pyarrow's errors on a damaged or foreign file (raised when opening it or at any batch) as one DataError."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: not a readable {kind} file ({e}); write it again with pyarrow or datasets") from e


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with _readable(path, "Parquet"):
        yield from _numbered(path, pq.ParquetFile(path).iter_batches(batch_size=1024), 0)


def _arrow(path: Path, first: int = 0, name: Path | None = None) -> Iterator[Row]:
    import pyarrow as pa

    with _readable(path, "Arrow"), pa.memory_map(str(path)) as source:
        try:
            batches = iter(pa.ipc.open_stream(source))  # what save_to_disk writes
        except (pa.ArrowInvalid, OSError):
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from _numbered(name or path, batches, first)


def _numbered(path: Path, batches, first: int) -> Iterator[Row]:
    n = first
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row
    if n == 0:
        raise DataError(f"{path}: the file holds no rows")


def _dataset_dir(path: Path) -> Iterator[Row]:
    if (path / "dataset_dict.json").is_file():
        splits = _json_file(path / "dataset_dict.json").get("splits")
        splits = [str(s) for s in splits] if isinstance(splits, list) else []
        raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; give one split's directory, e.g. "
                        f"data.train: {path / (splits[0] if splits else 'train')}")
    files = _json_file(path / "state.json").get("_data_files", [])
    if not isinstance(files, list):
        raise DataError(f"{path / 'state.json'}: _data_files must be a list; save the dataset again with save_to_disk")
    names = [f.get("filename") if isinstance(f, dict) else f for f in files]
    shards = [inside(path, name) for name in names]
    if None in shards:
        raise DataError(f"{path / 'state.json'}: _data_files names {names[shards.index(None)]!r}, not a file inside "
                        f"{path}; a dataset folder may only name its own files. Save the dataset again with save_to_disk")
    if not shards:
        raise DataError(f"{path}: state.json lists no data files; save the dataset again with save_to_disk")
    rows = 0
    for shard in shards:
        for where, row in _arrow(shard, rows, name=path):
            rows += 1
            yield where, row


def _json_file(path: Path) -> dict:
    """A save_to_disk folder's JSON description, a DataError when it is not a JSON object."""
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not valid JSON ({e}); save the dataset again with save_to_disk") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {kind(value)}; save the dataset again with save_to_disk")
    return value


def kind(value: object) -> str:
    """How a JSON value is named in messages: 'an object', 'a list', ..."""
    if value == []:
        return "an empty list"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
