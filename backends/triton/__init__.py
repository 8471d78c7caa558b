"""Triton backend: fused quantized kernels for ``qcompiler.backend(..., target="triton")``.

Modules, one kernel family each: ``gemm_w8a8`` (INT8 / FP8 W8A8), ``gemm_weight_only``
(W8A16 and packed-INT4 W4A16, split-K decode path), ``gemm_w4a8`` (FP8 activations x INT4
weights), ``norm_quant`` (RMSNorm / LayerNorm + SmoothQuant scale + per-token quantization);
``common`` (shared Triton helpers), ``config`` (autotune space, defaults, per-shape cache),
``availability`` (GPU / interpreter detection), ``checks`` (what each kernel takes),
``lowering`` (the kernels of the ``qcompiler::triton_<op>`` ops, whose schemas are in
``qcompiler.core.ops``, and the table the Lower pass applies).

Importing this package does not import triton: the kernel modules load on first use, after
``availability()`` decided between a GPU and the interpreter (``TRITON_INTERPRET=1``, which
must be set in the environment before that first use).
"""

from __future__ import annotations

from .availability import Availability, availability
from .lowering import LoweringTable, TritonKernel, lowering_table

__all__ = ["Availability", "availability", "LoweringTable", "TritonKernel", "lowering_table"]
