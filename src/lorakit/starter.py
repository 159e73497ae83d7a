"""`lorakit init`: a commented starter config and a tiny data set that trains as-is."""

import json
from pathlib import Path

from lorakit.errors import LorakitError

CONFIG = """\
# lorakit train lorakit.yaml
# A starter run: teaches the embedded SmolLM2-135M-Instruct to tag a message with its intent.
# Every key is listed in the README; any key can be overridden: lorakit train lorakit.yaml train.lr=5e-4
model: smollm2-135m          # embedded default | local Hugging Face model dir | hub id
method: lora                 # lora | qlora (4-bit base, less memory)
output_dir: runs/starter     # relative to where you run lorakit
data:
  train: data/train.jsonl    # relative to this file: JSONL lines of {"messages": [...]}
  eval: data/eval.jsonl      # held-out conversations: eval loss, then base vs tuned generations
  max_length: 256            # tokens per example; longer ones fail the check (data.too_long)
  packing: false
lora:
  r: 16
  alpha: 32
  dropout: 0.0
train:
  max_steps: 12              # a quick first run; use epochs: 3 for a real one
  batch_size: 4
  lr: 1.0e-3                 # adapters of small models take a high learning rate
  save_every: 6
  log_every: 1
eval:
  max_new_tokens: 24
"""

SYSTEM = 'Reply with JSON: {"intent": one of "refund", "cancel", "track", "other"}.'
MESSAGES = {
    "refund": ["I want my money back for the blender", "Please refund order 1123", "Can I get a refund?",
               "The mug broke, I'd like a refund", "Refund me for the late delivery", "money back please",
               "I was charged twice, refund one", "How do I get reimbursed for this?"],
    "cancel": ["Cancel my subscription", "Please cancel order 884", "I don't want the lamp anymore, cancel it",
               "Stop my plan from renewing", "cancel everything", "Can you cancel before it ships?",
               "I ordered by mistake, cancel please", "End my membership"],
    "track": ["Where is my package?", "Track order 5521", "When will the chair arrive?",
              "My parcel hasn't shown up", "Any shipping update?", "Has order 77 shipped yet?",
              "tracking number please", "Is my delivery still coming today?"],
    "other": ["Do you sell gift cards?", "What are your opening hours?", "Do you ship to Canada?",
              "Is the blue one in stock?", "I love your shop!", "Can I change my email address?",
              "Do you have a student discount?", "Who makes the kettle?"],
}


def _example(text: str, intent: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                {"role": "assistant", "content": json.dumps({"intent": intent})}]
    return json.dumps({"messages": messages}) + "\n"


def write_starter(directory: Path) -> Path:
    config = directory / "lorakit.yaml"
    if config.exists():
        raise LorakitError(f"{config} already exists; choose another directory: lorakit init DIR")
    (directory / "data").mkdir(parents=True, exist_ok=True)
    train, held_out = [], []
    for intent, texts in MESSAGES.items():
        train += [_example(t, intent) for t in texts[:6]]
        held_out += [_example(t, intent) for t in texts[6:]]
    (directory / "data" / "train.jsonl").write_text("".join(train))
    (directory / "data" / "eval.jsonl").write_text("".join(held_out))
    config.write_text(CONFIG)
    return config
