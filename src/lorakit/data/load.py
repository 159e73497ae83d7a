"""Read training files into `Example`s, naming file:line for every problem."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError

ROLES = ("system", "user", "assistant", "tool")
_SHAPE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


class DataError(LorakitError):
    """A data file or example is unusable; the message names where and how to fix it."""


@dataclass
class Example:
    """One conversation. `source` is `file:line` as the user wrote the file name."""

    source: str
    messages: list[dict]
    meta: dict = field(default_factory=dict)


def resolve_files(spec: str | os.PathLike | list) -> list[Path]:
    """Expand a file, a glob, or a list of them into existing files (globs sorted, no duplicates)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DataError("no data files given: set data.train to a file, a glob or a list of them")
    files: list[Path] = []
    for item in items:
        pattern = os.path.expanduser(str(item))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{item}: the glob matches no files; check the path and pattern")
            paths = [Path(m) for m in matches]
        else:
            path = Path(pattern)
            if path.is_dir():
                raise DataError(f"{item}: is a directory; give a file or a glob like {item}/*.jsonl")
            if not path.is_file():
                raise DataError(f"{item}: file not found")
            paths = [path]
        files += [p for p in paths if p not in files]
    return files


def read_messages(path: str | os.PathLike) -> Iterator[Example]:
    """Stream the conversations of a JSONL file with one `{"messages": [...]}` object a line.

    Blank lines are skipped; keys other than `messages` go to `Example.meta`. Raises `DataError`
    at the first bad line, naming `file:line`.
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from e
    seen = False
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, first=lineno == 1)
            if not line.strip():
                continue
            seen = True
            yield Example(where, *_parse(line, where))
    if not seen:
        raise DataError(f"{path}: the file is empty; it needs one JSON object a line like {_SHAPE}")


def _decode(raw: bytes, where: str, *, first: bool) -> str:
    try:
        # utf-8-sig on the first line: editors on Windows write a byte-order mark.
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from e


def _parse(line: str, where: str) -> tuple[list[dict], dict]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: invalid JSON: {e.msg} at column {e.colno}; "
            f"each line must be one complete JSON object like {_SHAPE}"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}; each line must look like {_SHAPE}")
    if "messages" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise DataError(f'{where}: no "messages" key (keys found: {keys}); each line must look like {_SHAPE}')
    messages = obj.pop("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of messages, got {_kind(messages)}')
    for i, message in enumerate(messages):
        _check_message(message, f"{where}: messages[{i}]")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: no assistant message, so there is nothing to train on; "
            "add the assistant's reply or remove the line"
        )
    return messages, obj


def _check_message(message: object, where: str) -> None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f'{where}: must be an object {{"role": ..., "content": "..."}}, got {_short(message)}')
    if message["role"] not in ROLES:
        raise DataError(f"{where}: unknown role {message['role']!r}; allowed roles: {', '.join(ROLES)}")
    if not isinstance(message["content"], str):
        raise DataError(f'{where}: "content" must be a string, got {_kind(message["content"])}')


def _kind(value: object) -> str:
    if value == []:
        return "an empty list"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
