"""The data report: what was read, rendered, kept, dropped and cut, in one JSON-ready dict.

`Tally` sees each example once, as it streams past, and keeps a few numbers per example (lengths,
duplicate hashes) and the ids of the examples it reports, so a check of millions of rows holds no
token ids in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
from array import array

from lorakit.data.formats import Example
from lorakit.data.render import IGNORE, Rendered

LISTED = 20  # example ids listed per warning kind; counts are always complete
_WORDS = re.compile(r"\w+")


class Tally:
    """Accumulates the report of one data split while examples stream through `add`."""

    def __init__(self, tokenizer, template_text: str | None, eot_ids: list[int]):
        self.tokenizer, self.eot_ids = tokenizer, set(eot_ids)
        self.totals, self.trained = array("i"), array("i")
        self.formats: dict[str, int] = {}
        self.dropped: dict = {"count": 0, "sources": [], "reasons": {}}
        self.truncated: dict = {"count": 0, "sources": []}
        self.warnings: dict[str, dict] = {}
        self.preview: list[dict] = []
        self.eot_trained = 0
        self._exact: dict[int, str] = {}
        self._near: dict[int, str] = {}
        self.duplicates = {"exact": {"count": 0, "pairs": []}, "near": {"count": 0, "pairs": []}}
        self._hash = hashlib.sha256()
        self._hash.update((tokenizer.get_chat_template(template_text) if _has_template(tokenizer, template_text)
                           else "").encode("utf-8"))
        self._hash.update(struct.pack("<q", len(tokenizer)))

    def add(self, example: Example, rendered: Rendered) -> None:
        """A kept example: its lengths, duplicates, turn warnings, and the fingerprint."""
        labels = rendered.labels
        n = len(labels)
        self.totals.append(n)
        self.trained.append(n - labels.count(IGNORE))
        self.formats[example.format] = self.formats.get(example.format, 0) + 1
        self.eot_trained += sum(labels.count(i) for i in self.eot_ids)
        self._duplicates(example)
        for kind in turn_warnings(example):
            self.warn(kind, example.source)
        self._hash.update(struct.pack("<q", n) + _int32(rendered.input_ids) + _int32(labels))
        if len(self.preview) < 2:
            self.preview.append({"source": example.source, "text": marked_text(self.tokenizer, rendered)})

    def drop(self, source: str, reason: str) -> None:
        self.dropped["count"] += 1
        self.dropped["sources"].append(source)
        self.dropped["reasons"][reason] = self.dropped["reasons"].get(reason, 0) + 1

    def truncate(self, source: str) -> None:
        self.truncated["count"] += 1
        self.truncated["sources"].append(source)

    def warn(self, kind: str, source: str) -> None:
        entry = self.warnings.setdefault(kind, {"count": 0, "sources": []})
        entry["count"] += 1
        if len(entry["sources"]) < LISTED:
            entry["sources"].append(source)

    @property
    def fingerprint(self) -> str:
        """sha256 over what training sees: token ids and labels, the template, the vocabulary size."""
        return "sha256:" + self._hash.hexdigest()

    def _duplicates(self, example: Example) -> None:
        exact, near = _digests(example)
        for key, seen, found in ((exact, self._exact, self.duplicates["exact"]),
                                 (near, self._near, self.duplicates["near"])):
            first = seen.setdefault(key, example.source)
            if first != example.source:
                found["count"] += 1
                if len(found["pairs"]) < LISTED:
                    found["pairs"].append([example.source, first])

    def stats(self) -> dict:
        return token_stats(self.totals, self.trained)


def token_stats(totals, trained) -> dict:
    """Token counts and min / median / p95 / max lengths of prompt (untrained), answer (trained) and
    total, given each example's total and trained token counts."""
    prompts = sorted(n - t for n, t in zip(totals, trained))
    totals, trained = sorted(totals), sorted(trained)
    total, answer = sum(totals), sum(trained)
    return {"examples_kept": len(totals), "tokens_total": total, "tokens_trained": answer,
            "trained_share": round(answer / total, 4) if total else 0.0,
            "max_len": totals[-1] if totals else 0, "mean_len": round(total / len(totals), 1) if totals else 0.0,
            "lengths": {"prompt": _percentiles(prompts), "answer": _percentiles(trained),
                        "total": _percentiles(totals)}}


