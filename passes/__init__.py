"""qcompiler's graph passes, one per module, and the default pipeline."""

from __future__ import annotations

from .annotate import Annotate
from .calibrate import Calibrate
from .outliers import OutlierAnalysis
from .smoothquant import SmoothQuantFold
from .fallback import FallbackRules, SensitivityFallback
from .weight_algorithm import AWQFold, WeightAlgorithm
from .qdq import InsertQDQ
from .fuse import FuseQuantizedGemm
from .fuse_norm_quant import FuseNormQuant
from .fuse_kv_attention import FuseKVDecodeAttention
from .lower import Lower
from .quantize_tensors import QuantizeTensors

__all__ = ["Annotate", "Calibrate", "OutlierAnalysis", "SmoothQuantFold", "FallbackRules", "SensitivityFallback", "AWQFold", "WeightAlgorithm", "InsertQDQ",
           "FuseQuantizedGemm", "FuseNormQuant", "FuseKVDecodeAttention", "Lower", "QuantizeTensors", "default_passes", "planning_passes"]


def planning_passes() -> list:
    """The analysis passes that decide, per linear, what to quantize and how (and quantize the other
    tensors the recipe names: ``QuantizeTensors``)."""
    return [Annotate(), QuantizeTensors(), Calibrate(), OutlierAnalysis(), FallbackRules(), SmoothQuantFold(), AWQFold(),
            SensitivityFallback(), WeightAlgorithm()]


def default_passes(target: str = "reference", kernels="auto") -> list:
    """The full pipeline: plan, insert Q/DQ, fuse into quantized GEMMs, lower to ``target`` with
    GEMM kernels chosen under the ``kernels`` policy (``qcompiler.backends.kernel_choice``).

    Per-token quantizers are also fused with the norm before them where the target's table has that
    fused kernel (``fuses_norm_quantize``: the Triton target), and attention over qcompiler's quantized KV
    cache becomes one op where the table has its kernel (``fuses_kv_decode_attention``)."""
    return planning_passes() + [InsertQDQ(), FuseQuantizedGemm(), FuseNormQuant(target), FuseKVDecodeAttention(target),
                                Lower(target, kernels)]
