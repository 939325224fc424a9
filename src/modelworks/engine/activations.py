"""Activation statistics (`--set train.debug.activations=true`): what each layer outputs, in TensorBoard.

On one training step in `train.debug.every_steps`, forward hooks record each layer's output mean, standard
deviation and fraction of exact zeros (a ReLU's dead units; a layer whose fraction creeps towards 1 has stopped
learning); at each evaluation, a histogram of each layer's output on the first validation batch. Hooks exist
only during a sampled step or an evaluation, so the other steps run at full speed, and the statistics stay on
the device until the step is over, so a sampled step costs a few reductions per layer and one host sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .log import Logger

HISTOGRAM_VALUES = 100_000  # larger outputs: a histogram of this many values drawn at random (as faithful, and
# no large copy to the host)


def watched_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules (convolutions, norms, activations, linear layers), by their names in the model."""
    return [(name, module) for name, module in model.named_modules()
            if name and not any(True for _ in module.children()) and not isinstance(module, nn.Identity)]


def first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


@contextlib.contextmanager
def first_outputs(model: nn.Module, record) -> Iterator[None]:
    """Call `record(name, output)` with each leaf layer's first floating-point output while the block runs (later
    calls, e.g. further micro-batches or validation batches, are skipped); the hooks are removed on exit."""
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(module, inputs, output):
            tensor = first_tensor(output)
            if name in seen or tensor is None or not tensor.is_floating_point():
                return
            seen.add(name)
            with torch.no_grad():
                record(name, tensor.detach())
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in watched_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def summarise(output: torch.Tensor) -> torch.Tensor:
    """[mean, std, fraction of exact zeros] of one layer's output, on its device."""
    values = output.float()
    std, mean = torch.std_mean(values) if values.numel() > 1 else (values.new_zeros(()), values.mean())
    zeros = 1 - torch.count_nonzero(output).float() / output.numel()  # counted in place: no mask the size of it
    return torch.stack([mean, std, zeros])


class ActivationMonitor:
    """Samples layer outputs into the run's TensorBoard; does nothing when switched off (the default)."""

    def __init__(self, model: nn.Module, log: Logger, enabled: bool, every_steps: int):
        self.model = model
        self.log = log
        self.enabled = enabled and log.enabled
        self.every_steps = every_steps

    def watch_training(self, step: int):
        """Around training step number `step` (1-based): its statistics, when the step is a sampled one."""
        if not self.enabled or step % self.every_steps:
            return contextlib.nullcontext()
        return self._statistics(step)

    @contextlib.contextmanager
    def _statistics(self, step: int) -> Iterator[None]:
        stats: dict[str, torch.Tensor] = {}
        with first_outputs(self.model, lambda name, output: stats.__setitem__(name, summarise(output))):
            yield
        if not stats:
            return
        table = torch.stack(list(stats.values())).cpu().tolist()  # one sync for every layer
        values = {}
        for name, (mean, std, zeros) in zip(stats, table):
            values[f"activation_mean/{name}"] = mean
            values[f"activation_std/{name}"] = std
            values[f"activation_zeros/{name}"] = zeros
        self.log.tensorboard_scalars(step, values)

    def watch_evaluation(self, model: nn.Module, step: int):
        """Around an evaluation of `model` (the live model, or its EMA): histograms of its first batch."""
        if not self.enabled:
            return contextlib.nullcontext()
        generator = torch.Generator().manual_seed(step)

        def record(name: str, output: torch.Tensor) -> None:
            values = output.float().flatten()
            if values.numel() > HISTOGRAM_VALUES:
                pick = torch.randint(values.numel(), (HISTOGRAM_VALUES,), generator=generator).to(values.device)
                values = values[pick]
            self.log.histogram(step, f"activations/{name}", values.cpu())

        return first_outputs(model, record)
