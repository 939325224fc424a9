"""Writing the exported graph as TorchScript (traced) and ONNX (dynamic batch axis)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import PackageError


def batch_of_two(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """torch.export specialises a dimension of size 1 to a constant, so the batch axis can only be marked
    dynamic when the example's batch is at least 2."""
    return tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in example)


def write_torchscript(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript's deprecation notice, and only it: the format is what packages ship for the
        # PyTorch runtime, and a TracerWarning (a Python value frozen into the graph) must still be seen.
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace(_method)?` is deprecated", FutureWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))


def dynamic_shapes_for(example: tuple[torch.Tensor, ...], input_names: list[str],
                       dynamic_axes: dict[str, dict[int, str]] | None) -> tuple[dict, ...]:
    """torch.export's dynamic shapes from named axes: inputs that share an axis name share one dimension; a name
    `cache+1` is that dimension plus one (a mask over the cache and the new token)."""
    if not dynamic_axes:
        batch = torch.export.Dim("batch")
        return tuple({0: batch} for _ in example)
    dims: dict[str, object] = {}

    def dim(name: str):
        base, _, offset = name.partition("+")
        if base not in dims:
            dims[base] = torch.export.Dim(base)
        return dims[base] + int(offset) if offset else dims[base]

    return tuple({axis: dim(name) for axis, name in dynamic_axes.get(input_name, {}).items()} or None
                 for input_name in input_names)


def grouped_like_signature(module: nn.Module, shapes: tuple) -> tuple:
    """torch.export groups the inputs of a `forward(a, b, *rest)` as (a, b, rest): so must the shapes be (a graph
    with one input per layer, e.g. a decoder's per-layer caches, takes them as *rest)."""
    parameters = list(inspect.signature(module.forward).parameters.values())
    for at, parameter in enumerate(parameters):
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return (*shapes[:at], tuple(shapes[at:]))
    return shapes


def write_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
               output_names: list[str], dynamic_axes: dict[str, dict[int, str]] | None = None,
               opset: int | None = None) -> None:
    """The graph through torch.export (the current exporter; it needs onnxscript). Without `dynamic_axes`, every
    input's first axis is dynamic so one file serves any batch size; with them, the named axes are. `opset`:
    the ONNX opset (None: the exporter's default)."""
    try:
        import onnxscript  # noqa: F401  the exporter's dependency: fail with the install hint, not deep inside
    except ImportError:
        raise PackageError("ONNX export needs onnx and onnxscript; `pip install 'modelworks[export]'`") from None
    dynamic_shapes = grouped_like_signature(module, dynamic_shapes_for(example, input_names, dynamic_axes))
    if not dynamic_axes:
        example = batch_of_two(example)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), input_names=input_names,
                              output_names=output_names, dynamic_shapes=dynamic_shapes, dynamo=True,
                              external_data=False, verbose=False,
                              **({"opset_version": opset} if opset else {}))
    except Exception as exc:  # the exporter raises many types; all mean the graph could not be expressed
        raise PackageError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); the "
                           "task's export_module must be tensor-in, tensor-out without Python control flow "
                           "on values") from None
