"""Model resolution: the embedded default, local directories, hub ids, and the cache."""

import json
from pathlib import Path

import pytest

from lorakit import models
from lorakit.models import ModelError, resolve_model


def test_embedded_model_cache_holds_a_complete_hf_copy(smol_dir):
    files = {p.name for p in Path(smol_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= files
    config = json.loads((Path(smol_dir) / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    gen = json.loads((Path(smol_dir) / "generation_config.json").read_text())
    im_end = json.loads((Path(smol_dir) / "tokenizer.json").read_text())["added_tokens"]
    assert gen["eos_token_id"] == next(t["id"] for t in im_end if t["content"] == "<|im_end|>")


def test_cached_model_is_not_converted_again(smol_dir, monkeypatch):
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted a cached model"))
    assert resolve_model("smollm2-135m") == smol_dir


def test_lorakit_home_decides_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    made = []

    def fake_convert(src, gguf_file, target):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        made.append((src, gguf_file))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert resolve_model("smollm2-135m") == str(tmp_path / "models" / "smollm2-135m")
    assert made and made[0][1].endswith(".gguf") and (made[0][0] / made[0][1]).is_file()


def test_local_directories_and_hub_ids(tmp_path, tiny_model_dir):
    assert resolve_model(tiny_model_dir) == str(Path(tiny_model_dir).resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="neither an embedded model"):
        resolve_model("smollm3")


def test_tokenizer_keeps_pad_equal_to_end_of_turn(smol_tokenizer):
    assert smol_tokenizer.pad_token == smol_tokenizer.eos_token == "<|im_end|>"
