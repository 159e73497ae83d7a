"""RUN_DIR/eval/report.md and report.html: what a person reads after a run.

report.html is one file that works offline: inline CSS, inline SVG charts and a few lines of inline
JavaScript for the example filter, no external URL. Every piece of text in it (prompts, references,
model outputs, file names) goes through `html.escape`: outputs are model text and must never become
markup. Stable ids for tools and tests: #run, #loss-curves, #metrics (rows tr.metric[data-metric]),
#per-field, #compare-metric, #example-filter, #examples (rows tr.example, with class improvement,
regression or unchanged).
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from lorakit.eval.metrics import primary_metric
from lorakit.eval.stats import verdict

MAX_EXAMPLES = 500  # example rows in report.html; results.jsonl has every one


def read_log(path: Path) -> list[dict]:
    """The training log (metrics.jsonl), or [] when the run has none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_block(run: Path, cfg) -> dict:
    """Model, method, data fingerprint, key hyperparameters and training cost of the run."""
    data_report = json.loads((run / "data_report.json").read_text()) if (run / "data_report.json").is_file() else {}
    block = {"name": run.resolve().name, "model": cfg.model, "method": cfg.method,
             "data_fingerprint": data_report.get("fingerprint"),
             "train_examples": (data_report.get("train") or {}).get("examples_kept"),
             "hyperparameters": {
                 "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "lora.dropout": cfg.lora.dropout,
                 "lora.target_modules": cfg.lora.target_modules, "train.lr": cfg.train.lr,
                 "train.scheduler": cfg.train.scheduler, "train.epochs": cfg.train.epochs,
                 "train.max_steps": cfg.train.max_steps, "train.batch_size": cfg.train.batch_size,
                 "train.grad_accum": cfg.train.grad_accum, "train.precision": cfg.train.precision,
                 "data.max_length": cfg.data.max_length, "data.loss_on": cfg.data.loss_on, "seed": cfg.seed}}
    log = read_log(run / "metrics.jsonl")
    if log:
        block["train"] = _train_cost(log)
    return block


def _train_cost(log: list[dict]) -> dict:
    # a record's step time is tokens / tok_s; steps between logged ones are assumed as long on average
    times = [r["tokens"] / r["tok_s"] for r in log if r.get("tok_s")]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    return {"steps": log[-1]["step"],
            "seconds": round(sum(times) / len(times) * log[-1]["step"], 1) if times else None,
            "peak_mem_gib": round(max(r.get("mem_gib", 0.0) for r in log), 2),
            "final_loss": log[-1].get("loss"), "final_eval_loss": evals[-1] if evals else None}


def fmt(name: str, value: float | None, signed: bool = False) -> str:
    """A metric value as the tables show it."""
    if value is None or not math.isfinite(value):
        return "–"
    digits = 1 if name == "length" else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(name: str, delta: dict) -> str:
    lo, hi = delta["ci95"]
    return f"[{fmt(name, lo, True)}, {fmt(name, hi, True)}]"


def _counts(delta: dict) -> str:
    return "–" if delta["wins"] is None else f"{delta['wins']} / {delta['ties']} / {delta['losses']}"


def _statuses(rows: list[dict], metric: str, better: str) -> list[str]:
    sign = 1 if better == "higher" else -1
    out = []
    for r in rows:
        d = sign * (r["tuned"]["scores"][metric] - r["base"]["scores"][metric])
        out.append("improvement" if d > 0 else "regression" if d < 0 else "unchanged")
    return out


# --- report.md -------------------------------------------------------------------------------------

