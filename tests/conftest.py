"""Shared fixtures: the embedded model (cached HF copy) and a tiny random model of its architecture."""

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
