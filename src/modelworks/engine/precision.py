"""Device and numeric precision: bf16 autocast where the hardware has it, fp16 with loss scaling otherwise."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import ConfigError


def resolve_device(name: str, local_index: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_index)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use auto or cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_index)
    return device


@dataclass
class Precision:
    """What the training step needs to know about numerics: an autocast dtype (or none) and loss scaling."""

    dtype: torch.dtype | None  # None: plain fp32
    device_type: str

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type if self.device_type == "cuda" else "cpu",
                                    enabled=self.needs_scaler)


def choose_precision(requested: str, device: torch.device) -> Precision:
    """`auto`: bf16 on CPU (AMX/AVX-512 make it several times faster than fp32) and on Ampere+ GPUs,
    fp16 with a gradient scaler on older GPUs, fp32 on MPS."""
    kind = device.type
    if requested == "auto":
        if kind == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif kind == "cpu":
            requested = "bf16"
        else:
            requested = "fp32"
    if requested == "fp32":
        return Precision(None, kind)
    if requested == "fp16" and kind == "cpu":
        raise ConfigError("train.precision: fp16 autocast is not supported on CPU; use bf16 or fp32")
    return Precision(torch.bfloat16 if requested == "bf16" else torch.float16, kind)
