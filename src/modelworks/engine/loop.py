"""fit() and evaluate_run(): the whole training loop, readable top to bottom.

Step-based: the run is `total_steps` optimizer steps; epochs, the data position and the learning rate all
derive from the step, so a checkpoint holding the step (plus model, optimizer, scheduler, scaler, EMA, early
stopping and RNG state) resumes the uninterrupted run exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ..config import RunConfig, flatten, to_dict
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from . import budget, checkpoint, closed_form, distributed, rundir
from .activations import ActivationMonitor
from .batches import augment_generator, eval_indices, fetch, split_batch, train_indices
from .early_stop import EarlyStopper
from .ema import EMA
from .log import Logger, format_values
from .memory import keep_freed_memory
from .optim import build_optimizer, build_schedule
from .precision import Precision, choose_precision, resolve_device


@dataclass
class FitResult:
    run_dir: Path
    step: int
    status: str  # "finished" | "early_stopped" | "interrupted"
    best: dict[str, float]


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so `last` is saved before leaving."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def configure_determinism(cfg: RunConfig) -> None:
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def prepare_model(task, device: torch.device, cfg: RunConfig) -> nn.Module:
    model = task.build_model().to(device)
    if cfg.train.channels_last and task.uses_channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def evaluate_split(task, model: nn.Module, dataset, collate_fn, cfg: RunConfig, device: torch.device,
                   precision: Precision, prefix: str, report_dir: Path | None = None) -> dict[str, float]:
    """Run the task's metrics over this rank's shard of a split; the task reduces across ranks."""
    indices = eval_indices(len(dataset), cfg.train.eval_batch_size, distributed.rank(), distributed.world_size())
    batches = (task.prepare_batch(b, None)
               for b in fetch(dataset, indices, device, cfg.train.num_workers, collate_fn))
    was_training = model.training
    model.eval()
    with torch.no_grad(), precision.autocast():
        metrics = task.evaluate(model, batches, report_dir)
    model.train(was_training)
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


def total_grad_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of all gradients together, as clip_grad_norm_ measures it, without clipping."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def accumulate_gradients(task, train_model: nn.Module, batch, scaler, precision: Precision, micro_batches: int,
                         world: int) -> list:
    """Forward and backward over `batch` cut into micro-batches, gradients summed (scaled by the scaler); returns
    each micro-batch's StepOutput. The optimizer is the caller's, so `modelworks debug gradients` can read the
    gradients between the two."""
    parts = split_batch(batch, micro_batches)
    outs = []
    for i, part in enumerate(parts):
        # DDP all-reduces (FSDP2 reduce-scatters) gradients only on the last micro-batch.
        with distributed.gradient_sync(train_model, i == len(parts) - 1):
            with precision.autocast():
                out = task.step(train_model, part)
            scaler.scale(out.loss / micro_batches).backward()
        outs.append(out)
    return outs


def clip_gradients(model: nn.Module, max_grad_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping; clips to `max_grad_norm` when it is > 0. Gradients must be
    unscaled first (scaler.unscale_)."""
    if max_grad_norm > 0 or distributed.is_sharded(model):
        # clip_grad_norm_ reduces the norms of sharded gradients (DTensors) across the ranks; at an infinite
        # bound it only measures
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        return distributed.whole_tensor(norm)
    return total_grad_norm(model)


def apply_gradients(optimizer, scaler) -> None:
    """The optimizer step (skipped by the fp16 scaler on inf/NaN gradients), then the gradients are released."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(task, train_model: nn.Module, model: nn.Module, batch, optimizer, scaler, precision: Precision,
               cfg: RunConfig, world: int, measure_norm: bool = False) -> tuple[list, torch.Tensor | None]:
    """One optimizer step over `batch` (micro-batches accumulated): the step outputs and the gradient norm (when
    clipping, or asked to `measure_norm`: the loop logs it for every run). The schedule and the EMA are the
    caller's, so the budget probe can run steps without them."""
    outs = accumulate_gradients(task, train_model, batch, scaler, precision, cfg.optim.accumulate_steps, world)
    grad_norm = None
    if cfg.optim.max_grad_norm > 0 or measure_norm:  # measured only when logged (one sync)
        scaler.unscale_(optimizer)
        grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
    apply_gradients(optimizer, scaler)
    return outs, grad_norm


