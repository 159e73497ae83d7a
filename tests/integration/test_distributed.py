"""Several training processes on CPU (gloo) through `lorakit train --nproc 2`, on a tiny random Llama:
two processes of batch 4 train the adapter one process of batch 8 trains, a killed run resumes to the
uninterrupted adapter, only the main process writes, and a resume with another process count is refused.

Each launch starts three Python processes (the launcher and two trainers), so the runs are made once,
in the module fixture, and the tests read them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import cli

LORAKIT = [sys.executable, "-m", "lorakit.cli"]
CONVERSATIONS = [("Capital of France?", "Paris."), ("2 + 2?", "4."), ("Color of the sky?", "Blue."),
                 ("Opposite of hot?", "Cold."), ("Largest ocean?", "Pacific."), ("First letter?", "A."),
                 ("Freezing point of water in Celsius?", "0 degrees."), ("Legs of a spider?", "Eight.")]

# Imported by every Python process the test starts (sitecustomize): lists what the process creates,
# changes or removes under RUNS_ROOT, and writes that list to WRITES_DIR/rank-R.json at exit.
WATCH_WRITES = """
import atexit, json, os, sys

_root, _seen = os.environ["RUNS_ROOT"], []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
    else:
        path, writes = args[0], event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree",
                                          "os.truncate", "os.link", "os.symlink")
    if writes and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(_root):
        _seen.append(f"{event} {os.fsdecode(path)}")

if "RANK" in os.environ:  # a training process, not the launcher
    sys.addaudithook(_hook)
    atexit.register(lambda: open(os.path.join(os.environ["WRITES_DIR"], "rank-" + os.environ["RANK"] + ".json"),
                                 "w").write(json.dumps(_seen)))
"""


def _launch(root: Path, name: str, config: Path, args: list[str], **env) -> subprocess.CompletedProcess:
    """`lorakit train CONFIG ARGS --nproc 2`, each process's writes under root/runs listed in root/writes-NAME."""
    (root / f"writes-{name}").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root / "watch"), *sys.path]),
           "RUNS_ROOT": str(root / "runs"), "WRITES_DIR": str(root / f"writes-{name}"), **env}
    return subprocess.run([*LORAKIT, "train", str(config), *args, "--nproc", "2"], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    with open(root / "train.jsonl", "w") as f:
        for question, answer in CONVERSATIONS:
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    config = root / "config.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\n"
        "data: {train: train.jsonl, max_length: 128, packing: false}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {max_steps: 4, batch_size: 4, lr: 1.0e-3, warmup_ratio: 0.0, scheduler: constant,\n"
        "        precision: fp32, save_every: 2, log_every: 1}\n"
        "eval: {after_train: false}\n")
    (root / "watch").mkdir()
    (root / "watch" / "sitecustomize.py").write_text(WATCH_WRITES)
    run = {name: root / "runs" / name for name in ("one", "two", "crashed")}
    lorakit.train(lorakit.load_config(config, [f"output_dir={run['one']}", "train.batch_size=8"]))
    two = _launch(root, "two", config, [f"output_dir={run['two']}"])
    assert two.returncode == 0, two.stderr
    crash = _launch(root, "crash", config, [f"output_dir={run['crashed']}"],
                    LORAKIT_FAULT="kill@step-3:micro-0", LORAKIT_FAULT_RANK="1")
    adapter_after_crash = (run["crashed"] / "adapter").exists()
    resumed = _launch(root, "resume", run["crashed"] / "config.yaml", ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    return {**run, "root": root, "two_log": two.stderr, "crash": crash, "adapter_after_crash": adapter_after_crash}


def _adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_of_batch_4_train_the_adapter_of_one_process_of_batch_8(runs):
    one, two = _adapter(runs["one"]), _adapter(runs["two"])
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-5) for k in one)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in two.items() if "lora_B" in k)  # it trained
    m1, m2 = _metrics(runs["one"]), _metrics(runs["two"])
    assert [(m["step"], m["tokens"], m["trained_tokens"]) for m in m1] == [
        (m["step"], m["tokens"], m["trained_tokens"]) for m in m2]  # tokens of the whole step, all processes
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-5)


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_adapter(runs):
    crash = runs["crash"]
    assert crash.returncode == 1 and "training process 1 of 2 failed (killed by SIGKILL)" in crash.stderr
    assert not runs["adapter_after_crash"]
    crashed, clean = _adapter(runs["crashed"]), _adapter(runs["two"])
    assert crashed.keys() == clean.keys() and all(torch.equal(crashed[k], clean[k]) for k in clean)
    assert [(m["step"], m["loss"]) for m in _metrics(runs["crashed"])] == [
        (m["step"], m["loss"]) for m in _metrics(runs["two"])]


def test_only_the_main_process_writes_files_and_prints(runs):
    for launch in ("writes-two", "writes-resume"):
        rank0 = json.loads((runs["root"] / launch / "rank-0.json").read_text())
        rank1 = json.loads((runs["root"] / launch / "rank-1.json").read_text())
        assert any("metrics.jsonl" in w for w in rank0)  # the watch sees writes
        assert rank1 == []
    assert sorted(p.name for p in runs["two"].iterdir()) == sorted(p.name for p in runs["one"].iterdir())
    assert runs["two_log"].count("adapter saved to") == 1 and runs["two_log"].count("step 4:") == 1


def test_resuming_with_another_process_count_is_refused(runs, capsys):
    assert cli.main(["train", str(runs["crashed"] / "config.yaml"), "--resume"]) == 2
    message = capsys.readouterr().err
    assert "written by a run of 2 process(es); this run has 1" in message and "--nproc 2" in message
