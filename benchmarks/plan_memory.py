"""Predicted (lorakit.plan) vs measured peak memory of lorakit's own training step.

GPU (default): random-init models of the Qwen3-0.6B and Llama-3.1-8B architectures (configs in
`lorakit.plan.ARCHS`), created on the GPU in bf16, saved once under /tmp and loaded with
`lorakit.models.load_base` (4-bit through bitsandbytes for qlora) + `attach_lora`, then optimizer
steps of `lorakit.train.loss.loss_sum` on random token batches under bf16 autocast, as train runs
them. Each configuration: torch.cuda.reset_peak_memory_stats, 6 optimizer steps, then
max_memory_allocated vs the planner's `allocated`; steps 3-6 are timed for tokens/s. A failing
configuration (OOM, say) is recorded and the next one runs.

CPU (--cpu): the embedded smollm2-135m and small random models, one subprocess per configuration
(with `plan.limit_cpu_heap()`), peak RSS (VmHWM) vs the planner's total, and the
allocator's own peak (torch profiler memory events) vs the planner's `allocated`.

    python benchmarks/plan_memory.py            # GPU, 13 configurations (~80 s of steps on an H200)
    python benchmarks/plan_memory.py --quick    # GPU, 2 configurations
    python benchmarks/plan_memory.py --cpu      # CPU
    python benchmarks/plan_memory.py --repredict benchmarks/results/plan_memory_DATE.json
Results: benchmarks/results/plan_memory_<date>[_cpu].json (and $OUT/ when set), a table on stdout.
`--repredict` recomputes an earlier file's predictions with the current model (no hardware needed).
"""

import argparse
import datetime
import gc as pygc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from lorakit import plan  # noqa: E402
from lorakit.config import Config  # noqa: E402

IGNORE = -100


def config(name, arch, method, rows, seq, gc=False, masked=False, trained=1.0, dropout=0.05):
    return dict(name=name, arch=arch, method=method, rows=rows, seq=seq, gc=gc, masked=masked,
                trained_frac=trained, dropout=dropout)


GPU_CONFIGS = [
    config("0.6b-lora-512", "qwen3-0.6b", "lora", 4, 512),
    config("0.6b-lora-2048", "qwen3-0.6b", "lora", 4, 2048),
    config("0.6b-lora-2048-gc", "qwen3-0.6b", "lora", 4, 2048, gc=True),
    config("0.6b-lora-2048-padded", "qwen3-0.6b", "lora", 4, 2048, masked=True),
    config("0.6b-qlora-512", "qwen3-0.6b", "qlora", 4, 512),
    config("0.6b-qlora-2048", "qwen3-0.6b", "qlora", 4, 2048),
    config("0.6b-lora-2048-nodrop", "qwen3-0.6b", "lora", 4, 2048, dropout=0.0),
    config("8b-lora-512", "llama-3.1-8b", "lora", 4, 512),
    config("8b-lora-2048", "llama-3.1-8b", "lora", 4, 2048),
    config("8b-lora-2048-10%trained", "llama-3.1-8b", "lora", 4, 2048, trained=0.1),
    config("8b-qlora-512", "llama-3.1-8b", "qlora", 4, 512),
    config("8b-qlora-2048", "llama-3.1-8b", "qlora", 4, 2048),
    config("8b-qlora-2048-gc", "llama-3.1-8b", "qlora", 4, 2048, gc=True),
]
QUICK = ["0.6b-lora-512", "0.6b-qlora-512"]
STEPS = 6  # per GPU configuration: peak memory over all, tokens/s over the last 4

