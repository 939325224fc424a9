"""The contract between a task and the rest of modelworks (engine, export, serving).

The engine never branches on a task: everything task-specific (data, model, loss, metrics, the exported graph)
comes through the methods below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to backpropagate (mean over the micro-batch)
    logs: dict[str, torch.Tensor]  # detached named scalars, e.g. a detector's box/obj/cls parts
    n: int  # samples in the micro-batch, for correctly weighted averages


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset | None = None
    collate_fn: Callable | None = None  # for data sets served through a DataLoader


class Task:
    """Subclass once per project; override what the project needs."""

    name: ClassVar[str]
    monitor: ClassVar[tuple[str, str]]  # ("val/acc1", "max"): best checkpoint and early stopping
    ModelConfig: ClassVar[type]
    DataConfig: ClassVar[type]
    uses_channels_last: ClassVar[bool] = False  # conv nets run faster in NHWC on CPU (oneDNN) and GPU

    def __init__(self, cfg):
        self.cfg = cfg

    def datasets(self, device: torch.device) -> Splits:
        """Train/val/test splits; in-memory sets may live on `device` and offer `get_batch(indices)`."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def prepare_batch(self, batch: Any, augment: torch.Generator | None) -> Any:
        """Turn a raw device batch into model inputs; augment it when a generator is given (training)."""
        return batch

    def step(self, model: nn.Module, batch: Any) -> StepOutput:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Any], report_dir: Path | None = None) -> dict[str, float]:
        """Metrics over prepared batches, keys without the split prefix (the engine adds `val/` or `test/`).
        With `report_dir`, also write the task's plots there. Must be correct under DDP (each rank sees a shard)."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> str:
        """One line for the start of a run: model name and size."""
        params = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__}: {params / 1e6:.2f}M parameters"

    def export_module(self, model: nn.Module) -> nn.Module:
        """A tensor-in, tensor-out module for TorchScript/ONNX; loops such as NMS or sampling stay outside."""
        return model

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Overrides for a seconds-scale run on data generated into `folder` in the real format (contract tests)."""
        raise NotImplementedError