def turn_warnings(example: Example) -> list[str]:
    """Problems with a conversation's turns that do not stop training but are worth a look."""
    messages = example.messages
    if not messages:
        return []
    kinds = []
    roles = [m["role"] for m in messages]
    if any(not m["content"].strip() for m in messages if m["role"] != "assistant"):
        kinds.append("empty_turn")
    if any(a == b == "user" for a, b in itertools.pairwise(roles)):
        kinds.append("two_user_turns_in_a_row")
    if roles[-1] == "user":
        kinds.append("ends_with_user_turn")
    if "system" in roles[1:]:
        kinds.append("system_turn_not_first")
    return kinds


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


def pad_note(tokenizer, eot_ids: list[int], eot_trained: int, examples: int) -> dict:
    """Whether the pad token is also a stop token, and proof that the stop token is still trained."""
    shared = tokenizer.pad_token_id is not None and tokenizer.pad_token_id in eot_ids
    note = None
    if not eot_trained and examples:
        note = ("no stop token is trained: the template ends assistant turns without an end-of-turn token "
                f"({', '.join(tokenizer.convert_ids_to_tokens(eot_ids))} never follows an answer), so the tuned "
                "model may not learn to stop; give data.template a template that closes each turn with one")
    elif shared and examples:
        note = ("the pad token is also the end-of-turn/eos token; lorakit masks by position, not by token id, "
                f"so the end of each answer is still trained ({eot_trained} trained stop tokens)")
    return {"pad_token": tokenizer.pad_token, "pad_is_stop_token": shared, "stop_tokens_trained": eot_trained,
            "note": note}


def summary_lines(report: dict) -> list[str]:
    """The report as short lines for the terminal: one per split, then warnings and packing."""
    lines = []
    for split in ("train", "eval"):
        r = report.get(split)
        if not r:
            continue
        t = r["lengths"]["total"]
        lines.append(f"{split}: {r['examples_kept']} of {r['examples_read']} examples "
                     f"({', '.join(f'{k} {v}' for k, v in r['formats'].items())}), {r['tokens_total']} tokens, "
                     f"{r['trained_share']:.0%} trained; length min {t['min']} / median {t['median']} / "
                     f"p95 {t['p95']} / max {t['max']} of {r['max_length']}")
        if r["dropped"]["count"] or r["truncated"]["count"]:
            lines.append(f"  dropped {r['dropped']['count']} {r['dropped']['reasons']}, truncated "
                         f"{r['truncated']['count']} (ids in data_report.json)")
        for kind, found in {**r["warnings"], **{f"{k}_duplicates": v for k, v in r["duplicates"].items()}}.items():
            if found["count"]:
                lines.append(f"  warning: {found['count']} {kind.replace('_', ' ')}, e.g. "
                             f"{(found.get('sources') or found.get('pairs'))[0]}")
        if r.get("packing", {}).get("rows"):
            p = r["packing"]
            lines.append(f"  packing: {p['rows']} rows of {p['capacity']} tokens, {p['efficiency']:.0%} filled")
        if r["pad"]["note"]:
            lines.append(f"  note: {r['pad']['note']}")
    return lines


def _digests(example: Example) -> tuple[int, int]:
    """8-byte hashes of the example's roles and texts, and of its lowercased words only (near duplicates)."""
    turns = example.conversation() or [{"role": "text", "content": example.text}]
    exact = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in turns)
    near = " ".join(_WORDS.findall(" ".join(m["content"] for m in turns).lower()))
    return _h(exact), _h(near)


def _int32(values: list[int]) -> bytes:
    return array("i", values).tobytes()


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _percentiles(values: list[int]) -> dict:
    """min / median / p95 / max of sorted `values`."""
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    at = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"min": values[0], "median": at(0.5), "p95": at(0.95), "max": values[-1]}


def _has_template(tokenizer, template_text: str | None) -> bool:
    return template_text is not None or tokenizer.chat_template is not None
