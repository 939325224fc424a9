"""Typed, validated run configuration: a dataclass tree, strict YAML recipes and `--set a.b=c` overrides.

A recipe is YAML whose keys mirror the dataclasses below; the `model:` and `data:` sections are typed by the
task's own `ModelConfig` and `DataConfig`. Every problem (unknown key, wrong type, value outside its choices)
is collected and reported together, each with its dotted path and the fix, before anything is trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "muon"] = "adamw"  # muon: torch.optim.Muon for the hidden weight matrices
    # (Jordan et al. 2024), AdamW at `lr` for the rest (embeddings, output layer, norms, biases)
    lr: float = 1e-3  # peak learning rate (OneCycle's max_lr)
    weight_decay: float = 5e-4  # decoupled for AdamW; L2 for SGD
    momentum: float = 0.9  # SGD momentum, or AdamW's beta1
    nesterov: bool = True  # SGD only
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = 0.3  # fraction of all optimizer steps spent warming up
    cycle_momentum: bool = True  # onecycle only: momentum (or beta1) cycles 0.95 -> 0.85 -> 0.95 as in torch's
    # OneCycleLR, which the seed uses; `momentum` then has no effect. false keeps `momentum` fixed
    max_grad_norm: float = 0.0  # clip the global gradient norm to this; 0 disables clipping
    accumulate_steps: int = 1  # micro-batches per optimizer step (global batch stays train.batch_size)
    muon_lr: float = 0.02  # muon only: the peak rate of the matrices Muon updates
    beta2: float = 0.999  # AdamW's second-moment decay (0.99 for small-batch language models, as nanoGPT uses)


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999  # per optimizer step
    warmup_steps: int = 100  # the decay ramps linearly from 0 over these steps; 0: constant decay
    # > 0: the power-function EMA of Karras et al. 2024 (EDM2) instead of `decay`: after t steps the decay is
    # (1 - 1/t)^(power + 1), so the average spans a fixed share of the run so far whatever its length (power 6.94:
    # about 10% of it; 16.97: 5%), which suits runs set by a time budget; a fixed decay of 0.995 averaged 200 steps
    # of a 250-step run and sampled far worse than the raw weights.
    power: float = 0.0


@dataclass
class EarlyStopConfig:
    patience: int = 0  # evaluations without improvement before stopping; 0 disables
    min_delta: float = 0.0  # an improvement smaller than this does not count


@dataclass
class DebugConfig:
    activations: bool = False  # per-layer activation statistics into TensorBoard: mean, std and the fraction of
    # exact zeros (dead ReLUs) of each layer's output on sampled training steps, histograms at each evaluation
    every_steps: int = 100  # sample one training step in this many: hooks exist only during a sampled step,
    # so the other steps run at full speed (bench/debug_overhead.py measures the cost)


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp2"] = "ddp"  # under torchrun: ddp keeps a whole model on every rank and
    # all-reduces gradients; fsdp2 (torch.distributed.fsdp.fully_shard) shards parameters, gradients and optimizer
    # state across the ranks (per block, for a model that names its blocks in `shard_units()`), for models too big
    # to hold whole on each rank. Checkpoints hold the whole, unsharded state either way


@dataclass
class TrainConfig:
    epochs: float = 10.0  # may be fractional; total steps = ceil(epochs * steps_per_epoch)
    steps: int = 0  # optimizer steps for the whole run, instead of `epochs` (a corpus of random windows has no
    # natural epoch); 0: from epochs
    time_budget_s: float = 0.0  # wall-clock seconds for training and its validation (the final test report
    # comes after): sets the step count from a short timed probe instead of `epochs`, so the whole schedule
    # (warm-up, decay, augmentation phases) fits the time (ultralytics' `time=`); 0: train for `epochs`
    batch_size: int = 128  # global batch across all ranks and accumulation micro-batches
    eval_batch_size: int = 512
    seed: int = 0
    deterministic: bool = False  # deterministic kernels: a resumed CPU run then matches bit for bit
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where supported, else fp16+scaler
    channels_last: bool = True  # memory format for conv nets (ignored for others by the task)
    compile: bool = False  # torch.compile the model
    num_workers: int = 0  # DataLoader workers for data sets that are not held in memory
    eval_every_steps: int = 0  # 0: once per epoch
    checkpoint_every_steps: int = 0  # extra `last` saves between evaluations; 0: only at evaluations
    log_every_steps: int = 50
    test_at_end: bool = True  # run `evaluate` (test split, report and plots) when training finishes
    init_from: str = ""  # a run directory (its best weights, the EMA when kept) or a .pt checkpoint to start
    # from: fine-tuning, with a fresh optimizer and schedule (e.g. captioning's self-critical stage); "": random
    ema: EMAConfig = field(default_factory=EMAConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class RunConfig:
    task: str
    name: str = ""  # run directory name, and the exported model's; empty: <recipe>-<time>, or <recipe>-<data>-<time>
    # when the data is not the recipe's (engine/rundir.py default_run_name)
    output_dir: str = "runs"  # runs land in <output_dir>/<task>/<name>
    recipe: str = ""  # filled in by the loader, for the record
    model: Any = None  # typed by the task's ModelConfig
    data: Any = None  # typed by the task's DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Return `value` as type `tp`, or append an error. Only lossless conversions are made."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        errors.append(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, choices))}{hint}")
        return None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, errors)
    if origin in (list, tuple):
        args = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list (got {value!r})")
            return None
        fixed_length = origin is tuple and Ellipsis not in args
        if fixed_length and len(value) != len(args):
            errors.append(f"{path}: expected a list of {len(args)} values (got {value!r})")
            return None
        item_types = args if fixed_length else [args[0]] * len(value)
        items = [_coerce(v, t, f"{path}[{i}]", errors) for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, errors)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means NaN or infinity, and NaN would pass every range check (comparisons are false).
            try:
                number = float(number)
            except OverflowError:  # an integer past float's range
                number = math.inf
            if math.isfinite(number):
                return number
            errors.append(f"{path}: expected a finite float (got {value!r})")
            return None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(value, tp):
        return value
    errors.append(f"{path}: expected {_type_name(tp)} (got {value!r})")
    return None


def build(cls: type, raw: Any, path: str, errors: list[str], section_types: dict | None = None) -> Any:
    """Build dataclass `cls` from a mapping, strictly. `section_types` types the `Any` sections (model, data)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path or 'config'}: expected a mapping of keys (got {raw!r})")
        return None
    errors_before = len(errors)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            where = f"{path}.{key}" if path else str(key)
            errors.append(f"{where}: unknown key{hint or '.'} Valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        tp = (section_types or {}).get(name, hints[name])
        if name in raw:
            kwargs[name] = _coerce(raw[name], tp, where, errors)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, {}, where, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where}: required key is missing")
    if len(errors) > errors_before:  # a section's own checks would only trip over the bad values
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ checks of a section
        message = str(exc)
        errors.append(message if path and message.startswith(path) else f"{path or 'config'}: {message}")
        return None


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def flatten(cfg: Any) -> dict[str, bool | int | float | str | None]:
    """The config as `a.b.c: value` pairs (TensorBoard's hyperparameters); lists become their text."""
    flat = {}
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return flat


