"""build_package(): a trained model -> a verified model package directory.

Every format is run on the validation split and compared with eager PyTorch before the package is published:
the largest absolute output difference and the task's agreement score (classification: the same top-1 class)
are recorded, and a float format outside the tolerance stops the export with nothing written. The int8 model is
expected to differ; its accuracy drop and speed-up against the fp32 ONNX model are measured and recorded.
The package is written into a hidden staging folder beside the output and published in one rename; staging
folders left by killed exports of the same output are removed by the next one (package.work_folder says how).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import PackageError
from . import formats, verify
from .package import (DEFAULT_GRAPH, RUNTIME_FILES, check_identifier, graph_file, publish, remove_stale_work_folders,
                      work_folder, write_manifest)
from .runtime import OnnxRunner, TorchRunner, load_torchscript, load_weights_into

FLOAT_FORMATS = ("torchscript", "onnx")
TIMING_BATCH_SIZES = (1, 32)  # one request alone, and the server's default largest batch


@dataclass
class ExportOptions:
    name: str
    version: str
    formats: tuple[str, ...] = FLOAT_FORMATS
    quantize: str | None = None  # None or "int8"
    atol: float = 1e-3  # largest absolute output difference a float format may show against eager PyTorch
    min_agreement: float = 0.999  # smallest fraction of validation samples with the eager answer (float formats)
    calibration_samples: int = 512  # training samples that set the int8 activation ranges
    timing_repeats: int = 30  # runs per timed batch size for the int8 speed-up (median)
    overwrite: bool = False

    def __post_init__(self):
        # Served, the name and version become URL segments and the X-Model-Version header: a value outside
        # NAME_PATTERN would make every prediction fail, so it is refused here, before any work.
        check_identifier("--name", self.name, "name")
        check_identifier("--version", self.version, "version")


def build_package(task, model: nn.Module, references_from: Iterable | Callable[[], Iterable],
                  calibration_from: Iterable, out: Path, options: ExportOptions, source: dict, metrics: dict,
                  config: dict, log: Callable[[str], None] = print) -> dict:
    """Write and verify the package for `model` (already carrying its trained weights) into `out`.

    `references_from` yields prepared validation batches, `calibration_from` prepared training batches (used only
    for static int8); `source` (run directory, checkpoint, step), `metrics` (the run's evaluation) and `config`
    (the resolved run config, from which the eager runtime rebuilds the model) go into the manifest."""
    if options.quantize not in (None, "int8"):
        raise PackageError(f"--quantize: {options.quantize!r} is not supported; use int8")
    if options.quantize and "onnx" not in options.formats:
        raise PackageError("--quantize int8: quantizes the ONNX model; include onnx in --format")
    model = model.cpu().float().to(memory_format=torch.contiguous_format).eval()
    graphs = task.export_graphs(model)
    predictor = task.predictor()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in remove_stale_work_folders(out):
        log(f"  removed {folder.name}, left by an export of {out} that did not finish")
    with work_folder(out, "tmp") as staging:
        runners = write_formats(task, model, graphs, staging, options)
        for name, content in predictor.files().items():
            (staging / name).write_bytes(content)
        int8 = calibration_samples = None
        if options.quantize == "int8":
            runners["int8"], calibration_samples = quantize_graphs(task, graphs, staging, calibration_from, options)
        batches = references_from() if callable(references_from) else references_from
        checks, n_checked, first_inputs = verify.check_formats(task, graphs, runners, batches)
        if not n_checked:
            raise PackageError("export: the validation split is empty; nothing to verify the formats on")
        judge_checks(checks, options, n_checked, log)
        if options.quantize == "int8":
            int8 = measure_int8(task, graphs, staging, checks, first_inputs, options, calibration_samples)
            log(f"  {'int8':<12} {format_check(checks['int8'])}; speed-up vs fp32 ONNX "
                + ", ".join(f"{b}: {s:.2f}x" for b, s in int8["speedup"].items()))

        import modelworks
        manifest = {
            "task": task.name, "name": options.name, "version": options.version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {**source, "modelworks": modelworks.__version__, "torch": torch.__version__,
                       "python": platform.python_version()},
            "predictor": predictor.spec,
            "metrics": {"run": metrics, "export": {"split": "val", "samples": n_checked,
                                                    **{k: {m: v for m, v in c.items() if m != "passed"}
                                                       for k, c in checks.items()}}},
            "checks": {"atol": options.atol, "min_agreement": options.min_agreement,
                       "passed": [k for k, c in checks.items() if c["passed"]]},
            "int8": int8,
            "config": config,
        }
        if list(graphs) != [DEFAULT_GRAPH]:
            manifest["graphs"] = list(graphs)
        manifest = write_manifest(staging, manifest)
        publish(staging, out, options.overwrite)
        return manifest


def write_formats(task, model: nn.Module, graphs: dict, staging: Path, options: ExportOptions) -> dict[str, dict]:
    """Write the weights and every float format of every graph; the runners that check them, by runtime and
    graph. The eager runner rebuilds the model from the written weights, as serving will."""
    weights = staging / RUNTIME_FILES["eager"]
    from safetensors.torch import save_model
    save_model(model, str(weights))  # shared (tied) tensors are stored once; load_weights_into restores them
    rebuilt = load_weights_into(task.build_model(), weights).eval()
    runners: dict[str, dict] = {"eager": {name: TorchRunner(graph.module, graph.input_names)
                                          for name, graph in task.export_graphs(rebuilt).items()}}
    for runtime in options.formats:
        runners[runtime] = {}
        for name, graph in graphs.items():
            path = staging / graph_file(runtime, name)
            if runtime == "torchscript":
                formats.write_torchscript(graph.module, graph.example_inputs, path)
                runners[runtime][name] = TorchRunner(load_torchscript(path), graph.input_names)
            else:
                formats.write_onnx(graph.module, graph.example_inputs, path, graph.input_names, graph.output_names,
                                   graph.dynamic_axes, graph.onnx_opset)
                runners[runtime][name] = OnnxRunner(path)
    return runners


def judge_checks(checks: dict, options: ExportOptions, n_checked: int, log) -> None:
    """Mark each float runtime passed or refused; refuse the export when one is outside the tolerance."""
    failed = []
    for runtime, check in checks.items():
        if runtime == "int8":  # int8 is expected to differ: judged by its drop, not refused
            check["passed"] = True
            continue
        check["passed"] = check["max_abs_diff"] <= options.atol and check["agreement"] >= options.min_agreement
        log(f"  {runtime:<12} {format_check(check)}" + ("" if check["passed"] else "  REFUSED"))
        if not check["passed"]:
            failed.append(f"{runtime}: {format_check(check)}")
    if failed:
        raise PackageError(
            f"export refused: a format disagrees with eager PyTorch on {n_checked} validation samples beyond "
            f"the tolerance (max_abs_diff <= {options.atol}, agreement >= {options.min_agreement}):\n  "
            + "\n  ".join(failed) + "\n  Nothing was written. Loosen --atol/--min-agreement only if the "
            "difference is understood.")


def quantize_graphs(task, graphs: dict, staging: Path, calibration_from: Iterable,
                    options: ExportOptions) -> tuple[dict[str, OnnxRunner], int]:
    """Quantize every graph's ONNX file by the task's method (`Task.int8_method`): their runners, and the
    number of training samples that calibrated them (0 for dynamic quantization)."""
    from .quantize import quantize_int8, quantize_int8_dynamic

    runners = {}
    if task.int8_method == "dynamic":
        for name in graphs:
            quantize_int8_dynamic(staging / graph_file("onnx", name), staging / graph_file("int8", name))
            runners[name] = OnnxRunner(staging / graph_file("int8", name))
        return runners, 0
    calibration: dict[str, list] = {name: [] for name in graphs}
    seen = 0
    with torch.inference_mode():
        for batch in calibration_from:
            previous = {}
            for name, graph in graphs.items():
                inputs = task.graph_batch_inputs(batch, name, previous)
                previous[name] = tuple(o.float() for o in verify.as_tuple(graph.module(*inputs)))
                calibration[name].append({n: t.contiguous().numpy() for n, t in zip(graph.input_names, inputs)})
            seen += len(inputs[0])
            if seen >= options.calibration_samples:
                break
    for name in graphs:
        quantize_int8(staging / graph_file("onnx", name), staging / graph_file("int8", name), calibration[name])
        runners[name] = OnnxRunner(staging / graph_file("int8", name))
    return runners, seen


def measure_int8(task, graphs: dict, staging: Path, checks: dict, first_inputs: dict,
                 options: ExportOptions, calibration_samples: int) -> dict:
    """The int8 model's drop against fp32 ONNX and its speed-up, timed per graph on a validation batch (and
    at TIMING_BATCH_SIZES for a graph batched along its first axis)."""
    speedup, seconds = {}, {}
    for name, graph in graphs.items():
        fp32, int8 = OnnxRunner(staging / graph_file("onnx", name)), OnnxRunner(staging / graph_file("int8", name))
        sample = first_inputs[name]
        if graph.dynamic_axes:
            batches = {f"{name} batch {len(next(iter(sample.values())))}": sample}
        else:
            batches = {f"batch {size}" if len(graphs) == 1 else f"{name} batch {size}": verify.slice_batch(sample, size)
                       for size in TIMING_BATCH_SIZES}
        for label, batch in batches.items():
            t_fp32 = verify.median_seconds(fp32, batch, options.timing_repeats)
            t_int8 = verify.median_seconds(int8, batch, options.timing_repeats)
            key = label.removeprefix("batch ") if len(graphs) == 1 else label
            speedup[key] = t_fp32 / t_int8
            seconds[key] = {"fp32": t_fp32, "int8": t_int8}
    quality = [k for k in checks["onnx"] if k not in ("max_abs_diff", "agreement", "passed", "error")]
    method = ("dynamic: int8 weights per channel, activations quantized per call" if task.int8_method == "dynamic"
              else "static, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration")
    return {"calibration_samples": calibration_samples, "method": method,
            "drop": {k: checks["onnx"][k] - checks["int8"][k] for k in quality},
            "agreement_with_eager": checks["int8"]["agreement"],
            "speedup": speedup, "median_seconds": seconds}


def format_check(check: dict) -> str:
    if "error" in check:
        return check["error"]
    parts = [f"max_abs_diff {check['max_abs_diff']:.2e}", f"agreement {check['agreement']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in check.items() if k not in ("max_abs_diff", "agreement", "passed")]
    return ", ".join(parts)
