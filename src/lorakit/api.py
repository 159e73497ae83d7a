"""The Python API: one function per CLI verb."""

from pathlib import Path

from accelerate import PartialState

from lorakit import console
from lorakit.config import Config, load_config
from lorakit.errors import LorakitError
from lorakit.train.loop import TrainResult
from lorakit.train import loop


def train(config: Config | str | Path, resume: bool = False, force: bool = False) -> TrainResult:
    """Train the adapter described by `config` (a Config or a YAML path); evaluate it unless
    eval.after_train is false. The result's `.eval` holds the evaluation summary (or None).
    `resume` continues from the newest valid checkpoint; `force` allows a changed setup."""
    cfg = config if isinstance(config, Config) else load_config(config)
    result = loop.train(cfg, resume=resume, force=force)
    console.info(f"adapter saved to {result.adapter_dir} ({result.steps} steps, {result.seconds:.0f}s)")
    main = PartialState().is_main_process  # of several training processes, one evaluates
    if main and cfg.eval.after_train and (cfg.eval.prompts or cfg.data.eval):  # split-off eval: loss only
        result.eval = evaluate(result.output_dir)
    return result


def train_processes(config: str | Path, overrides: list[str], nproc: int, resume: bool = False,
                    force: bool = False) -> None:
    """`lorakit train CONFIG [overrides] --nproc N`: train in `nproc` processes on this machine, each on
    its share of every batch (one process per GPU; gloo on CPU); the main process writes the run."""
    from lorakit.train.launch import train_processes as launch

    if nproc < 1:
        raise LorakitError(f"--nproc: must be at least 1 (got {nproc}). Use --nproc 1 for one process, or the "
                           f"number of GPUs of this machine.")
    launch([str(config), *overrides, *(["--resume"] if resume else []), *(["--force"] if force else [])], nproc)


def evaluate(run_dir: str | Path, prompts: str | None = None, limit: int | None = None) -> dict:
    """Base vs tuned on held-out prompts; writes RUN_DIR/eval/ and prints the table."""
    from lorakit.eval import evaluate as run_eval

    summary = run_eval(run_dir, prompts=prompts, limit=limit)
    console.metrics_table(summary)
    return summary


def check(config: Config | str | Path, dump_tokens: str | Path | None = None) -> dict:
    """Read, render and verify every example without loading model weights; print the report and
    return it. Raises DataError (exit 2) listing every problem found, after printing the rest.
    `dump_tokens` writes one JSON line per example: source, input_ids, labels (-100 = not trained)."""
    from lorakit import data, models

    cfg = config if isinstance(config, Config) else load_config(config)
    tokenizer = models.load_tokenizer(models.resolve_model(cfg.model), cfg.trust_remote_code)
    report = data.check(cfg, tokenizer, dump_tokens=dump_tokens)
    for line in data.summary_lines(report):
        console.info(line)
    data.raise_for_errors(report)
    return report


def plan(config: Config | str | Path, gpu_mem: str | float | None = None, gpu: str | None = None,
         as_json: bool = False):
    """Peak memory, fit, largest micro-batch, tokens/s and epoch time for lora and qlora with and
    without gradient checkpointing, on the given (`gpu_mem` like "24GiB", `gpu` like "A100") or
    detected device; prints the table (or JSON) and returns the lorakit.plan.Plan."""
    from lorakit import plan as planner

    cfg = config if isinstance(config, Config) else load_config(config)
    mem = planner.parse_size(gpu_mem) if isinstance(gpu_mem, str) else gpu_mem
    p = planner.plan(cfg, gpu_mem_bytes=mem, gpu_name=gpu)
    print(p.to_json() if as_json else planner.format_plan(p))
    return p


def init(directory: str | Path = ".") -> Path:
    """Write a commented starter config and a small data set that trains as-is; returns the config path."""
    from lorakit.starter import write_starter

    path = write_starter(Path(directory))
    console.info(f"wrote {path} and its data. Train it with: lorakit train {path}")
    return path


def merge(run_dir: str | Path, out: str | Path, dtype: str = "bf16"):
    """Fold RUN_DIR's adapter into the weights it was trained against (dequantized NF4 for qlora) and
    save a standalone model in `out` (bf16 or fp32); fails unless it matches base + adapter."""
    from lorakit.export.merge import merge as merge_run

    return merge_run(run_dir, out, dtype)


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "f16"):
    """Write RUN_DIR's merged model as a GGUF file (f16, bf16 or q8_0) plus an Ollama Modelfile, and
    check it loaded back against the merged model."""
    from lorakit.export.gguf import export_gguf as write

    return write(run_dir, out, quant)


def chat(target: str | Path, max_new_tokens: int = 512) -> None:
    """Chat in the terminal with a run (base + adapter) or a model; one answer when stdin is a pipe."""
    from lorakit.chat import chat as run_chat

    run_chat(target, max_new_tokens)


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve a run or a model behind an OpenAI-compatible /v1/chat/completions until Ctrl-C."""
    from lorakit.serve import serve as run_server

    run_server(target, host, port)