# ---------------------------------------------------------------------------------------------- recipes


def recipe_dir(task: str) -> Path:
    return Path(str(resources.files("modelworks") / "configs" / task))


def list_recipes(task: str) -> list[str]:
    folder = recipe_dir(task)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


# What parsing YAML can raise besides YAMLError: ValueError from building a value (a date such as 2001-13-45, an
# explicit tag such as `!!int x`) and RecursionError from nesting deeper than Python's stack.
YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def describe_yaml_error(exc: Exception) -> str:
    """One line for a YAML error: where and what, without PyYAML's multi-line excerpt of the document."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def read_yaml(path: Path, error: type[Exception], fix: str) -> Any:
    """The YAML document in `path`. An unreadable file or invalid YAML raises `error` in one line naming the file,
    ending with `fix`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: cannot be read (not UTF-8 text: {exc.reason} at byte {exc.start}); {fix}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        return yaml.safe_load(text)
    except YAML_ERRORS as exc:
        raise error(f"{path}: not valid YAML ({describe_yaml_error(exc)}); {fix}") from None


def read_recipe(task: str, recipe: str) -> dict:
    """A shipped recipe by name, or a YAML file by path."""
    path = Path(recipe)
    if not path.suffix:
        path = recipe_dir(task) / f"{recipe}.yaml"
        if not path.is_file():
            choices = list_recipes(task)
            near = difflib.get_close_matches(recipe, choices, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--recipe: no recipe {recipe!r} for task {task!r}.{hint} Recipes: {', '.join(choices)}")
    elif not path.is_file():
        raise ConfigError(f"--recipe: file {path} does not exist")
    data = read_yaml(path, ConfigError, "correct the recipe") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (got {type(data).__name__})")
    return data


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b=c` override in place; the value is parsed as YAML (so 3, 1e-3, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. --set optim.lr=0.002")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: {key.strip()!r} is not a dotted key; write e.g. --set optim.lr=0.002")
    try:
        value = yaml.safe_load(text)
    except YAML_ERRORS:
        value = text  # the field's type check then reports it, e.g. "optim.lr: expected float (got '[0.1')"
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge_aliases(raw: dict, aliases: dict[str, str], where: str, strict: bool) -> None:
    """Move each top-level alias section of `raw` (a task's short name, e.g. `tokenizer` for `data.tokenizer`)
    into the section it names, in place. `strict` (a recipe): a setting spelled both ways with different values is
    an error. Otherwise (an override such as `--set tokenizer.kind=bpe` on a saved or recipe config) the alias's
    values win: they came after the config they change."""
    for alias, target in aliases.items():
        if alias not in raw:
            continue
        section = raw.pop(alias)
        if not isinstance(section, dict):
            raise ConfigError(f"{where}{alias}: expected a mapping of keys (got {section!r}); {alias}.KEY is short "
                              f"for {target}.KEY")
        node = raw
        for part in target.split("."):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}{target}: expected a mapping of keys (got {child!r})")
            node = child
        for key, value in section.items():
            if strict and key in node and node[key] != value:
                raise ConfigError(f"{where}{alias}.{key} and {target}.{key} are the same setting, given twice "
                                  f"({value!r} and {node[key]!r}); keep one")
            node[key] = value


def load_config(task_cls: type, raw: dict) -> RunConfig:
    """Validate a raw mapping against RunConfig with the task's model/data sections; all errors at once."""
    errors: list[str] = []
    merge_aliases(raw, getattr(task_cls, "config_aliases", {}), "", strict=False)
    cfg = build(
        RunConfig,
        raw,
        "",
        errors,
        section_types={"model": task_cls.ModelConfig, "data": task_cls.DataConfig},
    )
    if cfg is not None and not errors:
        errors += validate(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def validate(cfg: RunConfig) -> list[str]:
    """Checks across fields that a type cannot express."""
    errors = []
    t, o = cfg.train, cfg.optim
    if t.batch_size < 1:
        errors.append(f"train.batch_size: must be >= 1 (got {t.batch_size})")
    if t.steps < 0:
        errors.append(f"train.steps: must be >= 0, 0 to train for train.epochs (got {t.steps})")
    if t.epochs <= 0:
        errors.append(f"train.epochs: must be > 0 (got {t.epochs})")
    if not t.time_budget_s >= 0 or t.time_budget_s == float("inf"):
        errors.append(f"train.time_budget_s: must be a finite number of seconds >= 0, 0 for no budget "
                      f"(got {t.time_budget_s})")
    if o.lr <= 0:
        errors.append(f"optim.lr: must be > 0 (got {o.lr})")
    if not 0 <= o.warmup_fraction < 1:
        errors.append(f"optim.warmup_fraction: must be in [0, 1) (got {o.warmup_fraction})")
    if o.accumulate_steps < 1 or t.batch_size % o.accumulate_steps:
        errors.append(
            f"optim.accumulate_steps: must divide train.batch_size={t.batch_size} (got {o.accumulate_steps})"
        )
    if o.name == "sgd" and o.nesterov and o.momentum <= 0:
        errors.append(f"optim.nesterov: Nesterov SGD needs optim.momentum > 0 (got {o.momentum}); "
                      "set optim.nesterov=false or a momentum such as 0.9")
    if t.debug.every_steps < 1:
        errors.append(f"train.debug.every_steps: must be >= 1 (got {t.debug.every_steps})")
    if t.debug.activations and t.compile:
        # Hooks added and removed on sampled steps would make torch.compile recompile the model each time.
        errors.append("train.debug.activations: cannot be combined with train.compile=true (the hooks would "
                      "recompile the model on every sampled step); turn one of them off")
    if t.distributed.strategy == "fsdp2" and o.name == "muon":
        errors.append("train.distributed.strategy: fsdp2 cannot be combined with optim.name=muon (Muon "
                      "orthogonalises whole matrices; fully_shard gives each rank rows of them); use optim.name=adamw "
                      "or train.distributed.strategy=ddp")
    if t.distributed.strategy == "fsdp2" and t.ema.enabled:
        errors.append("train.distributed.strategy: fsdp2 cannot be combined with train.ema.enabled=true (the "
                      "average would be a whole copy on every rank); turn one of them off")
    if not 0 <= t.ema.decay < 1:
        errors.append(f"train.ema.decay: must be in [0, 1) (got {t.ema.decay})")
    if t.ema.power < 0:
        errors.append(f"train.ema.power: must be >= 0 (0: the fixed decay; got {t.ema.power})")
    return errors


def resolve(task_cls: type, recipe: str | None, overrides: list[str], data: str | None = None) -> RunConfig:
    raw = read_recipe(task_cls.name, recipe) if recipe else {}
    raw.setdefault("task", task_cls.name)
    if raw["task"] != task_cls.name:
        raise ConfigError(f"--recipe {recipe}: it is a {raw['task']!r} recipe, not {task_cls.name!r}")
    if recipe:
        raw["recipe"] = recipe
        # The recipe's own spelling settles first, so an override in either spelling changes it.
        merge_aliases(raw, getattr(task_cls, "config_aliases", {}), f"--recipe {recipe}: ", strict=True)
    if data:
        raw.setdefault("data", {})["source"] = data
    for assignment in overrides:
        apply_override(raw, assignment)
    if raw["task"] != task_cls.name:
        raise ConfigError(f"--set task={raw['task']}: the task is chosen on the command line ({task_cls.name!r}), "
                          "not by an override")
    return load_config(task_cls, raw)
