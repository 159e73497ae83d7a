"""The training recipe, top to bottom: set up → for each optimizer step accumulate, clip, step, log,
maybe eval, maybe checkpoint → save the adapter → evaluate.

A step's loss is the sum of token losses over all its micro-batches divided by the trained tokens of
the whole step, so gradient accumulation is exactly a bigger batch, whatever the sequence lengths.

Several processes (`lorakit train --nproc N`, `accelerate launch`, `torchrun`) each train a disjoint
share of every step's rows; the trained tokens are summed over all of them first, so N processes of
batch B train as one of batch N x B. Only the main process prints and writes files.
"""

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import set_seed

from lorakit import console, data, models, plan
from lorakit.config import Config, config_to_dict, dump_config
from lorakit.errors import LorakitError, RunFailed
from lorakit.train import checkpoint, fast, faults
from lorakit.train import fp8 as fp8_path
from lorakit.train.batches import Schedule, collate, padding_batch, to_device, trained_tokens
from lorakit.train.loss import TokenLoss


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


def train(cfg: Config, resume: bool = False, force: bool = False) -> TrainResult:
    """Train the adapter `cfg` describes. `resume` continues from the newest valid checkpoint and
    refuses one made with another config, data, tokenizer or base model unless `force`."""
    started = time.time()
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    main = _process_state().is_main_process
    console.only_main_process(main)
    _check_run_dir(out, resume)
    set_seed(cfg.seed)

    precision = models.resolve_precision(cfg.train.precision, PartialState().device)
    cudagraphs, fp8 = _fast_path(cfg, PartialState().device)
    accelerator = _accelerator(cfg, precision)
    model_path = models.resolve_model(cfg.model)
    tokenizer = models.load_tokenizer(model_path, cfg.trust_remote_code)
    template = Path(cfg.data.template).read_text() if cfg.data.template else None
    train_data, eval_data, report = data.prepare_run(cfg, tokenizer)
    method = _resolve_auto(cfg, accelerator.device, train_data.rows)
    fingerprint = run_fingerprint(cfg, report, model_path)
    resume_from = _resume_point(ckpt_root, fingerprint, force, accelerator.num_processes) if resume else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale(ckpt_root)
        (out / "data_report.json").write_text(json.dumps(report, indent=1) + "\n")
        dump_config(cfg, out / "config.yaml")
    console.data_summary(report)

    base = models.load_base(cfg, model_path, precision, accelerator.device, training=True)
    checkpointing = cfg.train.gradient_checkpointing  # settled by _resolve_auto
    model = models.attach_lora(base, cfg, checkpointing)
    if cfg.train.compile and cfg.train.distributed != "fsdp":  # compiled layers under FSDP: not yet measured
        cache = 0
        if accelerator.device.type == "cuda" and method == "qlora" and not fp8:
            cache, reason = plan.resolve_dequant_cache(cfg, accelerator.device, train_data.rows)
            console.info(f"dequantization cache: {reason}")
        model = fast.speedups(model, accelerator.device, cudagraphs, fp8, cache)  # CUDA only; eager is the reference
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], cfg.train.lr, cfg.train.weight_decay,
                      fused=accelerator.device.type == "cuda" and cfg.train.distributed != "fsdp")
    schedule = Schedule(len(train_data.rows), cfg.train.batch_size, cfg.train.grad_accum, cfg.seed,
                        accelerator.num_processes)
    total = schedule.total_steps(cfg.train.epochs, cfg.train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total))
    # load_base already placed the weights (4-bit ones cannot move); the wrapper is DDP or FSDP, if any
    wrapped, optimizer = accelerator.prepare(TokenLoss(model), optimizer, device_placement=[False, False])
    trainable = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP swaps in sharded parameters

    step = 0
    if resume_from is not None:
        step = checkpoint.load(resume_from, wrapped, optimizer, scheduler)["step"]
        if main:
            _truncate_metrics(out / "metrics.jsonl", step)
        console.info(f"resumed from {resume_from} (step {step})")
    console.run_header(cfg, method, precision.name + (" · fp8 base matmuls" if fp8 else ""), checkpointing, total,
                       schedule, model)
    last_loss, bad_steps = math.nan, []
    with _StopFlag() as stop, open(out / "metrics.jsonl" if main else os.devnull, "a") as metrics, \
            console.progress(total, step, cfg.train.log_every) as bar, \
            _training_forward(model, accelerator.device, precision):
        def micro_batches(step: int) -> tuple[list[dict], int, int]:
            """This process's micro-batches of `step`, with the step's trained and real tokens on all processes."""
            shares = schedule.step_indices(step, accelerator.process_index)
            micro = [collate([train_data.rows[i] for i in idx], tokenizer.pad_token_id, width) if idx
                     else padding_batch(tokenizer.pad_token_id) for idx in shares]
            return micro, *_all_processes(accelerator, sum(trained_tokens(b["labels"]) for b in micro),
                                          sum(int(b["attention_mask"].sum()) for b, i in zip(micro, shares) if i))

        width = cfg.data.max_length if cudagraphs else None  # CUDA graphs: one shape, one recording
        upcoming = micro_batches(step) if step < total else None
        while step < total:
            t0 = time.time()
            micro, n_trained, tokens = upcoming
            if cudagraphs:
                fast.new_graph_step()
            step_loss = _accumulate(accelerator, wrapped, micro, n_trained, step + 1)
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm or math.inf)
            updated = update_before_wait(accelerator, optimizer, step_loss, grad_norm)
            # collate the next step while the GPU works: the line after waits for the GPU
            upcoming = micro_batches(step + 1) if step + 1 < total else None
            step_loss, stopping = _all_processes(accelerator, step_loss, stop.requested)  # the same on every one
            grad_norm = float(grad_norm)  # of the whole model already, under DDP and FSDP alike
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if not updated:
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            last_loss = step_loss
            record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "trained_tokens": n_trained, "tok_s": tokens / (time.time() - t0),
                      "mem_gib": console.memory_gib(accelerator.device)}
            if not finite:
                bad_steps.append(step)
                record["skipped"] = "non-finite loss or gradient norm: update not applied"
                console.warn(f"step {step}: loss {step_loss} / grad norm {grad_norm} is not finite; step skipped "
                             f"({len(bad_steps)} of at most {cfg.train.max_bad_steps})")
            if step % cfg.train.eval_every == 0 or (step == total and eval_data is not None):
                if eval_data is not None:
                    record["eval_loss"] = evaluate_loss(accelerator, wrapped, eval_data.examples,
                                                        tokenizer.pad_token_id, cfg.train.batch_size, width)
            if step % cfg.train.log_every == 0 or step == total or "eval_loss" in record or not finite:
                metrics.write(json.dumps(record) + "\n")  # non-finite values are logged, never filtered
                metrics.flush()
            bar.update(record)
            if len(bad_steps) > cfg.train.max_bad_steps:
                raise RunFailed(f"non-finite loss or gradient at steps {bad_steps}: stopping (train.max_bad_steps="
                                f"{cfg.train.max_bad_steps}). Lower train.lr, keep train.max_grad_norm set, or use "
                                f"precision=bf16/fp32 instead of fp16; resume from the last checkpoint with --resume.")
            if step % cfg.train.save_every == 0 or stopping:
                with _disk_errors(ckpt_root):
                    checkpoint.save(ckpt_root, step, wrapped, optimizer, scheduler,
                                    {**fingerprint, "world_size": accelerator.num_processes},
                                    cfg.train.keep_checkpoints)
            if stopping:
                raise Interrupted(f"stopped at step {step}; checkpoint saved in {ckpt_root}/step-{step}. "
                                  f"Continue with: lorakit train {out}/config.yaml --resume")

    adapter_dir = out / "adapter"
    weights = {k.removeprefix("model."): v for k, v in checkpoint.trained_state(wrapped).items()}
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise RunFailed(f"the adapter holds non-finite weights after step {step}; it was not saved. Resume from an "
                        f"earlier checkpoint with a lower train.lr.")
    if main:
        with _disk_errors(adapter_dir):
            save_adapter(model, tokenizer, template, adapter_dir, weights)
    accelerator.wait_for_everyone()
    return TrainResult(out, adapter_dir, step, last_loss, time.time() - started, model=model)


