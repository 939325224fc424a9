"""A wall-clock budget for a run (`train.time_budget_s`): the number of steps from a short timed probe.

The step count is fixed before the first real step, so everything the run expresses as a fraction of itself
(learning-rate warm-up and decay, augmentation phases such as closing mosaic, anything driven by
step / total_steps) fits the time, instead of being cut off when a clock runs out. The probe trains a few steps
of the real model on real batches with a throwaway optimizer and times one validation pass and one
checkpoint save (what follows each evaluation); `fit` then restores
the weights and the random state, so the run starts exactly where it would have without a budget.

Like ultralytics' `time=`, the budget covers the training and its validation passes and checkpoints, counted
from the start of `fit`; the final test report comes after it.

Steps per second measured over a few probe steps are an estimate, and it ran low: a diffusion run planned from a
451 ms probe trained 363 s of a 300 s budget (the loop's own work, EMA and logging, and a machine shared with other
jobs are not in the probe). So the run re-plans once, early (REPLAN_FRACTION of the planned steps): the steps
left are planned again from the real steps' measured time and the clock, and the learning-rate schedule is rebuilt
for the new length at the same step (its warm-up is over by then or nearly, so the jump is small). The new length
is saved in every checkpoint like the old one, and a resumed run keeps it: it never re-plans, so resuming stays
exact. A machine that slows down later still ends the run late by the same ratio.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

from ..errors import ConfigError

WARMUP_STEPS = 3  # untimed: allocation, kernel selection (cudnn, oneDNN) and torch.compile land in the first steps
TIMED_STEPS = 8
REPLAN_FRACTION = 0.1  # re-plan once after this share of the planned steps...
REPLAN_MIN_STEPS = 20  # ...and after at least this many (a mean over fewer is as noisy as the probe's)
REPLAN_SKIPPED_STEPS = 5  # the loop's first steps are not timed: a fresh optimizer's state, the EMA copy and the
# allocator's first pages made the first 22 steps of a diffusion run 867 ms each on average, 527 ms afterwards

@dataclass
class BudgetPlan:
    budget_s: float
    spent_s: float  # from the start of fit to the end of the probe: data, model, probe
    seconds_per_step: float
    seconds_per_evaluation: float  # a validation pass and the checkpoint saved after it
    eval_every_steps: int
    total_steps: int
    replanned: dict | None = None  # the re-plan's measurements and its new total_steps, once it has run

    def as_dict(self) -> dict:
        return asdict(self)  # unrounded: the summary then reproduces the plan exactly


def run_cost_s(steps: int, seconds_per_step: float, seconds_per_evaluation: float, eval_every_steps: int) -> float:
    """Predicted seconds of a run of `steps`: each step, plus an evaluation every `eval_every_steps` and at the end."""
    return steps * seconds_per_step + math.ceil(steps / eval_every_steps) * seconds_per_evaluation


def plan_steps(remaining_s: float, seconds_per_step: float, seconds_per_evaluation: float,
               eval_every_steps: int) -> int:
    """The most steps whose predicted cost fits in `remaining_s` (0 when not even one does)."""
    per_step = seconds_per_step + seconds_per_evaluation / eval_every_steps
    steps = max(int((remaining_s - seconds_per_evaluation) / per_step), 0)
    while run_cost_s(steps + 1, seconds_per_step, seconds_per_evaluation, eval_every_steps) <= remaining_s:
        steps += 1
    return steps


def measure(train_step: Callable[[], None], evaluate: Callable[[], None], synchronize: Callable[[], None]
            ) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation: `evaluate` validates and saves), after WARMUP_STEPS
    untimed steps. The step time is the median of TIMED_STEPS single steps: one step stalled by a neighbour's job
    or a late one-off initialisation would move a mean of so few by its whole length, and every step after it."""
    for _ in range(WARMUP_STEPS):
        train_step()
    times = []
    for _ in range(TIMED_STEPS):
        synchronize()
        tic = time.perf_counter()
        train_step()
        synchronize()
        times.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    evaluate()
    synchronize()
    return statistics.median(times), time.perf_counter() - tic


def make_plan(budget_s: float, spent_s: float, seconds_per_step: float, seconds_per_evaluation: float,
              eval_every_steps: int) -> BudgetPlan:
    steps = plan_steps(budget_s - spent_s, seconds_per_step, seconds_per_evaluation, eval_every_steps)
    if steps < 1:
        needed = spent_s + run_cost_s(1, seconds_per_step, seconds_per_evaluation, eval_every_steps)
        raise ConfigError(f"train.time_budget_s: {budget_s:g} s leaves no time to train ({spent_s:.1f} s went to "
                          f"loading and the speed probe, a step takes {seconds_per_step:.2f} s and a validation "
                          f"pass {seconds_per_evaluation:.1f} s); raise it above {math.ceil(needed)} s")
    return BudgetPlan(budget_s, spent_s, seconds_per_step, seconds_per_evaluation, eval_every_steps, steps)


def replan_step(plan: BudgetPlan) -> int | None:
    """The step at which the run re-plans its length, or None when the run is too short to measure one."""
    step = max(REPLAN_MIN_STEPS, REPLAN_SKIPPED_STEPS + 10, round(REPLAN_FRACTION * plan.total_steps))
    return step if step < plan.total_steps else None


def evaluations_between(start: int, end: int, eval_every_steps: int) -> int:
    """Evaluations a run makes after step `start` up to and including step `end`: one each `eval_every_steps`,
    and one at the end when it is not on that cadence."""
    if end <= start:
        return 0
    return end // eval_every_steps - start // eval_every_steps + (1 if end % eval_every_steps else 0)


def replan(plan: BudgetPlan, step: int, elapsed_s: float, seconds_per_step: float,
           seconds_per_evaluation: float) -> BudgetPlan:
    """The plan with `total_steps` re-planned at `step`, `elapsed_s` after the start of fit: the most steps whose
    cost at the measured rates fits in what is left of the budget (the run stops at `step` when none does)."""
    remaining = plan.budget_s - elapsed_s
    every = plan.eval_every_steps

    def cost(extra: int) -> float:
        return extra * seconds_per_step + evaluations_between(step, step + extra, every) * seconds_per_evaluation

    per_step = seconds_per_step + seconds_per_evaluation / every
    extra = max(int((remaining - seconds_per_evaluation) / per_step), 0)
    while extra > 0 and cost(extra) > remaining:
        extra -= 1
    while cost(extra + 1) <= remaining:
        extra += 1
    measured = {"at_step": step, "elapsed_s": elapsed_s, "seconds_per_step": seconds_per_step,
                "seconds_per_evaluation": seconds_per_evaluation, "planned_steps": plan.total_steps,
                "total_steps": step + extra}
    return BudgetPlan(plan.budget_s, plan.spent_s, plan.seconds_per_step, plan.seconds_per_evaluation, every,
                      step + extra, measured)