def endless_train_batches(splits, cfg: RunConfig, device: torch.device, rank: int, world: int):
    """Raw training batches as fit() draws them from step 0 (epoch after epoch), without end: for the budget
    probe and the debug commands, which take as many steps as they need."""
    t = cfg.train
    for epoch in itertools.count():
        indices = train_indices(len(splits.train), t.batch_size, t.seed, epoch, 0, rank, world)
        yield from fetch(splits.train, indices, device, t.num_workers, splits.collate_fn)


def probe_budget(task, model: nn.Module, train_model: nn.Module, replica: nn.Module | None, splits, cfg: RunConfig,
                 device: torch.device, precision: Precision, eval_every: int, run_dir: Path,
                 started: float) -> budget.BudgetPlan:
    """Time a few training steps and one validation pass, then restore the model and the random state, and
    plan the steps that fit `train.time_budget_s` (rank 0's plan, shared by every rank)."""
    t = cfg.train
    rank, world = distributed.rank(), distributed.world_size()
    weights = copy.deepcopy(model.state_dict())  # sharded: this rank's shards, restored into the same sharding
    rng = checkpoint.rng_state()
    optimizer, scaler = build_optimizer(model, cfg.optim), precision.scaler()

    stream = endless_train_batches(splits, cfg, device, rank, world)
    probe_step = itertools.count()

    def one_step() -> None:
        batch = task.prepare_batch(next(stream), augment_generator(device, t.seed, next(probe_step), rank))
        train_step(task, train_model, model, batch, optimizer, scaler, precision, cfg, world)

    def one_evaluation() -> None:
        eval_model = evaluation_model(model, replica)
        evaluate_split(task, eval_model, splits.val, splits.collate_fn, cfg, device, precision, "val")
        if distributed.is_main():
            task.samples(eval_model)  # text recorded at each evaluation (a language model's samples) costs time too
        # each evaluation saves `last`: on a small data set as slow as the pass itself
        state = {"model": distributed.full_model_state(model),
                 "optimizer": distributed.full_optimizer_state(model, optimizer)}
        if distributed.is_main():
            path = run_dir / "budget-probe.pt"
            checkpoint.save_atomic(state, path)
            path.unlink()

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train_model.train()
    seconds_per_step, seconds_per_evaluation = budget.measure(one_step, one_evaluation, synchronize)
    model.load_state_dict(weights)
    checkpoint.restore_rng_state(rng)
    del optimizer, scaler, weights
    plan = budget.make_plan(t.time_budget_s, time.perf_counter() - started, seconds_per_step,
                            seconds_per_evaluation, eval_every)
    return distributed.broadcast_object(plan)


def schedule_at(optimizer, cfg, total_steps: int, step: int):
    """A learning-rate schedule for `total_steps`, advanced to `step` (the optimizer's rate set as at that step):
    for a run whose length changed at `step`. A resumed run builds the same one and loads its state."""
    scheduler = build_schedule(optimizer, cfg, total_steps)
    scheduler.last_epoch = step - 1
    scheduler.step()
    return scheduler


def replanned(plan: budget.BudgetPlan, step: int, started: float, window: tuple[int, float, float],
              evaluation_s: float, evaluations: int) -> budget.BudgetPlan:
    """The budget re-planned at `step` from this run's own measurements (budget.py says why): the mean time of the
    steps since `window` (its step, clock and evaluation seconds then), evaluations excluded, and the mean
    evaluation (the probe's until one has run); rank 0's plan, shared by every rank."""
    window_step, window_tic, window_evaluation_s = window
    seconds_per_step = ((time.perf_counter() - window_tic - (evaluation_s - window_evaluation_s))
                        / (step - window_step))
    seconds_per_evaluation = evaluation_s / evaluations if evaluations else plan.seconds_per_evaluation
    new = budget.replan(plan, step, time.perf_counter() - started, seconds_per_step, seconds_per_evaluation)
    return distributed.broadcast_object(new)