@torch.no_grad()
def evaluate_loss(accelerator, model: TokenLoss, examples, pad_id: int, batch_size: int,
                  width: int | None = None) -> float:
    """Mean loss per trained token over `examples`. Every process computes it over all of them: each
    forward is a collective under FSDP, so the processes must run the same ones. `width`: pad every
    batch to it (CUDA graphs: one shape)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        if width is not None:
            fast.new_graph_step()
        batch = to_device(collate(examples[i:i + batch_size], pad_id, width), accelerator.device)
        with accelerator.autocast():
            total += model(batch).item()
        count += trained_tokens(batch["labels"])
    model.train()
    return total / max(count, 1)


def save_adapter(model, tokenizer, template: str | None, adapter_dir: Path, weights: dict | None = None) -> None:
    """PEFT adapter + tokenizer + chat template + a generation config that stops on the end-of-turn
    token(s), written to a temp folder and renamed into place. `weights`: the trained parameters by
    name, whole, when the model holds them in shards (FSDP)."""
    from transformers import GenerationConfig

    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp)
    stop = data.eot_token_ids(tokenizer, template)
    GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(tmp)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp, adapter_dir)


def _check_run_dir(out: Path, resume: bool) -> None:
    if not resume and checkpoint.complete_checkpoints(out / "checkpoints"):
        raise LorakitError(f"output_dir {out} already holds checkpoints of an earlier run. Continue it with "
                           f"--resume, or choose another output_dir=... (or delete {out}).")


def _resume_point(ckpt_root: Path, fingerprint: dict, force: bool, world_size: int) -> Path:
    """The newest checkpoint whose files match their manifest, made by this same run setup."""
    for ckpt in reversed(checkpoint.complete_checkpoints(ckpt_root)):
        problem = checkpoint.verify(ckpt)
        if problem:
            console.warn(f"skipping checkpoint {ckpt}: {problem}")
            continue
        saved = json.loads((ckpt / "state.json").read_text())
        ranks = saved.get("world_size", 1)
        if ranks != world_size:  # each process's share of every batch depends on it
            raise LorakitError(f"--resume: {ckpt} was written by a run of {ranks} process(es); this run has "
                               f"{world_size}. Resume with the same count (lorakit train ... --resume --nproc {ranks}, "
                               f"or as many accelerate/torchrun processes), or start a new run in another output_dir.")
        changed = _changes(saved, fingerprint)
        if changed and not force:
            raise LorakitError(f"--resume: {ckpt} was made with a different setup: {'; '.join(changed)}. Undo the "
                               f"change, or pass --force to resume anyway (the result will not match an "
                               f"uninterrupted run).")
        if changed:
            console.warn(f"resuming despite changes (--force): {'; '.join(changed)}")
        return ckpt
    raise LorakitError(f"--resume: no complete checkpoint in {ckpt_root}. Start without --resume.")


# Keys a resumed run may change without changing what it computes.
_RESUME_FREE = ("output_dir", "allow_pickle", "train.save_every", "train.keep_checkpoints", "train.log_every",
                "train.eval_every", "train.max_bad_steps", "eval.",
                "quant.dequant_cache")  # the same numbers either way


def run_fingerprint(cfg: Config, report: dict, model_path: str) -> dict:
    """What must not change between a checkpoint and the run resuming from it."""
    flat = _flatten(config_to_dict(cfg))
    return {"config": {k: v for k, v in flat.items() if not k.startswith(_RESUME_FREE)},
            "data": report["fingerprint"], "tokenizer": _tokenizer_fingerprint(model_path),
            "base_model": _model_fingerprint(model_path)}


def _changes(saved: dict, now: dict) -> list[str]:
    changed = [f"{k}: {saved['config'].get(k)!r} → {v!r}" for k, v in now["config"].items()
               if saved.get("config", {}).get(k) != v]
    changed += [f"{what} changed" for what in ("data", "tokenizer", "base_model") if saved.get(what) != now[what]]
    return changed


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "columns" else {prefix + k: v})
    return out


def _tokenizer_fingerprint(model_path: str) -> str:
    files = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"]
    return _hash_files(Path(model_path), files, content=True)


def _model_fingerprint(model_path: str) -> str:
    """config.json content and the name and size of every weight file (hashing GBs would be slow)."""
    path = Path(model_path)
    weights = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
    return _hash_files(path, ["config.json"], content=True) + ":" + _hash_files(path, weights, content=False)


def _hash_files(root: Path, names: list[str], content: bool) -> str:
    h = hashlib.sha256()
    for name in names:
        p = root / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes() if content else str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _training_forward(model, device: torch.device, precision: models.Precision):
    """How the model runs while train's loop does: 4-bit layers dequantize then multiply, in evaluate_loss
    too (`models.dequantizing_4bit`). Training on the CPU in 16 bits, LoRA layers take their input as
    it comes and autocast casts it for lora_A (every step runs under autocast): PEFT would cast each
    16-bit input up to the fp32 adapter's dtype, a copy that autocast casts back down, with dropout run
    on the fp32 copy. Same numbers (tests/unit/test_train_parts.py); with the 16-bit base, 8% less time
    per step of SmolLM2-135M (benchmarks/NOTES.md, session 10). CUDA keeps PEFT's casts: its compiled
    layers ran the 8B alike without them (16,120 against 16,103 tok/s on an H200). Afterwards the model
    runs as one loaded from the saved adapter."""
    from peft.helpers import disable_input_dtype_casting

    with models.dequantizing_4bit(model), \
            disable_input_dtype_casting(model, active=device.type == "cpu" and precision.name != "fp32"):
        yield


def _accumulate(accelerator, model: TokenLoss, micro: list[dict], n_trained: int, step: int) -> torch.Tensor:
    """Forward and backward this process's micro-batches of one optimizer step; returns its part of
    the step's loss (a tensor: reading it makes the host wait for the GPU). `n_trained` counts the
    step's trained tokens on all processes; DDP and FSDP average the gradients of the processes, so
    each loss is scaled by their number to make the update that of the whole step. Gradients are
    exchanged once, after the last micro-batch."""
    world, step_loss = accelerator.num_processes, 0.0
    if not model.training:  # evaluate_loss switches back; train() walks every module (~7 ms for Qwen3-0.6B)
        model.train()
    for k, batch in enumerate(micro):
        faults.at(f"step-{step}:micro-{k}")
        batch = to_device(batch, accelerator.device)
        last = k == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss = model(batch) * world / n_trained
                if faults.poisons(step):
                    loss = loss * math.nan
            accelerator.backward(loss)
        step_loss = step_loss + loss.detach() / world  # no .item(): the host runs ahead of the GPU
    return step_loss


def update_before_wait(accelerator, optimizer, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Queue the optimizer step before the host waits for the step's loss and gradient norm, with a
    non-finite one skipped on the device (fused AdamW's `found_inf`: neither the weights, the moments
    nor the step count change); returns whether it did, and then the gradients are cleared too.
    Stepping after the wait instead leaves the GPU idle while the host launches the update: 1.9 ms of
    a 160 ms Qwen3-0.6B step on an H200 (benchmarks/NOTES.md, session 7). Only for a fused optimizer
    in one process without a gradient scaler: several processes decide on the summed loss, and fp16's
    scaler sets found_inf itself."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the torch optimizer
    if accelerator.num_processes > 1 or accelerator.scaler is not None or not inner.defaults.get("fused"):
        return False
    inner.found_inf = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float()
    try:
        optimizer.step()
    finally:
        del inner.found_inf
    optimizer.zero_grad(set_to_none=True)
    return True


def _all_processes(accelerator, *values) -> list:
    """Each value summed over the training processes (one all-reduce): tensors come back as floats,
    numbers and flags as the type they came in."""
    kinds = [float if isinstance(v, torch.Tensor) else type(v) for v in values]
    if accelerator.num_processes > 1:
        values = accelerator.reduce(torch.tensor([float(v) for v in values], dtype=torch.float64,
                                                 device=accelerator.device), "sum").tolist()
    return [kind(v) for kind, v in zip(kinds, values)]


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """The optimizer. `fused` (CUDA): one kernel updates every parameter, instead of a launch per
    group of tensors per operation; tests/gpu compares it with the default implementation."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _fast_path(cfg: Config, device: torch.device) -> tuple[bool, bool]:
    """Whether this run replays CUDA graphs and runs the base in FP8; refuses settings that cannot work
    (on every device: configs travel)."""
    if cfg.train.compile == "cudagraphs" and cfg.train.grad_accum > 1:
        raise LorakitError(f"train.compile: cudagraphs replays recorded CUDA graphs, which reuse their memory at "
                           f"every micro-batch, so it needs train.grad_accum: 1 (it is {cfg.train.grad_accum}). "
                           f"Raise train.batch_size instead, or set train.compile: true.")
    if cfg.train.fp8 and not cfg.train.compile:
        raise LorakitError("train.fp8 runs inside the compiled layers, so it needs train.compile: true "
                           "(or cudagraphs). Set train.compile: true, or train.fp8: false.")
    if cfg.train.fp8 and cfg.train.distributed == "fsdp":
        raise LorakitError("train.fp8 is not available with train.distributed: fsdp yet (the sharded base is not "
                           "compiled). Set train.fp8: false, or train.distributed: ddp.")
    cuda = device.type == "cuda"
    if cfg.train.fp8 and cuda and not fp8_path.supported(device):
        raise LorakitError(f"train.fp8 needs FP8 tensor cores (compute capability 8.9 or later: H100, L4, RTX 40xx); "
                           f"{torch.cuda.get_device_name(device)} has "
                           f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Set train.fp8: false.")
    if cfg.train.fp8 and not cuda:
        console.info(f"train.fp8: ignored on {device.type} (it runs on CUDA GPUs with FP8 tensor cores)")
    return cfg.train.compile == "cudagraphs" and cuda, cfg.train.fp8 and cuda


def _accelerator(cfg: Config, precision: models.Precision) -> Accelerator:
    """DDP when several processes run (accelerate's default), or FSDP2 when train.distributed is fsdp:
    each GPU then holds a shard of the frozen base, for models that one GPU cannot hold."""
    mixed = {"fp32": "no"}.get(precision.name, precision.name)
    cpu = _process_state().device.type == "cpu"
    if cfg.train.distributed != "fsdp":
        return Accelerator(mixed_precision=mixed, cpu=cpu)
    if PartialState().device.type != "cuda":  # accelerate shards only on GPU-type devices
        raise LorakitError(f"train.distributed: fsdp needs CUDA GPUs; this process runs on "
                           f"{PartialState().device}. Use train.distributed=ddp (or auto) on CPU.")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # Weights gathered in the run's precision; gradients summed in fp32; outputs left as computed, so
    # the loss stays fp32 (accelerate's default casts it to 16 bits, which rounds the logged loss).
    policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    return Accelerator(mixed_precision=mixed, cpu=cpu,
                       fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=policy))


