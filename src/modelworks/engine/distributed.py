"""Data-parallel setup under torchrun: gloo on CPU, NCCL on CUDA; rank 0 alone writes files."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device_kind: str) -> None:
    """Join the process group that torchrun describes in the environment; a no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def local_device_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (each rank weighs equally: the training shards are equal by construction)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (used for stop requests so all ranks leave the loop together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's value on every rank (e.g. the run directory name, which holds rank 0's timestamp)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank (e.g. each rank's generated captions, which a metric
    such as CIDEr must score over the whole split at once). One process: [value]."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
