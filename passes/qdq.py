"""Q/DQ insertion: turn each quantized linear into a fake-quant linear over qcompiler ops.

Per quantized linear: the weight becomes constants ``w_q, w_scale[, w_zero]`` feeding
``qcompiler::dequantize`` (INT4: packed bytes feeding ``qcompiler::dequantize_int4``); weights an
algorithm pass already quantized (``ctx.analyses[Analysis.WEIGHT_ALGORITHM]``) are used as they are; the input goes through ``qcompiler::quantize`` +
``qcompiler::dequantize`` with its static scale, or ``qcompiler::quantize_per_token`` +
``dequantize`` when dynamic; the node becomes ``linear(x_dq, w_dq, bias)``. Linears kept in
float whose weights an earlier pass changed (SmoothQuant) get those weights as constants.
The result runs as is (the fake-quant reference) and is what ONNX export reads.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qcompiler.core import layer_quant
from qcompiler.pipeline import META_KEY, Analysis, PassContext, PassResult

from .annotate import linear_parts
from .smoothquant import add_constant

__all__ = ["InsertQDQ"]

_ops = torch.ops.qcompiler


class InsertQDQ:
    name = "insert_qdq"
    requires = ("sensitivity_fallback",)
    reads = (Analysis.ANNOTATE,)
    writes = (Analysis.QUANTIZED_WEIGHTS,)
    after = ("weight_algorithm",)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        ann = ctx.analyses[Analysis.ANNOTATE]
        params = set(ann.param_fqn)
        recipe, act = ctx.recipe, ctx.recipe.activation
        counts = {"quantized_linears": 0, "float_linears_rewritten": 0, "shared_activation_quantizers": 0}
        shared: dict[tuple, Node] = {}
        qweights: dict[str, layer_quant.QuantizedWeight] = {}
        # weights an algorithm pass (GPTQ, AWQ clipping) already quantized, by module path
        precomputed: dict[str, layer_quant.QuantizedWeight] = ctx.analyses.get(Analysis.WEIGHT_ALGORITHM, {})
        for node in list(gm.graph.nodes):
            info = node.meta.get(META_KEY)
            if info is None or info.kind not in ("linear", "output_head"):
                continue
            fqn, parts = info.fqn, linear_parts(node, params)
            d, lw = ctx.layer_plan[fqn], ann.weights[fqn]
            out_dtype = node.meta["example_value"].dtype if "example_value" in node.meta else torch.float32
            bias = parts.bias
            if lw.modified and lw.bias is not None:
                bias = add_constant(gm, f"{fqn}_bias", lw.bias.to(out_dtype), node)
            if not d.quantize:
                if lw.modified:
                    w = add_constant(gm, f"{fqn}_weight", lw.w.to(ann.values[parts.weight.name].dtype), node)
                    self._replace(gm, node, parts.x, w, bias)
                    counts["float_linears_rewritten"] += 1
                continue
            if fqn not in qweights:
                qweights[fqn] = precomputed.get(fqn) or layer_quant.quantize_weight(lw.w, recipe.weight)
            qw = qweights[fqn]
            with gm.graph.inserting_before(node):
                w_q = add_constant(gm, f"{fqn}_w_q", qw.storage(), node)
                w_scale = add_constant(gm, f"{fqn}_w_scale", qw.scale, node)
                w_zero = add_constant(gm, f"{fqn}_w_zero", qw.zero, node) if qw.zero is not None else None
                if qw.is_int4:
                    w_dq = gm.graph.call_function(_ops.dequantize_int4, (w_q, w_scale, w_zero, qw.group_size or 0,
                                                                         qw.shape[1], out_dtype))
                else:
                    w_dq = gm.graph.call_function(_ops.dequantize, (w_q, w_scale, w_zero, out_dtype,
                                                                    qw.group_size or 0))
                x = parts.x
                if act is not None:
                    # one quantizer per (input, scale): the linears reading one tensor with equal scales
                    # (q / k / v, gate / up) share it, so it runs once
                    key = (x, act.dynamic, act.dtype, out_dtype, None if act.dynamic else float(d.act_scale),
                           lw.w.device)
                    if key in shared:
                        counts["shared_activation_quantizers"] += 1
                    else:
                        shared[key] = self._quantize_activation(gm, node, x, act, fqn, d, lw.w.device, out_dtype)
                    x = shared[key]
            self._replace(gm, node, x, w_dq, bias)
            counts["quantized_linears"] += 1
        ctx.analyses[Analysis.QUANTIZED_WEIGHTS] = qweights
        gm.graph.eliminate_dead_code()
        return PassResult(gm, sum(counts.values()) > 0, counts)

    @staticmethod
    def _quantize_activation(gm: GraphModule, node: Node, x: Node, act, fqn: str, d, device: torch.device,
                             out_dtype: torch.dtype) -> Node:
        """``dequantize(quantize(x))`` in front of ``node``: per token when dynamic, else with the layer's static scale."""
        if act.dynamic:
            qt = gm.graph.call_function(_ops.quantize_per_token, (x, act.dtype.value))
            x_q = gm.graph.call_function(operator.getitem, (qt, 0))
            x_s = gm.graph.call_function(operator.getitem, (qt, 1))
        else:
            # on the weight's device: a CPU scale beside CUDA operands would keep the
            # GEMM off every GPU kernel ("tensors on several devices")
            x_s = add_constant(gm, f"{fqn}_act_scale", torch.tensor(d.act_scale, dtype=torch.float32, device=device),
                               node)
            x_q = gm.graph.call_function(_ops.quantize, (x, x_s, None, act.dtype.value))
        return gm.graph.call_function(_ops.dequantize, (x_q, x_s, None, out_dtype))

    @staticmethod
    def _replace(gm: GraphModule, node: Node, x: Node, w: Node, bias: Node | None) -> None:
        """Replace ``node`` by ``linear(x, w, bias)`` with w in [N, K] layout."""
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.nn.functional.linear, (x, w, bias))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
