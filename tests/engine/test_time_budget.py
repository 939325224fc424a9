"""train.time_budget_s: the step count comes from a timed probe, the plan is the one the probe implies, the run
ends near the budget, and the probe leaves no trace on the run (same weights, same random stream)."""

from __future__ import annotations

import json
import time

import pytest

from helpers import build_tiny_cfg, tiny_detection_raw
from modelworks import config as config_mod
from modelworks.engine import budget
from modelworks.engine.loop import fit
from modelworks.errors import ConfigError
from modelworks.tasks.classification.task import ClassificationTask
from modelworks.tasks.detection.task import DetectionTask


def test_plan_fills_the_time_left_and_no_more():
    assert budget.run_cost_s(10, 0.5, 2.0, 4) == 10 * 0.5 + 3 * 2.0
    steps = budget.plan_steps(30.0, 0.5, 2.0, 4)
    assert budget.run_cost_s(steps, 0.5, 2.0, 4) <= 30.0 < budget.run_cost_s(steps + 1, 0.5, 2.0, 4)
    assert budget.plan_steps(1.0, 0.5, 2.0, 4) == 0
    with pytest.raises(ConfigError, match=r"train.time_budget_s: 3 s leaves no time to train \(2.5 s went to "
                                          r"loading and the speed probe.*raise it above 5 s"):
        budget.make_plan(3.0, 2.5, 0.5, 2.0, 4)


def tiny_cfg(kind: str, tmp_path, budget_s: float):
    if kind == "classification":
        return ClassificationTask, build_tiny_cfg(tmp_path, train__time_budget_s=budget_s, train__test_at_end=False)
    raw = tiny_detection_raw(tmp_path)
    raw["train"]["time_budget_s"] = budget_s
    return DetectionTask, config_mod.load_config(DetectionTask, raw)


@pytest.mark.parametrize("kind", ["classification", "detection"])
def test_a_budget_sets_the_steps_from_the_probe_and_the_run_ends_near_it(tmp_path, kind):
    budget_s = 5.0
    task_cls, cfg = tiny_cfg(kind, tmp_path, budget_s)
    run_dir = tmp_path / "run"
    tic = time.perf_counter()
    result = fit(task_cls(cfg), cfg, run_dir)
    wall_s = time.perf_counter() - tic
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = summary["time_budget"]
    # The step count is exactly what the probe's timings give for the time left after the probe.
    assert summary["total_steps"] == result.step == budget.plan_steps(
        plan["budget_s"] - plan["spent_s"], plan["seconds_per_step"], plan["seconds_per_evaluation"],
        plan["eval_every_steps"])
    assert result.step > 2 * cfg.train.epochs  # not train.epochs' count
    # Near the budget: a shared CI machine's speed drifts, so the band is wide, but a plan ignoring the
    # validation passes or the start-up would miss it.
    assert 0.5 * budget_s < wall_s < 1.5 * budget_s, (wall_s, plan)


def test_the_probe_leaves_no_trace_on_the_run(tmp_path, monkeypatch):
    """A budgeted run planned to a plain run's length trains the same weights: the probe's steps, optimizer and
    random draws are undone before the first real step."""
    import torch

    steps = 10
    plain = build_tiny_cfg(tmp_path, train__test_at_end=False, train__deterministic=True)
    plain.train.epochs = (steps - 0.5) / (461 // plain.train.batch_size)  # ceil(epochs * steps_per_epoch) = 10
    fit(ClassificationTask(plain), plain, tmp_path / "plain")
    budgeted = build_tiny_cfg(tmp_path, train__test_at_end=False, train__deterministic=True,
                              train__time_budget_s=1e6)
    monkeypatch.setattr(budget, "plan_steps", lambda *timings: steps)  # the plain run's length, whatever the probe
    fit(ClassificationTask(budgeted), budgeted, tmp_path / "budgeted")
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "budgeted" / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == steps
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