def change_length(plan: budget.BudgetPlan, step: int, old_total: int, optimizer, cfg: RunConfig, log: Logger):
    """A re-planned run's new length at `step`: said in the log, shown by the progress bar, and the learning-rate
    schedule rebuilt for it (returned)."""
    log.info(f"time budget re-planned at step {step}: {plan.total_steps} steps instead of {old_total} "
             f"({1000 * plan.replanned['seconds_per_step']:.0f} ms/step measured, the probe said "
             f"{1000 * plan.seconds_per_step:.0f})")
    log.set_total_steps(plan.total_steps)
    return schedule_at(optimizer, cfg.optim, plan.total_steps, step)


def evaluation_replica(task, model: nn.Module, device: torch.device, cfg: RunConfig) -> nn.Module | None:
    """For a sharded model, a whole copy to evaluate with (None otherwise): a sharded forward is a collective,
    which would hang when the ranks' validation shards have different numbers of batches, or when rank 0 alone
    writes samples. Built without touching the random state the run continues from."""
    if not distributed.is_sharded(model):
        return None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return prepare_model(task, device, cfg)


def evaluation_model(model: nn.Module, replica: nn.Module | None) -> nn.Module:
    """The module to evaluate: `model`, or the replica loaded with its whole current weights (a collective)."""
    if replica is None:
        return model
    replica.load_state_dict(distributed.full_model_state(model, every_rank=True))
    return replica


def batch_size_for(batch_size: int, n_train: int, unit: int) -> tuple[int, str | None]:
    """The batch size to train with, and a note when it is not the configured one. A batch larger than the
    training split would give zero steps per epoch: a small data set (a labelling tool's first few dozen images)
    trains with the largest power-of-two batch that fits it, a multiple of `unit` (world size x accumulation),
    and the log says so, rather than stopping a user who gave no batch size at all."""
    if batch_size <= n_train:
        return batch_size, None
    fitted = 1 << (n_train.bit_length() - 1) if n_train > 0 else 0
    fitted -= fitted % unit
    if fitted < unit:
        raise ConfigError(f"train.batch_size: the training split has {n_train} samples, fewer than one batch of "
                          f"{unit} (world size x optim.accumulate_steps); add data or lower optim.accumulate_steps")
    return fitted, (f"train.batch_size={batch_size} is more than the {n_train} training samples: training with "
                    f"batches of {fitted} instead (optim.lr unchanged); set train.batch_size to choose")


def log_hparams(log: Logger, cfg: RunConfig, step: int, best: dict, last: dict) -> None:
    """The resolved config and the run's metrics in TensorBoard's HPARAMS view: the best validation values
    (written here as `best/val/...` scalars) and the last evaluation's (already logged as `val/...`)."""
    best_values = {f"best/{key}": value for key, value in best.items() if key != "step"}
    log.tensorboard_scalars(step, best_values)
    # As YAML writes them: torch's summary would store a bool as the number 0 or 1.
    settings = {k: str(v).lower() if isinstance(v, bool) else v for k, v in flatten(cfg).items()}
    log.hparams(settings, [*best_values, *last])


