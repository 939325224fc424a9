"""Checking an exported format against eager PyTorch on the validation split, and timing runtimes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass
class Reference:
    """One validation batch: the graph's inputs as numpy, eager PyTorch's outputs, and the prepared batch (the
    task's scores read its targets)."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[torch.Tensor, ...]
    batch: object


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def reference_batches(task, module, batches, input_names: list[str]) -> list[Reference]:
    references = []
    with torch.inference_mode():
        for batch in batches:
            inputs = task.graph_inputs(batch)
            outputs = tuple(o.float() for o in as_tuple(module(*inputs)))
            arrays = {name: t.contiguous().numpy() for name, t in zip(input_names, inputs)}
            references.append(Reference(arrays, outputs, batch))
    return references


def check_runner(task, runner: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]],
                 references: list[Reference]) -> dict[str, float]:
    """max_abs_diff over every output element, and the task's per-sample scores averaged over the split."""
    max_diff, sums, count = 0.0, {}, 0
    for ref in references:
        outputs = tuple(torch.from_numpy(np.asarray(o)).float() for o in runner(ref.inputs))
        for got, want in zip(outputs, ref.outputs):
            if got.shape != want.shape:
                return {"max_abs_diff": float("inf"), "agreement": 0.0, "error": f"output shape {tuple(got.shape)} "
                        f"!= eager {tuple(want.shape)}"}
            max_diff = max(max_diff, (got - want).abs().max().item())
        scores = task.score_outputs(outputs, ref.outputs, ref.batch)
        for key, value in scores.items():
            sums[key] = sums.get(key, 0.0) + value.double().sum().item()
        count += len(next(iter(scores.values())))
    return {"max_abs_diff": max_diff, **{key: total / count for key, total in sums.items()}}


def median_seconds(runner, inputs: dict[str, np.ndarray], repeats: int) -> float:
    runner(inputs)  # warm-up: first runs allocate and pick kernels
    runner(inputs)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        runner(inputs)
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def slice_batch(inputs: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The first `size` samples, tiled when the batch is smaller."""
    out = {}
    for name, array in inputs.items():
        reps = -(-size // len(array))
        out[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:size])
    return out
