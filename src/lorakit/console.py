"""Everything lorakit prints: one place, so the CLI and the Python API say the same things."""

import contextlib
import resource
import sys

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

out = Console(stderr=True, highlight=False)


def only_main_process(is_main: bool) -> None:
    """Silence every process but the main one: N training processes would print each line N times."""
    out.quiet = not is_main


def info(msg: str) -> None:
    out.print(f"[bold]lorakit[/]: {msg}")


def warn(msg: str) -> None:
    out.print(f"[bold yellow]lorakit: warning[/]: {msg}")


def error(msg: str) -> None:
    out.print(f"[bold red]lorakit: error[/]: {msg}", soft_wrap=True)


def memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated on GPU, process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def data_summary(report: dict) -> None:
    for split in ("train", "eval"):
        r = report.get(split)
        if not r:
            continue
        line = (f"{split}: {r['examples_kept']} of {r['examples_read']} examples, "
                f"{r['tokens_total']} tokens ({r['tokens_trained']} trained), longest {r['max_len']}")
        dropped, truncated = r["dropped"]["count"], r["truncated"]["count"]
        if dropped or truncated:
            line += f"; dropped {dropped}, truncated {truncated} (see data_report.json)"
        info(line)


def run_header(cfg, method: str, precision: str, checkpointing: bool, total: int, schedule, model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info(f"{cfg.model} · {method} r={cfg.lora.r} alpha={cfg.lora.alpha:g} · {precision}"
         f" · gradient checkpointing {'on' if checkpointing else 'off'} · {trainable / 1e6:.2f}M trainable")
    processes = f" × {schedule.world_size} processes" if schedule.world_size > 1 else ""
    info(f"{total} steps × {schedule.batch_size} × {schedule.grad_accum} accumulation{processes} "
         f"({schedule.steps_per_epoch} steps per epoch) → {cfg.output_dir}")


class _Bar:
    def __init__(self, progress: Progress | None, task, log_every: int):
        self.progress, self.task, self.log_every = progress, task, log_every

    def update(self, r: dict) -> None:
        fields = f"loss {r['loss']:.4f} · lr {r['lr']:.2e} · {r['tok_s']:.0f} tok/s"
        if "eval_loss" in r:
            fields += f" · eval {r['eval_loss']:.4f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=r["step"], fields=fields)
        elif r["step"] % self.log_every == 0 or "eval_loss" in r:
            info(f"step {r['step']}: {fields}")


@contextlib.contextmanager
def progress(total: int, start: int, log_every: int = 1):
    """A live bar on a terminal (step, loss, lr, tokens/s, ETA); plain log lines otherwise."""
    if not out.is_terminal or out.quiet:
        yield _Bar(None, None, log_every)
        return
    columns = [TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[fields]}"),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=out) as p:
        yield _Bar(p, p.add_task("train", total=total, completed=start, fields=""), log_every)


def metrics_table(summary: dict) -> None:
    """Base vs tuned, one row per metric: tuned − base with its paired-bootstrap 95% interval (green or
    red when the interval excludes zero) and on how many prompts tuned scored better / the same / worse."""
    from rich.text import Text

    from lorakit.eval.report import fmt
    from lorakit.eval.stats import verdict

    table = Table(title=f"held-out evaluation: base vs tuned ({summary['n']} prompts)")
    for col in ("metric", "base", "tuned", "tuned − base", "95% interval", "wins / ties / losses"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, meta in summary["metrics"].items():
        d = summary["delta"][name]
        style = {"better": "green", "worse": "red"}.get(verdict(d, meta["better"]), "")
        counts = "–" if d["wins"] is None else f"{d['wins']} / {d['ties']} / {d['losses']}"
        interval = f"[{fmt(name, d['ci95'][0], True)}, {fmt(name, d['ci95'][1], True)}]"
        table.add_row(name, fmt(name, summary["base"][name]), fmt(name, summary["tuned"][name]),
                      Text(fmt(name, d["mean"], True), style=style), Text(interval, style=style), counts)
    Console().print(table)


def quiet_libraries() -> None:
    """Library progress bars and advice lines would bury ours; errors still come through."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
