"""Rewrite the exporter's output into the final Q/DQ graph.

- Each ``qcompiler.export::WeightDequantize`` placeholder becomes a standard DequantizeLinear
  over a typed weight initializer: INT8 and FLOAT8E4M3FN as stored; INT4 as an ONNX INT4
  tensor [N, K] whose bytes are ``qcompiler.core.packing``'s packed bytes unchanged when K is even
  (ONNX packs the flattened tensor, low nibble first: the same bytes); for odd K the rows are
  repacked, since ONNX does not pad rows.
- Constant nodes feeding a Q/DQ scale or zero-point become initializers.
- An activation Q -> DQ pair shared by several GEMMs (the exporter merges the identical pairs
  of q/k/v or gate/up projections) is copied once per consumer, so each GEMM reads its own
  Q -> DQ -> GEMM unit, the shape TensorRT expects and onnxruntime fuses into an integer GEMM
  (``MatMulIntegerToFloat``, exact int32 accumulation like the reference backend).
- Q/DQ attributes that only restate defaults (``block_size`` 0, ``output_dtype`` 0, ``axis`` of a
  per-tensor scale) are dropped.
- The placeholder domain leaves the opset imports.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompiler.core.packing import unpack_int4

from .onnx_ops import DOMAIN, WEIGHT_DQ

__all__ = ["finalize", "int4_initializer"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def int4_initializer(name: str, packed: np.ndarray, k: int) -> TensorProto:
    """An ONNX INT4 initializer [N, k] from ``qcompiler.core.packing`` bytes [N, ceil(k / 2)]."""
    n = packed.shape[0]
    if k % 2 == 0:
        t = TensorProto(name=name, data_type=TensorProto.INT4, dims=[n, k])
        t.raw_data = np.ascontiguousarray(packed, dtype=np.uint8).tobytes()
        return t
    q = unpack_int4(torch.from_numpy(np.ascontiguousarray(packed, dtype=np.uint8)), k, signed=True)
    return numpy_helper.from_array(q.numpy().astype(ml_dtypes.int4), name)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewrite_weight_dq(graph: onnx.GraphProto) -> int:
    inits = {t.name: t for t in graph.initializer}
    converted: dict[str, str] = {}   # weight initializer -> dtype it was converted for
    count = 0
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != WEIGHT_DQ:
            continue
        a = _attrs(node)
        dtype = a["dtype"].decode() if isinstance(a["dtype"], bytes) else a["dtype"]
        w_name, s_name = node.input[0], node.input[1]
        if w_name not in inits or s_name not in inits:
            raise RuntimeError(f"{node.name}: the weight {w_name!r} and scale {s_name!r} of a quantized linear "
                               "must be initializers after export")
        if dtype == "int4" and converted.get(w_name) != "int4":
            packed = numpy_helper.to_array(inits[w_name])
            inits[w_name].CopyFrom(int4_initializer(w_name, packed, int(a["in_features"])))
        converted[w_name] = dtype
        scale_rank = len(inits[s_name].dims)
        new_attrs = []
        if scale_rank > 0:
            new_attrs.append(helper.make_attribute("axis", int(a["axis"])))
        if int(a["block_size"]) > 0:
            new_attrs.append(helper.make_attribute("block_size", int(a["block_size"])))
        node.op_type, node.domain = "DequantizeLinear", ""
        del node.attribute[:]
        node.attribute.extend(new_attrs)
        count += 1
    # the exporter's value_info still describes the packed bytes (uint8 [N, ceil(K / 2)]): drop it
    stale = [v for v in graph.value_info if v.name in converted]
    for v in stale:
        graph.value_info.remove(v)
    return count


def _lift_qdq_constants(graph: onnx.GraphProto) -> int:
    """Constant nodes that feed a Q/DQ scale or zero-point become initializers."""
    wanted = {name for n in graph.node if n.op_type in _QDQ and n.domain in ("", "ai.onnx") for name in n.input[1:]}
    keep, lifted = [], 0
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            t = TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
            lifted += 1
        else:
            keep.append(node)
    if lifted:
        del graph.node[:]
        graph.node.extend(keep)
    return lifted


def _copy_node(node: onnx.NodeProto, suffix: str, inputs: dict[str, str]) -> onnx.NodeProto:
    dup = onnx.NodeProto()
    dup.CopyFrom(node)
    dup.name = f"{node.name or node.output[0]}{suffix}"
    dup.output[0] = f"{node.output[0]}{suffix}"
    for j, name in enumerate(dup.input):
        dup.input[j] = inputs.get(name, name)
    return dup


def _unshare_activation_qdq(graph: onnx.GraphProto) -> int:
    """Give every consumer of an activation Q -> DQ pair its own pair (copies of the Q and DQ nodes)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    new_nodes, copies = [], 0
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or node.output[0] in outputs:
            continue
        dqs = consumers.get(node.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs):
            continue
        uses = [(dq, user) for dq in dqs for user in consumers.get(dq.output[0], [])]
        for i, (dq, user) in enumerate(uses[1:], start=1):
            q_copy = _copy_node(node, f"_u{i}", {})
            dq_copy = _copy_node(dq, f"_u{i}", {node.output[0]: q_copy.output[0]})
            for j, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[j] = dq_copy.output[0]
            new_nodes.extend([q_copy, dq_copy])
            copies += 1
    if copies:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return copies


def _drop_default_qdq_attributes(graph: onnx.GraphProto) -> int:
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    dropped = 0
    for node in graph.node:
        if node.op_type not in _QDQ or node.domain not in ("", "ai.onnx"):
            continue
        per_tensor = ranks.get(node.input[1]) == 0
        keep = [a for a in node.attribute
                if not ((a.name in ("block_size", "output_dtype") and a.type == onnx.AttributeProto.INT and a.i == 0)
                        or (a.name == "axis" and per_tensor))]
        if len(keep) != len(node.attribute):
            dropped += len(node.attribute) - len(keep)
            del node.attribute[:]
            node.attribute.extend(keep)
    return dropped


def finalize(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite ``model`` in place (see the module docstring); returns counts of what changed."""
    graph = model.graph
    stats = {"weight_dequantize": _rewrite_weight_dq(graph), "constants_lifted": _lift_qdq_constants(graph),
             "activation_pair_copies": _unshare_activation_qdq(graph),
             "default_attributes_dropped": _drop_default_qdq_attributes(graph)}
    remaining = [n.name for n in graph.node if n.domain == DOMAIN]
    if remaining:
        raise RuntimeError(f"placeholder nodes left after rewriting: {remaining[:5]}")
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return stats
