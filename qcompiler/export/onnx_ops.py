"""The torch ops of the Q/DQ export form and their ONNX translations (onnxscript).

- ``qcompiler_export::weight_dequantize(w, scale, dtype, axis, block_size, in_features)``:
  DequantizeLinear of a stored 2-D weight (INT8 / FP8 in either layout; INT4 packed bytes
  [N, ceil(K / 2)] of an [N, K] weight, layout of ``qcompiler.core.packing``) with ONNX's scale
  layout: 0-d (per tensor), 1-D along ``axis`` (per channel) or 2-D blocked along ``axis`` with
  ``block_size``; returns float32 of the unpacked shape. It is exported as a placeholder
  node ``WeightDequantize`` in the ``qcompiler.export`` domain, which ``finalize`` turns into a
  standard DequantizeLinear over a typed initializer: torch has no INT4 dtype, and the
  exporter's optimizer would constant-fold a standard DequantizeLinear of a constant to float.
- ``qcompiler::quantize`` / ``qcompiler::dequantize`` (static per-tensor activations, the ops
  of ``qcompiler.core.ops``) become QuantizeLinear / DequantizeLinear with an explicit zero-point 0
  of the quantized type (INT8 or FLOAT8E4M3FN), so the type does not depend on the opset.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import ir

from qcompiler.core import numerics
from qcompiler.core.packing import unpack_int4

__all__ = ["DOMAIN", "WEIGHT_DQ", "weight_dequantize", "translation_table"]

#: Domain and op type of the placeholder node that ``finalize`` rewrites.
DOMAIN = "qcompiler.export"
WEIGHT_DQ = "WeightDequantize"

#: Zero-points written on activation Q/DQ, by quantized dtype.
_ZERO = {"int8": np.zeros((), np.int8), "fp8_e4m3": np.zeros((), ml_dtypes.float8_e4m3fn)}


@torch.library.custom_op("qcompiler_export::weight_dequantize", mutates_args=())
def weight_dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: str, axis: int, block_size: int,
                      in_features: int) -> torch.Tensor:
    """DequantizeLinear of a stored weight to float32 (see the module docstring)."""
    q = unpack_int4(w, in_features, signed=True) if dtype == "int4" else w
    s = scale
    if scale.dim() == 1:                      # per channel along ``axis``: broadcast ONNX-style
        shape = [1] * q.dim()
        shape[axis] = -1
        s = scale.reshape(shape)
    return numerics.dequantize(q, s, None, torch.float32, block_size=block_size or None)


@weight_dequantize.register_fake
def _(w, scale, dtype, axis, block_size, in_features):
    return w.new_empty((w.shape[0], in_features) if dtype == "int4" else tuple(w.shape), dtype=torch.float32)


def _weight_dq_schema() -> OpSchema:
    attr = OpSchema.Attribute
    return OpSchema(
        WEIGHT_DQ, DOMAIN, 1, doc="placeholder for a weight DequantizeLinear; rewritten by qcompiler.export",
        inputs=[OpSchema.FormalParameter("w", "T1"), OpSchema.FormalParameter("scale", "T2")],
        outputs=[OpSchema.FormalParameter("y", "T2")],
        type_constraints=[("T1", ["tensor(int8)", "tensor(uint8)", "tensor(float8e4m3fn)"], "stored weight"),
                          ("T2", ["tensor(float)"], "scale and output")],
        attributes=[attr("dtype", OpSchema.AttrType.STRING, "int8, int4 or fp8_e4m3"),
                    attr("axis", OpSchema.AttrType.INT, "DequantizeLinear axis"),
                    attr("block_size", OpSchema.AttrType.INT, "DequantizeLinear block_size (0: none)"),
                    attr("in_features", OpSchema.AttrType.INT, "K")])


_WEIGHT_DQ_OP = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), WEIGHT_DQ, _weight_dq_schema())


def translation_table(opset: int) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` at ``opset``, keyed by OpOverload."""
    op = onnxscript.values.Opset("", opset)

    def quantize(x, scale, zero_point=None, dtype: str = "int8", block_size: int = 0):
        return op.QuantizeLinear(x, scale, op.Constant(value=ir.tensor(_ZERO[dtype])))

    def dequantize(q, scale, zero_point=None, out_dtype=None, block_size: int = 0):
        # q's type (INT8 / FLOAT8E4M3FN) comes from its QuantizeLinear; the output is float32 (the scale's).
        return op.DequantizeLinear(q, scale)

    def weight_dq(w, scale, dtype: str, axis: int, block_size: int, in_features: int):
        return _WEIGHT_DQ_OP(w, scale, dtype=dtype, axis=axis, block_size=block_size, in_features=in_features)

    ops = torch.ops
    return {ops.qcompiler.quantize.default: quantize,
            ops.qcompiler.dequantize.default: dequantize,
            ops.qcompiler_export.weight_dequantize.default: weight_dq}
