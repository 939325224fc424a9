"""Where the generic export/serve layers meet the tasks: export a run, open a package for inference.

export/ and serve/ never import a task (a contract test holds them to it). This module looks the task up in
the registry, by the name a run's config or a package's manifest gives, and hands the layers what they need:
the task object to export, the predictor and the eager model builder to run a package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import config as config_mod
from .errors import PackageError
from .export.package import check_identifier, read_package
from .export.runtime import InferenceModel, load_weights, open_runner
from .registry import get_task


def open_model(path: Path | str, runtime: str = "onnx", threads: int | None = None) -> InferenceModel:
    """A verified package with its task's predictor and the chosen runtime, ready to answer."""
    package = read_package(path)
    task_cls = get_task(package.task)
    predictor = task_cls.load_predictor(package.manifest["predictor"], package.path)

    def build_eager():
        task = task_cls(config_mod.load_config(task_cls, package.manifest["config"]))
        task.adopt_spec(package.manifest["predictor"])
        model = task.build_model()
        model.load_state_dict(load_weights(package.file_for("eager")))
        return task.export_module(model.eval())

    runner = open_runner(package, runtime, predictor.input_names, build_eager, threads)
    return InferenceModel(package, predictor, runner, runtime)


def export_run(run_dir: Path, out: Path | None, options_kwargs: dict, checkpoint: str = "best",
               overrides: list[str] | None = None, log=print) -> tuple[Path, dict]:
    """`modelworks export RUN_DIR`: rebuild the run's model on the CPU and write its verified package."""
    from .engine import rundir
    from .engine.batches import eval_indices, fetch, train_indices
    from .engine.loop import load_for_evaluation, restore_calibration
    from .export.build import ExportOptions, build_package

    raw = rundir.read_config_dict(run_dir)
    for assignment in overrides or []:
        config_mod.apply_override(raw, assignment)
    task_cls = get_task(raw.get("task", ""))
    cfg = config_mod.load_config(task_cls, raw)
    cfg.train.device = "cpu"
    # Name and version are checked before the data and the checkpoint are loaded: a bad one fails in a moment.
    # Named after the run (its name less the time stamp: the recipe, plus the data when it was not the recipe's),
    # so a raccoon model trained with the bccd recipe is not served as "bccd".
    defaults = {"name": (rundir.model_name(run_dir.absolute().name), "the run's name less its time stamp"),
                "version": (run_dir.absolute().name, "the run directory's name")}  # absolute: `export .` works
    for key, (value, origin) in defaults.items():
        if key not in options_kwargs:
            check_identifier(f"--{key}", value, key, fix=f"it defaults to {origin}: pass --{key} with")
    options = ExportOptions(**{**{key: value for key, (value, _) in defaults.items()}, **options_kwargs})
    log(f"exporting {run_dir} ({checkpoint} checkpoint); checking each format on the validation split:")
    task = task_cls(cfg)
    cpu = torch.device("cpu")
    splits = task.datasets(cpu)  # also teaches the task what the data decides (class names)
    model = load_for_evaluation(task, run_dir, cpu, cfg, checkpoint)
    _, note = restore_calibration(task, run_dir, checkpoint)  # the task puts it inside the exported graph
    if note:
        log(f"  note: {note}")

    batch_size = cfg.train.eval_batch_size
    val_batches = (task.prepare_batch(b, None) for b in
                   fetch(splits.val, eval_indices(len(splits.val), batch_size, 0, 1), cpu, 0, splits.collate_fn))
    # Calibration sees training images as the model saw them, minus the random augmentation: a seeded
    # shuffle of the training split, prepared without a generator.
    calibration = (task.prepare_batch(b, None) for b in
                   fetch(splits.train, train_indices(len(splits.train), min(batch_size, 256), cfg.train.seed, 0, 0,
                                                     0, 1), cpu, 0, splits.collate_fn))

    summary = _read_json(run_dir / "summary.json")
    metrics = _read_json(run_dir / "evaluation" / "test.json") or (summary or {}).get("best", {})
    out = Path(out) if out else run_dir / "package"
    source = {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint,
              "step": (summary or {}).get("best", {}).get("step") if checkpoint == "best" else
              (summary or {}).get("step")}
    manifest = build_package(task, model, val_batches, calibration, out, options, source, metrics,
                             config_mod.to_dict(cfg), log)
    return out, manifest


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
