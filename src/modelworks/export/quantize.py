"""int8 static post-training quantization with ONNX Runtime's quantizer, calibrated on training images.

Static (activation ranges fixed from calibration data, not measured per request) in the QDQ format, which ONNX
Runtime's CPU provider fuses into integer kernels (QLinearConv, QGemm). Weights are signed int8 per output
channel, activations unsigned int8 per tensor: the pairing ONNX Runtime recommends for x86 with VNNI.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import PackageError


def quantize_int8(fp32_path: Path, out_path: Path, calibration: Iterable[dict[str, np.ndarray]]) -> None:
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise PackageError("int8 quantization needs onnxruntime; `pip install 'modelworks[export]'`") from None

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference and graph optimisation (BatchNorm folded into the convolutions) before quantizing, as
        # ONNX Runtime's quantization guide prescribes: otherwise BN runs in float between int8 ops.
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX's own shape inference suffices for these graphs; the symbolic one fails on dynamo-exported
        # Reshape nodes (onnxruntime 1.32).
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # The quantizer logs a warning on the root logger for every 1-D weight (BatchNorm scales that could not
        # fold into a convolution because a max-pool sits between them) when per-channel is on: noise here.
        logging.disable(logging.WARNING)
        try:
            quantize_static(str(prepared), str(out_path), Reader(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            logging.disable(logging.NOTSET)


def quantize_int8_dynamic(fp32_path: Path, out_path: Path) -> None:
    """int8 weights, activations quantized per call from their observed range (no calibration data): ONNX
    Runtime's recommendation for transformers, whose activation ranges vary too much from call to call for
    static ranges (MatMulInteger / DynamicQuantizeLinear kernels)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise PackageError("int8 quantization needs onnxruntime; `pip install 'modelworks[export]'`") from None
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        logging.disable(logging.WARNING)
        try:
            # The quantizer's default op types less "Attention": it takes any node of that name for ONNX Runtime's
            # own (com.microsoft) Attention and writes a QAttention that rejects opset 23 Attention's attributes.
            quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["Conv", "MatMul", "Gather", "LSTM", "Transpose",
                                                   "EmbedLayerNormalization"])
        finally:
            logging.disable(logging.NOTSET)
