"""Trustworthy runs on a tiny random model: determinism, exact resume after crashes at any point,
crash-consistent checkpoints, refusal to resume a changed setup, disk full, non-finite losses."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import LorakitError, RunFailed
from lorakit.train import checkpoint

LORAKIT = [sys.executable, "-m", "lorakit.cli"]


@pytest.fixture
def tiny_args(tiny_model_dir, tmp_path):
    """Overrides that point the overfit config at the tiny model and a run folder named `name`."""
    return lambda name, *more: [f"model={tiny_model_dir}", f"output_dir={tmp_path / name}", "train.lr=1e-2", *more]


@pytest.fixture
def tiny_cfg(overfit_config, tiny_args):
    return lambda name, *more: lorakit.load_config(overfit_config, tiny_args(name, *more))


def _adapter(run) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_identical_runs_are_bitwise_identical(tiny_cfg):
    a, b = lorakit.train(tiny_cfg("a")), lorakit.train(tiny_cfg("b"))
    assert _same(_adapter(a.output_dir), _adapter(b.output_dir))
    assert [m["loss"] for m in _metrics(a.output_dir)] == [m["loss"] for m in _metrics(b.output_dir)]


@pytest.mark.parametrize("kill_step", [2, 3, 5])
def test_crash_between_micro_batches_then_resume_is_bitwise_exact(tiny_cfg, tiny_args, overfit_config, kill_step):
    """Dropout on (RNG states must be restored) and 2 micro-batches per step (the kill lands between them)."""
    settings = ("lora.dropout=0.1", "train.batch_size=4", "train.grad_accum=2", "train.save_every=1")
    clean = lorakit.train(tiny_cfg("clean", *settings))
    crashed = clean.output_dir.parent / "crashed"
    env = {**os.environ, "LORAKIT_FAULT": f"kill@step-{kill_step}:micro-1"}
    first = subprocess.run([*LORAKIT, "train", str(overfit_config), *tiny_args("crashed", *settings)],
                           env=env, capture_output=True, text=True)
    assert first.returncode == -9, first.stderr  # SIGKILL
    assert not (crashed / "adapter").exists()
    lorakit.train(lorakit.load_config(crashed / "config.yaml"), resume=True)
    assert _same(_adapter(crashed), _adapter(clean.output_dir))
    mine, theirs = _metrics(crashed), _metrics(clean.output_dir)
    assert [(m["step"], m["lr"], m["loss"]) for m in mine] == [(m["step"], m["lr"], m["loss"]) for m in theirs]


@pytest.mark.parametrize("point", ["save:files", "save:manifest", "save:rename", "save:rotate"])
def test_a_failure_at_any_point_of_a_save_keeps_the_previous_checkpoint(tiny_cfg, monkeypatch, point):
    cfg = tiny_cfg("run", "train.save_every=2", "train.keep_checkpoints=1")
    monkeypatch.setenv("LORAKIT_FAULT", f"enospc@{point}")
    with pytest.raises(RunFailed, match="could not write"):
        lorakit.train(cfg)  # the first save (step 2) fails at `point`
    root = cfg.output_dir
    ckpts = checkpoint.complete_checkpoints(_root(cfg))
    assert all(checkpoint.verify(c) is None for c in ckpts)  # whatever is there is whole
    monkeypatch.delenv("LORAKIT_FAULT")
    if ckpts:  # the failure came after the rename: resume from it
        lorakit.train(lorakit.load_config(f"{root}/config.yaml"), resume=True)
    else:
        with pytest.raises(LorakitError, match="no complete checkpoint"):
            lorakit.train(lorakit.load_config(f"{root}/config.yaml"), resume=True)
        lorakit.train(cfg)  # a fresh start is allowed and cleans the half-written folder
        assert list(_root(cfg).glob("*.tmp")) == []


def _root(cfg) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tiny_cfg, capsys, damage):
    cfg = tiny_cfg("run", "train.save_every=2", "train.keep_checkpoints=3")
    clean = lorakit.train(cfg)
    newest = checkpoint.complete_checkpoints(_root(cfg))[-1]
    target = newest / "adapter.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x01
    target.write_bytes(bytes(data))
    assert "checksum" in checkpoint.verify(newest)
    expected = _adapter(clean.output_dir)
    lorakit.train(lorakit.load_config(f"{cfg.output_dir}/config.yaml"), resume=True)
    assert "skipping checkpoint" in capsys.readouterr().err
    assert _same(_adapter(clean.output_dir), expected)  # redone from step 4: the same adapter


def test_resume_refuses_a_changed_setup_unless_forced(tiny_cfg):
    cfg = tiny_cfg("run", "train.save_every=2")
    lorakit.train(cfg)
    changed = lorakit.load_config(f"{cfg.output_dir}/config.yaml", ["train.lr=0.5", "lora.r=4"])
    with pytest.raises(LorakitError, match=r"train.lr: 0.01 → 0.5.*lora.r: 8 → 4|lora.r: 8 → 4.*train.lr"):
        lorakit.train(changed, resume=True)
    harmless = lorakit.load_config(f"{cfg.output_dir}/config.yaml", ["train.log_every=3", "train.max_steps=8"])
    with pytest.raises(LorakitError, match="max_steps"):  # a longer schedule changes the lr curve
        lorakit.train(harmless, resume=True)
    lorakit.train(lorakit.load_config(f"{cfg.output_dir}/config.yaml", ["train.log_every=3"]), resume=True)
    lorakit.train(lorakit.load_config(f"{cfg.output_dir}/config.yaml", ["train.max_steps=8"]), resume=True,
                  force=True)


def test_file_size_limit_gives_a_message_and_keeps_the_last_checkpoint(tiny_cfg, tiny_args, overfit_config):
    cfg = tiny_cfg("run")
    limit = 120_000  # the adapter (~60 KB) fits, the optimizer state (~3x) does not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([*LORAKIT, "train", str(overfit_config), *tiny_args("run", "train.save_every=1")],
                            preexec_fn=cap, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "could not write" in result.stderr and "Traceback" not in result.stderr
    assert checkpoint.complete_checkpoints(_root(cfg)) == []
    assert not (_root(cfg).parent / "adapter").exists()


def test_non_finite_loss_is_logged_skipped_and_bounded(tiny_cfg, monkeypatch):
    monkeypatch.setenv("LORAKIT_FAULT", "nan@step-3")
    result = lorakit.train(tiny_cfg("skip"))
    logged = {m["step"]: m for m in _metrics(result.output_dir)}
    assert logged[3]["loss"] != logged[3]["loss"] and "skipped" in logged[3]  # NaN is logged, not filtered
    assert all(torch.isfinite(v).all() for v in _adapter(result.output_dir).values())
    with pytest.raises(RunFailed, match="non-finite loss or gradient at steps \\[3\\]"):
        lorakit.train(tiny_cfg("stop", "train.max_bad_steps=0"))
    assert not (result.output_dir.parent / "stop" / "adapter").exists()


def test_gradient_accumulation_equals_one_big_batch(tiny_cfg):
    """(8 x 1), (2 x 4), (1 x 8) on examples of different lengths: the same token-weighted gradient.
    lr 1e-3: the sums differ in float rounding order only, and Adam turns a rounding difference in a
    near-zero gradient into a full-size update difference (at lr 1e-2 that reached 8.7e-5)."""
    runs = [lorakit.train(tiny_cfg(f"bs{b}", f"train.batch_size={b}", f"train.grad_accum={8 // b}", "train.lr=1e-3"))
            for b in (8, 2, 1)]
    adapters = [_adapter(r.output_dir) for r in runs]
    diffs = [max(float((a[k] - adapters[0][k]).abs().max()) for k in a) for a in adapters[1:]]
    assert adapters[0].keys() == adapters[1].keys() == adapters[2].keys()
    assert max(diffs) <= 1e-5, diffs
    assert [m["trained_tokens"] for m in _metrics(runs[0].output_dir)] == [
        m["trained_tokens"] for m in _metrics(runs[2].output_dir)]  # same examples in every step
