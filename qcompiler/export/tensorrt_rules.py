"""Legality of a Q/DQ ONNX graph for TensorRT's explicit quantization.

``check_tensorrt(model)`` raises ``TensorRTLegalityError`` listing every violation as
``node '<name>' (<op>): rule '<rule>': <what is wrong>``; ``tensorrt_violations`` returns them.
The rules (``RULES``) follow TensorRT's documented Q/DQ support: symmetric quantization
(zero-points 0), constant scales, signed INT8 / FP8 E4M3 for activations and weights, INT4 for
weights only (weight-only quantization, blocked scales), pre-quantized weights stored as
initializers behind a DequantizeLinear with per-channel scales on the output-channel axis,
activation Q -> DQ pairs in front of the GEMM, and the opsets that introduced each feature.

A GEMM is a MatMul (weight = input B, [K, N]) or a Gemm (B, [N, K] when ``transB``); a weight
DequantizeLinear may reach B through one ``Transpose(perm=[1, 0])``, so a weight stored
[N, K] (output channel first) has its output-channel axis 0 behind a Transpose.

Keys and values of a quantized KV cache are activations like any other: an attention's batched
matmuls read K^T and V from a Q -> DQ pair with one static per-tensor scale, zero-point 0, signed
INT8 or FP8 (the same rules; INT4 is for weights only), the DQ feeding the MatMul directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import QCompilerError

__all__ = ["RULES", "Violation", "QDQSummary", "TensorRTLegalityError", "tensorrt_violations", "check_tensorrt"]

#: rule id -> what it requires.
RULES: dict[str, str] = {
    "opset": "Q/DQ need opset >= 13 (per-axis scales); FLOAT8E4M3FN needs >= 19; INT4 and block_size need >= 21",
    "quantized-type": "quantized tensors are signed INT8 or FLOAT8E4M3FN, or INT4 for weights only",
    "scale-initializer": "every Q/DQ scale is a constant initializer",
    "scale-value": "scales are float32, float16 or bfloat16, finite and > 0",
    "zero-point": "a zero-point, when present, is a constant initializer of the quantized type, all 0 (symmetric)",
    "activation-pair": "an activation QuantizeLinear feeds only DequantizeLinear nodes with the same scale and "
                       "zero-point; every DequantizeLinear reads such a QuantizeLinear or a weight initializer",
    "activation-per-tensor": "activation Q/DQ use one static scale (per tensor)",
    "activation-placement": "an activation Q -> DQ pair feeds GEMM (MatMul / Gemm) inputs directly",
    "weight-placement": "weights are stored quantized: an initializer feeds a DequantizeLinear that feeds a GEMM's "
                        "weight input directly or through one Transpose(perm=[1, 0])",
    "weight-axis": "a per-channel weight scale has one entry per output channel and its axis is the GEMM's "
                   "output-channel axis",
    "weight-block": "blocked scales (block_size) are for INT4 weights only, in blocks along the input-channel axis, "
                    "with shape [N, ceil(K / block_size)] in the weight's layout",
    "gemm-activation": "a GEMM with INT8 or FP8 weights reads an activation Q/DQ pair of the same type; INT4 weights "
                       "read float (weight-only) or FP8 activations",
}

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_GEMM = ("MatMul", "Gemm")
_ALLOWED = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4"}
_MIN_OPSET = {TensorProto.FLOAT8E4M3FN: 19, TensorProto.INT4: 21}
_SCALE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass(frozen=True)
class Violation:
    """One broken rule: the offending node, the rule id (a key of ``RULES``) and what is wrong."""

    node: str
    op_type: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op_type}): rule {self.rule!r}: {self.message}"


@dataclass(frozen=True)
class QDQSummary:
    """What a legal graph holds: its opset and GEMMs counted by ``"<weight>/<activation>"`` type
    (``"INT8/INT8"``, ``"INT4/float"``, ``"float/float"``...); a batched matmul whose B operand is an
    activation read through Q/DQ (an attention's keys K^T or values V, ``Recipe.kv_cache``) counts as
    ``"BMM <B>/<A>"`` (``"BMM FP8/float"``: FP8 keys or values, float query or probabilities)."""

    opset: int
    weight_dequantize: int
    activation_pairs: int
    gemms: dict[str, int] = field(default_factory=dict)


class TensorRTLegalityError(QCompilerError, ValueError):
    """An ONNX graph breaks TensorRT's explicit-quantization rules; ``violations`` lists them."""

    def __init__(self, violations: list[Violation]):
        self.violations = list(violations)
        shown = "\n  ".join(str(v) for v in self.violations[:20])
        more = f"\n  ... and {len(self.violations) - 20} more" if len(self.violations) > 20 else ""
        super().__init__(f"the ONNX graph is not legal for TensorRT explicit quantization "
                         f"({len(self.violations)} violation(s)):\n  {shown}{more}")


class _Graph:
    """Indexes of one ONNX graph: initializers, producers, consumers, node labels."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    @staticmethod
    def label(node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def users(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        return self.consumers.get(name, [])


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_qdq(node: onnx.NodeProto) -> bool:
    return node.op_type in _QDQ and node.domain in ("", "ai.onnx")


class _Checker:
    def __init__(self, model: onnx.ModelProto):
        self.g = _Graph(model)
        self.out: list[Violation] = []
        self.weight_type: dict[str, int] = {}      # weight DQ output -> quantized type
        self.act_type: dict[str, int] = {}         # activation DQ output -> quantized type
        self.pairs = 0

    def bad(self, node: onnx.NodeProto, rule: str, message: str) -> None:
        self.out.append(Violation(self.g.label(node), node.op_type, rule, message))

    # -- per Q/DQ node -------------------------------------------------------------------------
    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The quantized element type a Q produces or a DQ reads, when it can be told."""
        g = self.g
        if len(node.input) > 2 and node.input[2] in g.inits:
            return g.inits[node.input[2]].data_type
        if node.op_type == "QuantizeLinear":
            has_zp = len(node.input) > 2 and node.input[2]
            return _attr(node, "output_dtype", 0) or (None if has_zp else TensorProto.UINT8)
        x = node.input[0]
        if x in g.inits:
            return g.inits[x].data_type
        prod = g.producer.get(x)
        return self.quantized_type(prod) if prod is not None and prod.op_type == "QuantizeLinear" else None

    def check_common(self, node: onnx.NodeProto) -> None:
        g = self.g
        if g.opset < 13:
            self.bad(node, "opset", f"{node.op_type} at opset {g.opset}; per-axis Q/DQ need opset >= 13")
        qtype = self.quantized_type(node)
        if qtype is not None and qtype not in _ALLOWED:
            self.bad(node, "quantized-type", f"quantized type {TensorProto.DataType.Name(qtype)}; "
                                             "expected INT8, FLOAT8E4M3FN or INT4 (signed)")
        if qtype in _MIN_OPSET and g.opset < _MIN_OPSET[qtype]:
            self.bad(node, "opset", f"{TensorProto.DataType.Name(qtype)} at opset {g.opset}; needs opset >= "
                                    f"{_MIN_OPSET[qtype]}")
        if (_attr(node, "block_size", 0) or 0) > 0 and g.opset < 21:
            self.bad(node, "opset", f"block_size at opset {g.opset}; blocked quantization needs opset >= 21")
        scale_name = node.input[1] if len(node.input) > 1 else ""
        scale = g.array(scale_name)
        if scale is None:
            origin = g.producer.get(scale_name)
            what = f"computed by {g.label(origin)} ({origin.op_type})" if origin is not None else "a graph input"
            self.bad(node, "scale-initializer", f"scale {scale_name!r} is {what}, not a constant initializer")
        elif g.inits[scale_name].data_type not in _SCALE_TYPES:
            self.bad(node, "scale-value", f"scale {scale_name!r} has type "
                                          f"{TensorProto.DataType.Name(g.inits[scale_name].data_type)}")
        else:
            s = scale.astype(np.float64)
            if not (np.isfinite(s).all() and (s > 0).all()):
                self.bad(node, "scale-value", f"scale {scale_name!r} has values <= 0 or not finite "
                                              f"(min {np.nanmin(s) if s.size else 'n/a'})")
        if len(node.input) > 2 and node.input[2]:
            zp_name = node.input[2]
            zp = g.array(zp_name)
            if zp is None:
                self.bad(node, "zero-point", f"zero-point {zp_name!r} is not a constant initializer")
            elif np.any(zp.astype(np.float64) != 0):
                self.bad(node, "zero-point", f"zero-point {zp_name!r} is not all 0 (values "
                                             f"{np.unique(zp.astype(np.float64))[:4].tolist()}); TensorRT "
                                             "quantization is symmetric")
            elif scale is not None and zp.shape != scale.shape:
                self.bad(node, "zero-point", f"zero-point shape {list(zp.shape)} differs from the scale's "
                                             f"{list(scale.shape)}")

    # -- activations -----------------------------------------------------------------------------
    def check_quantize(self, node: onnx.NodeProto) -> None:
        g = self.g
        if node.input[0] in g.inits:
            self.bad(node, "weight-placement", f"QuantizeLinear of the float initializer {node.input[0]!r}; "
                                               "store the weight quantized and feed it to a DequantizeLinear")
            return
        users = g.users(node.output[0])
        if not users:
            self.bad(node, "activation-pair", "QuantizeLinear output is unused")
        for user, _ in users:
            if not _is_qdq(user) or user.op_type != "DequantizeLinear":
                self.bad(node, "activation-pair", f"QuantizeLinear feeds {g.label(user)} ({user.op_type}), "
                                                  "not a DequantizeLinear")
                continue
            same_scale = self._same(node, user, 1)
            same_zp = self._same(node, user, 2, missing_is_zero=True)
            if not (same_scale and same_zp):
                self.bad(user, "activation-pair", f"scale or zero-point differs from its QuantizeLinear "
                                                  f"{g.label(node)}")
        scale = g.array(node.input[1])
        if (scale is not None and scale.size != 1) or (_attr(node, "block_size", 0) or 0) > 0:
            shape = list(scale.shape) if scale is not None else "?"
            self.bad(node, "activation-per-tensor", f"activation scale of shape {shape} (block_size "
                                                    f"{_attr(node, 'block_size', 0) or 0}); TensorRT activations "
                                                    "take one static per-tensor scale")
        if self.quantized_type(node) == TensorProto.INT4:
            self.bad(node, "quantized-type", "INT4 is for weights only (weight-only quantization)")

    def _same(self, a: onnx.NodeProto, b: onnx.NodeProto, i: int, missing_is_zero: bool = False) -> bool:
        na = a.input[i] if len(a.input) > i else ""
        nb = b.input[i] if len(b.input) > i else ""
        if na == nb:
            return True
        va, vb = self.g.array(na) if na else None, self.g.array(nb) if nb else None
        if missing_is_zero:
            va = va if na else np.zeros(())
            vb = vb if nb else np.zeros(())
        return va is not None and vb is not None and va.shape == vb.shape and \
            np.array_equal(va.astype(np.float64), vb.astype(np.float64))

    def check_activation_dq(self, node: onnx.NodeProto) -> None:
        g = self.g
        self.pairs += 1
        self.act_type[node.output[0]] = self.quantized_type(node)
        for user, _ in g.users(node.output[0]):
            if user.op_type not in _GEMM:
                self.bad(node, "activation-placement", f"activation DequantizeLinear feeds {g.label(user)} "
                                                       f"({user.op_type}), not a MatMul / Gemm input")

    # -- weights ---------------------------------------------------------------------------------
    def _weight_paths(self, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int, bool] | str]:
        """(gemm, input index, transposed on the way) per consumer path, or a description of a bad one."""
        paths: list = []
        for user, idx in self.g.users(node.output[0]):
            transposed = False
            if user.op_type == "Transpose":
                perm = list(_attr(user, "perm", []) or [])
                if perm != [1, 0]:
                    paths.append(f"Transpose {self.g.label(user)} with perm {perm}")
                    continue
                nexts = self.g.users(user.output[0])
                if not nexts:
                    paths.append(f"Transpose {self.g.label(user)} with no consumer")
                for nxt, j in nexts:
                    paths.append((nxt, j, True) if nxt.op_type in _GEMM else f"{self.g.label(nxt)} ({nxt.op_type})")
                continue
            paths.append((user, idx, transposed) if user.op_type in _GEMM else f"{self.g.label(user)} ({user.op_type})")
        return paths

    def check_weight_dq(self, node: onnx.NodeProto) -> None:
        g = self.g
        w = g.inits[node.input[0]]
        qtype = w.data_type
        self.weight_type[node.output[0]] = qtype
        dims = list(w.dims)
        if len(dims) != 2:
            self.bad(node, "weight-placement", f"weight {node.input[0]!r} has shape {dims}; expected a 2-D [N, K] "
                                               "or [K, N] GEMM weight")
            return
        out_axes = set()
        paths = self._weight_paths(node)
        if not paths:
            self.bad(node, "weight-placement", "weight DequantizeLinear output is unused")
        for p in paths:
            if isinstance(p, str):
                self.bad(node, "weight-placement", f"weight DequantizeLinear feeds {p}, not a GEMM weight input")
                continue
            gemm, idx, transposed = p
            if idx != 1:
                self.bad(node, "weight-placement", f"weight feeds input {idx} of {g.label(gemm)} ({gemm.op_type}); "
                                                   "expected the weight input B (index 1)")
                continue
            b_out_axis = 0 if gemm.op_type == "Gemm" and _attr(gemm, "transB", 0) else 1   # B's N axis
            out_axes.add(1 - b_out_axis if transposed else b_out_axis)
        if len(out_axes) != 1:
            if len(out_axes) > 1:
                self.bad(node, "weight-axis", "the weight reaches GEMMs with different output-channel axes")
            return
        out_axis = out_axes.pop()
        k_axis = 1 - out_axis
        scale = g.array(node.input[1])
        if scale is None:
            return   # reported by scale-initializer
        axis = _attr(node, "axis", 1)
        axis = axis + 2 if axis < 0 else axis
        block = _attr(node, "block_size", 0) or 0
        if block > 0:
            expect = [0, 0]
            expect[out_axis], expect[k_axis] = dims[out_axis], math.ceil(dims[k_axis] / block)
            if qtype != TensorProto.INT4:
                self.bad(node, "weight-block", f"block_size {block} on {TensorProto.DataType.Name(qtype)} weights; "
                                               "TensorRT blocks INT4 weights only")
            if axis != k_axis:
                self.bad(node, "weight-block", f"blocked along axis {axis}; the input-channel axis is {k_axis}")
            elif list(scale.shape) != expect:
                self.bad(node, "weight-block", f"blocked scale has shape {list(scale.shape)}; expected {expect}")
        elif scale.ndim == 0 or (scale.ndim == 1 and scale.size == 1):
            pass   # per tensor
        elif scale.ndim != 1:
            self.bad(node, "weight-axis", f"scale of rank {scale.ndim} without block_size; expected a scalar "
                                          "or a 1-D per-channel scale")
        elif axis != out_axis or scale.shape[0] != dims[out_axis]:
            self.bad(node, "weight-axis", f"per-channel scale of {scale.shape[0]} entries on axis {axis} of a "
                                          f"{dims} weight; expected {dims[out_axis]} entries on the output-channel "
                                          f"axis {out_axis}")

    # -- GEMMs -----------------------------------------------------------------------------------
    def gemm_kinds(self) -> dict[str, int]:
        g = self.g
        kinds: dict[str, int] = {}
        for node in g.nodes:
            if node.op_type not in _GEMM or len(node.input) < 2:
                continue
            b = node.input[1]
            prod = g.producer.get(b)
            if prod is not None and prod.op_type == "Transpose":
                b = prod.input[0]
            wtype = self.weight_type.get(b)
            atype = self.act_type.get(node.input[0])
            name = lambda t: "float" if t is None else _ALLOWED.get(t, TensorProto.DataType.Name(t))  # noqa: E731
            kind = f"{name(wtype)}/{name(atype)}"
            if wtype is None and b in self.act_type:     # an activation B operand: an attention's K^T or V
                kind = f"BMM {name(self.act_type[b])}/{name(atype)}"
            kinds[kind] = kinds.get(kind, 0) + 1
            if wtype is None:
                continue
            if wtype in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN) and atype != wtype:
                self.bad(node, "gemm-activation",
                         f"weights are {name(wtype)} but the activation input {node.input[0]!r} is "
                         f"{'not quantized by a Q/DQ pair' if atype is None else name(atype)}; TensorRT's "
                         "weight-only quantization is INT4 only")
            if wtype == TensorProto.INT4 and atype not in (None, TensorProto.FLOAT8E4M3FN):
                self.bad(node, "gemm-activation", f"INT4 weights with {name(atype)} activations; expected float "
                                                  "(weight-only) or FP8")
        return kinds

    def run(self) -> QDQSummary:
        g = self.g
        for node in g.nodes:
            if not _is_qdq(node):
                continue
            self.check_common(node)
            if node.op_type == "QuantizeLinear":
                self.check_quantize(node)
            elif node.input[0] in g.inits:
                self.check_weight_dq(node)
            elif (prod := g.producer.get(node.input[0])) is not None and prod.op_type == "QuantizeLinear":
                self.check_activation_dq(node)
            else:
                self.bad(node, "activation-pair", f"DequantizeLinear reads {node.input[0]!r}, which is neither a "
                                                  "weight initializer nor the output of a QuantizeLinear")
        kinds = self.gemm_kinds()
        return QDQSummary(g.opset, len(self.weight_type), self.pairs, kinds)


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def tensorrt_violations(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """Every rule ``model`` (a ModelProto or a file) breaks; empty when it is legal."""
    checker = _Checker(_load(model))
    checker.run()
    return checker.out


def check_tensorrt(model: onnx.ModelProto | str | Path) -> QDQSummary:
    """Check ``model`` against ``RULES``; raise ``TensorRTLegalityError`` naming each offending node
    and rule, else return what the graph holds."""
    checker = _Checker(_load(model))
    summary = checker.run()
    if checker.out:
        raise TensorRTLegalityError(checker.out)
    return summary
