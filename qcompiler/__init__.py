"""qcompiler: a quantization compiler for large language models on torch.fx / torch.compile."""

from __future__ import annotations

from . import errors, recipes
from .errors import CalibrationError, PassError, RecipeError, UnsupportedError
from .recipes import Recipe
from . import ops  # noqa: F401  (registers the qcompiler:: torch ops)
from .api import backend, quantize, report
from .pipeline import CompileReport, LayerDecision, PassContext, PassManager, PassResult

__all__ = ["backend", "quantize", "report", "Recipe", "recipes", "errors", "RecipeError", "CalibrationError",
           "PassError", "UnsupportedError", "CompileReport", "LayerDecision", "PassContext", "PassManager",
           "PassResult"]
__version__ = "0.1.0"
