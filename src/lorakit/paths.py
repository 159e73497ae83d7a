"""Paths named by files lorakit reads (dataset state.json, shard indexes) must stay inside their folder."""

import os
from pathlib import Path


def inside(root: Path, name: str) -> Path | None:
    """`root / name` when it names something inside `root` (no absolute path, no `..` out of it, no
    symlink leading out), else None."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        return None
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return path if real != real_root and os.path.commonpath([real_root, real]) == real_root else None