def markdown(summary: dict, rows: list[dict]) -> str:
    run, names = summary["run"], list(summary["metrics"])
    lines = [f"# lorakit eval: {run['name']}", "", _headline(summary), "",
             "| metric | base | tuned | tuned − base | 95% interval | wins / ties / losses | |",
             "|---|---:|---:|---:|---|---|---|"]
    for n in names:
        d = summary["delta"][n]
        lines.append(f"| {n} | {fmt(n, summary['base'][n])} | {fmt(n, summary['tuned'][n])} | "
                     f"{fmt(n, d['mean'], True)} | {_interval(n, d)} | {_counts(d)} | "
                     f"{verdict(d, summary['metrics'][n]['better'])} |")
    if summary.get("per_field"):
        lines += ["", "## Per field", "", "| field | n | base | tuned | tuned − base | 95% interval |",
                  "|---|---:|---:|---:|---:|---|"]
        for f, s in summary["per_field"].items():
            lines.append(f"| {f} | {s['n']} | {s['base']:.3f} | {s['tuned']:.3f} | {s['delta']['mean']:+.3f} | "
                         f"{_interval('field', s['delta'])} |")
    lines += ["", "## Run", "", *[f"- {k}: {v}" for k, v in _run_facts(summary)], ""]
    lines += _md_examples(summary, rows)
    return "\n".join(lines) + "\n"


def _md_examples(summary: dict, rows: list[dict]) -> list[str]:
    primary = primary_metric(list(summary["metrics"]))
    statuses = _statuses(rows, primary, summary["metrics"][primary]["better"] or "higher")
    lines = ["## Examples", "",
             f"By {primary}: {statuses.count('improvement')} improved, {statuses.count('regression')} regressed, "
             f"{statuses.count('unchanged')} unchanged. Every example is in report.html and results.jsonl.", ""]
    for r, s in [(r, s) for r, s in zip(rows, statuses) if s == "regression"][:3]:
        lines += [f"### regression: {r['source']}", ""]
        for label, text in (("reference", r["reference"]), ("base", r["base"]["output"]),
                            ("tuned", r["tuned"]["output"])):
            fence = "`" * max(3, _longest_backtick_run(text) + 1)
            lines += [f"{label}:", "", fence, text, fence, ""]
    return lines


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _headline(summary: dict) -> str:
    run, g = summary["run"], summary["generation"]
    decoding = "greedy" if g["temperature"] == 0 else \
        f"sampled (temperature {g['temperature']}, top_p {g['top_p']}, seed {g['seed']})"
    return (f"{summary['n']} held-out prompts from {g['prompts']} · base = {run['model']} without the adapter, "
            f"tuned = with it · {decoding}, at most {g['max_new_tokens']} new tokens · eval took "
            f"{summary['seconds']:.0f}s")


def _run_facts(summary: dict) -> list[tuple[str, str]]:
    run, hp = summary["run"], summary["run"]["hyperparameters"]
    length = f"{hp['train.max_steps']} steps" if hp["train.max_steps"] else f"{hp['train.epochs']:g} epochs"
    facts = [("model", f"{run['model']} · {run['method']}"),
             ("data", f"{run['train_examples']} training examples · fingerprint {run['data_fingerprint']}"),
             ("lora", f"r={hp['lora.r']} alpha={hp['lora.alpha']:g} dropout={hp['lora.dropout']:g} · "
                      f"target_modules={hp['lora.target_modules']}"),
             ("training", f"{length} · batch {hp['train.batch_size']} × {hp['train.grad_accum']} · lr "
                          f"{hp['train.lr']:g} {hp['train.scheduler']} · precision {hp['train.precision']} · "
                          f"max_length {hp['data.max_length']} · loss on {hp['data.loss_on']} · seed {hp['seed']}")]
    if "train" in run:
        t = run["train"]
        cost = f"{t['steps']} steps in about {t['seconds']:.0f}s" if t["seconds"] else f"{t['steps']} steps"
        facts.append(("training cost", f"{cost} · peak memory {t['peak_mem_gib']:.2f} GiB · final loss "
                                       f"{fmt('loss', t['final_loss'])} · final eval loss "
                                       f"{fmt('loss', t['final_eval_loss'])}"))
    facts.append(("evaluation cost", f"{summary['seconds']:.0f}s · peak memory {run['eval_peak_mem_gib']:.2f} GiB"))
    return facts


# --- report.html -----------------------------------------------------------------------------------

