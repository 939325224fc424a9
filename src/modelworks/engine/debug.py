"""`modelworks debug`: three checks to run before a long training run, for any task.

- `overfit_batch`: train on one fixed batch. A model that cannot drive the loss of 16 samples towards zero
  has a bug (a loss that ignores the output, labels that do not match their inputs, a learning rate that
  cannot learn) that a long run would only hide.
- `augmented_views`: the task's `prepare_batch` with and without augmentation, drawn by `Task.draw_batch`, so
  what the model is trained on (detection: the boxes after zoom, shift, flip, mosaic) can be looked at.
- `gradient_flow`: per-parameter gradient and weight norms over the first training steps, flagging
  parameters that get no gradient (frozen, detached or unused), a zero one (dead units), a non-finite one, one
  orders of magnitude smaller than the rest of the network's (vanishing), or one that grows step after step
  (exploding).

Each builds its pieces as `fit` does (`configure_determinism`, `prepare_model`, `build_optimizer`,
`train_step`), so `--set train.deterministic=true` and every other setting mean what they mean in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import RunConfig
from ..errors import ConfigError
from .batches import augment_generator, fetch, train_indices
from .loop import (accumulate_gradients, apply_gradients, clip_gradients, configure_determinism,
                   endless_train_batches, prepare_model, train_step)
from .memory import keep_freed_memory
from .optim import build_optimizer, build_schedule
from .precision import Precision, choose_precision, resolve_device


@dataclass
class Session:
    """What every debug command starts from, built as fit() builds it."""

    device: torch.device
    precision: Precision
    splits: object


def open_session(task, cfg: RunConfig) -> Session:
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()
    configure_determinism(cfg)
    return Session(device, choose_precision(cfg.train.precision, device), task.datasets(device))


def first_samples(session: Session, cfg: RunConfig, count: int, option: str):
    """The first `count` samples of the first batch fit() would draw (a mix of classes, not the file's first
    rows), as one raw device batch."""
    size = len(session.splits.train)
    if not 1 <= count <= size:
        raise ConfigError(f"{option}: must be between 1 and the training split's {size} samples (got {count})")
    indices = next(train_indices(size, count, cfg.train.seed, 0, 0, 0, 1))
    (raw,) = fetch(session.splits.train, iter([indices]), session.device, 0, session.splits.collate_fn)
    return raw


# ---------------------------------------------------------------------------------------------- overfit


@dataclass
class OverfitResult:
    losses: list[float]  # the training loss at each step, before that step's update
    batch_size: int
    target_ratio: float  # passed: the last loss is at most this fraction of the first
    lr: float
    logs: dict[str, float] = field(default_factory=dict)  # the task's last step logs (e.g. acc1)

    @property
    def passed(self) -> bool:
        first, last = self.losses[0], self.losses[-1]
        return math.isfinite(last) and last <= self.target_ratio * first

    def verdict(self) -> str:
        first, last, steps = self.losses[0], self.losses[-1], len(self.losses)
        logs = "".join(f", {k} {v:.3f}" for k, v in self.logs.items())
        what = (f"the loss went from {first:.4g} to {last:.4g} ({100 * last / first:.2f}% of its start{logs}) "
                f"in {steps} steps on one batch of {self.batch_size}" if math.isfinite(last) and first > 0 else
                f"the loss went from {first:.4g} to {last} in {steps} steps on one batch of {self.batch_size}")
        if self.passed:
            return f"PASS: {what}; the model can learn this batch"
        return (f"FAIL: {what}; the target was {100 * self.target_ratio:g}% of the start. A model that cannot fit "
                f"one batch will not fit the data set: check the learning rate (optim.lr={self.lr:g}; a higher "
                "one, or more --steps), that the loss is computed from the model's output and the batch's own "
                "labels, and that every layer gets a gradient (`modelworks debug ... gradients`)")


def overfit_batch(task, cfg: RunConfig, steps: int = 200, batch_size: int = 16, target: float | None = None
                  ) -> OverfitResult:
    """Train the configured model with the configured optimizer at its peak learning rate (no schedule) on one
    fixed batch, prepared without augmentation, for `steps` steps. It passes when the last loss is at most
    `target` (default: the task's `overfit_target`) times the first. The caller applies the task's
    `overfit_overrides` to `cfg` (the CLI does, before the user's own --set)."""
    target_ratio = type(task).overfit_target if target is None else target
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1 (got {steps})")
    if not 0 < target_ratio < 1:
        raise ConfigError(f"--target: must be a fraction of the first loss in (0, 1) (got {target_ratio})")
    session = open_session(task, cfg)
    batch = task.prepare_batch(first_samples(session, cfg, batch_size, "--batch-size"), None)
    model = prepare_model(task, session.device, cfg).train()
    optimizer = build_optimizer(model, cfg.optim)
    scaler = session.precision.scaler()
    losses, logs = [], {}
    for _ in range(steps):
        outs, _ = train_step(task, model, model, batch, optimizer, scaler, session.precision, cfg, 1)
        n = sum(out.n for out in outs)
        losses.append(sum(out.loss.detach().float() * out.n for out in outs) / n)
        logs = {key: sum(out.logs[key].float() * out.n for out in outs) / n for key in outs[-1].logs}
    values = torch.stack(losses).cpu().tolist()  # one sync at the end: the loop runs at training speed
    return OverfitResult(values, batch_size, target_ratio, cfg.optim.lr, {k: float(v) for k, v in logs.items()})


# ---------------------------------------------------------------------------------------------- augment


def augmented_views(task, cfg: RunConfig, samples: int = 8, views: int = 3, progress: float = 0.0
                    ) -> list[list[torch.Tensor]] | None:
    """For each of the first `samples` training samples, its image without augmentation and as `views`
    training steps (0, 1, ...) would augment it, drawn by `task.draw_batch` (uint8 [3, H, W]); None when the
    task has nothing to draw. `progress`: the fraction of training done, for augmentation that changes over a
    run (detection's mosaic turns off near the end)."""
    if views < 1:
        raise ConfigError(f"--views: must be >= 1 (got {views})")
    if not 0 <= progress <= 1:
        raise ConfigError(f"--progress: must be a fraction of training in [0, 1] (got {progress})")
    session = open_session(task, cfg)
    raw = first_samples(session, cfg, samples, "--samples")
    columns = [task.draw_batch(task.prepare_batch(clone(raw), None))]
    if columns[0] is None:
        return None
    for step in range(views):
        generator = augment_generator(session.device, cfg.train.seed, step, 0)
        columns.append(task.draw_batch(task.prepare_batch(clone(raw), generator, progress=progress)))
    return [list(row) for row in zip(*columns)]


def clone(batch):
    """A copy of a raw batch, so no view sees what an in-place augmentation did to the one before."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, (list, tuple)):
        return type(batch)(clone(b) for b in batch)
    if isinstance(batch, dict):
        return {k: clone(v) for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------------------------------------- gradients

# A parameter's gradient is "vanishing" when its typical size (RMS over its elements, median over the steps) is
# this many times below the median parameter's: a depth-wise symptom. Measured over the first 50 steps of the
# shipped recipes (`modelworks debug TASK --recipe R gradients`, 2026-12-01): fastnet's parameters spread over
# 14x; the detector's learning ones lie within ~300x of the median (its bottom-up PAN path the lowest), while
# its stride-16 and stride-32 box heads, to which the assigner gives no objects on that data, sit 1e6-1e11x below.
SPREAD_LIMIT = 1e3
# "Exploding" is a symptom over time, not depth: the gradient norm over the last quarter of the steps this many
# times its norm over the first quarter (medians), on runs of at least 4 steps. Healthy runs shrink or hold it.
GROWTH_LIMIT = 1e2
NO_GRADIENT = -1.0  # a gradient norm that cannot be one: the parameter got no gradient at that step (grad None)


@dataclass
class ParameterFlow:
    name: str
    shape: tuple[int, ...]
    grad_norms: list[float]  # per step; NO_GRADIENT where it got none (grad None)
    weight_norms: list[float]  # per step, before that step's update
    requires_grad: bool = True
    flags: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def typical_grad_rms(self) -> float:
        """The median over steps of the gradient's RMS over elements (0 when it never got one)."""
        got = [g for g in self.grad_norms if g != NO_GRADIENT and math.isfinite(g)]
        return float(torch.tensor(got).median()) / math.sqrt(self.numel) if got else 0.0

    def growth(self) -> float:
        """The median gradient norm over the last quarter of the steps over that of the first (1 when too few
        steps, or no gradient, to tell)."""
        got = [g for g in self.grad_norms if g != NO_GRADIENT and math.isfinite(g)]
        quarter = len(got) // 4
        if quarter == 0:
            return 1.0
        first, last = (float(torch.tensor(part).median()) for part in (got[:quarter], got[-quarter:]))
        return last / first if first > 0 else (math.inf if last > 0 else 1.0)

    def typical_ratio(self) -> float:
        """The median over steps of gradient norm / weight norm: the relative size of an SGD step."""
        ratios = [g / w for g, w in zip(self.grad_norms, self.weight_norms)
                  if g != NO_GRADIENT and math.isfinite(g) and w > 0]
        return float(torch.tensor(ratios).median()) if ratios else 0.0


@dataclass
class GradientReport:
    parameters: list[ParameterFlow]
    steps: int
    median_grad_rms: float  # the reference for vanishing / exploding

    @property
    def flagged(self) -> list[ParameterFlow]:
        return [p for p in self.parameters if p.flags]


def flag_parameters(parameters: list[ParameterFlow], spread_limit: float = SPREAD_LIMIT) -> float:
    """Fill each parameter's `flags`; returns the median gradient RMS the vanishing/exploding flags compare to."""
    for p in parameters:
        got = [(step, g) for step, g in enumerate(p.grad_norms) if g != NO_GRADIENT]
        if not p.requires_grad:
            p.flags.append("frozen: requires_grad is False, so it never trains")
        elif not got:
            p.flags.append("no gradient: the loss does not reach it (a detached, unused or disconnected branch)")
        elif any(not math.isfinite(g) for _, g in got):
            first = next(step for step, g in got if not math.isfinite(g))
            p.flags.append(f"non-finite gradient from step {first}")
        elif all(g == 0 for _, g in got):
            p.flags.append("zero gradient on every step: dead units, or a branch multiplied by zero")
    learning = [p.typical_grad_rms() for p in parameters if not p.flags]
    reference = float(torch.tensor(learning).median()) if learning else 0.0
    for p in parameters:
        if p.flags:
            continue
        rms = p.typical_grad_rms()
        if reference > 0 and rms < reference / spread_limit:
            p.flags.append(f"vanishing: gradient {reference / max(rms, 1e-30):.1e}x smaller than the median "
                           "parameter's")
            continue
        growth = p.growth()
        if growth > GROWTH_LIMIT:
            p.flags.append(f"exploding: gradient norm grew {growth:.1e}x from the first to the last quarter of "
                           "the steps")
    return reference


def gradient_flow(task, cfg: RunConfig, steps: int = 50) -> GradientReport:
    """The first `steps` steps of the configured run (its batches, augmentation, optimizer and schedule), with
    every parameter's gradient norm (after unscaling, before clipping) and weight norm recorded at each step."""
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1 (got {steps})")
    session = open_session(task, cfg)
    t = cfg.train
    steps_per_epoch = len(session.splits.train) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the training split "
                          f"({len(session.splits.train)} samples); lower it")
    total_steps = max(math.ceil(t.epochs * steps_per_epoch), steps)  # the schedule of a run set by epochs
    model = prepare_model(task, session.device, cfg).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, cfg.optim, total_steps)
    scaler = session.precision.scaler()
    named = list(model.named_parameters())
    grad_rows, weight_rows = [], []
    stream = endless_train_batches(session.splits, cfg, session.device, 0, 1)
    for step in range(steps):
        batch = task.prepare_batch(next(stream), augment_generator(session.device, t.seed, step, 0),
                                   progress=step / total_steps)
        accumulate_gradients(task, model, batch, scaler, session.precision, cfg.optim.accumulate_steps, 1)
        scaler.unscale_(optimizer)
        grad_rows.append(parameter_norms([p.grad for _, p in named]))
        weight_rows.append(parameter_norms([p.detach() for _, p in named]))
        if cfg.optim.max_grad_norm > 0:
            clip_gradients(model, cfg.optim.max_grad_norm)
        apply_gradients(optimizer, scaler)
        scheduler.step()
    grads = torch.stack(grad_rows).T.tolist()  # [parameter][step]
    weights = torch.stack(weight_rows).T.tolist()
    parameters = [ParameterFlow(name, tuple(p.shape), g, w, p.requires_grad)
                  for (name, p), g, w in zip(named, grads, weights)]
    reference = flag_parameters(parameters)
    return GradientReport(parameters, steps, reference)


