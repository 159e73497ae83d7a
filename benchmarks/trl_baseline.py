"""The arms lorakit is measured against: the seed guide's QLoRA script through TRL, as its users run it.

The seed guide's SFTTrainer settings (../shared/seed-guide.txt; `max_seq_length` renamed to
`max_length`, the one change TRL 1.16 needs): QLoRA NF4 + double quant, bf16 compute, LoRA r16/α32,
dropout 0.05, all-linear, packing to 2,048 tokens, micro-batch 1 × 8 accumulation, lr 1e-4. On a
random-init model of a real architecture (the one benchmarks/gpu_throughput.py saves to
/tmp/rand-ARCH) and random-word conversations, so throughput and memory are those of the real model.

  VARIANT seed        the guide's settings
          tuned       + Liger kernels, micro-batch 8 × 1 accumulation (the same tokens per step)
          lora-tuned  tuned on a bf16 base (no 4-bit)

usage: python benchmarks/trl_baseline.py ARCH VARIANT STEPS TOKENIZER_DIR
Prints one JSON line: tokens/s over the steps after the third, peak allocated GPU memory, losses.
gpu_throughput.py runs it in a child process (Liger patches transformers' model classes globally).
"""

import json
import random
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer


def main() -> None:
    arch, variant, steps, tok_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    path = f"/tmp/rand-{arch}"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if variant.startswith("lora"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto")
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="auto")
    model.config.use_cache = False

    rng = random.Random(0)
    vocab = tokenizer.get_vocab()
    words = [w for w in sorted(vocab, key=vocab.get) if w.isalpha() and 3 < len(w) < 10][:5000]

    def turn(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"messages": [{"role": "user", "content": turn(rng.randint(20, 300))},
                          {"role": "assistant", "content": turn(rng.randint(50, 900))}]} for _ in range(3000)]
    tuned = variant.endswith("tuned")
    args = SFTConfig(output_dir="/tmp/trl-out", learning_rate=1e-4, per_device_train_batch_size=8 if tuned else 1,
                     gradient_accumulation_steps=1 if tuned else 8, max_steps=steps, logging_steps=1,
                     save_strategy="no", bf16=True, max_length=2048, packing=True, report_to=[],
                     use_liger_kernel=tuned, dataloader_num_workers=0)
    log = []

    class Clock(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.append((time.perf_counter(), float(logs.get("num_tokens", 0)), float(logs["loss"])))

    peft_config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=16, lora_alpha=32,
                             lora_dropout=0.05, bias="none")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    warm = min(3, len(log) - 2)
    (t0, n0, _), (t1, n1, _) = log[warm], log[-1]
    print(json.dumps(dict(arch=arch, variant=variant, steps=steps, tokens_per_s=round((n1 - n0) / (t1 - t0)),
                          tokens_per_step=round((n1 - n0) / (len(log) - 1 - warm)),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          losses=[round(x, 4) for _, _, x in log], attn=model.config._attn_implementation,
                          gradient_checkpointing=args.gradient_checkpointing)))


if __name__ == "__main__":
    main()
