"""qcompiler: a quantization compiler for large language models on torch.fx / torch.compile."""

from __future__ import annotations

from qcompiler import errors, recipes
from qcompiler.errors import CalibrationError, PassError, RecipeError, UnsupportedError
from qcompiler.recipes import Recipe
from qcompiler.core import ops  # noqa: F401  (registers the qcompiler:: torch ops)
from qcompiler.api import backend, kv_cache, quantize, report
from qcompiler.rotation import rotate
from qcompiler.sparsity import sparsify
from qcompiler.qat import convert, distillation_loss, prepare_qat
from qcompiler.pipeline import CompileReport, LayerDecision, PassContext, PassManager, PassResult


def export_onnx(model, recipe, example_inputs, path, calibration=None, **kwargs):
    """Write ``model`` quantized with ``recipe`` as an ONNX Q/DQ graph for TensorRT; see
    ``qcompiler.export.export_onnx`` (imported on call: ``import qcompiler`` does not import onnx)."""
    from qcompiler.export import export_onnx as _export_onnx
    return _export_onnx(model, recipe, example_inputs, path, calibration, **kwargs)


def save_compressed_tensors(model, path, recipe, *, tokenizer=None, overwrite=False, asymmetric_format="pack-quantized"):
    """Write ``model`` (after ``quantize``) as a compressed-tensors checkpoint, the serving format transformers
    and vLLM read; see ``qcompiler.export.compressed_tensors`` (imported on call: it needs compressed-tensors)."""
    from qcompiler.export.compressed_tensors import save_compressed_tensors as _save
    try:
        rep = report(model)      # where SmoothQuant / AWQ scales fold
    except ValueError:
        rep = None
    return _save(model, path, recipe, tokenizer=tokenizer, overwrite=overwrite, report=rep,
                 asymmetric_format=asymmetric_format)


def load_compressed_tensors(path):
    """Load a compressed-tensors checkpoint folder (llm-compressor's, or ``save_compressed_tensors``'s) into
    qcompiler's quantized modules; returns ``(model, recipe)``. See ``qcompiler.runtime.compressed_tensors_load``
    (imported on call: it needs compressed-tensors)."""
    from qcompiler.runtime.compressed_tensors_load import load_compressed_tensors as _load
    return _load(path)


__all__ = ["backend", "quantize", "report", "kv_cache", "rotate", "sparsify", "prepare_qat", "convert", "distillation_loss", "export_onnx", "save_compressed_tensors",
           "load_compressed_tensors", "Recipe", "recipes",
           "errors", "RecipeError", "CalibrationError", "PassError", "UnsupportedError", "CompileReport", "LayerDecision",
           "PassContext", "PassManager", "PassResult"]
__version__ = "0.1.0"
