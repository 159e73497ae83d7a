"""`lorakit eval`: base vs tuned on held-out prompts, from a run directory."""

import json
import time
from pathlib import Path

from lorakit import console, models
from lorakit.config import load_config
from lorakit.data.load import read_messages
from lorakit.data.render import eot_token_ids
from lorakit.errors import LorakitError
from lorakit.eval.generate import generate
from lorakit.eval.metrics import pick_metrics


def evaluate(run_dir: str | Path, prompts: str | None = None, limit: int | None = None) -> dict:
    """Generate with the adapter off and on for each held-out prompt; write RUN_DIR/eval/. Returns the
    summary: {"base": {metric: mean}, "tuned": {...}, "n": prompts, "seconds": wall time}."""
    started = time.time()
    run = Path(run_dir)
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise LorakitError(f"{run}: no trained adapter in {run / 'adapter'}. Train first: "
                           f"lorakit train CONFIG output_dir={run}")
    cfg = load_config(run / "config.yaml", require_train=False)
    source = prompts or cfg.eval.prompts or cfg.data.eval
    if source is None:
        raise LorakitError(f"{run}: nothing to evaluate on: set data.eval or eval.prompts, or pass --prompts FILE.")
    cases = _cases(Path(source), limit or cfg.eval.limit)
    model, tokenizer, template = _load_tuned(cfg, run)
    stop_ids = eot_token_ids(tokenizer, template)
    kwargs = dict(stop_ids=stop_ids, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                  template=template)
    prompt_msgs = [c["prompt"] for c in cases]
    outputs = {"base": generate(model, tokenizer, prompt_msgs, adapter=False, **kwargs),
               "tuned": generate(model, tokenizer, prompt_msgs, adapter=True, **kwargs)}
    metrics = pick_metrics([c["reference"] for c in cases])
    rows, summary = _score(cases, outputs, metrics)
    summary["n"], summary["seconds"] = len(cases), round(time.time() - started, 1)
    _write(run / "eval", rows, summary)
    return summary


def _cases(path: Path, limit: int | None) -> list[dict]:
    """Each example's messages before its last assistant turn, and that turn as the reference."""
    cases = []
    for ex in read_messages(path):
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        cases.append({"source": ex.source, "prompt": ex.messages[:last], "reference": ex.messages[last]["content"]})
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


def _score(cases, outputs, metrics) -> tuple[list[dict], dict]:
    rows, totals = [], {arm: {name: 0.0 for name in metrics} | {"stop_rate": 0.0} for arm in outputs}
    for i, case in enumerate(cases):
        row = {"source": case["source"], "prompt": case["prompt"], "reference": case["reference"]}
        for arm, gens in outputs.items():
            g = gens[i]
            scores = {name: fn(g.text, case["reference"]) for name, fn in metrics.items()}
            scores["stop_rate"] = float(g.stopped)
            row[arm] = {"output": g.text, "new_tokens": g.new_tokens, "scores": scores}
            for name, v in scores.items():
                totals[arm][name] += v
        rows.append(row)
    summary = {arm: {k: v / max(len(cases), 1) for k, v in t.items()} for arm, t in totals.items()}
    return rows, summary


def _write(eval_dir: Path, rows: list[dict], summary: dict) -> None:
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(eval_dir / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    console.info(f"wrote {eval_dir}/summary.json and results.jsonl ({len(rows)} prompts)")
