"""`lorakit.evaluate` end to end on the embedded model, and report.html as a browser renders it."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

import lorakit

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    """Headless Chromium with nothing that reaches the network, a throwaway profile, the page given last."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class _Dom(HTMLParser):
    """Elements by id; the example rows (with their hidden flag) and metric rows; the text of #example-count."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.examples, self.metrics, self.count, self._in_count = set(), [], [], "", False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        classes = (attrs.get("class") or "").split()
        if tag == "tr" and "example" in classes:
            self.examples.append(("hidden" in attrs, classes))
        if tag == "tr" and "metric" in classes:
            self.metrics.append(attrs["data-metric"])
        self._in_count = attrs.get("id") == "example-count"

    def handle_data(self, data):
        if self._in_count:
            self.count += data


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium (make test installs it)")
def test_eval_writes_reports_that_render_in_chromium(overfit_config, tmp_path):
    run = tmp_path / "run"
    cfg = lorakit.load_config(overfit_config, [f"output_dir={run}", "train.max_steps=4", "train.eval_every=2",
                                               f"data.eval={overfit_config.parent / 'train.jsonl'}"])
    lorakit.train(cfg)
    summary = lorakit.evaluate(run)

    assert summary["n"] == 8 and list(summary["metrics"]) == ["exact_match", "token_f1", "rouge_l", "loss",
                                                              "perplexity", "stop_rate", "length"]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the same masks and loss as training: tuned loss is the eval loss training logged on this file (to
    # float rounding: eval takes it from the KV-cached generation pass, training from one full forward)
    assert summary["tuned"]["loss"] == pytest.approx(log[-1]["eval_loss"], rel=1e-3, abs=1e-5)
    assert summary["delta"]["loss"]["ci95"][1] < 0 and summary["delta"]["loss"]["wins"] == 8  # it learned them
    assert summary["run"]["data_fingerprint"].startswith("sha256:") and summary["run"]["train"]["steps"] == 4
    rows = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]["tuned"]["scores"]) == set(summary["metrics"])
    assert (run / "eval" / "report.md").read_text().startswith("# lorakit eval: run")

    page = (run / "eval" / "report.html").as_uri()
    dom = _Dom(_chromium(tmp_path, "--dump-dom", page).stdout)
    assert {"run", "loss-svg", "metrics", "examples", "compare-metric", "example-filter"} <= dom.ids
    assert dom.metrics == list(summary["metrics"])
    assert len(dom.examples) == 8 and not any(hidden for hidden, _ in dom.examples)
    assert dom.count == "8 of 8 shown"  # written by the page's script: it ran

    improved = _Dom(_chromium(tmp_path, "--dump-dom", page + "#metric=loss&show=improvement").stdout)
    assert improved.count == "8 of 8 shown" and all("improvement" in c for _, c in improved.examples)
    regressed = _Dom(_chromium(tmp_path, "--dump-dom", page + "#metric=loss&show=regression").stdout)
    assert regressed.count == "0 of 8 shown" and all(hidden for hidden, _ in regressed.examples)

    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", page)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
