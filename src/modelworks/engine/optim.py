"""Optimizers and learning-rate schedules from config. Norm and bias parameters get no weight decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices and conv kernels: decaying BN scales and biases hurts accuracy for no gain."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """OneCycle follows torch's OneCycleLR exactly (the seed's choice, momentum cycling included);
    cosine is linear warm-up then cosine decay to zero; constant keeps `lr` after warm-up."""
    total_steps = max(total_steps, 1)
    if cfg.schedule == "onecycle" and total_steps >= 3:
        # OneCycleLR divides by the length of each phase, so each needs at least one step: a tiny run (a smoke
        # test, a small data set with a big batch) would otherwise die with ZeroDivisionError.
        pct_start = min(max(cfg.warmup_fraction, 2 / total_steps), 1 - 1 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start,
            cycle_momentum=cfg.cycle_momentum)
    if cfg.schedule == "onecycle":  # 1-2 steps in all: no room for a cycle, keep the peak rate
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
