"""Checkpoints that lose nothing: full training state, atomic writes, and loading without pickle code execution.

A checkpoint holds only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`,
whose restricted unpickler refuses any other object: a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import write_atomic


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    write_atomic(path, lambda f: torch.save(state, f))


# What fit() saves; a training checkpoint must hold all of it to be resumed.
TRAINING_KEYS = ("step", "total_steps", "model", "optimizer", "scheduler", "scaler", "early_stop", "rng",
                 "best_metrics", "ema")
# torch's weights-only unpickler names the global it refused: "Unsupported global: GLOBAL __main__.Plain was not
# an allowed global by default ..." or "Trying to load unsupported GLOBAL posix.system whose module posix is
# blocked." (torch 2.6 to 2.14).
REFUSED_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")
# Lines of torch's message that advise loading the file anyway (weights_only=False, or allowlisting the type):
# advice that would run whatever the file holds, so they are dropped.
UNSAFE_HINTS = ("Weights only load failed", "weights_only", "safe_globals")
SHOWN = 5  # names listed per problem in a message; the count says how many there are in all
FIX = "use a checkpoint `modelworks train` wrote for this run"


def load(path: Path, map_location: str | torch.device = "cpu", keys: tuple[str, ...] = ()) -> dict:
    """The checkpoint's dict, which must hold `keys`; anything else is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; a run saves checkpoints/last.pt after its first "
                              "evaluation or checkpoint_every_steps")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, wrong format: all unusable
        raise CheckpointError(describe_load_failure(path, exc)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a modelworks checkpoint (a dict with "
                              f"{listing([repr(k) for k in keys or ('model',)])}); {FIX}")
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a complete modelworks checkpoint (missing {', '.join(map(repr, missing))}; "
                              f"it has {listing([repr(k) for k in state])}); {FIX}")
    return state


def describe_load_failure(path: Path, exc: Exception) -> str:
    """One line for a checkpoint torch.load refused. torch's own advice for a weights-only refusal (load it with
    weights_only=False, or allowlist the type) would run whatever the file holds, so only its diagnosis is kept."""
    text = str(exc)
    refused = REFUSED_GLOBAL.search(text)
    if refused:
        return (f"{path}: refused to load: the file holds a Python object, {refused.group(1).rstrip('.')}, that "
                "unpickling would import and could run as code; a modelworks checkpoint never holds one (only tensors "
                "and plain values), so the file was not written by modelworks or was tampered with: do not load it, "
                f"{FIX}")
    if "Weights only load failed" in text:
        diagnosis = [line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines()
                     if line.strip() and not any(hint in line for hint in UNSAFE_HINTS)]
        text = diagnosis[0] if diagnosis else "it holds objects a checkpoint never holds"
    first_sentence = text.strip().splitlines()[0].split(". ")[0][:200] if text.strip() else ""
    detail = f"{type(exc).__name__}: {first_sentence}" if first_sentence else type(exc).__name__
    return f"{path}: cannot be loaded as a modelworks checkpoint ({detail}); it is corrupt or not ours"


def load_model_weights(model: nn.Module, weights, path: Path, key: str = "model") -> None:
    """Load `weights`, the checkpoint's entry `key`, into `model`. Weights that do not fit (missing, unexpected or
    differently shaped tensors) are a CheckpointError listing the first few of each, not torch's traceback."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: {key!r} holds a {type(weights).__name__}, not the model's weights; {FIX}")
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [str(name) for name in weights if name not in expected]
    reshaped = []
    for name, tensor in expected.items():
        got = weights.get(name, tensor)
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            found = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            reshaped.append(f"{name} {found} in the file, {tuple(tensor.shape)} in the model")
    problems = [f"{what} {len(names)}: {listing(names)}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if names]
    if problems:
        raise CheckpointError(f"{path}: the weights in {key!r} do not fit the model the run's config builds "
                              f"({'; '.join(problems)}); was the checkpoint copied from another run, or config.yaml "
                              "edited? Use the run's own checkpoint and config")
    model.load_state_dict(weights)


@contextmanager
def restoring(path: Path, part: str):
    """Turn a failure to restore `part` of a training checkpoint (an optimizer state for other parameters, a
    malformed RNG state) into a CheckpointError naming the file and the part."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: its {part} does not fit this run ({type(exc).__name__}: {detail}); "
                              "resume with the run's own config.yaml, or start a new run") from None


def listing(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


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
