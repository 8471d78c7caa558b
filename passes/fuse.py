"""Pattern fusion: rewrite fake-quant linears into quantized GEMM ops.

One row per fusion in ``FUSIONS``: a matcher that reads the Q/DQ pattern around a
``linear`` node and returns the fused op and its arguments, or None. Which op a (weight,
activation) format pair becomes, and its argument order, come from ``qcompiler.core.formats``.

- ``linear(dq(q(x, s)), dq(w_q, w_s), b)`` with int8 / fp8 -> ``int8_gemm`` / ``fp8_gemm(x_q, s, w_q, w_s, b)``
- the same with ``quantize_per_token`` (dynamic) -> the same GEMMs with per-row scales
- ``linear(x, dq(w_q, w_s, w_z), b)`` (weight-only) -> ``weight_only_gemm(x, w_q, w_s, w_z, b)``
- ``linear(x, dequantize_int4(w_packed, ...), b)`` -> ``int4_gemm``; with an fp8 Q/DQ (static or
  per-token) on x -> ``w4a8_gemm``
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from qcompiler.core.formats import find_gemm_format
from qcompiler.pipeline import PassContext, PassResult

__all__ = ["Fusion", "FUSIONS", "FuseQuantizedGemm"]

_ops = torch.ops.qcompiler


@dataclass(frozen=True)
class Fusion:
    name: str
    match: Callable[[Node], tuple | None]   # -> (fused op, args) or None


def _is(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _linear_operands(node: Node, weight_op=_ops.dequantize):
    """(x, weight dequantize node, bias) of ``linear(x, weight_op(constants...), b)``, or None."""
    if not _is(node, torch.nn.functional.linear):
        return None
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not _is(w, weight_op) or w.args[1].op != "get_attr":
        return None
    return x, w, b


def _match_static(node: Node):
    ops = _linear_operands(node)
    if ops is None:
        return None
    x, w, b = ops
    if not (_is(x, _ops.dequantize) and _is(x.args[0], _ops.quantize)) or x.args[2] is not None:
        return None
    x_q = x.args[0]
    fmt = find_gemm_format("byte", x_q.args[3])
    w_q, w_s, w_z = w.args[0], w.args[1], w.args[2]
    if fmt is None or w_z is not None or (len(w.args) > 4 and w.args[4]):
        return None
    return fmt.packet, fmt.arguments(x_q, x.args[1], w_q, w_s, None, b, 0, None, w.args[3])


def _match_per_token(node: Node):
    ops = _linear_operands(node)
    if ops is None:
        return None
    x, w, b = ops
    if not _is(x, _ops.dequantize):
        return None
    x_q, x_s = x.args[0], x.args[1]
    if not (_is(x_q, operator.getitem) and _is(x_s, operator.getitem) and x_q.args[0] is x_s.args[0]
            and _is(x_q.args[0], _ops.quantize_per_token)):
        return None
    fmt = find_gemm_format("byte", x_q.args[0].args[1])
    if fmt is None or w.args[2] is not None:
        return None
    return fmt.packet, fmt.arguments(x_q, x_s, w.args[0], w.args[1], None, b, 0, None, w.args[3])


def _match_weight_only(node: Node):
    ops = _linear_operands(node)
    if ops is None:
        return None
    x, w, b = ops
    if _is(x, _ops.dequantize):
        return None
    block = w.args[4] if len(w.args) > 4 else 0
    fmt = find_gemm_format("byte", None)
    return fmt.packet, fmt.arguments(x, None, w.args[0], w.args[1], w.args[2], b, block, None, None)


def _int4_operands(node: Node):
    ops = _linear_operands(node, _ops.dequantize_int4)
    if ops is None:
        return None
    x, w, b = ops
    return x, w.args[:5], b   # (w_packed, w_scale, w_zero, group_size, in_features)


def _match_int4_weight_only(node: Node):
    ops = _int4_operands(node)
    if ops is None or _is(ops[0], _ops.dequantize):
        return None
    x, (w_p, w_s, w_z, group, k), b = ops
    fmt = find_gemm_format("int4", None)
    return fmt.packet, fmt.arguments(x, None, w_p, w_s, w_z, b, group, k, None)


def _match_w4a8(node: Node):
    ops = _int4_operands(node)
    if ops is None or not _is(ops[0], _ops.dequantize):
        return None
    x, (w_p, w_s, w_z, group, k), b = ops
    x_q, x_s = x.args[0], x.args[1]
    if _is(x_q, operator.getitem):
        if not (_is(x_s, operator.getitem) and x_q.args[0] is x_s.args[0] and _is(x_q.args[0], _ops.quantize_per_token)):
            return None
        dtype = x_q.args[0].args[1]
    elif _is(x_q, _ops.quantize) and x.args[2] is None:
        dtype = x_q.args[3]
    else:
        return None
    fmt = find_gemm_format("int4", dtype)
    if fmt is None:
        return None
    return fmt.packet, fmt.arguments(x_q, x_s, w_p, w_s, w_z, b, group, k, x.args[3])


FUSIONS: tuple[Fusion, ...] = (
    Fusion("static_act_gemm", _match_static),
    Fusion("per_token_act_gemm", _match_per_token),
    Fusion("weight_only_gemm", _match_weight_only),
    Fusion("int4_weight_only_gemm", _match_int4_weight_only),
    Fusion("w4a8_gemm", _match_w4a8),
)


class FuseQuantizedGemm:
    name = "fuse"
    requires = ("insert_qdq",)
    reads = ()
    writes = ()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        counts = {f.name: 0 for f in FUSIONS}
        for node in list(gm.graph.nodes):
            for fusion in FUSIONS:
                m = fusion.match(node)
                if m is None:
                    continue
                op, args = m
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(op, args)
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                counts[fusion.name] += 1
                break
        gm.graph.eliminate_dead_code()
        return PassResult(gm, sum(counts.values()) > 0, counts)
