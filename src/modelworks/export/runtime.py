"""Runtimes that execute an exported graph, behind one call: named numpy inputs -> numpy outputs.

eager (PyTorch, the model rebuilt from its config and safetensors weights), TorchScript, ONNX Runtime (fp32)
and ONNX Runtime (int8). A predictor drives any of them the same way, so serving and batch inference have one
code path whatever the runtime.
"""

from __future__ import annotations

import threading
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
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.local = threading.local()

    def __call__(self, inputs: dict[str, np.ndarray],
                 out: Sequence[np.ndarray | None] | None = None) -> Sequence[np.ndarray]:
        """The graph's outputs. `out`: arrays to write outputs into, by position (None: a new array), bound by
        address through an IOBinding, so nothing is copied; an operator that updates a buffer in place when its
        output shares the input's memory (GroupQueryAttention's cache) then writes only what changed.

        The binding is kept between calls (one per thread) and an array is bound again only when its address, shape
        or type changed: a decode step's cache stays where it is, and binding it anew costs more than the step's
        arithmetic on a small model."""
        if out is None:
            return self.session.run(None, inputs)
        out = [*out, *[None] * (len(self.output_names) - len(out))]
        binding, bound = self.binding()
        for name, array in inputs.items():
            self.bind(binding.bind_input, bound, name, array)
        for name, target in zip(self.output_names, out):
            if target is None:
                # ORT allocates it; bound by name at every call, or the last call's output (still held by the
                # binding) would be taken as a preallocated buffer of the last call's shape
                binding.bind_output(name)
                bound.pop(name, None)
            else:
                self.bind(binding.bind_output, bound, name, target)
        self.session.run_with_iobinding(binding)
        if all(target is not None for target in out):
            return out
        values = binding.get_outputs()  # in binding order: the graph's
        return [value.numpy() if target is None else target for value, target in zip(values, out)]

    @staticmethod
    def bind(bind, bound: dict, name: str, array: np.ndarray) -> None:
        """Bind `array` to `name` by address unless the same array, or one at the same address with the same shape
        and type, is bound already. `bound` holds each bound array, so its memory cannot be reused meanwhile."""
        entry = bound.get(name)
        if entry is not None and entry[0] is array and entry[1][1] == array.shape:
            return
        key = (contiguous(array, name), array.shape, array.dtype)
        if entry is None or entry[1] != key:
            bind(name, "cpu", 0, array.dtype.type, list(array.shape), key[0])
        bound[name] = (array, key)

    def binding(self):
        """This thread's IOBinding and what is bound to it ({name: (array, (address, shape, dtype))})."""
        local = self.local
        if not hasattr(local, "binding"):
            local.binding, local.bound = self.session.io_binding(), {}
        return local.binding, local.bound


def contiguous(array: np.ndarray, name: str) -> int:
    """The address of an array bound to a graph by address (it must be one C-ordered block)."""
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: an array bound by address must be C-contiguous")
    return array.ctypes.data


class TorchRunner:
    """An nn.Module (eager) or a TorchScript module, called with the inputs in the graph's argument order."""

    def __init__(self, module: nn.Module, input_names: list[str]):
        self.module = module.eval()
        self.input_names = input_names

    def __call__(self, inputs: dict[str, np.ndarray],
                 out: Sequence[np.ndarray | None] | None = None) -> Sequence[np.ndarray]:
        """The module's outputs; `out` as OnnxRunner's (here each given output is copied into its array)."""
        with torch.inference_mode():
            result = self.module(*[torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names])
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        arrays = [o.detach().float().numpy() if o.is_floating_point() else o.numpy() for o in outputs]
        for i, target in enumerate(out or []):
            if target is not None:
                np.copyto(target, arrays[i])
                arrays[i] = target
        return arrays


class GraphSet:
    """The runners of a package's graphs behind one callable: `run(inputs)` calls the first (for a single-graph
    package, its only) graph, `run(inputs, graph="decode")` a named one."""

    def __init__(self, runners: dict[str, Callable]):
        self.runners = runners
        self.default = next(iter(runners))

    def __call__(self, inputs: dict[str, np.ndarray], graph: str | None = None,
                 out: Sequence[np.ndarray | None] | None = None) -> Sequence[np.ndarray]:
        """`out`: arrays the outputs are written into, by position (see OnnxRunner)."""
        try:
            runner = self.runners[graph or self.default]
        except KeyError:
            raise PackageError(f"graph {graph!r}: not in this package; it has {', '.join(self.runners)}") from None
        return runner(inputs) if out is None else runner(inputs, out=out)


def open_runner(package: Package, runtime: str, input_names: list[str] | Callable[[str], list[str]],
                build_eager: Callable[[], nn.Module | dict[str, nn.Module]], threads: int | None = None) -> GraphSet:
    """The runners of one runtime of a verified package, one per graph. `build_eager` rebuilds the graph
    modules in PyTorch (the caller knows the task; this layer does not): one module, or a dict by graph name.
    `input_names`: the graph's input names, or a function of the graph's name giving them."""
    names_of = input_names if callable(input_names) else (lambda graph: input_names)
    if threads:
        torch.set_num_threads(threads)
    eager = build_eager() if runtime == "eager" else None
    runners = {}
    for graph in package.graphs:
        if runtime == "eager":
            module = eager[graph] if isinstance(eager, dict) else eager
            runners[graph] = TorchRunner(module, names_of(graph))
            continue
        path = package.file_for(runtime, graph)
        if runtime in ("onnx", "int8"):
            runners[graph] = OnnxRunner(path, threads)
            continue
        try:
            module = load_torchscript(path)
        except RuntimeError as exc:
            raise PackageError(f"{path}: cannot be loaded as TorchScript ({str(exc).splitlines()[0][:200]})") from None
        runners[graph] = TorchRunner(module, names_of(graph))
    return GraphSet(runners)


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice, once per load
        return torch.jit.load(str(path), map_location="cpu")


def load_weights_into(model: nn.Module, path: Path) -> nn.Module:
    """Load a package's safetensors weights into `model`, strictly. Tied parameters (a language model's input and
    output embeddings) are stored once by `save_model`; safetensors' `load_model` knows which names share a
    tensor, where a plain strict `load_state_dict` would report the dropped name as missing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise PackageError(f"{path}: cannot be read as safetensors ({exc})") from None
    except RuntimeError as exc:  # a shape mismatch
        raise PackageError(f"{path}: the weights do not fit the model ({str(exc).splitlines()[0][:300]})") from None
    if missing or unexpected:
        raise PackageError(f"{path}: the weights do not rebuild the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}); export the run again")
    return model


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
    runner: Callable[..., Sequence[np.ndarray]]  # GraphSet: run(inputs, graph=None)
    runtime: str

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> str:
        return self.package.version

    def predict(self, items: list) -> list:
        return self.predictor.predict(items, self.runner)
