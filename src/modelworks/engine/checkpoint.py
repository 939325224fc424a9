"""Checkpoints that lose nothing: full training state, atomic writes, and loading without pickle code execution.

A checkpoint holds only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`,
whose restricted unpickler refuses any other object: a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; a run saves checkpoints/last.pt after its first "
                              "evaluation or checkpoint_every_steps")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, wrong format: all unusable
        raise CheckpointError(f"{path}: cannot be loaded as a modelworks checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); it is corrupt or not ours") from None


def sha256_file(path: Path) -> str:
    """The file's sha256: ties what was fitted to a checkpoint (e.g. calibration.json) to those exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
