"""Tuned minus base, paired per prompt: the difference of means with a bootstrap interval, and counts.

Base and tuned answer the same prompts, so the comparison is paired: a resample draws prompts with
replacement and takes both arms' scores of each drawn prompt. That removes the prompt-to-prompt
variance both arms share, and gives much tighter intervals than comparing two independent means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 2000


def weighted_mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    return float((v * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


def paired_bootstrap(base: Sequence[float], tuned: Sequence[float], *, weights: Sequence[float] | None = None,
                     transform: Callable | None = None, resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """(difference, lo, hi): transform(mean(tuned)) − transform(mean(base)) and its 95% percentile
    interval over `resamples` paired resamples of the prompts. `weights` makes the means weighted
    (loss per token: weights are each prompt's token counts); `transform` maps a mean, elementwise (np.exp: perplexity)."""
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=float)
    f = transform or (lambda x: x)
    idx = np.random.default_rng(seed).integers(0, len(b), size=(resamples, len(b)))
    wsum = w[idx].sum(axis=1)
    deltas = f((t * w)[idx].sum(axis=1) / wsum) - f((b * w)[idx].sum(axis=1) / wsum)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return float(f(weighted_mean(t, w)) - f(weighted_mean(b, w))), float(lo), float(hi)


def win_tie_loss(base: Sequence[float], tuned: Sequence[float], better: str | None) -> tuple[int, int, int] | None:
    """Prompts where tuned scored better, the same, worse than base; None for a metric with no better."""
    if better is None:
        return None
    sign = 1 if better == "higher" else -1
    diffs = [sign * (t - b) for b, t in zip(base, tuned)]
    return sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)


def compare(base: Sequence[float], tuned: Sequence[float], better: str | None, *,
            weights: Sequence[float] | None = None, transform: Callable | None = None, seed: int = 0) -> dict:
    """The summary.json entry of one metric: {"mean", "ci95": [lo, hi], "wins", "ties", "losses"}."""
    mean, lo, hi = paired_bootstrap(base, tuned, weights=weights, transform=transform, seed=seed)
    counts = win_tie_loss(base, tuned, better) or (None, None, None)
    return {"mean": mean, "ci95": [lo, hi], **dict(zip(("wins", "ties", "losses"), counts))}


def verdict(delta: dict, better: str | None) -> str:
    """'better' or 'worse' when the interval excludes zero, 'unclear' when it does not, '' without a direction."""
    if better is None:
        return ""
    lo, hi = delta["ci95"]
    if lo > 0 or hi < 0:
        return "better" if (lo > 0) == (better == "higher") else "worse"
    return "unclear"
