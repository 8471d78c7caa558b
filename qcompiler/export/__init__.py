"""ONNX Q/DQ export for TensorRT's explicit quantization.

``export_onnx(model, recipe, example_inputs, path, calibration=batches)`` writes the graph;
``check_tensorrt(onnx_model)`` checks a graph against ``RULES`` and names each offending node
and rule. ``check_int8_gemm()`` says whether this machine's onnxruntime computes INT8 GEMMs exactly
(full-range weights need VNNI or AMX; 7-bit weights, ``WeightSpec.reduce_range``, are exact on any
x86 CPU). Importing this package imports onnx and onnxscript (``import qcompiler`` does not).
"""

from __future__ import annotations

from .exporter import MIN_EXPORT_OPSET, OnnxExport, check_exportable, export_onnx, required_opset, runtime_notes
from .runtime import Int8GemmCheck, check_int8_gemm, onnxruntime_session, saturating_u8s8_gemm
from .tensorrt_rules import RULES, QDQSummary, TensorRTLegalityError, Violation, check_tensorrt, tensorrt_violations

__all__ = ["export_onnx", "OnnxExport", "check_tensorrt", "tensorrt_violations", "TensorRTLegalityError",
           "Violation", "QDQSummary", "RULES", "required_opset", "check_exportable", "MIN_EXPORT_OPSET", "onnxruntime_session",
           "runtime_notes", "check_int8_gemm", "Int8GemmCheck", "saturating_u8s8_gemm"]
