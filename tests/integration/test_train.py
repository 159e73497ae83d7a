"""`lorakit train` end to end on the embedded SmolLM2-135M-Instruct, on CPU."""

import json

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit import models
from lorakit.models import resolve_precision

pytestmark = pytest.mark.slow


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fresh_base(cfg):
    device = torch.device("cpu")
    return models.load_base(cfg, models.resolve_model(cfg.model), resolve_precision("fp32", device), device)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_train_changes_adapter_only_and_reloads_identically(overfit_config, tmp_path, method):
    cfg = lorakit.load_config(overfit_config, [f"method={method}", f"output_dir={tmp_path / 'run'}"])
    result = lorakit.train(cfg)
    run = tmp_path / "run"

    losses = _losses(run)
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses  # the overfit set is being learned

    trained = result.model
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it moved

    fresh = _fresh_base(cfg).state_dict()
    base_part = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                 for k, v in trained.state_dict().items() if "lora_" not in k}
    assert set(fresh) <= set(base_part)
    assert all(torch.equal(fresh[k], base_part[k]) for k in fresh)  # frozen base untouched (4-bit packed too)

    tokenizer = models.load_tokenizer(str(run / "adapter"))
    reloaded = PeftModel.from_pretrained(_fresh_base(cfg), run / "adapter")
    assert torch.equal(_logits(trained, tokenizer), _logits(reloaded, tokenizer))
    assert (run / "adapter" / "chat_template.jinja").is_file()
    assert json.loads((run / "data_report.json").read_text())["train"]["examples_kept"] == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_eval_writes_base_vs_tuned_summary(overfit_config, tmp_path):
    cfg = lorakit.load_config(overfit_config, [f"output_dir={tmp_path / 'run'}", "train.max_steps=4",
                                               f"data.eval={overfit_config.parent / 'train.jsonl'}"])
    lorakit.train(cfg)
    summary = lorakit.evaluate(tmp_path / "run", limit=4)
    assert summary["n"] == 4 and set(summary) >= {"base", "tuned"}
    assert {"exact_match", "stop_rate", "loss"} <= set(summary["tuned"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["base"]["output"] != rows[0]["tuned"]["output"]
    # memorised answers: the tuned model reproduces the training answers it overfit
    assert summary["tuned"]["exact_match"] > summary["base"]["exact_match"]


def test_auto_method_and_batch_size_are_decided_by_the_planner(overfit_config, tiny_model_dir, tmp_path, capfd):
    run = tmp_path / "run"
    cfg = lorakit.load_config(overfit_config, [f"output_dir={run}", f"model={tiny_model_dir}", "method=auto",
                                               "train.batch_size=auto", "train.max_steps=1"])
    lorakit.train(cfg)
    saved = lorakit.load_config(run / "config.yaml")
    # a 2-layer model on a machine with GBs of RAM: lora fits, and the largest allowed micro-batch
    assert (saved.method, saved.train.batch_size) == ("lora", 16)
    captured = capfd.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "auto: method lora" in out and "batch_size 16" in out


def test_plan_cli_prints_options_and_json(overfit_config, tiny_model_dir):
    import subprocess
    import sys

    def plan(*args):
        return subprocess.run([sys.executable, "-m", "lorakit.cli", "plan", str(overfit_config),
                               f"model={tiny_model_dir}", *args], capture_output=True, text=True, timeout=300)

    table = plan("--gpu-mem", "24GiB")
    assert table.returncode == 0, table.stderr
    assert all(label in table.stdout for label in ("lora + checkpointing", "qlora", "recommendation"))
    doc = json.loads(plan("--gpu", "A100", "--json").stdout)
    assert [o["label"] for o in doc["options"]] == ["lora", "lora + checkpointing", "qlora", "qlora + checkpointing"]
    assert doc["device_kind"] == "cuda" and all(o["fits"] for o in doc["options"])
    bad = plan("--gpu-mem", "lots")
    assert bad.returncode == 2 and "--gpu-mem" in bad.stderr and "Traceback" not in bad.stderr
