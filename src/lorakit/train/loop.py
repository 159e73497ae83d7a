"""The training recipe, top to bottom: set up → for each optimizer step accumulate, clip, step, log,
maybe eval, maybe checkpoint → save the adapter → evaluate.

A step's loss is the sum of token losses over all its micro-batches divided by the trained tokens of
the whole step, so gradient accumulation is exactly a bigger batch, whatever the sequence lengths.
"""

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

from lorakit import console, data, models
from lorakit.config import Config, dump_config
from lorakit.errors import LorakitError
from lorakit.train import checkpoint
from lorakit.train.batches import Schedule, collate, trained_tokens
from lorakit.train.loss import loss_sum


class Interrupted(Exception):
    """Raised after a checkpoint was saved because SIGINT/SIGTERM asked the run to stop."""

    exit_code = 130


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    final_loss: float
    seconds: float
    eval: dict | None = None  # filled by lorakit.train when it evaluates after training
    model: object = field(default=None, repr=False)  # the trained PEFT model, for use from Python


def train(cfg: Config, resume: bool = False) -> TrainResult:
    started = time.time()
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    _check_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale(ckpt_root)
    set_seed(cfg.seed)

    precision = models.resolve_precision(cfg.train.precision, PartialState().device)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision.name, precision.name))
    method = _resolve_method(cfg, accelerator.device)
    model_path = models.resolve_model(cfg.model)
    tokenizer = models.load_tokenizer(model_path, cfg.trust_remote_code)
    template = Path(cfg.data.template).read_text() if cfg.data.template else None
    train_data, eval_data, report = data.prepare_run(cfg, tokenizer)
    console.data_summary(report)
    if cfg.data.packing:
        console.warn("data.packing is not implemented yet: batches are padded instead (set data.packing: false "
                     "to silence this)")
    (out / "data_report.json").write_text(json.dumps(report, indent=1) + "\n")
    dump_config(cfg, out / "config.yaml")

    base = models.load_base(cfg, model_path, precision, accelerator.device)
    checkpointing = _gradient_checkpointing(cfg, base)
    model = models.attach_lora(base, cfg, checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule = Schedule(len(train_data.examples), _batch_size(cfg), cfg.train.grad_accum, cfg.seed)
    total = schedule.total_steps(cfg.train.epochs, cfg.train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total))
    model, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    if resume:
        step = _resume(ckpt_root, model, optimizer, scheduler, out)
    console.run_header(cfg, method, precision.name, checkpointing, total, schedule, model)
    metrics = open(out / "metrics.jsonl", "a")
    stop = _StopFlag()
    last_loss = math.nan
    with console.progress(total, step, cfg.train.log_every) as bar:
        while step < total:
            t0 = time.time()
            micro = [collate([train_data.examples[i] for i in idx], tokenizer.pad_token_id)
                     for idx in schedule.step_indices(step)]
            n_trained = sum(trained_tokens(b["labels"]) for b in micro)
            step_loss = 0.0
            model.train()
            for batch in micro:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    loss = loss_sum(model, batch) / n_trained
                accelerator.backward(loss)
                step_loss += loss.item()
            grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm or math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            last_loss = step_loss
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "trained_tokens": n_trained, "tok_s": tokens / (time.time() - t0),
                      "mem_gib": console.memory_gib(accelerator.device)}
            if step % cfg.train.eval_every == 0 or (step == total and eval_data is not None):
                if eval_data is not None:
                    record["eval_loss"] = evaluate_loss(accelerator, model, eval_data.examples,
                                                        tokenizer.pad_token_id, _batch_size(cfg))
            if step % cfg.train.log_every == 0 or step == total or "eval_loss" in record:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.update(record)
            if step % cfg.train.save_every == 0 or stop.requested:
                checkpoint.save(ckpt_root, step, model, optimizer, scheduler, _state(cfg, report),
                                cfg.train.keep_checkpoints)
            if stop.requested:
                metrics.close()
                raise Interrupted(f"stopped at step {step}; checkpoint saved in {ckpt_root}/step-{step}. "
                                  f"Continue with: lorakit train {out}/config.yaml --resume")
    metrics.close()
    stop.restore()

    adapter_dir = out / "adapter"
    model = accelerator.unwrap_model(model)
    save_adapter(model, tokenizer, template, adapter_dir)
    return TrainResult(out, adapter_dir, step, last_loss, time.time() - started, model=model)


@torch.no_grad()
def evaluate_loss(accelerator, model, examples, pad_id: int, batch_size: int) -> float:
    """Mean loss per trained token over `examples`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        with accelerator.autocast():
            total += loss_sum(model, batch).item()
        count += trained_tokens(batch["labels"])
    model.train()
    return total / max(count, 1)


def save_adapter(model, tokenizer, template: str | None, adapter_dir: Path) -> None:
    """PEFT adapter + tokenizer + chat template, written to a temp folder and renamed into place."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    model.save_pretrained(tmp)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp)
    if adapter_dir.exists():
        import shutil
        shutil.rmtree(adapter_dir)
    tmp.rename(adapter_dir)


def _check_run_dir(out: Path, resume: bool) -> None:
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise LorakitError(f"output_dir {out} already holds checkpoints of an earlier run. Continue it with "
                           f"--resume, or choose another output_dir=... (or delete {out}).")


def _resume(ckpt_root: Path, model, optimizer, scheduler, out: Path) -> int:
    for ckpt in reversed(checkpoint.complete_checkpoints(ckpt_root)):
        problem = checkpoint.verify(ckpt)
        if problem:
            console.warn(f"skipping checkpoint {ckpt}: {problem}")
            continue
        state = checkpoint.load(ckpt, model, optimizer, scheduler)
        _truncate_metrics(out / "metrics.jsonl", state["step"])
        console.info(f"resumed from {ckpt} (step {state['step']})")
        return state["step"]
    raise LorakitError(f"--resume: no complete checkpoint in {ckpt_root}. Start without --resume.")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from; they will be written again."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _state(cfg: Config, report: dict) -> dict:
    return {"data_fingerprint": report.get("fingerprint"), "model": cfg.model, "method": cfg.method}


def _lr_lambda(cfg: Config, total: int):
    warmup = int(cfg.train.warmup_ratio * total)
    kind = cfg.train.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1 - progress
        return 1.0

    return factor


def _resolve_method(cfg: Config, device: torch.device) -> str:
    if cfg.method == "auto":
        cfg.method = "lora"  # the planner (lorakit plan) will pick qlora when memory is short
    if cfg.method == "qlora" and device.type not in ("cuda", "cpu", "xpu"):
        raise LorakitError(f"method: qlora needs bitsandbytes on CUDA, XPU or CPU; this device is {device}.")
    return cfg.method


def _gradient_checkpointing(cfg: Config, model) -> bool:
    setting = cfg.train.gradient_checkpointing
    if setting == "auto":  # recomputation costs ~30% speed; worth it only when memory is the limit
        return next(model.parameters()).device.type == "cuda" and model.num_parameters() > 3e9
    return setting


def _batch_size(cfg: Config) -> int:
    return 8 if cfg.train.batch_size == "auto" else cfg.train.batch_size


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        console.warn("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)
