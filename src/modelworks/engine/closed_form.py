"""Training without steps: a model the task solves in closed form (EASE's ridge regression, a popularity count).

`fit` hands over here when `task.trains_in_closed_form()`: the task fits the model once on the training split
(`task.fit_closed_form`), and the rest is the engine's as for any run: validation by `evaluate_split`, the same
checkpoints (best.pt and last.pt hold the one solution), metrics.jsonl, TensorBoard and summary.json, so
`evaluate`, `export` and the final test report work unchanged. The run counts as one step. Resuming fits again
(the solution is a function of the data and config, with nothing to continue).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from ..config import RunConfig, to_dict
from . import checkpoint, distributed, rundir
from .log import Logger, format_values
from .precision import Precision


def fit(task, cfg: RunConfig, run_dir: Path, device, precision: Precision):
    from .loop import FitResult, evaluate_split, prepare_model  # loop imports this module

    started = time.perf_counter()
    splits = task.datasets(device)
    model = prepare_model(task, device, cfg)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(run_dir, 1, 0, enabled=distributed.is_main(), config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log.info(f"{task.describe(model)} | device {device} | closed form (no optimizer steps) | "
             f"train {len(splits.train)} val {len(splits.val)}")
    for note in splits.notes:
        log.info(note)
    model.train()
    fit_logs = task.fit_closed_form(model, splits) or {}
    fit_s = time.perf_counter() - started
    values = {**{f"train/{k}": float(v) for k, v in fit_logs.items()}, "train/fit_s": fit_s}
    log.scalars(1, values, epoch=1.0)
    metrics = evaluate_split(task, model, splits.val, splits.collate_fn, cfg, device, precision, "val")
    log.info(f"solved in {fit_s:.1f} s: {format_values(metrics)}")
    log.scalars(1, metrics, epoch=1.0)
    best = {**metrics, "step": 1}
    if distributed.is_main():
        state = {"step": 1, "total_steps": 1, "model": model.state_dict(), "best_metrics": best, "ema": None,
                 "closed_form": True}
        for name in ("last", "best"):
            checkpoint.save_atomic(state, run_dir / "checkpoints" / f"{name}.pt")
    log.close()
    rundir.write_summary(run_dir, {"status": "finished", "step": 1, "total_steps": 1, "best": best,
                                   "closed_form": {"fit_s": round(fit_s, 3)}})
    return FitResult(run_dir, 1, "finished", best)
