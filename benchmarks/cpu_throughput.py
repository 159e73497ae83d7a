"""Training tokens/s on this CPU: lorakit vs the seed guide's TRL script, same data and LoRA settings.

The setting of issue 7's CPU target: the embedded SmolLM2-135M-Instruct, 400 short conversations
(examples/support_tickets/train.jsonl), packed rows of 512 tokens, 8 rows per optimizer step,
LoRA r=16 alpha=32 dropout 0.05 on all linear layers, loss on the assistant turns.

Arms (`--only`):
  trl-seed    TRL SFTTrainer with the seed guide's settings (micro-batch 1 x accumulation 8, packing,
              max_length 512, a bf16 model with bf16=True), LoRA on the full-precision base (4-bit is
              far slower on a CPU)
  trl-tuned   the same at micro-batch 8 x accumulation 1
  lorakit     `lorakit.train` with packing, max_length 512, batch 8
  matmul      one decoder-sized matmul in fp32 and bf16: why precision auto is what it is on this CPU

Every arm runs in `--precision` (default auto: lorakit's rule, bf16 where the CPU has AVX-512 BF16 or
AMX, else fp32). bf16 is the seed script's own setting; without those units oneDNN emulates bf16 and
is ~100x slower than fp32 (benchmarks/NOTES.md, session 2), so there the seed arm runs fp32 as well.

Tokens/s counts every token the model runs (padding included, as the arms pad differently: lorakit's
packed rows carry none), over the steps after the first `--warmup`, on wall time. The lorakit arm also
reports each step's seconds and the arm's user and system CPU seconds and minor page faults: nearly
all its system time is step 1 touching the step's memory for the first time (benchmarks/NOTES.md,
session 4), outside the timed steps.

usage: python benchmarks/cpu_throughput.py [--steps 6] [--warmup 2] [--only ARM ...] [--precision auto|fp32|bf16]
                                          [--out FILE]
"""

import argparse
import datetime
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "support_tickets" / "train.jsonl"
ROWS, MAX_LENGTH, BATCH = 400, 512, 8
LORA = dict(r=16, alpha=32, dropout=0.05)


def _rows(path: Path) -> Path:
    """The first ROWS conversations, as their own file."""
    lines = DATA.read_text().splitlines()[:ROWS]
    path.write_text("\n".join(lines) + "\n")
    return path


def lorakit_arm(steps: int, warmup: int, work: Path, precision: str) -> dict:
    import lorakit

    cfg = lorakit.load_config(overrides=[
        f"data.train={_rows(work / 'train.jsonl')}", f"data.max_length={MAX_LENGTH}", "data.packing=true",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
        f"train.batch_size={BATCH}", "train.grad_accum=1", f"train.precision={precision}",
        f"train.max_steps={steps}", "train.log_every=1", f"train.save_every={steps + 1}", "eval.after_train=false",
        f"output_dir={work / 'run'}"])
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = lorakit.train(cfg)
    after = resource.getrusage(resource.RUSAGE_SELF)
    log = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = log[warmup:]
    seconds = sum(r["tokens"] / r["tok_s"] for r in timed)
    return {"tok_s": sum(r["tokens"] for r in timed) / seconds, "loss": [round(r["loss"], 4) for r in log],
            "tokens_per_step": [r["tokens"] for r in log],
            "step_seconds": [round(r["tokens"] / r["tok_s"], 1) for r in log],
            "precision": precision,
            "train_seconds": round(result.seconds, 1), "user_seconds": round(after.ru_utime - before.ru_utime, 1),
            "sys_seconds": round(after.ru_stime - before.ru_stime, 1), "minor_faults": after.ru_minflt - before.ru_minflt}


def trl_arm(steps: int, warmup: int, micro: int, precision: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit import models

    path = models.resolve_model("smollm2-135m")
    tokenizer = models.load_tokenizer(path)
    bf16 = precision == "bf16"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:ROWS]]
    args = SFTConfig(output_dir=tempfile.mkdtemp(), learning_rate=1e-4, per_device_train_batch_size=micro,
                     gradient_accumulation_steps=BATCH // micro, max_steps=steps, logging_steps=1,
                     save_strategy="no", bf16=bf16, max_length=MAX_LENGTH, packing=True, report_to=[],
                     use_cpu=True, dataloader_num_workers=0, assistant_only_loss=False)
    peft = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=LORA["r"], lora_alpha=LORA["alpha"],
                      lora_dropout=LORA["dropout"], bias="none")
    log = []

    class Clock(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.append((time.perf_counter(), float(logs.get("num_tokens", 0)), float(logs["loss"])))

    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft, callbacks=[Clock()])
    trainer.train()
    (t0, n0, _), (t1, n1, _) = log[warmup - 1], log[-1]
    return {"tok_s": (n1 - n0) / (t1 - t0), "loss": [round(x, 4) for _, _, x in log],
            "tokens_per_step": [round(b[1] - a[1]) for a, b in zip(log, log[1:])], "precision": precision}


def matmul_arm() -> dict:
    """A [4096 x 576] x [576 x 1536] matmul (SmolLM2's MLP on one 8 x 512 batch), ms per call."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(4096, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        out[f"{name}_ms"] = round((time.perf_counter() - t) / 3 * 1e3, 1)
    return out


ARMS = {"lorakit": lorakit_arm, "trl-seed": lambda s, w, _, p: trl_arm(s, w, 1, p),
        "trl-tuned": lambda s, w, _, p: trl_arm(s, w, BATCH, p), "matmul": lambda *_: matmul_arm()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["matmul", "lorakit", "trl-seed", "trl-tuned"])
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--out", default=f"benchmarks/results/cpu_throughput_{datetime.date.today()}.json")
    args = parser.parse_args()
    import peft
    import transformers

    import lorakit
    from lorakit import models

    precision = models.resolve_precision(args.precision, torch.device("cpu")).name
    results = []
    for name in args.only:
        with tempfile.TemporaryDirectory() as work:
            load = os.getloadavg()[0]
            started = time.time()
            result = {"arm": name, **ARMS[name](args.steps, args.warmup, Path(work), precision),
                      "seconds": round(time.time() - started, 1), "load_before": round(load, 2),
                      "load_after": round(os.getloadavg()[0], 2)}
        print(json.dumps(result), flush=True)
        results.append(result)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__, "lorakit": lorakit.__version__}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    doc = {"date": str(datetime.date.today()), "what": "training tokens/s on CPU, lorakit vs TRL (seed settings)",
           "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "bf16_units": models.cpu_has_fast_bf16()},
           "settings": {"model": "smollm2-135m", "rows": ROWS, "max_length": MAX_LENGTH, "rows_per_step": BATCH,
                        "lora": LORA, "steps": args.steps, "warmup": args.warmup,
                        "precision": precision},
           "versions": versions, "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
