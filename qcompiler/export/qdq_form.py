"""Put an eagerly quantized model (``qcompiler.quantize``) into the Q/DQ form that exports to ONNX.

Each ``QuantizedLinear`` becomes a ``QDQLinear``: ``[x * inv_smooth] -> Q -> DQ`` on the
activation (static per-tensor scale), ``DQ`` of the stored weight, a matmul. SmoothQuant / AWQ
scales that the planner folded into a norm (``LayerDecision.smoothing == "norm:<path>"``) are in
that norm's parameters once ``qcompiler.quantize`` returns (``qcompiler.runtime.norm_fold``;
``export_onnx`` runs ``fold_norm_smoothing`` again, which leaves a folded model as it is); a scale no norm could absorb stays an explicit ``Mul`` in front of the activation quantizer.
"""

from __future__ import annotations

import logging

import torch

from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.runtime.norm_fold import FoldResult, fold_norm_smoothing
from qcompiler.errors import UnsupportedError
from qcompiler.core.formats import gemm_format

from . import onnx_ops  # noqa: F401  (registers qcompiler_export::weight_dequantize)

__all__ = ["QDQLinear", "FoldResult", "fold_norm_smoothing", "to_qdq_form"]

log = logging.getLogger(__name__)
_ops = torch.ops


class QDQLinear(torch.nn.Module):
    """A quantized linear in Q/DQ form.

    INT8 / FP8 weights are stored transposed, ``w_q`` [K, N] with per-channel scales on axis 1,
    and export as ``x -> Q -> DQ -> MatMul(., DQ(w_q))``: the weight DQ feeds the MatMul
    directly, TensorRT's canonical pattern (and onnxruntime fuses it into an integer GEMM).
    INT4 weights keep ``qcompiler.core.packing``'s bytes, ``w_q`` packed [N, ceil(K / 2)] with
    scales [N, G] blocked along axis 1 (or [N] on axis 0), and export as
    ``DQ(w_q) -> Transpose -> MatMul``. Other buffers: ``w_scale`` in ONNX layout, ``bias``,
    ``act_scale`` (0-d, static activations), ``inv_smooth`` [K] (a SmoothQuant scale that could
    not be folded upstream).
    """

    def __init__(self, ql: QuantizedLinear):
        super().__init__()
        self.fqn, self.in_features, self.out_features = ql.fqn, ql.in_features, ql.out_features
        self.weight_dtype, self.act_dtype = ql.weight_dtype, ql.act_dtype
        if ql.act_dynamic:
            raise UnsupportedError(f"{ql.fqn}: dynamic per-token activation scales cannot be written as TensorRT "
                                   "static Q/DQ; use a recipe with per_tensor (static) activations")
        if ql.w_zero is not None or self.weight_dtype not in ("int8", "int4", "fp8_e4m3"):
            raise UnsupportedError(f"{ql.fqn}: weight format {ql.weight_format!r} is asymmetric or unsigned; "
                                   "TensorRT needs symmetric int8, int4 or fp8_e4m3 weights (zero-point 0)")
        scale = ql.w_scale.float()
        # the format table fusion and the eager runtime read: byte weights export transposed ([K, N]),
        # packed INT4 ones keep the packing's [N, ceil(K / 2)]
        self.transposed = gemm_format(self.weight_dtype, self.act_dtype).weight == "byte"
        w_q = ql.w_q.t().contiguous() if self.transposed else ql.w_q
        if scale.dim() == 0:
            self.axis, self.block_size = 0, 0
        elif ql.group_size:
            if self.transposed:
                raise UnsupportedError(f"{ql.fqn}: per-group {self.weight_dtype} weights; TensorRT blocks INT4 "
                                       "weights only")
            self.axis, self.block_size = 1, int(ql.group_size)
        else:   # per channel: [N, 1] -> [N], on the output-channel axis of the stored layout
            self.axis, self.block_size, scale = (1 if self.transposed else 0), 0, scale.reshape(-1)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", scale.contiguous())
        self.register_buffer("bias", None if ql.bias is None else ql.bias.float())
        self.register_buffer("act_scale", None if ql.act_scale is None else ql.act_scale.float())
        self.register_buffer("inv_smooth", None if ql.inv_smooth is None else ql.inv_smooth.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if self.act_dtype is not None:
            x_q = _ops.qcompiler.quantize(x, self.act_scale, None, self.act_dtype)
            x = _ops.qcompiler.dequantize(x_q, self.act_scale, None, x.dtype)
        w = _ops.qcompiler_export.weight_dequantize(self.w_q, self.w_scale, self.weight_dtype, self.axis,
                                                    self.block_size, self.in_features)
        if not self.transposed:
            return torch.nn.functional.linear(x, w, self.bias)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        act = self.act_dtype or "float"
        return (f"{self.in_features} -> {self.out_features}, weight {self.weight_dtype} "
                f"(axis {self.axis}, block {self.block_size}), activations {act}")


def to_qdq_form(model: torch.nn.Module) -> int:
    """Replace every ``QuantizedLinear`` of ``model`` by a ``QDQLinear`` (with its hooks: an online
    Hadamard transform stays on the module's input); returns how many."""
    from qcompiler.runtime.eager import _carry_hooks
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = QDQLinear(m)
        _carry_hooks(m, new)
        setattr(parent, child, new)
    return len(targets)
