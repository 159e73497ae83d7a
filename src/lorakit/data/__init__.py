"""The data stage: files → examples → rendered, masked token ids (→ packed rows), with a report of
what happened to every row."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorakit.data.check import Tally, marked_text, pad_note, summary_lines, token_stats
from lorakit.data.errors import DataError, Problems
from lorakit.data.formats import Example
from lorakit.data.load import read_examples, read_messages, resolve_files
from lorakit.data.pack import efficiency, pack
from lorakit.data.render import (IGNORE, Rendered, RenderError, eot_token_ids, render, render_example,
                                 render_examples)

__all__ = [
    "DataError",
    "Example",
    "IGNORE",
    "Prepared",
    "RenderError",
    "Rendered",
    "check",
    "eot_token_ids",
    "marked_text",
    "prepare",
    "prepare_run",
    "raise_for_errors",
    "read_examples",
    "read_messages",
    "render",
    "render_example",
    "resolve_files",
    "summary_lines",
]

TOO_LONG = ("error", "drop", "truncate")


@dataclass
class Prepared:
    """The examples to train on, their `file:line` sources, and the report for data_report.json.

    `lengths` and `trained` have the token counts of each kept example (also when the examples
    themselves were not kept); `packed` has the example indices of each row when data.packing is on.
    """

    examples: list[Rendered]
    sources: list[str]
    report: dict
    lengths: list[int] = field(default_factory=list, repr=False)
    trained: list[int] = field(default_factory=list, repr=False)
    problems: Problems = field(default_factory=Problems, repr=False)
    packed: list[list[int]] | None = None

    @functools.cached_property
    def rows(self) -> list:
        """What the training schedule draws from: packed rows (lists of examples), or the examples."""
        if self.packed is None:
            return self.examples
        return [[self.examples[i] for i in row] for row in self.packed]


def prepare(
    files: str | os.PathLike | list,
    tokenizer,
    *,
    max_length: int,
    too_long: Literal["error", "drop", "truncate"] = "error",
    loss_on: Literal["assistant", "completion", "all"] = "assistant",
    template: str | os.PathLike | None = None,
    format: str = "auto",
    columns: dict | None = None,
    keep: bool = True,
    dump_tokens: str | os.PathLike | None = None,
    raise_errors: bool = True,
) -> Prepared:
    """Read, render and length-check every example of `files` (a file, a glob or a list of them).

    `template` is the path of a .jinja chat template (None: the tokenizer's). Examples longer than
    `max_length` tokens raise (`error`), are dropped (`drop`) or are cut from the right (`truncate`;
    an example whose cut would remove an answer entirely is dropped instead). Every drop and cut is
    in the report. Bad rows do not stop the reading: all of them are reported in one `DataError`
    at the end (or left in `Prepared.problems` with `raise_errors=False`). `keep=False` streams: the
    report is complete but no examples are kept. `dump_tokens` writes each kept example's source,
    input_ids and labels as one JSON line.
    """
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    template_text = _read_template(template)
    problems, inputs = Problems(), []
    tally = Tally(tokenizer, template_text, _stop_ids(tokenizer, template_text))
    fit = _Fit(tokenizer, max_length, too_long, loss_on, template_text)
    examples, sources = [], []
    stream = _stream(files, format=format, columns=columns, file_reports=inputs)
    with _dump(dump_tokens) as dump:
        for example, rendered in _rendered(stream, tokenizer, loss_on, template_text):
            if isinstance(rendered, DataError):
                problems.add(rendered)
                continue
            try:
                rendered = fit(example, rendered, tally)
            except DataError as e:
                problems.add(e)
                continue
            if rendered is None:
                continue
            tally.add(example, rendered)
            dump(example.source, rendered)
            if keep:
                examples.append(rendered)
                sources.append(example.source)
    _final_problems(problems, fit, tally)
    if raise_errors:
        problems.raise_if_any()
    settings = dict(max_length=max_length, too_long=too_long, loss_on=loss_on, over_max_length=len(fit.over),
                    template=str(template) if template is not None else "tokenizer")
    report = _report(tally, inputs, tokenizer, settings)
    return Prepared(examples, sources, report, list(tally.totals), list(tally.trained), problems)


BATCH = 512  # examples rendered together: enough to amortize the template's and tokenizer's per-call cost


class _Found(list):
    """Problems met while reading, held until `_stream` yields them in their place."""

    add = list.append


def _stream(files, **kwargs) -> Iterator[Example | DataError]:
    """`read_examples(files, **kwargs)` with the error of each bad row in its place, in file order."""
    found = _Found()
    for example in read_examples(files, problems=found, **kwargs):
        yield from found
        found.clear()
        yield example
    yield from found


def _rendered(stream: Iterator[Example | DataError], tokenizer, loss_on: str,
              template: str | None) -> Iterator[tuple[Example | None, Rendered | DataError]]:
    """(example, its rendering or its error), and (None, error) for a bad row, in file order; the
    examples are rendered BATCH at a time."""
    while chunk := list(itertools.islice(stream, BATCH)):
        examples = [item for item in chunk if isinstance(item, Example)]
        rendered = iter(render_examples(tokenizer, examples, loss_on=loss_on, template=template))
        for item in chunk:
            yield (item, next(rendered)) if isinstance(item, Example) else (None, item)


class _Fit:
    """The length policy: the example as it will be trained on, or None when it is dropped."""

    def __init__(self, tokenizer, max_length: int, too_long: str, loss_on: str, template: str | None):
        self.tokenizer, self.max_length, self.too_long = tokenizer, max_length, too_long
        self.loss_on, self.template = loss_on, template
        self.over: list[tuple[str, int]] = []
        self.seen = 0

    def __call__(self, example: Example, r: Rendered, tally: Tally) -> Rendered | None:
        self.seen += 1
        if len(r.input_ids) <= self.max_length:
            return r
        self.over.append((example.source, len(r.input_ids)))
        if self.too_long == "drop":
            tally.drop(example.source, "longer than max_length")
        if self.too_long != "truncate":
            return None
        cut = self.max_length
        starts = self._answer_starts(example, r)
        if any(start >= cut for start in starts) or all(label == IGNORE for label in r.labels[:cut]):
            tally.drop(example.source, "truncation would cut an answer off entirely")
            return None
        tally.truncate(example.source)
        return Rendered(r.input_ids[:cut], r.labels[:cut], starts)

    def _answer_starts(self, example: Example, r: Rendered) -> list[int]:
        if self.loss_on != "all" or example.text is not None:
            return r.turn_starts
        # loss_on: all trains everything, so where the answers start takes an assistant-only rendering
        return render_example(self.tokenizer, example, loss_on="assistant", template=self.template).turn_starts


def _final_problems(problems: Problems, fit: _Fit, tally: Tally) -> None:
    if fit.over and fit.too_long == "error":
        problems.add(_too_long_message(fit.over, fit.seen, fit.max_length))
    elif fit.seen and not tally.totals:
        problems.add(f"all {fit.seen} examples were dropped as longer than data.max_length={fit.max_length} "
                     f"(with too_long={fit.too_long}); raise data.max_length")


def _report(tally: Tally, inputs: list[dict], tokenizer, settings: dict) -> dict:
    stop_ids = sorted(tally.eot_ids)
    return {
        "files": [i["file"] for i in inputs],
        "inputs": inputs,
        "examples_read": sum(i["rows"] for i in inputs),
        **tally.stats(),
        "formats": tally.formats,
        **settings,
        "dropped": tally.dropped,
        "truncated": tally.truncated,
        "duplicates": tally.duplicates,
        "warnings": tally.warnings,
        "eot_tokens": tokenizer.convert_ids_to_tokens(stop_ids),
        "pad": pad_note(tokenizer, stop_ids, tally.eot_trained, len(tally.totals)),
        "fingerprint": tally.fingerprint,
        "sample_source": tally.preview[0]["source"] if tally.preview else None,
        "sample": tally.preview[0]["text"] if tally.preview else None,
        "preview": tally.preview,
    }


def check(cfg, tokenizer, *, dump_tokens: str | os.PathLike | None = None) -> dict:
    """The data report of a run's config, as `lorakit check` shows it: every row is read, rendered
    and verified, streaming (nothing is kept, no model weights are needed). Problems do not raise:
    they are in report["errors"] ({"count", "messages"}), so the caller prints the report and then
    exits 2 when the count is not 0. `dump_tokens` writes one JSON line per training example:
    {"source": "file:line", "input_ids": [...], "labels": [...]} with -100 where not trained.
    """
    return prepare_run(cfg, tokenizer, keep=False, dump_tokens=dump_tokens, raise_errors=False)[2]


def raise_for_errors(report: dict) -> None:
    """After `check`: one DataError listing the problems in `report`, if there are any (exit code 2)."""
    problems = Problems()
    problems.extend(report["errors"])
    problems.raise_if_any()


def prepare_run(cfg, tokenizer, *, keep: bool = True, dump_tokens: str | os.PathLike | None = None,
                raise_errors: bool = True) -> tuple[Prepared, Prepared | None, dict]:
    """Train and held-out examples for a run (data.eval, or a seeded data.eval_split of train), the
    train rows packed when data.packing is on, and the report written to data_report.json:
    {"train": ..., "eval": ..., "fingerprint": ..., "errors": {"count", "messages"}}.
    Raises one DataError listing every problem of both splits (unless `raise_errors` is False)."""
    d = cfg.data
    kwargs = dict(max_length=d.max_length, too_long=d.too_long, loss_on=d.loss_on, template=d.template,
                  format=d.format, columns=d.columns, keep=keep, raise_errors=False)
    train = prepare(d.train, tokenizer, dump_tokens=dump_tokens, **kwargs)
    held_out = prepare(d.eval, tokenizer, **kwargs) if d.eval else None
    problems = _merged(train, held_out)
    if raise_errors:
        problems.raise_if_any()
    if held_out is None and d.eval_split > 0 and train.lengths:
        train, held_out = _split(train, d.eval_split, cfg.seed)
    train.report["packing"] = {"enabled": d.packing}
    if d.packing and train.lengths:
        train.packed = pack(train.lengths, d.max_length)
        train.report["packing"].update(rows=len(train.packed), capacity=d.max_length,
                                       efficiency=round(efficiency(train.lengths, train.packed, d.max_length), 4))
    report = {"train": train.report, "eval": held_out.report if held_out else None,
              "fingerprint": train.report["fingerprint"], "errors": problems.report()}
    return train, held_out, report


def _merged(train: Prepared, held_out: Prepared | None) -> Problems:
    if held_out is None or not held_out.problems.count:
        return train.problems
    merged = Problems()
    merged.extend(train.problems)
    merged.extend(held_out.problems)
    return merged


def _stop_ids(tokenizer, template_text: str | None) -> list[int]:
    if template_text is None and tokenizer.chat_template is None:  # plain text: eos ends each example
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return eot_token_ids(tokenizer, template_text)


@contextlib.contextmanager
def _dump(path: str | os.PathLike | None):
    """A function writing one example's tokens as a JSON line to `path` (doing nothing without one)."""
    if path is None:
        yield lambda source, rendered: None
        return
    with open(path, "w", encoding="utf-8") as f:
        yield lambda source, r: f.write(json.dumps({"source": source, "input_ids": r.input_ids,
                                                    "labels": r.labels}) + "\n")


def _read_template(template: str | os.PathLike | None) -> str | None:
    if template is None:
        return None
    try:
        return Path(template).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(
            f"data.template: cannot read {template} ({e.strerror}); give the path of a .jinja file"
        ) from e


def _too_long_message(over: list[tuple[str, int]], total: int, max_length: int) -> str:
    lines = [f"  {source} ({length} tokens)" for source, length in over[:10]]
    if len(over) > 10:
        lines.append(f"  ... and {len(over) - 10} more")
    return (
        f"{len(over)} of {total} examples are longer than data.max_length={max_length} tokens:\n"
        + "\n".join(lines)
        + "\nraise data.max_length or set data.too_long: drop|truncate"
    )


def _split(data: Prepared, fraction: float, seed: int) -> tuple[Prepared, Prepared]:
    order = list(range(len(data.lengths)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(order)))
    if n_eval >= len(order):
        raise DataError(f"data.eval_split={fraction} leaves no training examples out of {len(order)}")
    return _subset(data, sorted(order[n_eval:])), _subset(data, sorted(order[:n_eval]))


def _subset(data: Prepared, idx: list[int]) -> Prepared:
    examples = [data.examples[i] for i in idx] if data.examples else []
    lengths, trained = [data.lengths[i] for i in idx], [data.trained[i] for i in idx]
    report = {**data.report, "split_of": data.report["files"], "examples_read": len(idx),
              **token_stats(lengths, trained)}
    sources = [data.sources[i] for i in idx] if data.sources else []
    return Prepared(examples, sources, report, lengths, trained, data.problems)