def page(summary: dict, rows: list[dict], log: list[dict]) -> str:
    e = html.escape
    return "\n".join([
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lorakit eval · {e(summary['run']['name'])}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<header><h1>lorakit eval · {e(summary['run']['name'])}</h1><p>{e(_headline(summary))}</p></header>",
        _section("run", "Run", _facts_table(summary)),
        _section("loss-curves", "Loss during training", loss_curves_svg(log)),
        _section("metrics-section", "Base vs tuned", _metrics_table(summary)),
        _section("per-field-section", "Per field", _fields_table(summary)) if summary.get("per_field") else "",
        _section("examples-section", "Examples", _examples(summary, rows)),
        f"<script>{_script(summary)}</script>", "</body>", "</html>", ""])


def _section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _facts_table(summary: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _run_facts(summary))
    return f'<table class="facts">{cells}</table>'


def loss_curves_svg(log: list[dict], width: int = 720, height: int = 260) -> str:
    """Training loss per logged step (line) and eval loss (line with dots), as inline SVG."""
    train = [(r["step"], r["loss"]) for r in log if math.isfinite(r.get("loss", math.nan))]
    evals = [(r["step"], r["eval_loss"]) for r in log if math.isfinite(r.get("eval_loss", math.nan))]
    if not train:
        return "<p>No training log (metrics.jsonl) in this run.</p>"
    left, right, top, bottom = 56, 16, 12, 36
    x_max = max(s for s, _ in train + evals) or 1
    y_max = max(v for _, v in train + evals) * 1.05 or 1.0

    def x(step: float) -> float:
        return left + step / x_max * (width - left - right)

    def y(value: float) -> float:
        return top + (1 - value / y_max) * (height - top - bottom)

    parts = [f'<svg id="loss-svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             'aria-label="training and eval loss by step">']
    for k in range(5):
        v = y_max * k / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                     f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for s in sorted({0, round(x_max / 2), x_max}):
        parts.append(f'<text class="tick" x="{x(s):.1f}" y="{height - bottom + 16}" text-anchor="middle">{s}</text>')
    parts.append(f'<text class="tick" x="{width - right}" y="{height - 4}" text-anchor="end">step</text>')
    parts.append(_polyline("train", [(x(s), y(v)) for s, v in train]))
    if evals:
        parts.append(_polyline("eval", [(x(s), y(v)) for s, v in evals]))
        parts += [f'<circle class="eval" cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5"/>' for s, v in evals]
    parts.append(f'<text class="legend train" x="{left + 10}" y="{top + 14}">train loss</text>')
    if evals:
        parts.append(f'<text class="legend eval" x="{left + 100}" y="{top + 14}">eval loss</text>')
    return "".join(parts) + "</svg>"


def _polyline(cls: str, points: list[tuple[float, float]]) -> str:
    return f'<polyline class="{cls}" points="{" ".join(f"{px:.1f},{py:.1f}" for px, py in points)}"/>'


def _interval_svg(name: str, delta: dict, width: int = 140, height: int = 16) -> str:
    """The interval as a bar around the difference, against a line at zero; one scale per row."""
    lo, hi = delta["ci95"]
    span = max(abs(lo), abs(hi), abs(delta["mean"]), 1e-12)

    def x(v: float) -> float:
        return width / 2 + v / span * (width / 2 - 4)

    return (f'<svg class="ci" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'aria-label="95% interval {html.escape(_interval(name, delta))}">'
            f'<line class="zero" x1="{width / 2}" x2="{width / 2}" y1="0" y2="{height}"/>'
            f'<line class="bar" x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{height / 2}" y2="{height / 2}"/>'
            f'<circle class="point" cx="{x(delta["mean"]):.1f}" cy="{height / 2}" r="3"/></svg>')


def _metrics_table(summary: dict) -> str:
    e = html.escape
    head = ("<tr><th>metric</th><th>base</th><th>tuned</th><th>tuned − base</th><th>95% interval</th><th></th>"
            "<th>wins / ties / losses</th><th></th></tr>")
    body = []
    for n, m in summary["metrics"].items():
        d = summary["delta"][n]
        v = verdict(d, m["better"])
        direction = f"{m['better']} is better" if m["better"] else "neither better nor worse"
        body.append(
            f'<tr class="metric {v}" data-metric="{e(n)}"><td><span class="name">{e(n)}</span>'
            f'<div class="about">{e(m["about"])} · {e(direction)}</div></td>'
            f'<td class="num">{fmt(n, summary["base"][n])}</td><td class="num">{fmt(n, summary["tuned"][n])}</td>'
            f'<td class="num delta">{fmt(n, d["mean"], True)}</td><td class="num">{e(_interval(n, d))}</td>'
            f"<td>{_interval_svg(n, d)}</td><td class=\"num\">{e(_counts(d))}</td>"
            f'<td class="verdict">{e(v)}</td></tr>')
    note = (f"<p class=\"note\">Intervals: paired bootstrap over prompts, {summary['bootstrap']['resamples']} "
            f"resamples, seed {summary['bootstrap']['seed']}. A verdict is given only when the interval excludes "
            "zero; wins / ties / losses count prompts where tuned scored better / the same / worse.</p>")
    return f'<table id="metrics"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>{note}'


def _fields_table(summary: dict) -> str:
    e = html.escape
    head = ("<tr><th>field</th><th>prompts</th><th>base</th><th>tuned</th><th>tuned − base</th>"
            "<th>95% interval</th><th></th><th>wins / ties / losses</th></tr>")
    body = [f'<tr class="field {verdict(s["delta"], "higher")}" data-field="{e(f)}"><td>{e(f)}</td>'
            f'<td class="num">{s["n"]}</td><td class="num">{s["base"]:.3f}</td><td class="num">{s["tuned"]:.3f}</td>'
            f'<td class="num delta">{s["delta"]["mean"]:+.3f}</td><td class="num">{e(_interval("field", s["delta"]))}</td>'
            f'<td>{_interval_svg("field", s["delta"])}</td><td class="num">{e(_counts(s["delta"]))}</td></tr>'
            for f, s in summary["per_field"].items()]
    return f'<table id="per-field"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _examples(summary: dict, rows: list[dict]) -> str:
    e = html.escape
    comparable = [n for n, m in summary["metrics"].items() if m["better"]]
    primary = primary_metric(list(summary["metrics"]))
    options = "".join(f'<option value="{e(n)}"{" selected" if n == primary else ""}>{e(n)}</option>'
                      for n in comparable)
    controls = (f'<div class="controls"><label>compare by <select id="compare-metric">{options}</select></label> '
                '<label>show <select id="example-filter"><option value="all">all</option>'
                '<option value="regression">regressions: tuned worse than base</option>'
                '<option value="improvement">improvements: tuned better than base</option>'
                '<option value="unchanged">unchanged</option></select></label> '
                f'<span id="example-count">{min(len(rows), MAX_EXAMPLES)} of {len(rows)} shown</span></div>')
    statuses = _statuses(rows, primary, summary["metrics"][primary]["better"])
    body = [_example_row(i, r, s, list(summary["metrics"]))
            for i, (r, s) in enumerate(zip(rows[:MAX_EXAMPLES], statuses))]
    more = (f'<p class="note">The first {MAX_EXAMPLES} of {len(rows)} examples; all are in results.jsonl.</p>'
            if len(rows) > MAX_EXAMPLES else "")
    head = "<tr><th>#</th><th>prompt</th><th>reference</th><th>base</th><th>tuned</th><th>scores</th></tr>"
    return f'{controls}{more}<table id="examples"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _example_row(i: int, row: dict, status: str, names: list[str]) -> str:
    e = html.escape
    scores = {arm: row[arm]["scores"] for arm in ("base", "tuned")}
    last_user = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
    context = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in row["prompt"])
    score_rows = "".join(f"<tr><td>{e(n)}</td><td class=\"num\">{fmt(n, scores['base'][n])}</td><td>→</td>"
                         f"<td class=\"num\">{fmt(n, scores['tuned'][n])}</td></tr>" for n in names)
    return (f'<tr class="example {status}" id="example-{i}" data-scores="{e(json.dumps(scores))}">'
            f'<td class="num">{i + 1}<div class="source" title="{e(row["source"])}">'
            f'{e(Path(row["source"]).name)}</div></td>'
            f'<td class="prompt"><pre>{e(last_user)}</pre><details><summary>whole prompt</summary>'
            f"<pre>{e(context)}</pre></details></td>"
            f'<td class="reference"><pre>{e(row["reference"])}</pre></td>'
            f"{_output_cell('base', row['base'])}{_output_cell('tuned', row['tuned'])}"
            f'<td class="scores"><table>{score_rows}</table></td></tr>')


