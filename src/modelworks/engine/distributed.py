"""Data-parallel setup under torchrun: gloo on CPU, NCCL on CUDA; rank 0 alone writes files.

Two strategies (train.distributed.strategy): `ddp` (DistributedDataParallel: a whole model per rank, gradients
all-reduced) and `fsdp2` (torch.distributed.fsdp.fully_shard: each rank holds a shard of every parameter, its
gradient and its optimizer state; parameters are gathered per block for its forward and backward). The loop reads
and writes whole (unsharded) state through the helpers below, so checkpoints look the same under both.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


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


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first, the other ranks after it: what the body downloads, generates or caches (data
    sets, tokenizers, token files) is written once, whole, and then read by every other rank, not written by all
    ranks at once. One process: just the body."""
    if not dist.is_initialized():
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's value on every rank (e.g. the run directory name, which holds rank 0's timestamp)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap_for_training(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module the training step calls. ddp: a DistributedDataParallel wrapper around `model`. fsdp2: `model`
    itself, sharded in place: each of its `shard_units()` (an optional model hook: its transformer blocks) is a
    unit of its own, so only one block's parameters are gathered at a time, then the rest as one root unit."""
    if world_size() == 1:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for unit in getattr(model, "shard_units", lambda: [])():
            fully_shard(unit)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(train_model: nn.Module, enabled: bool):
    """A context in which backward passes all-reduce (or, sharded, reduce-scatter) gradients only when `enabled`:
    accumulation syncs on its last micro-batch alone."""
    if enabled or world_size() == 1:
        return contextlib.nullcontext()
    if is_sharded(train_model):
        return _sharded_sync_off(train_model)
    return train_model.no_sync()


@contextlib.contextmanager
def _sharded_sync_off(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full_options(every_rank: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload: rank 0 alone receives the gathered tensors (on the CPU), which is what a checkpoint needs
    return StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)


def full_model_state(model: nn.Module, every_rank: bool = False) -> dict:
    """The whole model's state dict. Sharded, a collective every rank must call: rank 0 gets it (every rank
    with `every_rank`), the others an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(every_rank))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state dict (sharded: a collective, rank 0 gets it; its per-parameter state is then
    keyed by parameter name, as torch.distributed.checkpoint writes it, so it resumes under fsdp2)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(False))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load whole state dicts (a checkpoint every rank has read) into a sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective: every rank calls it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank (e.g. each rank's generated captions, which a metric
    such as CIDEr must score over the whole split at once). One process: [value]."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
