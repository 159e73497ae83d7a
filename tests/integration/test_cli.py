"""The `lorakit` command as a user runs it: exit codes, messages, kill -9 and resume, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

LORAKIT = [sys.executable, "-m", "lorakit.cli"]


def run(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*LORAKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_config_with_three_mistakes_lists_all_and_exits_2(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    config = tmp_path / "bad.yaml"
    config.write_text("method: qlor\ndata: {train: train.jsonl}\nlora: {rank: 8}\ntrain: {lr: -1}\n")
    result = run("train", config, f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    err = " ".join(result.stderr.split())
    assert "3 problems" in err and "Traceback" not in err
    assert "method" in err and "did you mean 'qlora'?" in err
    assert "lora.rank" in err and "lora.r" in err
    assert "train.lr" in err and "-1" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_data_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "c.yaml").write_text("data: {train: train.jsonl}\n")
    result = run("check", tmp_path / "c.yaml")
    assert result.returncode == 2 and "train.jsonl:1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_kill_9_then_resume_finishes_with_the_uninterrupted_adapter(overfit_config, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([*LORAKIT, "train", str(overfit_config), f"output_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-2" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(1.5)  # land inside a later step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()

    resumed = run("train", killed / "config.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    assert run("train", overfit_config, f"output_dir={clean}").returncode == 0
    a = load_file(killed / "adapter" / "adapter_model.safetensors")
    b = load_file(clean / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bitwise: fp32 on CPU


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_130(overfit_config, tmp_path, tiny_model_dir, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([*LORAKIT, "train", str(overfit_config), f"output_dir={out}", f"model={tiny_model_dir}",
                             "train.max_steps=100000", "train.save_every=100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-") and "--resume" in err


@pytest.mark.slow
def test_init_writes_a_config_that_trains_as_is(tmp_path):
    assert run("init", tmp_path / "proj").returncode == 0
    config = tmp_path / "proj" / "lorakit.yaml"
    assert config.read_text().startswith("# lorakit train lorakit.yaml")
    result = run("train", config, "train.max_steps=2", "eval.limit=2", cwd=tmp_path / "proj")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "proj" / "runs" / "starter" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "proj" / "runs" / "starter" / "eval" / "summary.json").read_text())["n"] == 2