def _process_state() -> PartialState:
    """This process's place among the training processes (set up on first call). Without an
    accelerator, accelerate must be told to use CPU processes (gloo), or each launched process
    would train alone."""
    return PartialState(cpu=not torch.accelerator.is_available())


@contextlib.contextmanager
def _disk_errors(target: Path):
    """Disk full or over the file-size limit: one message; the previous checkpoint stays intact."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise RunFailed(f"could not write {target}: {e.strerror}. Free disk space (older runs, checkpoints), then "
                        f"continue with --resume from the last complete checkpoint.") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from; they will be written again."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


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


def _resolve_auto(cfg: Config, device: torch.device, rows) -> str:
    """Settle `method: auto`, `train.batch_size: auto` and `train.gradient_checkpointing: auto` through
    the planner's memory model of this device and these rows; the choice is logged and written to the
    run's config.yaml, so a resume reads it back instead of deciding again."""
    if "auto" in (cfg.method, cfg.train.batch_size):
        cfg.method, cfg.train.batch_size, reason = plan.resolve_auto(cfg, device, rows)
        console.info(f"auto: {reason}")
    if cfg.method == "qlora" and device.type not in ("cuda", "cpu", "xpu"):
        raise LorakitError(f"method: qlora needs bitsandbytes on CUDA, XPU or CPU; this device is {device}.")
    if cfg.train.gradient_checkpointing == "auto":
        cfg.train.gradient_checkpointing, reason = plan.resolve_checkpointing(cfg, device, rows)
        if device.type == "cuda":  # elsewhere it is simply off
            console.info(f"auto: gradient checkpointing {reason}")
    return cfg.method


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        # Over RLIMIT_FSIZE a write should fail with EFBIG (reported, checkpoint kept), not kill us.
        self._old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        console.warn("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
