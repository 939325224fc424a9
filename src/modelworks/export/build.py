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
from .package import (RUNTIME_FILES, check_identifier, publish, remove_stale_work_folders, work_folder,
                      write_manifest)
from .runtime import OnnxRunner, TorchRunner, load_torchscript, load_weights

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


def build_package(task, model: nn.Module, references_from: Iterable, calibration_from: Iterable, out: Path,
                  options: ExportOptions, source: dict, metrics: dict, config: dict,
                  log: Callable[[str], None] = print) -> dict:
    """Write and verify the package for `model` (already carrying its trained weights) into `out`.

    `references_from` yields prepared validation batches, `calibration_from` prepared training batches (used only
    for int8); `source` (run directory, checkpoint, step), `metrics` (the run's evaluation) and `config` (the
    resolved run config, from which the eager runtime rebuilds the model) go into the manifest."""
    if options.quantize not in (None, "int8"):
        raise PackageError(f"--quantize: {options.quantize!r} is not supported; use int8")
    if options.quantize and "onnx" not in options.formats:
        raise PackageError("--quantize int8: quantizes the ONNX model; include onnx in --format")
    model = model.cpu().float().to(memory_format=torch.contiguous_format).eval()
    module = task.export_module(model).eval()
    predictor = task.predictor()
    input_names, output_names = predictor.input_names, predictor.output_names
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in remove_stale_work_folders(out):
        log(f"  removed {folder.name}, left by an export of {out} that did not finish")
    with work_folder(out, "tmp") as staging:
        for name, content in predictor.files().items():
            (staging / name).write_bytes(content)
        references = verify.reference_batches(task, module, references_from, input_names)
        if not references:
            raise PackageError("export: the validation split is empty; nothing to verify the formats on")
        n_checked = sum(len(next(iter(r.inputs.values()))) for r in references)
        checks: dict[str, dict] = {}

        from safetensors.torch import save_model
        save_model(model, str(staging / RUNTIME_FILES["eager"]))
        rebuilt = task.build_model()
        missing, unexpected = rebuilt.load_state_dict(load_weights(staging / RUNTIME_FILES["eager"]), strict=False)
        if missing or unexpected:
            raise PackageError(f"export: the saved weights do not rebuild the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        checks["eager"] = verify.check_runner(task, TorchRunner(task.export_module(rebuilt.eval()), input_names),
                                              references)

        example = task.example_inputs()
        if "torchscript" in options.formats:
            path = staging / RUNTIME_FILES["torchscript"]
            formats.write_torchscript(module, example, path)
            checks["torchscript"] = verify.check_runner(task, TorchRunner(load_torchscript(path), input_names),
                                                        references)
        if "onnx" in options.formats:
            path = staging / RUNTIME_FILES["onnx"]
            formats.write_onnx(module, example, path, input_names, output_names)
            checks["onnx"] = verify.check_runner(task, OnnxRunner(path), references)

        failed = []
        for runtime, check in checks.items():
            check["passed"] = (check["max_abs_diff"] <= options.atol
                               and check["agreement"] >= options.min_agreement)
            log(f"  {runtime:<12} {format_check(check)}" + ("" if check["passed"] else "  REFUSED"))
            if not check["passed"]:
                failed.append(f"{runtime}: {format_check(check)}")
        if failed:
            raise PackageError(
                f"export refused: a format disagrees with eager PyTorch on {n_checked} validation samples beyond "
                f"the tolerance (max_abs_diff <= {options.atol}, agreement >= {options.min_agreement}):\n  "
                + "\n  ".join(failed) + "\n  Nothing was written. Loosen --atol/--min-agreement only if the "
                "difference is understood.")

        int8 = None
        if options.quantize == "int8":
            int8 = quantize_and_measure(task, staging, calibration_from, references, input_names, checks, options)
            log(f"  {'int8':<12} {format_check(checks['int8'])}; speed-up vs fp32 ONNX "
                + ", ".join(f"batch {b}: {s:.2f}x" for b, s in int8["speedup"].items()))

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
        manifest = write_manifest(staging, manifest)
        publish(staging, out, options.overwrite)
        return manifest


def quantize_and_measure(task, staging: Path, calibration_from: Iterable, references, input_names,
                         checks: dict, options: ExportOptions) -> dict:
    from .quantize import quantize_int8

    calibration, seen = [], 0
    for batch in calibration_from:
        inputs = task.graph_inputs(batch)
        calibration.append({n: t.contiguous().numpy() for n, t in zip(input_names, inputs)})
        seen += len(inputs[0])
        if seen >= options.calibration_samples:
            break
    fp32_path, int8_path = staging / RUNTIME_FILES["onnx"], staging / RUNTIME_FILES["int8"]
    quantize_int8(fp32_path, int8_path, calibration)
    int8_runner, fp32_runner = OnnxRunner(int8_path), OnnxRunner(fp32_path)
    checks["int8"] = verify.check_runner(task, int8_runner, references)
    checks["int8"]["passed"] = True  # int8 is expected to differ: judged by the drop below, not refused
    sample = references[0].inputs
    speedup, seconds = {}, {}
    for size in TIMING_BATCH_SIZES:
        batch = verify.slice_batch(sample, size)
        t_fp32 = verify.median_seconds(fp32_runner, batch, options.timing_repeats)
        t_int8 = verify.median_seconds(int8_runner, batch, options.timing_repeats)
        speedup[str(size)] = t_fp32 / t_int8
        seconds[str(size)] = {"fp32": t_fp32, "int8": t_int8}
    quality = [k for k in checks["onnx"] if k not in ("max_abs_diff", "agreement", "passed", "error")]
    return {"calibration_samples": seen, "method": "static, QDQ, per-channel int8 weights, uint8 activations, "
                                                   "MinMax calibration",
            "drop": {k: checks["onnx"][k] - checks["int8"][k] for k in quality},
            "agreement_with_eager": checks["int8"]["agreement"],
            "speedup": speedup, "median_seconds": seconds}


def format_check(check: dict) -> str:
    if "error" in check:
        return check["error"]
    parts = [f"max_abs_diff {check['max_abs_diff']:.2e}", f"agreement {check['agreement']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in check.items() if k not in ("max_abs_diff", "agreement", "passed")]
    return ", ".join(parts)
