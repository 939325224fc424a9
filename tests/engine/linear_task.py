"""A tiny real task for engine tests: linear regression on generated data.

It has no BatchNorm, so a data-parallel run must match one process on the same global batch, and it can inject
a fault into `step()` (a NaN loss, or a finite loss with NaN gradients) at a chosen step to exercise the guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from modelworks.config import RunConfig, load_config
from modelworks.tasks.base import Splits, StepOutput, Task


@dataclass
class LinearModelConfig:
    features: int = 8


@dataclass
class LinearDataConfig:
    n_train: int = 256
    n_val: int = 64
    seed: int = 0
    fault: Literal["none", "nan_loss", "nan_grad"] = "none"
    fault_at_step: int = 0  # step() call (1-based) from which the fault appears


class TensorSplit(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device):
        self.x, self.y = x.to(device), y.to(device)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def get_batch(self, indices: torch.Tensor):
        return self.x[indices], self.y[indices]


class LinearTask(Task):
    name = "linear"
    monitor = ("val/loss", "min")
    ModelConfig = LinearModelConfig
    DataConfig = LinearDataConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0
        self.seen_targets: list[torch.Tensor] = []  # every training batch's targets, in order (shard checks)

    def datasets(self, device: torch.device) -> Splits:
        d, features = self.cfg.data, self.cfg.model.features
        g = torch.Generator().manual_seed(d.seed)
        n = d.n_train + d.n_val
        x = torch.randn(n, features, generator=g)
        y = x @ torch.randn(features, generator=g) + 0.1 * torch.randn(n, generator=g)
        return Splits(TensorSplit(x[:d.n_train], y[:d.n_train], device), TensorSplit(x[d.n_train:], y[d.n_train:], device))

    def build_model(self) -> nn.Module:
        return nn.Linear(self.cfg.model.features, 1)

    def step(self, model: nn.Module, batch) -> StepOutput:
        self.calls += 1
        x, y = batch
        self.seen_targets.append(y.detach().cpu())
        loss = F.mse_loss(model(x).squeeze(-1), y)
        d = self.cfg.data
        if d.fault != "none" and self.calls >= d.fault_at_step:
            if d.fault == "nan_loss":
                loss = loss * float("nan")
            else:  # sqrt'(0) is infinite and 0 * inf is NaN: the loss stays finite, every gradient is NaN
                loss = loss + torch.sqrt(next(model.parameters()).sum() * 0.0)
        return StepOutput(loss, {}, len(y))

    def evaluate(self, model: nn.Module, batches, report_dir: Path | None = None) -> dict[str, float]:
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in batches:
            total += torch.stack([((model(x).squeeze(-1) - y) ** 2).sum().double(), torch.tensor(len(y)).double()])
        if dist.is_initialized():
            dist.all_reduce(total)
        return {"loss": (total[0] / total[1]).item()}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, self.cfg.model.features),)

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        return {"train": {"epochs": 2, "batch_size": 32}}


def linear_cfg(output_dir: Path, **sections) -> RunConfig:
    """fp32, deterministic, constant learning rate; `sections` update the raw sections (e.g. data={...})."""
    raw = {
        "task": "linear", "name": "linear", "output_dir": str(output_dir),
        "optim": {"name": "adamw", "lr": 0.05, "schedule": "constant", "warmup_fraction": 0.0},
        "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "device": "cpu", "precision": "fp32",
                  "deterministic": True, "log_every_steps": 100, "test_at_end": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return load_config(LinearTask, raw)
