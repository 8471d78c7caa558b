"""Quantized GEMM formats: the fused op a (weight, activation) format pair runs on, and that op's
argument layout.

One table (``GEMM_FORMATS``) read by graph fusion (``passes/fuse.py``), the eager runtime
(``qcompiler.runtime.eager``), the lowering (``passes/lower.py``) and the kernel choice
(``backends/kernel_choice.py``): which op a quantized linear becomes, which of the op's arguments is the
weight (a kernel may repack it) and which are per-call activations (the micro-benchmark synthesizes
them). Weights are ``"byte"`` (int8 / uint8 / int7 / fp8, one value per byte) or ``"int4"`` (two per
byte, ``qcompiler.core.packing``); activations are the quantized dtype, or None for float activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qcompiler.core import ops  # noqa: F401  (registers the qcompiler:: ops)
from qcompiler.errors import UnsupportedError

__all__ = ["ActivationSource", "GemmFormat", "GEMM_FORMATS", "weight_kind", "find_gemm_format", "gemm_format", "op_format"]


def _act_args(a, a_scale, w, w_scale, w_zero, bias, group_size, in_features, out_dtype):
    return (a, a_scale, w, w_scale, bias, out_dtype)


def _weight_only_args(a, a_scale, w, w_scale, w_zero, bias, group_size, in_features, out_dtype):
    return (a, w, w_scale, w_zero, bias, group_size)


def _int4_args(a, a_scale, w, w_scale, w_zero, bias, group_size, in_features, out_dtype):
    return (a, w, w_scale, w_zero, bias, group_size, in_features)


def _w4a8_args(a, a_scale, w, w_scale, w_zero, bias, group_size, in_features, out_dtype):
    return (a, a_scale, w, w_scale, w_zero, bias, group_size, in_features, out_dtype)


@dataclass(frozen=True)
class GemmFormat:
    """One quantized GEMM format.

    Args:
        op: the fused ``qcompiler::`` op.
        weight: ``"byte"`` or ``"int4"`` (packed two per byte).
        activation: the activation dtype quantized before the GEMM; None: float activations.
        weight_arg: index of the weight among the op's arguments.
        activation_args: indices of the per-call activation arguments (values, and their scale).
        arguments: ``(a, a_scale, w, w_scale, w_zero, bias, group_size, in_features, out_dtype) ->``
            the op's arguments.
    """

    op: str
    weight: str
    activation: str | None
    weight_arg: int
    activation_args: tuple[int, ...]
    arguments: Callable[..., tuple]

    @property
    def packet(self) -> torch._ops.OpOverloadPacket:
        return getattr(torch.ops.qcompiler, self.op)


GEMM_FORMATS: tuple[GemmFormat, ...] = (
    GemmFormat("int8_gemm", "byte", "int8", 2, (0, 1), _act_args),
    GemmFormat("fp8_gemm", "byte", "fp8_e4m3", 2, (0, 1), _act_args),
    GemmFormat("weight_only_gemm", "byte", None, 1, (0,), _weight_only_args),
    GemmFormat("int4_gemm", "int4", None, 1, (0,), _int4_args),
    GemmFormat("w4a8_gemm", "int4", "fp8_e4m3", 2, (0, 1), _w4a8_args),
    GemmFormat("w4a8_gemm", "int4", "int8", 2, (0, 1), _w4a8_args),   # the same op: a_q's dtype says which
)
_BY_OP: dict[str, GemmFormat] = {}
for _f in GEMM_FORMATS:   # one op may take several activation dtypes, in the same argument layout
    _BY_OP.setdefault(_f.op, _f)


def weight_kind(weight_dtype: str) -> str:
    """``"int4"`` for the packed 4-bit weight dtypes, ``"byte"`` for the others."""
    return "int4" if weight_dtype in ("int4", "uint4") else "byte"


def find_gemm_format(weight: str, activation: str | None) -> GemmFormat | None:
    """The format of ``weight`` (a kind, or a weight dtype) with ``activation``, None when no fused op takes it."""
    kind = weight if weight in ("byte", "int4") else weight_kind(weight)
    return next((f for f in GEMM_FORMATS if f.weight == kind and f.activation == activation), None)


def gemm_format(weight: str, activation: str | None) -> GemmFormat:
    """``find_gemm_format``, or ``UnsupportedError`` naming the pairs there are."""
    found = find_gemm_format(weight, activation)
    if found is None:
        pairs = ", ".join(f"{f.weight} weights x {f.activation or 'float'} activations" for f in GEMM_FORMATS)
        raise UnsupportedError(f"no fused GEMM for {weight} weights with {activation or 'float'} activations; "
                               f"there are: {pairs}")
    return found


def op_format(op: str) -> GemmFormat:
    """The format of the fused op named ``op`` (``"int8_gemm"``; a packet's or overload's name works too): its
    argument layout (an op serving several activation dtypes, like ``w4a8_gemm``, has one layout)."""
    return _BY_OP[op.split("::")[-1].split(".")[0]]


@dataclass(frozen=True)
class ActivationSource:
    """How a GEMM's quantized activation is made in the graph: ``kind`` ``"static"`` (a ``quantize`` with
    the GEMM's own scale) or ``"per_token"`` (``quantize_per_token``), to ``dtype``. Given to the chooser,
    every candidate is timed from the float activation with that quantization in front of it, folded
    into the kernels that take float activations (``GemmKernel.from_float``) as the lowering folds it."""

    kind: str
    dtype: str

    def __post_init__(self):
        if self.kind not in ("static", "per_token"):
            raise ValueError(f"ActivationSource.kind must be 'static' or 'per_token', got {self.kind!r}")
