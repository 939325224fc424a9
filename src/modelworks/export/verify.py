"""Checking exported formats against eager PyTorch on the validation split, and timing runtimes.

`check_formats` streams: each validation batch goes through eager PyTorch and every runtime of every graph, is
scored, and is dropped, so memory holds one batch's outputs whatever the split's size. Graphs are checked in
their export order on each batch, and a graph's inputs may be built from the eager outputs of the ones before it
(a decode step from the cache its prefill made).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


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


@dataclass
class GraphCheck:
    """Running sums of one runtime on one graph."""

    max_abs_diff: float = 0.0
    count: int = 0
    error: str | None = None

    def __post_init__(self):
        self.sums: dict[str, float] = {}


def check_formats(task, graphs: dict, runners: dict[str, dict[str, Callable]], batches,
                  keep_inputs: bool = True) -> tuple[dict[str, dict], int, dict[str, dict[str, np.ndarray]]]:
    """Run every runtime's runners ({runtime: {graph: runner}}) against the eager graph modules (`graphs`, from
    `Task.export_graphs`) over the prepared validation `batches`, in one pass. Returns each runtime's check
    (max_abs_diff, agreement and the task's scores; keys prefixed `graph/` when there are several graphs), the
    number of samples checked, and the first batch's inputs per graph (for timing)."""
    sums = {runtime: {graph: GraphCheck() for graph in graphs} for runtime in runners}
    first_inputs: dict[str, dict[str, np.ndarray]] = {}
    samples = 0
    with torch.inference_mode():
        for batch in batches:
            previous: dict[str, tuple[torch.Tensor, ...]] = {}
            for name, graph in graphs.items():
                inputs = task.graph_batch_inputs(batch, name, previous)
                reference = tuple(o.float() for o in as_tuple(graph.module(*inputs)))
                previous[name] = reference
                arrays = {n: t.contiguous().numpy() for n, t in zip(graph.input_names, inputs)}
                if keep_inputs and name not in first_inputs:
                    first_inputs[name] = arrays
                for runtime, by_graph in runners.items():
                    check = sums[runtime][name]
                    if check.error:
                        continue
                    outputs = tuple(torch.from_numpy(np.asarray(o)).float() for o in by_graph[name](arrays))
                    for got, want in zip(outputs, reference):
                        if got.shape != want.shape:
                            check.error = f"{name}: output shape {tuple(got.shape)} != eager {tuple(want.shape)}"
                            break
                        check.max_abs_diff = max(check.max_abs_diff, (got - want).abs().max().item())
                    if check.error:
                        continue
                    scores = task.score_graph_outputs(name, outputs, reference, batch)
                    for key, value in scores.items():
                        check.sums[key] = check.sums.get(key, 0.0) + value.double().sum().item()
                    check.count += len(next(iter(scores.values())))
            samples += len(inputs[0])
    several = len(graphs) > 1
    results = {}
    for runtime, by_graph in sums.items():
        errors = [c.error for c in by_graph.values() if c.error]
        if errors:
            results[runtime] = {"max_abs_diff": float("inf"), "agreement": 0.0, "error": "; ".join(errors)}
            continue
        result = {"max_abs_diff": max(c.max_abs_diff for c in by_graph.values()),
                  "agreement": min(c.sums.get("agreement", 0.0) / max(c.count, 1) for c in by_graph.values())}
        for name, c in by_graph.items():
            for key, total in c.sums.items():
                if several:
                    result[f"{name}/{key}"] = total / max(c.count, 1)
                elif key != "agreement":
                    result[key] = total / max(c.count, 1)
        results[runtime] = result
    return results, samples, first_inputs