def parameter_norms(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """The L2 norm of each tensor (NO_GRADIENT for None), as one float32 vector on the CPU."""
    present = [t for t in tensors if t is not None]
    norms = iter(torch.stack(torch._foreach_norm(present)).float().cpu() if present else [])
    return torch.tensor([float(next(norms)) if t is not None else NO_GRADIENT for t in tensors])


def gradient_table(report: GradientReport) -> str:
    """One line per parameter, in model order: its gradient (median over steps), weights and flags."""
    width = max(len(p.name) for p in report.parameters)
    lines = [f"{'parameter':<{width}}  {'shape':<16} {'grad norm':>10} {'grad RMS':>10} {'weight norm':>11} "
             f"{'grad/weight':>11}  flag"]
    for p in report.parameters:
        got = [g for g in p.grad_norms if g != NO_GRADIENT and math.isfinite(g)]
        grad = f"{float(torch.tensor(got).median()):10.3e}" if got else f"{'-':>10}"
        rms = f"{p.typical_grad_rms():10.3e}" if got else f"{'-':>10}"
        ratio = f"{p.typical_ratio():11.3e}" if got else f"{'-':>11}"
        shape = "x".join(map(str, p.shape)) or "scalar"
        lines.append(f"{p.name:<{width}}  {shape:<16} {grad} {rms} {p.weight_norms[-1]:11.3e} {ratio}  "
                     + "; ".join(p.flags))
    return "\n".join(lines)
