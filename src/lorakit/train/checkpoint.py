"""Checkpoints that survive a crash at any moment.

A save writes `step-N.tmp/`, fsyncs every file, writes manifest.json (sha256 and size of each file)
last, then renames the folder to `step-N/` and only then removes old checkpoints. A folder without a
valid manifest is never resumed from.

With several processes every one calls `save` and `load`: the adapter and optimizer state are
gathered whole (FSDP holds them in shards) and each process's RNG state is kept, but only the main
process writes. The files are the same whatever the sharding; `load` restores them on the same
number of processes (the loop refuses another number before calling it).
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
from accelerate import PartialState
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lorakit.train import faults

MANIFEST = "manifest.json"
# Whole (unsharded) tensors of the trained parameters only: the frozen base is not saved.
_TRAINED = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
_LOAD = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)  # the base is not in it


def trained_state(model) -> dict[str, torch.Tensor]:
    """The trained parameters by name, whole on every process. Collective under FSDP."""
    state = get_model_state_dict(model, options=_TRAINED)
    # A frozen weight tied to another (lm_head to embed_tokens) slips through ignore_frozen_params.
    trained = {name.removeprefix("module.") for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in trained}


def save(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Every process calls it; the main process writes; all return once the checkpoint is in place."""
    adapter = trained_state(model)
    trainer = {"optimizer": get_optimizer_state_dict(model, optimizer, options=_TRAINED),
               "scheduler": scheduler.state_dict(), "rng": gather_object([_rng_state()])}
    final = ckpt_root / f"step-{step}"
    if PartialState().is_main_process:
        _write(ckpt_root, step, adapter, trainer, state, keep)
    PartialState().wait_for_everyone()
    return final


def _write(ckpt_root: Path, step: int, adapter: dict, trainer: dict, state: dict, keep: int) -> None:
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(adapter, tmp / "adapter.safetensors")
    # Serialised in memory first: torch's zip writer turns a failed write (disk full, file-size
    # limit) into a RuntimeError; a plain write raises the OSError the loop reports.
    buffer = io.BytesIO()
    torch.save(trainer, buffer)
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
    """Restore adapter, optimizer, scheduler and this process's RNG states; returns state.json."""
    set_model_state_dict(model, load_file(ckpt / "adapter.safetensors"), options=_LOAD)
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)  # tensors and plain values: no code runs
    set_optimizer_state_dict(model, optimizer, trainer["optimizer"], options=_TRAINED)
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"][PartialState().process_index])
    return json.loads((ckpt / "state.json").read_text())


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so that loading needs no pickle (weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
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