def _output_cell(arm: str, out: dict) -> str:
    ending = "stopped" if out["stopped"] else "hit the token cap"
    return (f'<td class="output {arm}"><pre>{html.escape(out["output"])}</pre>'
            f'<div class="meta">{out["new_tokens"]} tokens · {ending}</div></td>')


def _script(summary: dict) -> str:
    better = json.dumps({n: m["better"] for n, m in summary["metrics"].items()})
    return _JS.replace("BETTER", better.replace("<", "\\u003c"))


_JS = """
(() => {
  const better = BETTER;
  const rows = [...document.querySelectorAll("#examples tr.example")];
  const scores = new Map(rows.map((row) => [row, JSON.parse(row.dataset.scores)]));
  const metric = document.getElementById("compare-metric");
  const filter = document.getElementById("example-filter");
  const count = document.getElementById("example-count");
  const hash = new URLSearchParams(location.hash.slice(1));  // e.g. report.html#show=regression&metric=loss
  if (hash.get("metric")) metric.value = hash.get("metric");
  if (hash.get("show")) filter.value = hash.get("show");
  function apply() {
    const m = metric.value, sign = better[m] === "lower" ? -1 : 1;
    let shown = 0;
    for (const row of rows) {
      const s = scores.get(row), d = sign * (s.tuned[m] - s.base[m]);
      const status = d > 0 ? "improvement" : d < 0 ? "regression" : "unchanged";
      row.classList.remove("improvement", "regression", "unchanged");
      row.classList.add(status);
      row.hidden = filter.value !== "all" && filter.value !== status;
      shown += row.hidden ? 0 : 1;
    }
    count.textContent = `${shown} of ${rows.length} shown`;
  }
  metric.addEventListener("change", apply);
  filter.addEventListener("change", apply);
  apply();
})();
"""

