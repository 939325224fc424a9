"""Which samples form each batch, and how they reach the device.

Batch composition is a pure function of (seed, epoch, batch position), so a resumed run rebuilds exactly the
batches the interrupted one would have seen, and every rank takes its own slice of the same global batch:
2 ranks x 64 see the same 128 samples as 1 process x 128. Data sets held in memory on the device expose
`get_batch(indices)` and skip the DataLoader entirely; the rest go through a DataLoader with workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def train_indices(n: int, batch_size: int, seed: int, epoch: int, start: int, rank: int, world: int
                  ) -> Iterator[torch.Tensor]:
    """This rank's share of each full global batch of an epoch, from batch number `start` on (last partial
    batch dropped so every step has the same global batch size)."""
    perm = epoch_permutation(n, seed, epoch)
    per_rank = batch_size // world
    for b in range(start, n // batch_size):
        global_batch = perm[b * batch_size:(b + 1) * batch_size]
        yield global_batch[rank * per_rank:(rank + 1) * per_rank]


def eval_indices(n: int, batch_size: int, rank: int, world: int) -> Iterator[torch.Tensor]:
    """This rank's strided shard of the split, in order; no padding, so no sample counts twice."""
    mine = torch.arange(rank, n, world)
    yield from mine.split(batch_size)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Cut every tensor of a batch along dim 0 into `parts` micro-batches (gradient accumulation)."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, (list, tuple)):
        columns = [split_batch(b, parts) for b in batch]
        return [type(batch)(col[i] for col in columns) for i in range(parts)]
    if isinstance(batch, dict):
        columns = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in columns.items()} for i in range(parts)]
    raise TypeError(f"cannot split a batch element of type {type(batch).__name__}")


def fetch(dataset: Dataset, indices: Iterator[torch.Tensor], device: torch.device, num_workers: int = 0,
          collate_fn: Callable | None = None) -> Iterator[Any]:
    """Yield device batches for the given index batches."""
    if hasattr(dataset, "get_batch"):
        for idx in indices:
            yield dataset.get_batch(idx)
        return
    loader = DataLoader(dataset, batch_sampler=[idx.tolist() for idx in indices], num_workers=num_workers,
                        collate_fn=collate_fn, pin_memory=device.type == "cuda")
    for batch in loader:
        yield to_device(batch, device)


def augment_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The random stream for one training step's augmentation: derived, so nothing needs saving to resume."""
    return torch.Generator(device=device).manual_seed((seed * 7_919 + step) * 131 + rank)
