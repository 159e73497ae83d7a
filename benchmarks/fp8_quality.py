"""FP8 base matmuls on a real fine-tune: `make demo` trained twice, fp32 base vs FP8 base matmuls.

The GPU machine has no pretrained weights, so `train.fp8` had only been checked on random-init models,
whose loss sits near log(V) and barely moves. This runs the demo (the embedded SmolLM2-135M-Instruct,
examples/support_tickets/config.yaml: 24 steps of 8 tickets, then the base-vs-tuned eval on 100 held-out
tickets) twice, same seed and data, each in its own process:

  reference  exactly what `make demo` runs: lorakit's CPU default (fp32 base, no FP8)
  fp8        the same, with the frozen base matmuls of every LoRA layer (y = x Wᵀ forward, dx = dy W
             backward) through train/fp8.py: e4m3 operands with row-wise scales, fp32 accumulation

On CPU lorakit ignores `train.fp8` (loop._fast_path returns fp8 False, fast.speedups returns early), so
the fp8 arm forces it: `_fast_path` returns (False, True) and `speedups` becomes `fp8.attach(model)`,
with no compile. torch._scaled_mm's CPU kernel rounds the operands to e4m3 as the GPU does and sums
in fp32, so the effect on learning carries over; only the speed does not (emulated, slower than fp32).

`fp8_linear` returns bf16 (the kernel's out_dtype); the frozen layer casts it back to its input's
dtype, so this fp32 model keeps fp32 activations (the bf16 rounding stays). The results file was
written before fp8.py did that cast itself, when this script's patch did the same.

The patch is checked, not trusted: the arm counts the layers attached and the FP8 matmuls run, forward
(expected: layers x steps, so none during evaluation) and backward (one per forward whose input needs a
gradient); the comparison fails unless they match and step 1's loss already differs from the reference's.

Writes each run to OUT_DIR/{reference,fp8}/ (metrics.jsonl, eval/summary.json, eval/results.jsonl),
prints the comparison and writes the JSON to --out.

usage: python benchmarks/fp8_quality.py [--out-dir /tmp/fp8_quality] [--out FILE]
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "support_tickets" / "config.yaml"
ARMS = ("reference", "fp8")
METRICS = ("json_valid", "field_accuracy", "exact_match", "stop_rate", "loss", "length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="/tmp/fp8_quality", help="run directories go here")
    parser.add_argument("--out", default=f"benchmarks/results/fp8_quality_{datetime.date.today()}.json")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # the child process of one arm
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    if args.arm:
        result = run_arm(args.arm, out_dir / args.arm)
        (out_dir / f"{args.arm}.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    runs = {arm: spawn(arm, out_dir) for arm in ARMS}
    comparison = compare(runs)
    print_table(runs, comparison)
    doc = {"date": str(datetime.date.today()), "what": __doc__.split("\n")[0], "command": " ".join(sys.argv),
           "machine": machine(), "versions": versions(), "settings": settings(), "comparison": comparison,
           "runs": runs}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


def spawn(arm: str, out_dir: Path) -> dict:
    """One arm in a fresh process, so nothing the fp8 patch touched reaches the reference."""
    out_dir.mkdir(parents=True, exist_ok=True)
    load, started = os.getloadavg()[0], time.time()
    subprocess.run([sys.executable, __file__, "--arm", arm, "--out-dir", str(out_dir)], check=True)
    result = json.loads((out_dir / f"{arm}.json").read_text())
    return {**result, "process_seconds": time.time() - started, "load_before": load,
            "load_after": os.getloadavg()[0]}


def run_arm(arm: str, run_dir: Path) -> dict:
    """`lorakit train CONFIG output_dir=RUN_DIR` in this process (train, then the base-vs-tuned eval)."""
    from lorakit import cli

    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: remove it (or pass another --out-dir) so the run starts clean")
    argv = ["train", str(CONFIG), f"output_dir={run_dir}"]
    counts = {}
    started = time.time()
    with forced_fp8(counts) if arm == "fp8" else contextlib.nullcontext():
        code = cli.main(argv)
    seconds = time.time() - started
    if code:
        raise SystemExit(f"{arm}: lorakit train exited with {code}")
    return {"arm": arm, "argv": ["lorakit", *argv], "seconds": seconds, **read_run(run_dir), "fp8_calls": counts}


@contextlib.contextmanager
def forced_fp8(counts: dict):
    """Patches that run the fp8 path on CPU and count what it did: layers attached, FP8 forward
    matmuls (and those whose input needs a gradient: layer 0's q, k, v read the frozen embedding and
    have none), and backward ones: `_rows_to_fp8` casts x in the forward and dy in the backward."""
    from lorakit.train import fast, fp8, loop

    linear, rows = fp8.fp8_linear, fp8._rows_to_fp8
    counts.update(attached=0, forward=0, forward_with_grad=0, row_casts=0)

    def speedups(model, device, cudagraphs=False, use_fp8=False):
        counts["attached"] = fp8.attach(model)
        print(f"fp8 arm: {counts['attached']} frozen base linears routed through train/fp8.py", flush=True)
        return model

    def fp8_linear(x, *args):
        counts["forward"] += 1
        counts["forward_with_grad"] += x.requires_grad
        return linear(x, *args)

    def rows_to_fp8(x):
        counts["row_casts"] += 1
        return rows(x)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(loop, "_fast_path", lambda cfg, device: (False, True)))
        stack.enter_context(mock.patch.object(fast, "speedups", speedups))
        stack.enter_context(mock.patch.object(fp8, "fp8_linear", fp8_linear))
        stack.enter_context(mock.patch.object(fp8, "_rows_to_fp8", rows_to_fp8))
        yield


def read_run(run_dir: Path) -> dict:
    """What the run wrote: per-step training log, eval loss, and the eval summary and per-prompt rows."""
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "eval" / "results.jsonl").read_text().splitlines()]
    return {"run_dir": str(run_dir),
            "steps": [{k: r[k] for k in ("step", "loss", "grad_norm", "lr", "tok_s")} for r in log],
            "eval_loss": log[-1].get("eval_loss"), "train_seconds": summary["run"]["train"]["seconds"],
            "eval_seconds": summary["seconds"], "tuned": summary["tuned"], "base": summary["base"],
            "tuned_minus_base": summary["delta"], "per_field": summary.get("per_field"),
            "prompts": [{"source": r["source"], "reference_tokens": r["reference_tokens"],
                         "tuned_output": r["tuned"]["output"], "scores": r["tuned"]["scores"]} for r in rows]}


def compare(runs: dict) -> dict:
    """fp8 against reference: per-step loss, the patch's checks, and the tuned eval paired by prompt."""
    from lorakit.eval.stats import compare as paired

    ref, low = runs["reference"], runs["fp8"]
    steps = len(ref["steps"])
    rel = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(ref["steps"], low["steps"])]
    worst = max(range(steps), key=rel.__getitem__)
    differs = [a["step"] for a, b in zip(ref["steps"], low["steps"]) if a["loss"] != b["loss"]]
    calls = low["fp8_calls"]
    checks = {"layers_attached": calls["attached"], "forward_fp8_matmuls": calls["forward"],
              "backward_fp8_matmuls": calls["row_casts"] - calls["forward"],
              "expected_forward": calls["attached"] * steps, "expected_backward": calls["forward_with_grad"],
              "first_step_loss_differs": bool(differs) and differs[0] == 1,
              "base_eval_identical": ref["base"] == low["base"]}
    if not (checks["layers_attached"] and checks["forward_fp8_matmuls"] == checks["expected_forward"]
            and 0 < checks["backward_fp8_matmuls"] == checks["expected_backward"]
            and checks["first_step_loss_differs"]):
        raise SystemExit(f"the fp8 patch did not run as intended: {checks}")
    paired_eval = {}
    for name in METRICS:
        weights = [p["reference_tokens"] for p in ref["prompts"]] if name == "loss" else None
        better = {"loss": "lower", "length": None}.get(name, "higher")
        paired_eval[name] = paired([p["scores"][name] for p in ref["prompts"]],
                                   [p["scores"][name] for p in low["prompts"]], better, weights=weights, seed=42)
    same = sum(a["tuned_output"] == b["tuned_output"] for a, b in zip(ref["prompts"], low["prompts"]))
    return {"patch_checks": checks,
            "max_rel_loss_diff": {"value": rel[worst], "step": worst + 1, "reference": ref["steps"][worst]["loss"],
                                  "fp8": low["steps"][worst]["loss"]},
            "mean_rel_loss_diff": sum(rel) / steps,
            "final_loss": {arm: runs[arm]["steps"][-1]["loss"] for arm in ARMS},
            "eval_loss": {arm: runs[arm]["eval_loss"] for arm in ARMS},
            "fp8_minus_reference_tuned": paired_eval, "identical_tuned_outputs": same}


