"""Eval metrics against hand-computed values, and the paired bootstrap."""

import math
import random

import numpy as np
import pytest

from lorakit.errors import LorakitError
from lorakit.eval.metrics import (
    _lcs, exact_match, field_accuracy, field_scores, json_valid, normalize, pick_metrics, primary_metric, rouge_l,
    token_f1,
)
from lorakit.eval.stats import compare, paired_bootstrap, verdict, weighted_mean, win_tie_loss


def test_normalize_drops_case_punctuation_articles_and_extra_space():
    assert normalize("  The Cat,\tsat!  ") == "cat sat"
    assert normalize("An apple — a day…") == "apple day"
    assert exact_match("Paris.", "paris") == 1.0 and exact_match("Paris", "Lyon") == 0.0


def test_token_f1_by_hand():
    # words: [cat, sat, on, mat] vs [cat, on, mat]: overlap 3, precision 3/4, recall 1
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    # bags, not sets: x x y vs x y y share one x and one y
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("y", "x") == 0.0


def test_rouge_l_counts_order_where_token_f1_does_not():
    ref = "police killed the gunman"  # ROUGE's own example (Lin, 2004)
    assert rouge_l("police kill the gunman", ref) == pytest.approx(2 / 3)  # LCS police..gunman: 2 of 3
    assert rouge_l("the gunman kill police", ref) == pytest.approx(1 / 3)  # LCS is one word
    assert token_f1("police kill the gunman", ref) == token_f1("the gunman kill police", ref) == pytest.approx(2 / 3)
    assert rouge_l("w x y z", "x z w") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))


def _lcs_table(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_matches_the_full_table():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert _lcs(a, b) == _lcs_table(a, b)


def test_json_metrics_by_hand():
    ref = '{"a": 1, "b": 3, "c": null}'
    assert json_valid('{"a": 1}', ref) == 1.0 and json_valid("[1]", ref) == 0.0 and json_valid("a: 1", ref) == 0.0
    assert field_scores('{"a": 1, "b": 2}', ref) == {"a": 1.0, "b": 0.0, "c": 0.0}  # a missing null is wrong
    assert field_accuracy('{"a": 1, "b": 2}', ref) == pytest.approx(1 / 3)
    assert field_accuracy("not json", ref) == 0.0


def test_metrics_follow_the_references_or_the_request():
    json_refs = ['{"a": 1}', ' {"b": "x"} ']
    assert pick_metrics(json_refs) == ["json_valid", "field_accuracy", "exact_match", "loss", "perplexity",
                                       "stop_rate", "length"]
    assert pick_metrics(['{"a": 1}', "Paris."])[:3] == ["exact_match", "token_f1", "rouge_l"]
    assert pick_metrics(["x"], ["loss", "exact_match"]) == ["exact_match", "loss"]
    with pytest.raises(LorakitError, match="'bleu'.*choose from"):
        pick_metrics(["x"], ["bleu"])
    assert primary_metric(pick_metrics(json_refs)) == "field_accuracy"
    assert primary_metric(pick_metrics(["x"])) == "token_f1"


def test_bootstrap_interval_excludes_zero_for_a_clear_improvement():
    base, tuned = [0.0, 1.0] * 25, [1.0] * 50
    mean, lo, hi = paired_bootstrap(base, tuned, seed=0)
    assert mean == pytest.approx(0.5) and 0 < lo < mean < hi
    d = compare(base, tuned, "higher")
    assert (d["wins"], d["ties"], d["losses"]) == (25, 25, 0) and verdict(d, "higher") == "better"
    assert verdict(compare(tuned, base, "higher"), "higher") == "worse"


def test_bootstrap_interval_includes_zero_for_noise():
    base = list(np.random.default_rng(1).normal(size=100))
    tuned = [b + d for b, d in zip(base, [0.5, -0.5] * 50)]  # each prompt moves, the mean does not
    mean, lo, hi = paired_bootstrap(base, tuned, seed=0)
    assert mean == pytest.approx(0.0, abs=1e-12) and lo < 0 < hi
    assert verdict(compare(base, tuned, "higher"), "higher") == "unclear"


def test_bootstrap_is_deterministic_by_seed_and_pairs_prompts():
    rng = np.random.default_rng(2)
    base = rng.normal(size=40)
    tuned = base + 0.1 + rng.normal(scale=0.05, size=40)
    assert paired_bootstrap(base, tuned, seed=3) == paired_bootstrap(base, tuned, seed=3)
    assert paired_bootstrap(base, tuned, seed=3) != paired_bootstrap(base, tuned, seed=4)
    _, lo, _ = paired_bootstrap(base, tuned, seed=3)
    assert lo > 0  # pairing removes the large shared prompt-to-prompt spread (sd 1 ≫ the 0.1 shift)


def test_weighted_means_and_transform():
    # loss per token: prompt 1 has 1 token at loss 1, prompt 2 has 3 tokens at loss 3 → (1 + 9) / 4
    assert weighted_mean([1.0, 3.0], [1, 3]) == pytest.approx(2.5)
    mean, lo, hi = paired_bootstrap([1.0, 3.0], [0.5, 1.0], weights=[1, 3], transform=np.exp, seed=0)
    assert mean == pytest.approx(math.exp((0.5 + 3.0) / 4) - math.exp(2.5))
    assert lo <= mean <= hi


def test_win_tie_loss_follows_the_direction():
    assert win_tie_loss([0, 1, 1], [1, 1, 0], "higher") == (1, 1, 1)
    assert win_tie_loss([2.0, 1.0], [1.0, 1.5], "lower") == (1, 0, 1)
    assert win_tie_loss([1, 2], [3, 4], None) is None
    assert compare([1, 2], [3, 4], None)["wins"] is None