def fit(task, cfg: RunConfig, run_dir: Path, resume: bool = False) -> FitResult:
    """Train `task` as `cfg` says, writing into `run_dir` (rank 0 only). Resumes from checkpoints/last.pt."""
    started = time.perf_counter()
    t = cfg.train
    device = resolve_device(t.device, distributed.local_device_index())
    if device.type == "cpu":
        keep_freed_memory()
    distributed.init(device.type)
    rank, world = distributed.rank(), distributed.world_size()
    micro_batches = cfg.optim.accumulate_steps
    if t.batch_size % (world * micro_batches):
        raise ConfigError(f"train.batch_size: {t.batch_size} must be divisible by world size ({world}) x "
                          f"optim.accumulate_steps ({micro_batches})")
    configure_determinism(cfg)
    precision = choose_precision(t.precision, device)
    if task.trains_in_closed_form():  # solved once, not stepped (EASE): engine/closed_form.py
        return closed_form.fit(task, cfg, run_dir, device, precision)

    with distributed.main_first():  # rank 0 writes generated data and caches, then the others read them
        splits = task.datasets(device)
    batch_size, note = batch_size_for(t.batch_size, len(splits.train), world * micro_batches)
    if note:
        splits.notes.append(note)
        t = dataclasses.replace(t, batch_size=batch_size)
        cfg = dataclasses.replace(cfg, train=t)
    steps_per_epoch = len(splits.train) // t.batch_size
    eval_every = t.eval_every_steps or steps_per_epoch

    model = prepare_model(task, device, cfg)
    if t.init_from and not resume:  # a resumed run has its own weights in checkpoints/last.pt
        splits.notes.append(f"weights from {initial_weights(model, t.init_from, device)} (train.init_from)")
    train_model = distributed.wrap_for_training(model, t.distributed.strategy, device)
    replica = evaluation_replica(task, model, device, cfg)
    if t.compile:
        train_model = torch.compile(train_model)

    ckpt_dir = run_dir / "checkpoints"
    state = checkpoint.load(ckpt_dir / "last.pt", device, keys=checkpoint.TRAINING_KEYS) if resume else None
    plan = None
    if not t.time_budget_s:
        total_steps = t.steps or math.ceil(t.epochs * steps_per_epoch)
    elif resume:  # the plan was made when the run started; its schedule must not change halfway
        total_steps = int(state["total_steps"])
    else:
        plan = probe_budget(task, model, train_model, replica, splits, cfg, device, precision, eval_every, run_dir,
                            started)
        total_steps = plan.total_steps

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, cfg.optim, total_steps)
    scaler = precision.scaler()
    ema = EMA(model, t.ema.decay, t.ema.warmup_steps, t.ema.power) if t.ema.enabled else None
    monitor_key, monitor_mode = task.monitor
    stopper = EarlyStopper(monitor_mode, t.early_stop.patience, t.early_stop.min_delta)
    step, best_metrics = 0, {}

    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        path = ckpt_dir / "last.pt"
        if distributed.is_sharded(model):
            with checkpoint.restoring(path, "model and optimizer state"):
                distributed.load_full_state(model, optimizer, state["model"], state["optimizer"])
        else:
            checkpoint.load_model_weights(model, state["model"], path)
        if ema is not None and state["ema"] is None:
            raise CheckpointError(f"{path}: saved without an EMA, but train.ema.enabled is now true; resume with "
                                  "the run's own config")
        parts = {"optimizer": None if distributed.is_sharded(model) else optimizer,  # sharded: loaded above
                 "scheduler": scheduler, "scaler": scaler, "early_stop": stopper, "ema": ema}
        for name, part in parts.items():
            if part is not None:
                with checkpoint.restoring(path, f"{name} state"):
                    part.load_state_dict(state[name])
        with checkpoint.restoring(path, "step and RNG state"):
            checkpoint.restore_rng_state(state["rng"])
            step, best_metrics = int(state["step"]), dict(state["best_metrics"])
        if state["total_steps"] != total_steps:
            raise CheckpointError(f"{path}: saved for {state['total_steps']} total steps but the "
                                  f"configuration now gives {total_steps}; resume with the run's own config")
        if distributed.is_main():
            rundir.truncate_metrics(run_dir, step)  # lines logged after the checkpoint will be logged again
        del state

    log = Logger(run_dir, total_steps, step, enabled=distributed.is_main(),
                 config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log.info(f"{task.describe(model)} | device {device} x{world} | {precision.name} | "
             f"{steps_per_epoch} steps/epoch, {total_steps} steps | train {len(splits.train)} val {len(splits.val)}")
    for note in splits.notes:
        log.info(note)
    if plan is not None:
        log.info(f"train.time_budget_s={t.time_budget_s:g}: {total_steps} steps ({total_steps / steps_per_epoch:.2f} "
                 f"epochs; train.epochs is not used) from a probe of {1000 * plan.seconds_per_step:.0f} ms/step and "
                 f"{plan.seconds_per_evaluation:.2f} s per validation and checkpoint, after {plan.spent_s:.1f} s of "
                 "loading and probing")
        if ema is not None and not t.ema.power and 1 / (1 - t.ema.decay) > total_steps / 2:
            # Not changed for the user (decay is per step, not a fraction of the run), but worth knowing: an
            # average over more than half the run leans on early, poor weights.
            log.info(f"note: train.ema.decay={t.ema.decay:g} averages over ~{1 / (1 - t.ema.decay):.0f} steps, more "
                     f"than half of this {total_steps}-step run; a lower decay suits a run this short")
    if resume:
        log.info(f"resumed at step {step} (epoch {step / steps_per_epoch:.2f})")
    activations = ActivationMonitor(model, log, t.debug.activations, t.debug.every_steps)

    def save(name: str) -> None:
        model_state = distributed.full_model_state(model)  # sharded: gathered by every rank, for rank 0
        optimizer_state = distributed.full_optimizer_state(model, optimizer)
        if not distributed.is_main():
            return
        state = {
            "step": step, "total_steps": total_steps, "model": model_state,
            "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "early_stop": stopper.state_dict(), "rng": checkpoint.rng_state(),
            "best_metrics": best_metrics, "ema": ema.state_dict() if ema is not None else None,
        }
        checkpoint.save_atomic(state, ckpt_dir / f"{name}.pt")

    # Running sums stay on the device between log points: no host sync per step.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    log_sums: dict[str, torch.Tensor] = {}
    samples_since_log, last_checked_step, tic = 0, step, time.perf_counter()

    def check_finite() -> None:
        """The NaN guard: called before anything is logged or saved, so no checkpoint holds diverged weights.
        Weights are checked too: a finite loss can still produce NaN gradients (e.g. an overflowing backward)."""
        nonlocal last_checked_step
        if step == last_checked_step:  # already checked at this step (a log point that is also an evaluation)
            return
        # Sharded, each rank checks its own shards; every rank stops if any finds a non-finite value.
        weight_norms = torch.stack(torch._foreach_norm([distributed.local_tensor(p.detach())
                                                        for p in model.parameters()]))
        finite = bool((torch.isfinite(loss_sum) & torch.isfinite(weight_norms).all()).item())
        if distributed.broadcast_flag(not finite, device):
            what = (f"loss became {loss_sum.item()}" if not torch.isfinite(loss_sum).item()
                    else "weights became non-finite (NaN/inf gradients)")
            raise TrainingDiverged(
                f"training {what} between steps {last_checked_step} and {step}; stopped. "
                f"The last good checkpoint is kept in {ckpt_dir}. Lower optim.lr, set optim.max_grad_norm, "
                "or use train.precision=fp32")
        last_checked_step = step

    status, last_metrics = "finished", {}
    replan_at = budget.replan_step(plan) if plan is not None else None  # a resumed run keeps its saved length
    window_from, window, evaluation_s, evaluations = step + budget.REPLAN_SKIPPED_STEPS, None, 0.0, 0
    train_model.train()
    with StopRequest() as stop:
        while step < total_steps and status == "finished":
            epoch, offset = divmod(step, steps_per_epoch)
            indices = train_indices(len(splits.train), t.batch_size, t.seed, epoch, offset, rank, world)
            for raw_batch in fetch(splits.train, indices, device, t.num_workers, splits.collate_fn):
                batch = task.prepare_batch(raw_batch, augment_generator(device, t.seed, step, rank),
                                           progress=step / total_steps)
                logs_now = (step + 1) % t.log_every_steps == 0 or step + 1 == total_steps
                with activations.watch_training(step + 1):
                    outs, grad_norm = train_step(task, train_model, model, batch, optimizer, scaler, precision, cfg,
                                                 world, measure_norm=logs_now)
                for out in outs:
                    loss_sum += out.loss.detach().double() * out.n
                    for key, value in out.logs.items():
                        log_sums[key] = log_sums.get(key, 0.0) + value.detach().double() * out.n
                    samples_since_log += out.n
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                if step == window_from:  # the re-plan times the steps from here
                    window = (step, time.perf_counter(), evaluation_s)
                if step == replan_at:
                    plan = replanned(plan, step, started, window, evaluation_s, evaluations)
                    if plan.total_steps != total_steps:
                        scheduler = change_length(plan, step, total_steps, optimizer, cfg, log)
                        total_steps = plan.total_steps

                if logs_now:
                    check_finite()
                    elapsed = time.perf_counter() - tic
                    values = {"train/loss": loss_sum.item() / samples_since_log,
                              **{f"train/{k}": v.item() / samples_since_log for k, v in log_sums.items()},
                              "train/lr": optimizer.param_groups[0]["lr"],
                              "train/samples_per_s": samples_since_log * world / elapsed}
                    if grad_norm is not None:
                        values["train/grad_norm"] = float(grad_norm)
                    values = distributed.mean_across_ranks(values, device)
                    log.progress(step, values)
                    log.scalars(step, values, epoch=round(step / steps_per_epoch, 4))
                    loss_sum.zero_()
                    log_sums.clear()
                    samples_since_log, tic = 0, time.perf_counter()

                if step % eval_every == 0 or step == total_steps:
                    evaluation_tic = time.perf_counter()
                    check_finite()
                    eval_model = ema.module if ema is not None else evaluation_model(model, replica)
                    with activations.watch_evaluation(eval_model, step):
                        metrics = evaluate_split(task, eval_model, splits.val, splits.collate_fn, cfg, device,
                                                 precision, "val")
                    last_metrics = metrics
                    improved = stopper.improved(metrics[monitor_key])
                    if improved:
                        best_metrics = {**metrics, "step": step}
                    log.info(f"step {step} epoch {step / steps_per_epoch:.2f}: {format_values(metrics)}"
                             + (" (best)" if improved else ""))
                    log.scalars(step, metrics, epoch=round(step / steps_per_epoch, 4))
                    if distributed.is_main():
                        log.texts(step, task.samples(eval_model))
                    save("last")
                    if improved:
                        save("best")
                    if stopper.should_stop:
                        log.info(f"early stop: {monitor_key} has not improved by more than "
                                 f"{t.early_stop.min_delta} for {t.early_stop.patience} evaluations")
                        status = "early_stopped"
                    evaluation_s, evaluations = evaluation_s + time.perf_counter() - evaluation_tic, evaluations + 1
                elif t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                    check_finite()
                    save("last")

                if distributed.broadcast_flag(stop.signal_name is not None, device):
                    check_finite()
                    save("last")
                    log.info(f"{stop.signal_name or 'stop request'}: saved checkpoints/last.pt at step {step}; "
                             f"continue with: modelworks train --resume {run_dir}")
                    status = "interrupted"
                if status != "finished" or step >= total_steps:
                    break
            distributed.barrier()
    log_hparams(log, cfg, step, best_metrics, last_metrics)
    summary = {"status": status, "step": step, "total_steps": total_steps, "best": best_metrics}
    if plan is not None:
        summary["time_budget"] = {**plan.as_dict(), "fit_s": round(time.perf_counter() - started, 2)}
        log.info(f"trained in {summary['time_budget']['fit_s']:.0f} s of the {t.time_budget_s:g} s budget")
    log.close()
    rundir.write_summary(run_dir, summary)
    return FitResult(run_dir, step, status, best_metrics)


def checkpoint_path(run_dir: Path, which: str = "best") -> Path:
    """checkpoints/best.pt (last.pt for a run stopped before its first evaluation) or checkpoints/last.pt."""
    path = run_dir / "checkpoints" / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run_dir / "checkpoints" / "last.pt"
    return path


def load_trained_weights(model: nn.Module, path: Path, device: torch.device, state: dict | None = None) -> None:
    """A checkpoint's weights into `model`: the EMA weights when the run kept an average, else the model's."""
    state = state if state is not None else checkpoint.load(path, device, keys=("model",))
    if state.get("ema") is None:
        checkpoint.load_model_weights(model, state["model"], path)
    else:
        ema = state["ema"]
        checkpoint.load_model_weights(model, ema.get("module") if isinstance(ema, dict) else ema, path, "ema.module")


def load_for_evaluation(task, run_dir: Path, device: torch.device, cfg: RunConfig, which: str = "best") -> nn.Module:
    """The run's model with its best (or last) weights, the EMA weights when the run kept an average."""
    path = checkpoint_path(run_dir, which)
    state = checkpoint.load(path, device, keys=("model",))  # a missing or unreadable file is named before building
    model = prepare_model(task, device, cfg)
    load_trained_weights(model, path, device, state)
    return model.eval()


def initial_weights(model: nn.Module, source: str, device: torch.device) -> Path:
    """train.init_from: start from another run's best weights (or a checkpoint file's) instead of random ones."""
    given = Path(source).expanduser()
    path = checkpoint_path(given) if given.is_dir() else given
    if not path.is_file():
        raise ConfigError(f"train.init_from: {source!r} is neither a run directory with checkpoints/best.pt or "
                          "last.pt nor a checkpoint file; give the directory of a finished run")
    load_trained_weights(model, path, device)
    return path


CALIBRATION_FILE = "calibration.json"  # in the run directory, beside checkpoints/


def calibrate_run(task, cfg: RunConfig, run_dir: Path, which: str = "best") -> dict | None:
    """Fit the task's post-hoc calibration (`task.calibrate`) on the whole validation split with the run's best
    (or last) weights, and keep it in RUN_DIR/calibration.json, where evaluation and export find it. None (and
    nothing written) for a task without calibration."""
    device = resolve_device(cfg.train.device)
    precision = choose_precision(cfg.train.precision, device)
    with distributed.main_first():
        splits = task.datasets(device)
    model = load_for_evaluation(task, run_dir, device, cfg, which)
    indices = eval_indices(len(splits.val), cfg.train.eval_batch_size, 0, 1)
    batches = (task.prepare_batch(b, None)
               for b in fetch(splits.val, indices, device, cfg.train.num_workers, splits.collate_fn))
    with torch.no_grad(), precision.autocast():
        fitted = task.calibrate(model, batches)
    if fitted is None:
        return None
    path = checkpoint_path(run_dir, which)
    record = {"checkpoint": path.name, "checkpoint_sha256": checkpoint.sha256_file(path), "split": "val",
              "fitted": fitted}
    rundir.write_json(run_dir / CALIBRATION_FILE, record)
    return record


def restore_calibration(task, run_dir: Path, which: str = "best") -> tuple[dict[str, float], str | None]:
    """Give the task the calibration fitted for this checkpoint (`task.adopt_calibration`), or none when the run
    has none or it was fitted for other weights. Returns its numbers as `val/...` keys for a report, and a note
    for the user when the task would have used a calibration it did not get."""
    path = run_dir / CALIBRATION_FILE
    fitted, why = None, f"{path} does not exist"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); delete it and run `modelworks calibrate "
                                  f"{run_dir}` again") from None
        weights = checkpoint_path(run_dir, which)
        if weights.is_file() and record["checkpoint_sha256"] == checkpoint.sha256_file(weights):
            fitted = record["fitted"]
        else:
            why = f"{path} was fitted for other weights ({record['checkpoint']} before it changed)"
    note = task.adopt_calibration(fitted)
    if note and fitted is None:
        note = f"{note} ({why}); fit it with `modelworks calibrate {run_dir}`"
    values = {f"val/{k}": v for k, v in (fitted or {}).items() if isinstance(v, float)}
    return values, note


