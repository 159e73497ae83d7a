"""What each metric means, and the per-example scores of one generation against its reference.

Text metrics map (output, reference) → float in [0, 1]. `loss`, `perplexity`, `stop_rate` and `length`
come from the model and the generation instead (see `lorakit.eval`), but are listed here too so that
every metric has one name, one direction and one line of documentation.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lorakit.errors import LorakitError


def parse_json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation and the articles a/an/the, collapse
    whitespace. Formatting differences do not count as errors; wording does."""
    text = "".join(" " if _is_punct(ch) else ch for ch in text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


def token_f1(output: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the normalized words, as a bag (SQuAD's F1)."""
    got, want = normalize(output).split(), normalize(reference).split()
    if not got or not want:
        return float(got == want)
    same = sum((Counter(got) & Counter(want)).values())
    return _f1(same, len(got), len(want))


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of normalized words, so order counts but gaps do not."""
    got, want = normalize(output).split(), normalize(reference).split()
    if not got or not want:
        return float(got == want)
    return _f1(_lcs(got, want), len(got), len(want))


def _f1(overlap: int, n_output: int, n_reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_output, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence; one DP row, O(len(a) * len(b))."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def json_valid(output: str, reference: str) -> float:
    return float(parse_json_object(output) is not None)


def field_scores(output: str, reference: str) -> dict[str, float]:
    """1.0 for each field of the reference object the output reproduces exactly, else 0.0."""
    ref, got = parse_json_object(reference) or {}, parse_json_object(output) or {}
    return {k: float(k in got and got[k] == v) for k, v in ref.items()}


def field_accuracy(output: str, reference: str) -> float:
    """Share of the reference object's fields the output reproduces exactly (0 when not JSON)."""
    scores = field_scores(output, reference)
    return sum(scores.values()) / max(len(scores), 1)


@dataclass(frozen=True)
class Metric:
    name: str
    better: Literal["higher", "lower"] | None  # None: a description (length), neither better nor worse
    about: str  # one line, shown in the report
    score: Callable[[str, str], float] | None = None  # text metrics; the others come from the model


METRICS = {m.name: m for m in (
    Metric("json_valid", "higher", "share of outputs that parse as one JSON object", json_valid),
    Metric("field_accuracy", "higher", "share of the reference's JSON fields reproduced exactly", field_accuracy),
    Metric("exact_match", "higher", "output equals the reference after normalization", exact_match),
    Metric("token_f1", "higher", "word overlap with the reference (F1 of normalized words)", token_f1),
    Metric("rouge_l", "higher", "longest common word subsequence with the reference (F1)", rouge_l),
    Metric("loss", "lower", "teacher-forced loss per reference token, training mask"),
    Metric("perplexity", "lower", "exp(loss)"),
    Metric("stop_rate", "higher", "share of generations that end on end-of-turn before the token cap"),
    Metric("length", None, "output length in tokens"),
)}
TEXT_JSON = ("json_valid", "field_accuracy", "exact_match")
TEXT_FREE = ("exact_match", "token_f1", "rouge_l")
ALWAYS = ("loss", "perplexity", "stop_rate", "length")


def pick_metrics(references: list[str], requested: list[str] | None = None) -> list[str]:
    """The metric names to report, in table order: JSON-object references get validity and field
    accuracy, free text gets F1 and ROUGE-L; every task gets exact match, loss, stop rate and length.
    `requested` (e.g. eval.metrics) replaces the choice."""
    if requested:
        unknown = [name for name in requested if name not in METRICS]
        if unknown:
            raise LorakitError(f"eval metrics: unknown {', '.join(map(repr, unknown))}; "
                               f"choose from {', '.join(METRICS)}")
        return [name for name in METRICS if name in requested]
    is_json = bool(references) and all(parse_json_object(r) is not None for r in references)
    return [*(TEXT_JSON if is_json else TEXT_FREE), *ALWAYS]


def primary_metric(names: list[str]) -> str:
    """The metric that decides whether an example got better or worse by default in the report."""
    return next(n for n in ("field_accuracy", "token_f1", "exact_match", "rouge_l", "json_valid", "loss",
                            "stop_rate", *names) if n in names)
