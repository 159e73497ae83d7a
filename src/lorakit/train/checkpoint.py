"""Checkpoints that survive a crash at any moment.

A save writes `step-N.tmp/`, fsyncs every file, writes manifest.json (sha256 and size of each file)
last, then renames the folder to `step-N/` and only then removes old checkpoints. A folder without a
valid manifest is never resumed from.
"""

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lorakit.train import faults

MANIFEST = "manifest.json"


def save(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(get_peft_model_state_dict(model), tmp / "adapter.safetensors")
    # Serialised in memory first: torch's zip writer turns a failed write (disk full, file-size
    # limit) into a RuntimeError; a plain write raises the OSError the loop reports.
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
               buffer)
    (tmp / "trainer.pt").write_bytes(buffer.getvalue())
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
    faults.at("save:files")
    files = sorted(p for p in tmp.iterdir())
    for p in files:
        _fsync(p)
    manifest = {p.name: {"sha256": _sha256(p), "size": p.stat().st_size} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp / MANIFEST)
    faults.at("save:manifest")
    shutil.rmtree(final, ignore_errors=True)
    faults.at("save:rename")
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    faults.at("save:rotate")
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders whose manifest exists, oldest first (not verified: see `verify`)."""
    found = [p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def verify(ckpt: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, want in manifest.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["size"] or _sha256(p) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def remove_stale(ckpt_root: Path) -> None:
    for tmp in ckpt_root.glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def load(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter, optimizer, scheduler and RNG states; returns state.json."""
    set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors"))
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return json.loads((ckpt / "state.json").read_text())


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
