"""`lorakit eval`: base vs tuned on held-out prompts, from a run directory.

The base model is loaded once with the run's adapter. For every held-out example we generate with the
adapter off (base) and on (tuned), score both outputs against the reference, take both models'
teacher-forced loss on the reference, and compare the arms prompt by prompt (`lorakit.eval.stats`).
RUN_DIR/eval/ gets summary.json, results.jsonl, report.md and report.html.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit import console, models
from lorakit.config import load_config
from lorakit.data.load import read_examples
from lorakit.data.render import IGNORE, eot_token_ids, render
from lorakit.errors import LorakitError
from lorakit.eval import report
from lorakit.eval.generate import Prompt, Sampling, generate
from lorakit.eval.metrics import pick_metrics
from lorakit.eval.score import ARMS, score_row, summarize


@dataclass
class Case:
    """One held-out example: the messages before its last assistant turn, and that turn's content."""

    source: str
    prompt: list[dict]
    reference: str


def evaluate(run_dir: str | Path, prompts: str | None = None, limit: int | None = None, *,
             metrics: list[str] | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> dict:
    """Generate with the adapter off and on for each held-out prompt; score, compare, write RUN_DIR/eval/.

    `prompts` (a file the data pipeline reads) defaults to eval.prompts, then data.eval; `metrics`,
    `max_new_tokens` and `batch_size` default to the run's choice and eval config. Decoding is greedy
    unless `temperature` > 0 (then seeded by `seed`, default the run's seed). Returns the summary:
    {"base": {metric: value}, "tuned": {...}, "delta": {metric: {"mean", "ci95", "wins", "ties",
    "losses"}}, "per_field", "metrics", "n", "seconds", "generation", "bootstrap", "run"}.
    """
    started = time.time()
    run = Path(run_dir)
    cfg = _run_config(run)
    source = prompts or cfg.eval.prompts or cfg.data.eval
    if source is None:
        raise LorakitError(f"{run}: nothing to evaluate on: set data.eval or eval.prompts, or pass --prompts FILE.")
    seed = cfg.seed if seed is None else seed
    sampling = _sampling(temperature, top_p, seed)
    cases = _cases(source, cfg, limit or cfg.eval.limit)
    names = pick_metrics([c.reference for c in cases], metrics)
    model, tokenizer, template = _load_tuned(cfg, run)
    settings = dict(stop_ids=eot_token_ids(tokenizer, template), sampling=sampling,
                    max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
                    batch_size=batch_size or cfg.eval.batch_size)
    encoded = [_encode(tokenizer, c, template, with_loss="loss" in names or "perplexity" in names) for c in cases]
    outputs = {arm: generate(model, tokenizer, encoded, adapter=arm == "tuned", **settings) for arm in ARMS}
    rows = [score_row(c.source, c.prompt, c.reference, {arm: outputs[arm][i] for arm in ARMS}, names)
            for i, c in enumerate(cases)]
    summary = summarize(rows, names, seed)
    summary |= {"n": len(cases), "seconds": round(time.time() - started, 1),
                "generation": {"prompts": str(source), "max_new_tokens": settings["max_new_tokens"],
                               "batch_size": settings["batch_size"], "temperature": temperature, "top_p": top_p,
                               "seed": seed if temperature > 0 else None},
                "run": report.run_block(run, cfg) | {"eval_peak_mem_gib": round(console.memory_gib(
                    next(model.parameters()).device), 2)}}
    _write(run, rows, summary)
    return summary


def _run_config(run: Path):
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise LorakitError(f"{run}: no trained adapter in {run / 'adapter'}. Train first: "
                           f"lorakit train CONFIG output_dir={run}")
    return load_config(run / "config.yaml", require_train=False)


def _sampling(temperature: float, top_p: float, seed: int) -> Sampling:
    if temperature < 0 or not 0 < top_p <= 1:
        raise LorakitError(f"eval sampling: temperature must be ≥ 0 (0 = greedy) and top_p in (0, 1]; got "
                           f"temperature={temperature}, top_p={top_p}")
    return Sampling(temperature, top_p, seed)


def _cases(source: str | Path, cfg, limit: int | None) -> list[Case]:
    """Each example's messages before its last assistant turn, and that turn as the reference."""
    cases = []
    for ex in read_examples(source, format=cfg.data.format, columns=cfg.data.columns):
        messages = ex.conversation()
        if messages is None:
            raise LorakitError(f"{ex.source}: a plain-text example has no prompt to answer; evaluate on "
                               "conversations or prompt/completion examples (--prompts FILE)")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        cases.append(Case(ex.source, messages[:last], messages[last]["content"]))
        if limit and len(cases) >= limit:
            break
    return cases


def _load_tuned(cfg, run: Path):
    from peft import PeftModel

    model_path = models.resolve_model(cfg.model)
    device = models.default_device()
    precision = models.resolve_precision(cfg.train.precision, device)
    tokenizer = models.load_tokenizer(str(run / "adapter"), cfg.trust_remote_code)
    base = models.load_base(cfg, model_path, precision, device)
    model = PeftModel.from_pretrained(base, run / "adapter")
    template = Path(cfg.data.template).read_text() if cfg.data.template else None
    return model, tokenizer, template


def _encode(tokenizer, case: Case, template: str | None, with_loss: bool) -> Prompt:
    """The prompt's token ids as training renders them, and the reference answer after them with its
    training mask (the answer and its end-of-turn token), which the loss is taken over."""
    messages = [*case.prompt, {"role": "assistant", "content": case.reference}]
    rendered = render(tokenizer, messages, template=template, source=case.source)
    start = rendered.turn_starts[-1]  # the reference's first trained token: everything before is prompt
    if not with_loss:
        return Prompt(rendered.input_ids[:start])
    return Prompt(rendered.input_ids[:start], rendered.input_ids[start:],
                  [label != IGNORE for label in rendered.labels[start:]])


def _write(run: Path, rows: list[dict], summary: dict) -> None:
    eval_dir = run / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(eval_dir / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (eval_dir / "report.md").write_text(report.markdown(summary, rows))
    (eval_dir / "report.html").write_text(report.page(summary, rows, report.read_log(run / "metrics.jsonl")))
    console.info(f"wrote {eval_dir}/report.html, report.md, summary.json and results.jsonl ({len(rows)} prompts)")
