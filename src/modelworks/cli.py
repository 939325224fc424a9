"""The `modelworks` command: verbs train / evaluate / recipes, with the task as an argument.

    modelworks train classification --recipe fashion-mnist --set optim.lr=0.002
    modelworks train --resume runs/classification/NAME
    modelworks evaluate runs/classification/NAME
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config as config_mod
from .errors import ConfigError, ModelworksError
from .registry import TASKS, get_task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelworks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a model (or resume a run)")
    train.add_argument("task", nargs="?", help=f"one of: {', '.join(TASKS)}")
    train.add_argument("--recipe", help="a shipped recipe name (see `modelworks recipes`) or a YAML file")
    train.add_argument("--data", help="data source, e.g. fashion-mnist, cifar10, imagefolder:PATH")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set optim.lr=0.002 (repeatable)")
    train.add_argument("--name", help="run directory name (default: <recipe>-<timestamp>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoints/last.pt")

    evaluate = verbs.add_parser("evaluate", help="test metrics and plots for a finished run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", default="test", choices=["test", "val", "train"])
    evaluate.add_argument("--checkpoint", default="best", choices=["best", "last"])
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="change an evaluation setting, e.g. --set model.tta=flip or train.device=cpu")

    recipes = verbs.add_parser("recipes", help="list the shipped recipes")
    recipes.add_argument("task", nargs="?")
    return parser


def print_table(title: str, metrics: dict[str, float]) -> None:
    width = max(len(k) for k in metrics) if metrics else 10
    print(f"\n{title}")
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


def load_run_config(run_dir: Path, overrides: list[str]):
    """A run's saved config (with any overrides) and its task class."""
    from .engine import rundir

    raw = rundir.read_config_dict(run_dir)
    for assignment in overrides:
        config_mod.apply_override(raw, assignment)
    task_cls = get_task(raw.get("task", ""))
    return task_cls, config_mod.load_config(task_cls, raw)


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from .engine import distributed, rundir
    from .engine.loop import evaluate_run, fit
    from .engine.precision import resolve_device

    if args.resume:
        run_dir = Path(args.resume)
        task_cls, cfg = load_run_config(run_dir, args.overrides)
    else:
        if not args.task:
            raise ConfigError("train: name a task (e.g. `modelworks train classification`) or --resume RUN_DIR")
        task_cls = get_task(args.task)
        cfg = config_mod.resolve(task_cls, args.recipe, args.overrides, args.data)
        if args.name:
            cfg.name = args.name

    distributed.init(resolve_device(cfg.train.device, distributed.local_device_index()).type)
    if not args.resume:
        # Rank 0 names the run (it holds a timestamp) and every rank uses that name.
        run_dir = Path(distributed.broadcast_object(str(rundir.new_run_dir(cfg))))
        cfg.name = run_dir.name
        if run_dir.exists() and (run_dir / "checkpoints").exists():
            raise ConfigError(f"--name: run directory {run_dir} already holds a run; choose another "
                                         f"name or continue it with --resume {run_dir}")
        if distributed.is_main():
            rundir.write_run_files(run_dir, cfg, ["modelworks", *argv])
        distributed.barrier()

    task = task_cls(cfg)
    result = fit(task, cfg, run_dir, resume=bool(args.resume))
    is_main = distributed.is_main()
    distributed.shutdown()  # the test report runs on rank 0 alone, over the whole test split
    if not is_main:
        return 0
    print(f"\nrun {result.status} at step {result.step}: {run_dir}")
    if result.best:
        print_table("best validation", result.best)
    if result.status == "interrupted":
        return 130
    if cfg.train.test_at_end:
        metrics = evaluate_run(task, cfg, run_dir, "test", fallback_to_val=True)
        print_table(f"report ({run_dir / 'evaluation'})", metrics)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .engine.loop import evaluate_run

    run_dir = Path(args.run_dir)
    task_cls, cfg = load_run_config(run_dir, args.overrides)
    metrics = evaluate_run(task_cls(cfg), cfg, run_dir, args.split, args.checkpoint)
    print_table(f"{args.split} ({run_dir / 'evaluation'})", metrics)
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    for name in [args.task] if args.task else TASKS:
        get_task(name)
        print(f"{name}: {', '.join(config_mod.list_recipes(name))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "train":
            return run_train(args, argv)
        if args.verb == "evaluate":
            return run_evaluate(args)
        return run_recipes(args)
    except ModelworksError as exc:
        print(f"modelworks: error: {exc}", file=sys.stderr)
        return 2
