"""Runtimes that execute an exported graph, behind one call: named numpy inputs -> numpy outputs.

eager (PyTorch, the model rebuilt from its config and safetensors weights), TorchScript, ONNX Runtime (fp32)
and ONNX Runtime (int8). A predictor drives any of them the same way, so serving and batch inference have one
code path whatever the runtime.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import PackageError
from .package import Package

RUNTIMES = ("eager", "torchscript", "onnx", "int8")


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise PackageError("onnxruntime is not installed; `pip install 'modelworks[export]'` (or pick "
                           "--runtime eager/torchscript)") from None
    return onnxruntime


class OnnxRunner:
    """An ONNX Runtime session on the CPU."""

    def __init__(self, path: Path, threads: int | None = None):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads otherwise spin for a while after each run; on a small machine that busy-wait
        # takes the CPU from the HTTP server between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        return self.session.run(None, inputs)


class TorchRunner:
    """An nn.Module (eager) or a TorchScript module, called with the inputs in the graph's argument order."""

    def __init__(self, module: nn.Module, input_names: list[str]):
        self.module = module.eval()
        self.input_names = input_names

    def __call__(self, inputs: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        with torch.inference_mode():
            out = self.module(*[torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names])
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().float().numpy() if o.is_floating_point() else o.numpy() for o in outputs]


def open_runner(package: Package, runtime: str, input_names: list[str],
                build_eager: Callable[[], nn.Module], threads: int | None = None):
    """The runner of one runtime of a verified package. `build_eager` rebuilds the graph module in PyTorch (the
    caller knows the task; this layer does not)."""
    path = package.file_for(runtime)
    if threads:
        torch.set_num_threads(threads)
    if runtime in ("onnx", "int8"):
        return OnnxRunner(path, threads)
    if runtime == "torchscript":
        try:
            module = load_torchscript(path)
        except RuntimeError as exc:
            raise PackageError(f"{path}: cannot be loaded as TorchScript ({str(exc).splitlines()[0][:200]})") from None
        return TorchRunner(module, input_names)
    return TorchRunner(build_eager(), input_names)


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice, once per load
        return torch.jit.load(str(path), map_location="cpu")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise PackageError(f"{path}: cannot be read as safetensors ({exc})") from None


@dataclass
class InferenceModel:
    """A verified package ready to answer: its predictor (task-specific) and a runner (runtime-specific)."""

    package: Package
    predictor: Any  # tasks.base.Predictor; typed loosely because this layer must not import the tasks
    runner: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]
    runtime: str

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> str:
        return self.package.version

    def predict(self, items: list) -> list:
        return self.predictor.predict(items, self.runner)
