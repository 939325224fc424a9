"""The run directory: everything needed to understand, reproduce and continue a run lives in one folder.

    <output_dir>/<task>/<name>/
        config.yaml  command.txt  environment.json  metrics.jsonl  tensorboard/  checkpoints/{last,best}.pt
        summary.json  evaluation/{test.json, *.png}
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from ..config import RunConfig, to_dict


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{Path(cfg.recipe).stem or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output_dir) / cfg.task / name


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def environment() -> dict:
    import torchvision

    info = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_run_files(run_dir: Path, cfg: RunConfig, argv: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # Replaying the command with the saved config reproduces the run whatever the recipe file says later.
    (run_dir / "command.txt").write_text(
        "# as typed:\n" + shlex.join(argv) + "\n# reproduce exactly:\n"
        + f"modelworks train {cfg.task} --recipe {run_dir / 'config.yaml'} --set name={cfg.name}-again\n")
    write_json(run_dir / "environment.json", environment())


def write_summary(run_dir: Path, summary: dict) -> None:
    from . import distributed

    if distributed.is_main():
        write_json(run_dir / "summary.json", summary)


def read_config_dict(run_dir: Path) -> dict:
    from ..errors import CheckpointError

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.yaml); pass runs/<task>/<name>")
    return yaml.safe_load(path.read_text())


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines past `step` (written after the checkpoint a run resumes from)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(kept))


def discard_if_untrained(run_dir: Path) -> str:
    """After a failed start: remove a run folder that holds nothing a user could use (no checkpoint, no
    metrics line; its config is the command they just typed), else keep it. Says which, for the error report."""
    checkpoints = list((run_dir / "checkpoints").glob("*.pt")) if (run_dir / "checkpoints").is_dir() else []
    metrics = run_dir / "metrics.jsonl"
    if checkpoints or (metrics.is_file() and metrics.stat().st_size):
        return f"the run's files so far are in {run_dir}"
    shutil.rmtree(run_dir, ignore_errors=True)
    return f"removed {run_dir}: the run stopped before anything was saved"