TINY = dict(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
CPU_CONFIGS = [
    config("smollm2-lora-8x128", "smollm2-135m", "lora", 8, 128),
    config("smollm2-lora-4x256", "smollm2-135m", "lora", 4, 256),
    config("smollm2-lora-4x256-padded-nodrop", "smollm2-135m", "lora", 4, 256, masked=True, dropout=0.0,
           trained=0.3),
    config("smollm2-lora-4x256-gc", "smollm2-135m", "lora", 4, 256, gc=True),
    config("smollm2-qlora-4x256", "smollm2-135m", "qlora", 4, 256),
    config("tiny-lora-8x256", "tiny", "lora", 8, 256),
    config("tiny-lora-16x256", "tiny", "lora", 16, 256),
]
CPU_QUICK = ["smollm2-lora-8x128", "tiny-lora-8x256"]


def arch_config(name: str) -> dict:
    return TINY if name == "tiny" else plan.ARCHS[name]


def predicted(c: dict, device: str, precision: str | None = None) -> plan.Memory:
    from lorakit.train.batches import trained_tokens

    arch = plan.arch_from_config(arch_config(c["arch"]))
    trained = trained_tokens(make_batch(c, arch.vocab, "cpu")["labels"])
    precision = precision or ("bf16" if device == "cuda" else "fp32")
    step = plan.Step(c["method"], device, precision, c["gc"], c["rows"], c["seq"],
                     trained, c["masked"], dropout=c["dropout"])
    return plan.step_memory(arch, step)


def make_batch(c: dict, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (c["rows"], c["seq"]), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if c["masked"]:  # one row shorter: transformers then builds a [rows, 1, seq, seq] mask
        mask[0, -c["seq"] // 8:] = 0
        labels[0, -c["seq"] // 8:] = IGNORE
    if c["trained_frac"] < 1:  # assistant-only loss: the first part of each row is prompt
        labels[:, : int(c["seq"] * (1 - c["trained_frac"]))] = IGNORE
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def lorakit_config(path: str, method: str, dropout: float) -> Config:
    cfg = Config(model=path, method=method)
    cfg.lora.dropout = dropout
    return cfg


def train_steps(model, batch, n_steps: int, device_type: str, probe: dict | None = None) -> list[float]:
    """lorakit's loop body: loss_sum / trained tokens under autocast, backward, clip, AdamW step.
    On CUDA, `probe` gets the allocated bytes before the last step and after its forward."""
    from lorakit.train.batches import trained_tokens
    from lorakit.train.loss import loss_sum

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    n_trained = trained_tokens(batch["labels"])
    autocast = device_type == "cuda"
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        model.train()
        if probe is not None and device_type == "cuda":
            probe["before_step"] = torch.cuda.memory_allocated()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_sum(model, batch) / n_trained
        if probe is not None and device_type == "cuda":
            probe["after_forward"] = torch.cuda.memory_allocated()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del optimizer
    return times


# ---------------------------------------------------------------------------------------------- GPU

def build_checkpoint(name: str, root: Path) -> str:
    """A random-init model of `name`'s architecture, made on the GPU in bf16 and saved once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = root / name
    if (path / "config.json").exists():
        return str(path)
    spec = {k: v for k, v in plan.ARCHS[name].items() if k != "model_type"}
    cfg = AutoConfig.for_model(plan.ARCHS[name]["model_type"], **spec)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    print(f"[{name}] random init + save: {time.time() - t0:.0f}s", flush=True)
    return str(path)


def run_gpu(configs: list[dict], root: Path) -> list[dict]:
    from lorakit import models

    device = torch.device("cuda")
    precision = models.resolve_precision("auto", device)
    results = []
    groups = []  # (arch, method, dropout) share one loaded model
    for c in configs:
        key = (c["arch"], c["method"], c["dropout"])
        if key not in groups:
            groups.append(key)
    for arch, method, dropout in groups:
        model = None
        try:
            path = build_checkpoint(arch, root)
            t0 = time.time()
            cfg = lorakit_config(path, method, dropout)
            base = models.load_base(cfg, path, precision, device)
            model = models.attach_lora(base, cfg, False)
            print(f"[{arch} {method}] load_base + attach_lora: {time.time() - t0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - record and go on with the next group
            for c in configs:
                if (c["arch"], c["method"], c["dropout"]) == (arch, method, dropout):
                    results.append({**c, "error": f"load: {type(e).__name__}: {e}"})
            traceback.print_exc()
            continue
        for c in [c for c in configs if (c["arch"], c["method"], c["dropout"]) == (arch, method, dropout)]:
            results.append(measure_gpu(model, c))
            print(_row(results[-1]), flush=True)
        del model, base
        pygc.collect()
        torch.cuda.empty_cache()
    return results


def measure_gpu(model, c: dict) -> dict:
    base = model.get_base_model()
    out = dict(c)
    try:
        if c["gc"]:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        batch = make_batch(c, base.config.vocab_size, "cuda")
        pygc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        probe = {}
        times = train_steps(model, batch, STEPS, "cuda", probe)
        free, total = torch.cuda.mem_get_info()
        out.update(measured_allocated=torch.cuda.max_memory_allocated(),
                   measured_reserved=torch.cuda.max_memory_reserved(),
                   device_used=total - free, reserved_now=torch.cuda.memory_reserved(),
                   tok_s=c["rows"] * c["seq"] * (STEPS - 2) / sum(times[2:]), step_s=times,
                   allocated_before_step=probe["before_step"], allocated_after_forward=probe["after_forward"])
    except Exception as e:  # noqa: BLE001 - an OOM is a result too
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        if c["gc"]:
            base.gradient_checkpointing_disable()
            base.disable_input_require_grads()
        pygc.collect()
        torch.cuda.empty_cache()
    return add_prediction(out, "cuda")


# ---------------------------------------------------------------------------------------------- CPU

def _status() -> dict:
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                d[key] = int(value.split()[0]) * 1024
    return d


def child_cpu(c: dict) -> dict:
    """One configuration in this fresh process: 2 optimizer steps (the second with the AdamW state)
    for the peak RSS, then a third under the profiler for the allocator's own peak."""
    from lorakit import console, models

    console.quiet_libraries()
    plan.limit_cpu_heap()  # freed memory leaves RSS at once: RSS follows the allocator's peak
    plan.RUNTIME["cpu_retained"] = plan.RUNTIME["cpu_retained_heap_limited"]
    device = torch.device("cpu")
    precision = models.resolve_precision("fp32", device)
    if c["arch"] == "tiny":
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = {k: v for k, v in TINY.items() if k != "model_type"}
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **spec), dtype=torch.float32)
        base.config.use_cache = False
        base.requires_grad_(False)
        cfg = lorakit_config("tiny", c["method"], c["dropout"])
    else:
        path = models.resolve_model(c["arch"])
        cfg = lorakit_config(path, c["method"], c["dropout"])
        base = models.load_base(cfg, path, precision, device)
    model = models.attach_lora(base, cfg, c["gc"])
    batch = make_batch(c, base.config.vocab_size, "cpu")
    before = _status()["VmRSS"]
    times = train_steps(model, batch, 2, "cpu")
    return dict(measured_rss=_status()["VmHWM"], rss_before_steps=before, step_s=times,
                tok_s=c["rows"] * c["seq"] / times[1], measured_allocated=_allocator_peak(model, batch))


def _allocator_peak(model, batch) -> int:
    """Tensor bytes at the peak of an optimizer step: the parameters and AdamW state held before it
    plus the largest running sum of the profiler's allocation events during it."""
    from torch.profiler import ProfilerActivity, profile

    from lorakit.train.batches import trained_tokens
    from lorakit.train.loss import loss_sum

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    n = trained_tokens(batch["labels"])
    for p in trainable:  # AdamW state as after the first step, without running one
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    held = list(model.parameters()) + [v for st in optimizer.state.values() for v in st.values()]
    seen, live = set(), 0
    for t in held:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            live += s.nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = loss_sum(model, batch) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return live + peak


def run_cpu(configs: list[dict]) -> list[dict]:
    results = []
    for c in configs:
        out = dict(c)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(c)], capture_output=True, text=True)
        if proc.returncode != 0:
            out["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        else:
            out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        results.append(add_prediction(out, "cpu"))
        print(_row(out), flush=True)
    return results


# ---------------------------------------------------------------------------------------------- report

def _row(r: dict) -> str:
    if "error" in r and "measured_allocated" not in r:
        return f"{r['name']:34} ERROR {r['error'][:90]}"
    if "measured_rss" in r:
        return (f"{r['name']:34} rss {r['measured_rss'] / 2**30:7.2f} GiB  predicted "
                f"{r['predicted_total'] / 2**30:7.2f}  {r['error_pct']:+6.1f}%   alloc "
                f"{r['measured_allocated'] / 2**30:6.2f} vs {r['predicted_allocated'] / 2**30:6.2f} GiB "
                f"{r['alloc_error_pct']:+6.1f}%  {r['tok_s']:8.1f} tok/s")
    return (f"{r['name']:34} allocated {r['measured_allocated'] / 2**30:7.2f} GiB  predicted "
            f"{r['predicted_allocated'] / 2**30:7.2f}  {r['error_pct']:+6.1f}%  ({r['predicted_peak_at']})  "
            f"reserved {r['measured_reserved'] / 2**30:7.2f}  {r['tok_s']:9.0f} tok/s")


def add_prediction(r: dict, device: str) -> dict:
    """The planner's figures for measured configuration `r`, and the errors against it."""
    mem = predicted(r, device)
    r.update(predicted_allocated=mem.allocated, predicted_total=mem.total, predicted_peak_at=mem.peak_at,
             predicted_parts={k: getattr(mem, k) for k in ("weights", "adapter", "activations", "transient",
                                                             "runtime")})
    if "measured_rss" in r:
        r["error_pct"] = round(100 * (mem.total / r["measured_rss"] - 1), 1)
        r["alloc_error_pct"] = round(100 * (mem.allocated / r["measured_allocated"] - 1), 1)
    elif "measured_allocated" in r:
        r["error_pct"] = round(100 * (mem.allocated / r["measured_allocated"] - 1), 1)
    return r


def repredict(path: Path) -> int:
    doc = json.loads(path.read_text())
    cpu = "measured_rss" in json.dumps(doc["results"])
    for r in doc["results"]:
        add_prediction(r, "cpu" if cpu else "cuda")
        print(_row(r))
    doc["repredicted"] = {"date": datetime.date.today().isoformat(), "runtime_assumed": plan.RUNTIME}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def device_info(cpu: bool) -> dict:
    if cpu:
        return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "memory": p.total_memory, "cuda": torch.version.cuda,
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
            "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "sdpa_cudnn": torch.backends.cuda.cudnn_sdp_enabled()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="measure peak RSS on the CPU instead of the GPU")
    ap.add_argument("--quick", action="store_true", help="2 configurations only")
    ap.add_argument("--only", nargs="*", help="configuration names to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--models", default="/tmp/lorakit-plan-models", help="where the random GPU models are saved")
    ap.add_argument("--repredict", metavar="RESULTS_JSON",
                    help="recompute the predictions of an earlier results file with the current model")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_cpu(json.loads(args.child))))
        return 0
    if args.repredict:
        return repredict(Path(args.repredict))
    configs = CPU_CONFIGS if args.cpu else GPU_CONFIGS
    names = args.only or (CPU_QUICK if args.cpu else QUICK) if (args.quick or args.only) else None
    if names:
        configs = [c for c in configs if c["name"] in names]
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu", file=sys.stderr)
        return 2
    started = time.time()
    results = run_cpu(configs) if args.cpu else run_gpu(configs, Path(args.models))
    doc = {"date": datetime.date.today().isoformat(), "what": "lorakit.plan predicted vs measured peak memory",
           "measure": "peak RSS (VmHWM) and allocator peak" if args.cpu else "torch.cuda.max_memory_allocated",
           "device": device_info(args.cpu), "versions": versions(), "runtime_assumed": plan.RUNTIME,
           "seconds": round(time.time() - started), "results": results}
    name = f"plan_memory_{doc['date']}{'_cpu' if args.cpu else ''}.json"
    for folder in filter(None, [args.out, os.environ.get("OUT")]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(json.dumps(doc, indent=1) + "\n")
    print("\nsummary (predicted vs measured):")
    for r in results:
        print(_row(r))
    ok = [abs(r["error_pct"]) for r in results if "error_pct" in r]
    if ok:
        print(f"{len(ok)} of {len(results)} measured; |error| max {max(ok):.1f}%, mean {sum(ok) / len(ok):.1f}%")
    print(f"wrote {name} ({doc['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