def evaluate_run(task, cfg: RunConfig, run_dir: Path, split: str = "test", which: str = "best",
                 fallback_to_val: bool = False) -> dict[str, float]:
    """The final report of a run on one split: metrics JSON and the task's plots. With `fallback_to_val`, a data
    source without a test split (an ImageFolder tree without test/) is reported on its validation split."""
    device = resolve_device(cfg.train.device)
    precision = choose_precision(cfg.train.precision, device)
    with distributed.main_first():
        splits = task.datasets(device)
    dataset = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if dataset is None and fallback_to_val:
        print(f"the data source has no {split} split: reporting on the validation split instead")
        split, dataset = "val", splits.val
    if dataset is None:
        raise ConfigError(f"--split {split}: this data source has no {split} split")
    model = load_for_evaluation(task, run_dir, device, cfg, which)
    calibration, note = restore_calibration(task, run_dir, which)
    if note:
        print(note)
    report_dir = run_dir / "evaluation"
    report_dir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    metrics = evaluate_split(task, model, dataset, splits.collate_fn, cfg, device, precision, split, report_dir)
    metrics[f"{split}/seconds"] = time.perf_counter() - tic
    # The fitted values (val/temperature, ...) beside the metrics they produced.
    metrics.update({k: v for k, v in calibration.items() if k not in metrics})
    rundir.write_json(report_dir / f"{split}.json", metrics)
    return metrics
