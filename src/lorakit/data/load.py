"""Find the data files and stream their rows as checked `Example`s, naming file:line for every problem."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from lorakit.data.errors import DataError, Problems
from lorakit.data.formats import ROLES, Example, check_columns, detect, normalize, rename
from lorakit.data.readers import SUFFIXES, is_dataset_dir, read_rows

__all__ = ["DataError", "Example", "ROLES", "read_examples", "read_messages", "resolve_files"]


def resolve_files(spec: str | os.PathLike | list) -> list[Path]:
    """Expand a file, a save_to_disk directory, a glob, or a list of them (globs sorted, no duplicates)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DataError("no data files given: set data.train to a file, a glob or a list of them")
    files: list[Path] = []
    for item in items:
        pattern = os.path.expanduser(str(item))
        if glob.has_magic(pattern):
            found = glob.glob(pattern, recursive=True)
            matches = sorted(p for p in found if os.path.isfile(p) or is_dataset_dir(Path(p)))
            if not matches:
                raise DataError(f"{item}: the glob matches no files; check the path and pattern")
            paths = [Path(m) for m in matches]
        else:
            path = Path(pattern)
            if path.is_dir() and not is_dataset_dir(path):
                raise DataError(f"{item}: is a directory but not one written by datasets' save_to_disk; give a "
                                f"file or a glob like {item}/*.jsonl ({', '.join(SUFFIXES)})")
            if not path.exists():
                raise DataError(f"{item}: file not found")
            paths = [path]
        files += [p for p in paths if p not in files]
    return files


def read_examples(
    files: str | os.PathLike | list,
    *,
    format: str = "auto",
    columns: dict | None = None,
    problems: Problems | None = None,
    file_reports: list | None = None,
) -> Iterator[Example]:
    """Stream the examples of `files`, each row renamed by `columns` and normalized to `format`
    (`auto`: detected from the first good row of each file).

    Without `problems`, the first bad row raises `DataError`; with it, each bad row or unreadable
    file is added there and reading goes on. `file_reports` receives one dict per file: rows read,
    the format and the columns mapping used.
    """
    columns = dict(columns or {})
    check_columns(columns)
    for path in resolve_files(files):
        info = {"file": str(path), "rows": 0, "format": None if format == "auto" else format, "columns": columns}
        if file_reports is not None:
            file_reports.append(info)
        try:
            yield from _file_examples(path, columns, problems, info)
        except DataError as e:
            if problems is None:
                raise
            problems.add(e)


def _file_examples(path: Path, columns: dict, problems: Problems | None, info: dict) -> Iterator[Example]:
    first = True
    for where, row in read_rows(path):
        info["rows"] += 1
        try:
            if isinstance(row, DataError):
                raise row
            row = _first_row(row, columns, where, info) if first else rename(row, columns, where)
            first = False
            example = normalize(row, info["format"], where)
        except _FileError:
            raise
        except DataError as e:
            if problems is None:
                raise
            problems.add(e)
            continue
        yield example


class _FileError(DataError):
    """A problem that makes the rest of the file unreadable: reported once, then the next file."""


def _first_row(row: dict, columns: dict, where: str, info: dict) -> dict:
    """The first good row decides the file's format and checks its columns; when that fails, every
    row after it would fail the same way, so the whole file is reported once."""
    try:
        row = rename(row, columns, where)
        info["format"] = info["format"] or detect(row, where)
    except DataError as e:
        raise _FileError(str(e)) from e
    return row


def read_messages(path: str | os.PathLike) -> Iterator[Example]:
    """Stream the conversations of a JSONL file with one `{"messages": [...]}` object a line.

    Blank lines are skipped; keys other than `messages` go to `Example.meta`. Raises `DataError`
    at the first bad line, naming `file:line`.
    """
    return read_examples(path, format="messages")
