"""The run directory: everything needed to understand, reproduce and continue a run lives in one folder.

    <output_dir>/<task>/<name>/
        config.yaml  command.txt  environment.json  metrics.jsonl  tensorboard/  checkpoints/{last,best}.pt
        summary.json  evaluation/{test.json, *.png}
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from ..config import RunConfig, read_yaml, to_dict
from ..errors import CheckpointError


STAMP = re.compile(r"-\d{8}-\d{6}$")  # the time a default run name ends with
GENERIC_NAMES = {"", ".", "..", "data", "dataset", "annotations", "images", "labels", "jpegimages", "train", "val",
                 "valid", "test"}


def data_label(source: str) -> str:
    """A short name for a data source: the source itself (fashion-mnist), else the folder or file it points at,
    skipping the names every data set shares (data.yaml, annotations/, images/, train/), lower case."""
    kind, _, location = source.partition(":")
    if not location:
        return kind
    path = Path(location.split(":")[0].replace("{split}", ""))  # coco: the annotation file, not the image folder
    for part in [path.stem, *(p.name for p in path.parents)]:
        label = re.sub(r"[^a-z0-9._-]+", "-", part.lower()).strip("-._")
        if label.lower() not in GENERIC_NAMES and not label.startswith("instances"):
            return label
    return kind


def default_run_name(cfg: RunConfig) -> str:
    """<recipe>-<time>; with the recipe's data swapped for other data, <recipe>-<data>-<time>; with no recipe,
    <data>-<time>. The model is then named for what it learned from (a raccoon model trained with the bccd
    recipe is not a "bccd" model)."""
    from ..config import read_recipe
    from ..errors import ConfigError

    source = getattr(cfg.data, "source", "") or ""
    parts = []
    if cfg.recipe:
        parts.append(Path(cfg.recipe).stem)
        try:
            recipe_source = (read_recipe(cfg.task, cfg.recipe).get("data") or {}).get("source")
        except ConfigError:  # a recipe file moved since: name the data, which is certain
            recipe_source = None
        default_source = next((f.default for f in dataclasses.fields(cfg.data) if f.name == "source"), None) \
            if dataclasses.is_dataclass(cfg.data) else None
        if source and source != (recipe_source or default_source):
            parts.append(data_label(source))
    else:
        parts.append(data_label(source) if source else "custom")
    return "-".join(parts) + "-" + time.strftime("%Y%m%d-%H%M%S")


def model_name(run_name: str) -> str:
    """A run's name without the time a default name ends with: the name of the model it trained."""
    return STAMP.sub("", run_name)


def new_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.task / (cfg.name or default_run_name(cfg))


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
    """The run's saved config.yaml as a raw mapping (validated by config.load_config)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.yaml); pass runs/<task>/<name>")
    fix = "correct the file or restore it from a copy"
    raw = read_yaml(path, CheckpointError, fix)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping of config sections (got {type(raw).__name__}); {fix}")
    return raw


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
