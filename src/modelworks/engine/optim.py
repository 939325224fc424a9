"""Optimizers and learning-rate schedules from config. Norm, bias and embedding parameters get no weight decay.

`optim.name=muon` pairs torch.optim.Muon (orthogonalised momentum, for 2-D hidden weight matrices) with AdamW
for everything else, as the nanoGPT speed-run records do; both sit behind one optimizer object so the engine's
schedule, checkpoint and clipping treat it like any other."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def embedding_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of embedding tables (a lookup, not a matrix product: no decay, no Muon). A weight
    shared with an output layer (tied embeddings) counts as an embedding."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices and conv kernels: decaying BN scales, biases and embeddings hurts accuracy
    for no gain."""
    decay, no_decay = [], []
    embeddings = embedding_parameters(model)
    for p in unique_parameters(model):
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # parameters() yields a shared tensor once


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one; `param_groups` is theirs, concatenated, so a scheduler sets each
    group's rate relative to its own initial rate."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        # Optimizer.__init__ would build groups of its own; the hooks it sets up are what schedulers use.
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict):
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "muon":
        return build_muon(model, cfg)
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def build_muon(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Muon for the 2-D weights of hidden layers, AdamW for embeddings, norms, biases and what the model names in
    an optional `no_muon_parameters()` (a language model's output layer, which meets the vocabulary)."""
    embeddings = embedding_parameters(model)
    excluded = {id(p) for p in getattr(model, "no_muon_parameters", lambda: [])()}
    params = unique_parameters(model)
    hidden = [p for p in params if p.ndim == 2 and id(p) not in embeddings and id(p) not in excluded]
    rest = [p for p in params if not any(p is q for q in hidden)]
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True)
    decay = [p for p in rest if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in rest if not any(p is q for q in decay)]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.momentum, cfg.beta2))
    return CombinedOptimizer([muon, adamw])


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
