"""Per-prompt scores of both arms (the rows of results.jsonl) and their summary (summary.json)."""

from __future__ import annotations

import math

import numpy as np

from lorakit.eval.generate import Generation
from lorakit.eval.metrics import METRICS, field_scores
from lorakit.eval.stats import RESAMPLES, compare, weighted_mean

ARMS = ("base", "tuned")


def score_row(source: str, prompt: list[dict], reference: str, gens: dict[str, Generation],
              names: list[str]) -> dict:
    """One prompt: its reference, each arm's output and its score on every metric in `names`.

    Per prompt, `loss` is the mean over the reference's trained tokens; `reference_tokens` is their
    count, which weighs the prompt in the summary's loss.
    """
    row = {"source": source, "prompt": prompt, "reference": reference,
           "reference_tokens": gens["base"].loss_tokens}
    for arm in ARMS:
        g = gens[arm]
        loss = g.loss / max(g.loss_tokens, 1)
        scores = {"stop_rate": float(g.stopped), "length": float(g.new_tokens), "loss": loss,
                  "perplexity": math.exp(loss)}
        scores |= {n: METRICS[n].score(g.text, reference) for n in names if METRICS[n].score}
        row[arm] = {"output": g.text, "new_tokens": g.new_tokens, "stopped": g.stopped,
                    "scores": {n: scores[n] for n in names}}
        if "field_accuracy" in names:
            row[arm]["fields"] = field_scores(g.text, reference)
    return row


def summarize(rows: list[dict], names: list[str], seed: int) -> dict:
    """{"base": {metric: value}, "tuned": {...}, "delta": {metric: tuned − base with its interval and
    win/tie/loss counts}, "per_field": {...}, "metrics": {metric: {"better", "about"}}, "bootstrap"}."""
    summary = {"base": {}, "tuned": {}, "delta": {}}
    for name in names:
        # loss and perplexity are per reference token: weighted by each prompt's tokens; perplexity
        # is exp of the mean loss, not a mean of per-prompt perplexities
        key = "loss" if name == "perplexity" else name
        weights = [r["reference_tokens"] for r in rows] if key == "loss" else None
        transform = np.exp if name == "perplexity" else None
        values = {arm: [r[arm]["scores"][key] for r in rows] for arm in ARMS}
        for arm in ARMS:
            mean = weighted_mean(values[arm], weights)
            summary[arm][name] = float(transform(mean)) if transform else mean
        summary["delta"][name] = compare(values["base"], values["tuned"], METRICS[name].better,
                                         weights=weights, transform=transform, seed=seed)
    if "field_accuracy" in names:
        summary["per_field"] = per_field(rows, seed)
    summary["metrics"] = {n: {"better": METRICS[n].better, "about": METRICS[n].about} for n in names}
    summary["bootstrap"] = {"resamples": RESAMPLES, "seed": seed, "interval": "95% percentile, paired by prompt"}
    return summary


def per_field(rows: list[dict], seed: int) -> dict:
    """Accuracy of each field of the JSON references, over the prompts whose reference has it."""
    fields = list(dict.fromkeys(f for r in rows for f in r["base"]["fields"]))
    out = {}
    for f in fields:
        values = {arm: [r[arm]["fields"][f] for r in rows if f in r[arm]["fields"]] for arm in ARMS}
        out[f] = {"n": len(values["base"]), **{arm: weighted_mean(values[arm]) for arm in ARMS},
                  "delta": compare(values["base"], values["tuned"], "higher", seed=seed)}
    return out