_CSS = """
:root { --fg: #1d2330; --muted: #5f6b7a; --line: #d9dee5; --good: #1a7f37; --bad: #c62828; --bg2: #f5f7fa; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 24px auto; max-width: 1400px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
header p, .note, .about, .meta, .source { color: var(--muted); }
.about, .meta, .source { font-size: 12px; }
table { border-collapse: collapse; } th, td { padding: 5px 9px; border-bottom: 1px solid var(--line);
  vertical-align: top; text-align: left; }
th { background: var(--bg2); font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.facts th { background: none; white-space: nowrap; }
tr.better .verdict, tr.better .delta { color: var(--good); font-weight: 600; }
tr.worse .verdict, tr.worse .delta { color: var(--bad); font-weight: 600; }
svg .grid { stroke: var(--line); } svg .tick { font-size: 11px; fill: var(--muted); }
svg polyline { fill: none; stroke-width: 2; } svg polyline.train { stroke: #3867d6; }
svg polyline.eval { stroke: #e67e22; } svg circle.eval { fill: #e67e22; }
svg .legend { font-size: 12px; } svg .legend.train { fill: #3867d6; } svg .legend.eval { fill: #e67e22; }
svg.ci .zero { stroke: var(--muted); stroke-dasharray: 2 2; } svg.ci .bar { stroke: var(--fg); stroke-width: 3; }
svg.ci .point { fill: var(--fg); }
.controls { margin: 8px 0 12px; display: flex; gap: 16px; align-items: center; }
#examples { table-layout: fixed; width: 100%; }
#examples th:nth-child(1) { width: 4%; } #examples th:nth-child(6) { width: 16%; }
#examples pre { white-space: pre-wrap; word-break: break-word; margin: 0; max-height: 18em; overflow: auto;
  font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
#examples td.scores table td { border: none; padding: 1px 4px; font-size: 12px; }
tr.example.regression td:first-child { border-left: 4px solid var(--bad); }
tr.example.improvement td:first-child { border-left: 4px solid var(--good); }
tr.example.unchanged td:first-child { border-left: 4px solid var(--line); }
details summary { cursor: pointer; color: var(--muted); font-size: 12px; }
"""
