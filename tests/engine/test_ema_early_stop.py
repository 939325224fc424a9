"""Small engine parts: the early-stopping rule, the weight average, the schedules, and batch composition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelworks.config import OptimConfig
from modelworks.engine.batches import eval_indices, split_batch, train_indices
from modelworks.engine.early_stop import EarlyStopper
from modelworks.engine.ema import EMA
from modelworks.engine.optim import build_optimizer, build_schedule, parameter_groups

# ---------------------------------------------------------------------------------------------- early stopping


def test_max_mode_counts_evaluations_without_improvement():
    stopper = EarlyStopper("max", patience=2, min_delta=0.01)
    assert [stopper.improved(v) for v in (0.5, 0.505, 0.52, 0.52, 0.521)] == [True, False, True, False, False]
    assert stopper.should_stop and stopper.best == 0.52


def test_min_mode_and_reset_on_improvement():
    stopper = EarlyStopper("min", patience=2, min_delta=0.0)
    assert [stopper.improved(v) for v in (1.0, 1.2, 0.9, 0.95)] == [True, False, True, False]
    assert not stopper.should_stop and stopper.bad_evals == 1


def test_zero_patience_never_stops():
    stopper = EarlyStopper("max", patience=0, min_delta=0.0)
    for _ in range(10):
        stopper.improved(0.0)
    assert not stopper.should_stop


def test_state_round_trip():
    stopper = EarlyStopper("min", patience=3, min_delta=0.0)
    stopper.improved(2.0)
    stopper.improved(3.0)
    again = EarlyStopper("min", patience=3, min_delta=0.0)
    again.load_state_dict(stopper.state_dict())
    assert (again.best, again.bad_evals) == (2.0, 1)
    fresh = EarlyStopper("max", 1, 0.0)
    fresh.load_state_dict(EarlyStopper("max", 1, 0.0).state_dict())
    assert fresh.best == -math.inf


# ---------------------------------------------------------------------------------------------- EMA


def model_with(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_ema_averages_parameters_and_statistics_and_copies_counters():
    model = model_with(0.0)
    ema = EMA(model, decay=0.5, warmup_steps=0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model[1].running_mean.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert all(torch.allclose(p, torch.full_like(p, 0.5)) for p in ema.module.parameters())
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 1.5))  # 0 halfway to 3
    assert ema.module[1].num_batches_tracked.item() == 7
    ema.update(model)
    assert all(torch.allclose(p, torch.full_like(p, 0.75)) for p in ema.module.parameters())
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_round_trip():
    model = model_with(1.0)
    ema = EMA(model, decay=0.9, warmup_steps=0)
    ema.update(model_with(2.0))
    other = EMA(model_with(0.0), decay=0.9, warmup_steps=0)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.module.state_dict().values(),
                                                 ema.module.state_dict().values()))


def ema_after(warmup_steps: int, updates: int) -> float:
    ema = EMA(model_with(0.0), decay=0.999, warmup_steps=warmup_steps)
    target = model_with(1.0)
    for _ in range(updates):
        ema.update(target)
    return next(ema.module.parameters()).flatten()[0].item()


def test_ema_warmup_length_is_respected():
    assert ema_after(warmup_steps=10, updates=20) != pytest.approx(ema_after(warmup_steps=1000, updates=20))


# ---------------------------------------------------------------------------------------------- optimizer


def test_norm_and_bias_parameters_get_no_weight_decay():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_peak_at_lr_and_survive_every_step(schedule):
    cfg = OptimConfig(lr=0.1, schedule=schedule, warmup_fraction=0.2)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_schedule(optimizer, cfg, total_steps=50)
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(0.1, rel=1e-3)
    assert lrs[0] < 0.1  # warm-up
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(0.1)
    else:
        assert lrs[-1] < 0.01  # annealed


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 10])
@pytest.mark.parametrize("warmup_fraction", [0.0, 0.2, 0.3])
def test_onecycle_survives_runs_of_a_few_steps(total_steps, warmup_fraction):
    # torch's OneCycleLR divides by each phase's length: 5 steps with 20% warm-up used to raise ZeroDivisionError
    cfg = OptimConfig(lr=0.1, schedule="onecycle", warmup_fraction=warmup_fraction)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_schedule(optimizer, cfg, total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(0 < lr <= 0.1 + 1e-9 for lr in lrs)
    if total_steps >= 3:
        assert max(lrs) == pytest.approx(0.1, rel=1e-3)


# ---------------------------------------------------------------------------------------------- batches


def test_two_ranks_split_exactly_the_global_batch_of_one():
    one = list(train_indices(100, 32, seed=3, epoch=1, start=0, rank=0, world=1))
    r0 = list(train_indices(100, 32, seed=3, epoch=1, start=0, rank=0, world=2))
    r1 = list(train_indices(100, 32, seed=3, epoch=1, start=0, rank=1, world=2))
    assert len(one) == 3  # the last partial batch is dropped
    for whole, a, b in zip(one, r0, r1):
        assert torch.equal(torch.cat([a, b]), whole)


def test_train_indices_resume_mid_epoch_and_differ_between_epochs():
    full = list(train_indices(100, 10, seed=0, epoch=0, start=0, rank=0, world=1))
    assert [b.tolist() for b in train_indices(100, 10, 0, 0, 4, 0, 1)] == [b.tolist() for b in full[4:]]
    other = list(train_indices(100, 10, seed=0, epoch=1, start=0, rank=0, world=1))
    assert not torch.equal(torch.cat(full), torch.cat(other))
    assert sorted(torch.cat(full).tolist()) == list(range(100))


def test_eval_indices_cover_every_sample_once_across_ranks():
    shards = [torch.cat(list(eval_indices(103, 10, rank, 3))) for rank in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(103))


def test_split_batch_cuts_nested_batches():
    batch = (torch.arange(8), {"y": torch.arange(8) * 2})
    parts = split_batch(batch, 4)
    assert len(parts) == 4
    assert parts[1][0].tolist() == [2, 3] and parts[1][1]["y"].tolist() == [4, 6]
    with pytest.raises(TypeError, match="cannot split a batch element of type str"):
        split_batch(("text", torch.arange(4)), 2)


@pytest.mark.parametrize("steps", [100, 1000])
def test_power_ema_averages_the_same_share_of_any_run_length(steps):
    """Weights that rise linearly (theta_t = t): the power-function EMA's average is the mean of t weighted by
    t^power, t (power + 1) / (power + 2), a fixed fraction of the run whatever its length; the first update copies
    the weights (no trace of the initial ones)."""
    power = 6.94
    model = nn.Linear(1, 1)
    ema = EMA(model, decay=0.999, warmup_steps=100, power=power)  # decay and warm-up are not used
    for t in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(float(t))
        ema.update(model)
        if t == 1:
            assert ema.module.weight.item() == 1.0
    assert ema.module.weight.item() / steps == pytest.approx((power + 1) / (power + 2), rel=0.01)
