"""qcompiler: a quantization compiler for large language models on torch.fx / torch.compile."""

from __future__ import annotations

from qcompiler import errors, recipes
from qcompiler.errors import CalibrationError, PassError, RecipeError, UnsupportedError
from qcompiler.recipes import Recipe
from qcompiler.core import ops  # noqa: F401  (registers the qcompiler:: torch ops)
from qcompiler.api import backend, kv_cache, quantize, report
from qcompiler.pipeline import CompileReport, LayerDecision, PassContext, PassManager, PassResult


def export_onnx(model, recipe, example_inputs, path, calibration=None, **kwargs):
    """Write ``model`` quantized with ``recipe`` as an ONNX Q/DQ graph for TensorRT; see
    ``qcompiler.export.export_onnx`` (imported on call: ``import qcompiler`` does not import onnx)."""
    from qcompiler.export import export_onnx as _export_onnx
    return _export_onnx(model, recipe, example_inputs, path, calibration, **kwargs)


__all__ = ["backend", "quantize", "report", "kv_cache", "export_onnx", "Recipe", "recipes", "errors", "RecipeError", "CalibrationError",
           "PassError", "UnsupportedError", "CompileReport", "LayerDecision", "PassContext", "PassManager",
           "PassResult"]
__version__ = "0.1.0"