def print_table(runs: dict, c: dict) -> None:
    ref, low = runs["reference"]["steps"], runs["fp8"]["steps"]
    print(f"\n{'step':>4} {'reference':>10} {'fp8':>10} {'rel diff':>9} {'gnorm ref':>9} {'gnorm fp8':>9}")
    for a, b in zip(ref, low):
        print(f"{a['step']:>4} {a['loss']:>10.4f} {b['loss']:>10.4f} {(b['loss'] - a['loss']) / a['loss']:>+9.2%} "
              f"{a['grad_norm']:>9.4f} {b['grad_norm']:>9.4f}")
    m = c["max_rel_loss_diff"]
    print(f"max |rel diff| {m['value']:.4g} at step {m['step']}; mean {c['mean_rel_loss_diff']:.4g}; eval loss "
          f"{c['eval_loss']['reference']:.4f} vs {c['eval_loss']['fp8']:.4f}")
    print(f"\n{'tuned metric':<15} {'reference':>10} {'fp8':>10} {'fp8 - ref [95%]':>28}")
    for name, d in c["fp8_minus_reference_tuned"].items():
        print(f"{name:<15} {runs['reference']['tuned'][name]:>10.4f} {runs['fp8']['tuned'][name]:>10.4f} "
              f"{d['mean']:>+10.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    print(f"identical tuned outputs: {c['identical_tuned_outputs']}/{len(runs['fp8']['prompts'])}")
    for arm in ARMS:
        r = runs[arm]
        print(f"{arm}: train {r['train_seconds']:.1f} s, eval {r['eval_seconds']:.1f} s, lorakit train "
              f"{r['seconds']:.1f} s, process {r['process_seconds']:.1f} s")
    print(f"patch checks: {c['patch_checks']}")


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "note": "shared 2-core CPU, other work running: wall times are indicative only"}


def versions() -> dict:
    import peft
    import torch
    import transformers

    import lorakit

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "lorakit": lorakit.__version__}


def settings() -> dict:
    import torch

    import lorakit
    from lorakit import models

    cfg = lorakit.load_config(CONFIG)
    return {"config": str(CONFIG.relative_to(ROOT)), "model": cfg.model, "seed": cfg.seed,
            "precision": models.resolve_precision(cfg.train.precision, torch.device("cpu")).name,
            "max_steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": cfg.lora.target_modules},
            "fp8": "e4m3 operands, row-wise scales (x, dy per token; W per output channel forward, per input "
                   "channel backward), torch._scaled_mm CPU kernel, fp32 accumulation, bf16 output cast back to "
                   "fp32; training only (eval loss and generation run the fp32 base)"}


if __name__ == "__main__":
    main()
