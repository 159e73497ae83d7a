"""Scores of one generation against its reference. Each metric maps (output, reference) → float."""

import json
import re


def parse_json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


def json_valid(output: str, reference: str) -> float:
    return float(parse_json_object(output) is not None)


def field_accuracy(output: str, reference: str) -> float:
    """Share of the reference object's fields the output reproduces exactly (0 when not JSON)."""
    ref, got = parse_json_object(reference), parse_json_object(output) or {}
    return sum(got.get(k, object()) == v for k, v in ref.items()) / max(len(ref), 1)


def pick_metrics(references: list[str]) -> dict:
    """JSON-object references get validity and per-field accuracy; every task gets exact match."""
    chosen = {"exact_match": exact_match}
    if references and all(parse_json_object(r) is not None for r in references):
        chosen = {"json_valid": json_valid, "field_accuracy": field_accuracy, **chosen}
    return chosen
