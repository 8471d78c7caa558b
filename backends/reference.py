"""The ``reference`` backend: the custom ops' own kernels, the pure-torch references in
``qcompiler.core.reference_kernels`` (re-exported here), run as they are."""

from __future__ import annotations

from qcompiler.core.reference_kernels import (_epilogue, _rows, dequantize_int4_ref, fp8_gemm_ref,  # noqa: F401
                                         int4_gemm_ref, int8_gemm_ref, w4a8_gemm_ref, weight_only_gemm_ref)

from . import register_backend

__all__ = ["int8_gemm_ref", "fp8_gemm_ref", "weight_only_gemm_ref", "dequantize_int4_ref", "int4_gemm_ref",
           "w4a8_gemm_ref"]


@register_backend("reference")
def _reference_table() -> dict:
    # The custom ops' own kernels are these functions: nothing to rewrite.
    return {}
