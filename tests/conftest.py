"""Shared fixtures: the embedded model (cached HF copy), a tiny random model of its architecture, and a
small overfit config over eight short conversations."""

import json
from pathlib import Path

import pytest
import torch

from lorakit import models


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into $LORAKIT_HOME."""
    return models.resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    return models.load_tokenizer(smol_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: fast, same code paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
                         pad_token_id=smol_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


# Short conversations: the run overfits them in a few steps, and a step takes seconds on 2 cores.
OVERFIT = [("Capital of France?", "Paris."), ("2 + 2?", "4."), ("Color of the sky?", "Blue."),
           ("Opposite of hot?", "Cold."), ("First letter of the alphabet?", "A."), ("Largest ocean?", "Pacific."),
           ("Freezing point of water in Celsius?", "0 degrees."), ("How many legs does a spider have?", "Eight.")]


def write_conversations(path: Path, pairs=OVERFIT, system: str | None = "Answer in one or two words.") -> Path:
    with open(path, "w") as f:
        for question, answer in pairs:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def overfit_config(tmp_path) -> Path:
    """A config over the 8-example overfit set; tests override model, method, steps as they need."""
    write_conversations(tmp_path / "train.jsonl")
    config = tmp_path / "config.yaml"
    config.write_text(
        "data: {train: train.jsonl, max_length: 128, packing: false}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {max_steps: 6, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0, scheduler: constant,\n"
        "        precision: fp32, save_every: 2, log_every: 1}\n"
        "eval: {after_train: false, max_new_tokens: 12}\n"
    )
    return config
