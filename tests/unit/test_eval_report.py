"""Scoring rows, the summary and the reports, without a model: escaping, structure, offline."""

import json
from html.parser import HTMLParser

import pytest

from lorakit.eval import report
from lorakit.eval.generate import Generation
from lorakit.eval.metrics import pick_metrics
from lorakit.eval.score import score_row, summarize

REFS = ['{"category": "billing", "order_id": null}', '{"category": "shipping", "order_id": "ORD-1"}',
        '{"category": "account", "order_id": null}']
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _rows():
    names = pick_metrics(REFS)
    outputs = [("Sure! " + EVIL, REFS[0]), ('{"category": "billing"}', REFS[1]), (REFS[2], '{"category": "x"}')]
    rows = []
    for i, (ref, (base, tuned)) in enumerate(zip(REFS, outputs)):
        gens = {"base": Generation(base, 30, False, loss=6.0, loss_tokens=4),
                "tuned": Generation(tuned, 12, True, loss=2.0, loss_tokens=4)}
        rows.append(score_row(f"eval.jsonl:{i + 1}", [{"role": "user", "content": f"ticket {i} {EVIL}"}], ref, gens,
                              names))
    return rows, names


def _summary():
    rows, names = _rows()
    summary = summarize(rows, names, seed=0)
    summary |= {"n": len(rows), "seconds": 1.0,
                "generation": {"prompts": "eval.jsonl", "max_new_tokens": 32, "batch_size": 8, "temperature": 0.0,
                               "top_p": 1.0, "seed": None},
                "run": {"name": "r<b>", "model": "m", "method": "lora", "data_fingerprint": "sha256:ab",
                        "train_examples": 8, "eval_peak_mem_gib": 1.0,
                        "hyperparameters": {"lora.r": 8, "lora.alpha": 16.0, "lora.dropout": 0.0,
                                            "lora.target_modules": "all-linear", "train.lr": 1e-3,
                                            "train.scheduler": "cosine", "train.epochs": 1.0, "train.max_steps": 4,
                                            "train.batch_size": 8, "train.grad_accum": 1, "train.precision": "fp32",
                                            "data.max_length": 128, "data.loss_on": "assistant", "seed": 42},
                        "train": {"steps": 4, "seconds": 9.0, "peak_mem_gib": 2.0, "final_loss": 0.5,
                                  "final_eval_loss": 0.6}}}
    return summary, rows


def test_summary_scores_each_arm_and_field():
    summary, rows = _summary()
    assert rows[2]["tuned"]["scores"]["field_accuracy"] == 0.0 and rows[2]["base"]["scores"]["json_valid"] == 1.0
    assert summary["base"]["json_valid"] == pytest.approx(2 / 3) and summary["tuned"]["json_valid"] == 1.0
    assert summary["base"]["loss"] == pytest.approx(1.5) and summary["tuned"]["loss"] == pytest.approx(0.5)
    assert summary["tuned"]["perplexity"] == pytest.approx(2.718281828 ** 0.5)
    assert summary["delta"]["loss"]["wins"] == 3 and summary["delta"]["length"]["wins"] is None
    assert summary["per_field"]["category"] == {**summary["per_field"]["category"], "n": 3, "base": pytest.approx(1 / 3),
                                                "tuned": pytest.approx(2 / 3)}
    json.dumps(summary, allow_nan=False)  # plain JSON, no NaN


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.classes = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.ids.add(attrs.get("id"))
        self.classes.append((tag, attrs.get("class") or ""))


def test_html_report_is_escaped_offline_and_has_stable_ids():
    summary, rows = _summary()
    page = report.page(summary, rows, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "eval_loss": 1.2}])
    dom = _Dom()
    dom.feed(page)
    assert dom.tags.count("script") == 1 and "img" not in dom.tags  # model text stayed text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "r&lt;b&gt;" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page.replace("src=x", "")
    assert {"run", "loss-curves", "loss-svg", "metrics", "per-field", "compare-metric", "example-filter",
            "examples", "example-0", "example-2"} <= dom.ids
    metric_rows = [c for t, c in dom.classes if t == "tr" and c.startswith("metric")]
    assert len(metric_rows) == len(summary["metrics"])
    examples = [c for t, c in dom.classes if t == "tr" and c.startswith("example")]
    assert examples == ["example improvement", "example improvement", "example regression"]  # by field_accuracy


def test_markdown_report_has_the_table_and_a_regression():
    summary, rows = _summary()
    md = report.markdown(summary, rows)
    assert "| metric | base | tuned | tuned − base | 95% interval |" in md
    assert "| json_valid | 0.667 | 1.000 | +0.333 |" in md
    assert "### regression: eval.jsonl:3" in md and "## Per field" in md


def test_loss_curves_without_a_log():
    assert "No training log" in report.loss_curves_svg([])
