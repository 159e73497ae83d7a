"""The data stage: files → conversations → rendered, masked token ids, with a report of what happened."""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorakit.data.load import DataError, Example, read_messages, resolve_files
from lorakit.data.render import IGNORE, Rendered, RenderError, eot_token_ids, render

__all__ = [
    "DataError",
    "Example",
    "IGNORE",
    "Prepared",
    "RenderError",
    "Rendered",
    "eot_token_ids",
    "marked_text",
    "prepare",
    "read_messages",
    "render",
    "resolve_files",
]

TOO_LONG = ("error", "drop", "truncate")


@dataclass
class Prepared:
    """The examples to train on, their `file:line` sources, and the report for data_report.json."""

    examples: list[Rendered]
    sources: list[str]
    report: dict


def prepare(
    files: str | os.PathLike | list,
    tokenizer,
    *,
    max_length: int,
    too_long: Literal["error", "drop", "truncate"] = "error",
    loss_on: Literal["assistant", "all"] = "assistant",
    template: str | os.PathLike | None = None,
) -> Prepared:
    """Read, render and length-check every example of `files` (a file, a glob or a list of them).

    `template` is the path of a .jinja chat template (None: the tokenizer's). Examples longer than
    `max_length` tokens raise (`error`), are dropped (`drop`) or are cut from the right (`truncate`;
    an example left with no trained token is dropped instead). Every drop and cut is in the report.
    """
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    paths = resolve_files(files)
    template_text = _read_template(template)
    rendered, sources = [], []
    for path in paths:
        for example in read_messages(path):
            rendered.append(
                render(
                    tokenizer, example.messages, loss_on=loss_on, template=template_text, source=example.source
                )
            )
            sources.append(example.source)

    over = [(s, len(r.input_ids)) for s, r in zip(sources, rendered) if len(r.input_ids) > max_length]
    if over and too_long == "error":
        raise DataError(_too_long_message(over, len(rendered), max_length))
    kept, kept_sources, dropped, truncated = [], [], [], []
    for source, r in zip(sources, rendered):
        if len(r.input_ids) > max_length:
            if too_long == "truncate":
                r = Rendered(r.input_ids[:max_length], r.labels[:max_length])
            if too_long == "drop" or all(label == IGNORE for label in r.labels):
                dropped.append(source)
                continue
            truncated.append(source)
        kept.append(r)
        kept_sources.append(source)
    if not kept:
        raise DataError(
            f"all {len(rendered)} examples were dropped as longer than data.max_length={max_length} "
            f"(with too_long={too_long}); raise data.max_length"
        )

    lengths = [len(r.input_ids) for r in kept]
    report = {
        "files": [str(p) for p in paths],
        "examples_read": len(rendered),
        "examples_kept": len(kept),
        "dropped": {"count": len(dropped), "sources": dropped},
        "truncated": {"count": len(truncated), "sources": truncated},
        "max_length": max_length,
        "too_long": too_long,
        "loss_on": loss_on,
        "tokens_total": sum(lengths),
        "tokens_trained": sum(label != IGNORE for r in kept for label in r.labels),
        "max_len": max(lengths),
        "mean_len": round(sum(lengths) / len(lengths), 1),
        "template": str(template) if template is not None else "tokenizer",
        "eot_tokens": tokenizer.convert_ids_to_tokens(eot_token_ids(tokenizer, template_text)),
        "fingerprint": _fingerprint(kept, tokenizer.get_chat_template(template_text), len(tokenizer)),
        "sample_source": kept_sources[0],
        "sample": marked_text(tokenizer, kept[0]),
    }
    return Prepared(kept, kept_sources, report)


def marked_text(tokenizer, rendered: Rendered) -> str:
    """The decoded example with each trained span wrapped in `[[` `]]`, for eyeballing the mask."""
    parts = []
    pairs = zip(rendered.input_ids, rendered.labels)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE):
        text = tokenizer.decode(
            [token for token, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)


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


def _fingerprint(examples: list[Rendered], template_text: str, vocab_size: int) -> str:
    """sha256 over what training sees: the token ids and labels, the template and the vocabulary size."""
    h = hashlib.sha256()
    h.update(template_text.encode("utf-8"))
    h.update(struct.pack("<q", vocab_size))
    for r in examples:
        h.update(struct.pack(f"<q{len(r.input_ids)}i", len(r.input_ids), *r.input_ids))
        h.update(struct.pack(f"<{len(r.labels)}i", *r.labels))
    return "sha256:" + h.hexdigest()


def prepare_run(cfg, tokenizer) -> tuple[Prepared, Prepared | None, dict]:
    """Train and held-out examples for a run (data.eval, or a seeded data.eval_split of train) and
    the report written to data_report.json: {"train": ..., "eval": ..., "fingerprint": ...}."""
    d = cfg.data
    if d.format not in ("auto", "messages") or d.columns:
        raise DataError(f"data.format: {d.format!r} and data.columns are not supported yet; give JSONL lines of "
                        f'{{"messages": [{{"role": ..., "content": ...}}]}} and data.format: auto')
    if d.loss_on == "completion":
        raise DataError("data.loss_on: 'completion' applies to prompt/completion data, which is not supported "
                        "yet; use assistant (train on assistant turns) or all")
    kwargs = dict(max_length=d.max_length, too_long=d.too_long, loss_on=d.loss_on, template=d.template)
    train = prepare(d.train, tokenizer, **kwargs)
    held_out = prepare(d.eval, tokenizer, **kwargs) if d.eval else None
    if held_out is None and d.eval_split > 0:
        train, held_out = _split(train, d.eval_split, cfg.seed)
    report = {"train": train.report, "eval": held_out.report if held_out else None,
              "fingerprint": train.report["fingerprint"]}
    return train, held_out, report


def _split(data: Prepared, fraction: float, seed: int) -> tuple[Prepared, Prepared]:
    import random

    order = list(range(len(data.examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(order)))
    if n_eval >= len(order):
        raise DataError(f"data.eval_split={fraction} leaves no training examples out of {len(order)}")
    return _subset(data, sorted(order[n_eval:])), _subset(data, sorted(order[:n_eval]))


def _subset(data: Prepared, idx: list[int]) -> Prepared:
    examples = [data.examples[i] for i in idx]
    lengths = [len(r.input_ids) for r in examples]
    report = {**data.report, "split_of": data.report["files"], "examples_read": len(idx), "examples_kept": len(idx),
              "tokens_total": sum(lengths), "max_len": max(lengths), "mean_len": round(sum(lengths) / len(idx), 1),
              "tokens_trained": sum(label != IGNORE for r in examples for label in r.labels)}
    return Prepared(examples, [data.sources[i] for i in idx], report)
