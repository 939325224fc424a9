"""Interruptions of real `modelworks train` processes: SIGKILL then --resume reproduces the uninterrupted run bit
for bit; SIGTERM saves last.pt, says how to continue, and exits 130."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli, start_cli, tiny_cli_args
from modelworks.engine import checkpoint

# 461 training images / batch 16 = 28 steps per epoch; 1.5 epochs = 42 steps, so the resumed part crosses an
# epoch boundary and an evaluation. A checkpoint every 2 steps gives a mid-epoch last.pt almost at once.
STEPS_PER_EPOCH, TOTAL_STEPS = 28, 42
RUN = {"train.batch_size": 16, "train.epochs": 1.5, "train.checkpoint_every_steps": 2, "train.deterministic": True,
       "train.test_at_end": False, "train.log_every_steps": 10, "optim.lr": 0.01,
       "data.augment.crop_padding": 2, "data.augment.hflip": True}

pytestmark = pytest.mark.slow


def wait_for_checkpoint(process: subprocess.Popen, path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"training exited ({process.returncode}) before writing {path}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {path} after {timeout_s} s")
        time.sleep(0.005)


def model_state(run_dir: Path) -> tuple[int, dict]:
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    return state["step"], state["model"]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    full = run_cli(tiny_cli_args(tmp_path, "full", **RUN))
    assert full.returncode == 0, full.stderr

    run_dir = tmp_path / "runs" / "classification" / "killed"
    process = start_cli(tiny_cli_args(tmp_path, "killed", **RUN))
    wait_for_checkpoint(process, run_dir / "checkpoints" / "last.pt")
    process.send_signal(signal.SIGKILL)  # no handler, no final save: a crash
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at, _ = model_state(run_dir)
    assert 0 < killed_at < TOTAL_STEPS and killed_at % STEPS_PER_EPOCH, f"killed at step {killed_at}: not mid-epoch"
    assert not (run_dir / "summary.json").exists()

    resumed = run_cli(["train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {killed_at}" in resumed.stdout
    assert f"run finished at step {TOTAL_STEPS}" in resumed.stdout

    step, weights = model_state(run_dir)
    full_step, full_weights = model_state(tmp_path / "runs" / "classification" / "full")
    assert step == full_step == TOTAL_STEPS
    assert weights.keys() == full_weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], full_weights[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different}"


def test_sigterm_saves_last_and_exits_130(tmp_path):
    run_dir = tmp_path / "runs" / "classification" / "stopped"
    process = start_cli(tiny_cli_args(tmp_path, "stopped", **RUN))
    wait_for_checkpoint(process, run_dir / "checkpoints" / "last.pt")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    step, weights = model_state(run_dir)
    assert 0 < step < TOTAL_STEPS
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert (f"SIGTERM: saved checkpoints/last.pt at step {step}; continue with: modelworks train --resume {run_dir}"
            in out)
    assert f"run interrupted at step {step}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("interrupted", step)
