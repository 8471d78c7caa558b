"""SmoothQuant folding: migrate activation outliers into the weights (Xiao et al., 2023).

For the linears that read one input node (q/k/v after one norm, gate/up, ...) a per-channel
scale ``s_j = max|X_j|^a / max|W_j|^(1-a)`` divides the input and multiplies the weights'
columns, so ``(X / s) @ (W * s).T == X @ W.T``. Alpha is fixed, or searched per group on
calibration rows (the group's quantized-output error). ``1 / s`` is folded, found from the
graph, into

- a norm whose output only these linears read: the gain (RMSNorm ``w``, Gemma ``1 + w``, any
  parameter-only gain) or LayerNorm's weight and bias;
- a linear producing the input, directly or through an elementwise product (up -> down in
  gated MLPs), whose output only feeds this input: its rows and bias;

and otherwise applied as an explicit ``mul`` in front of the linears.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from qcompiler.core import layer_quant
from qcompiler.pipeline import META_KEY, Analysis, PassContext, PassResult

from .annotate import LinearWeights, _fname, eval_param_node, linear_parts
from .fallback import rule_reason

__all__ = ["SmoothQuantFold", "smoothing_scale", "add_constant"]

log = logging.getLogger(__name__)


def smoothing_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1 - alpha)``, clamped away from 0 and inf."""
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.float().clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5, max=1e5)


def add_constant(gm: GraphModule, base: str, value: torch.Tensor, before: Node) -> Node:
    """Register ``value`` as a buffer on ``gm`` and return a ``get_attr`` node for it."""
    name = "_qc_" + "".join(c if c.isalnum() else "_" for c in base)
    stem, i = name, 1
    while hasattr(gm, name):
        name, i = f"{stem}_{i}", i + 1
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


class SmoothQuantFold:
    name = "smoothquant_fold"
    requires = ("outliers", "fallback_rules")
    writes = ()
    reads = (Analysis.ANNOTATE, Analysis.CALIBRATION, Analysis.SMOOTHING)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if not self.enabled(ctx):
            return PassResult(gm, False, {})
        ann = ctx.analyses[Analysis.ANNOTATE]
        stats = ctx.analyses[Analysis.CALIBRATION]
        params = set(ann.param_fqn)
        groups: dict[Node, list[Node]] = {}
        for node in gm.graph.nodes:
            info = node.meta.get(META_KEY)
            if info is not None and info.kind in ("linear", "output_head"):
                groups.setdefault(linear_parts(node, params).x, []).append(node)
        counts = {"groups": 0, "folded_into_norm": 0, "folded_into_linear": 0, "explicit": 0, "skipped": 0}
        for x, nodes in groups.items():
            fqns = list(dict.fromkeys(n.meta[META_KEY].fqn for n in nodes))
            if any(rule_reason(ctx, f) or f not in stats or not ctx.layer_plan[f].quantize for f in fqns):
                counts["skipped"] += 1
                continue
            if any(len(ann.linears[f]) > 1 for f in fqns):
                counts["skipped"] += 1   # a module applied twice would need one scale for both inputs
                continue
            ws = [ann.weights[f].w.float() for f in fqns]
            alpha, s = self.group_scale(ctx, fqns, ws, stats[fqns[0]])
            if s is None:
                counts["skipped"] += 1
                continue
            where = self._fold(gm, ctx, x, nodes, s)
            counts["groups"] += 1
            counts[{"norm": "folded_into_norm", "linear": "folded_into_linear"}.get(where[0], "explicit")] += 1
            for f, w in zip(fqns, ws):
                old = ann.weights[f]
                ann.weights[f] = LinearWeights(w * s[None, :], old.bias, old.transposed, modified=True)
                ctx.analyses[Analysis.SMOOTHING][f] = s
                d = ctx.layer_plan[f]
                d.alpha, d.smoothing = alpha, where[1]
        return PassResult(gm, counts["groups"] > 0, counts)

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.recipe.smoothquant is not None

    def group_scale(self, ctx: PassContext, fqns: list[str], ws: list[torch.Tensor], st
                    ) -> tuple[float | None, torch.Tensor | None]:
        """(alpha, per-channel scale s) for the linears ``fqns`` sharing one input (s None: skip)."""
        spec = ctx.recipe.smoothquant
        w_absmax = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
        x_absmax, samples = st.absmax.to(w_absmax.device), st.samples.to(w_absmax.device)   # meet the weights
        memo = ctx.analyses.setdefault(Analysis.MEMO, {})
        key = ("smoothquant_alpha", tuple(fqns))
        if spec.search and key not in memo:
            memo[key] = self._search(ctx, fqns, ws, x_absmax, samples, w_absmax)
        alpha = memo[key] if spec.search else spec.alpha
        return alpha, smoothing_scale(x_absmax, w_absmax, alpha)

    @staticmethod
    def _search(ctx, fqns, ws, x_absmax, samples, w_absmax) -> float:
        recipe = ctx.recipe
        x = samples.float()
        refs = [torch.nn.functional.linear(x, w) for w in ws]
        best, best_err = ctx.recipe.smoothquant.alpha, float("inf")
        for alpha in recipe.smoothquant.alpha_grid:
            s = smoothing_scale(x_absmax, w_absmax, alpha)
            xs = x / s
            scale = None
            if not recipe.activation.dynamic:
                scale = layer_quant.static_act_scale(x_absmax / s, xs, recipe.activation)
            err = 0.0
            for w, ref in zip(ws, refs):
                y = layer_quant.simulate_linear(xs, w * s[None, :], None, recipe, scale)
                err += layer_quant.relative_error(y, ref) ** 2
            if err < best_err:
                best, best_err = alpha, err
        return best

    def _fold(self, gm: GraphModule, ctx: PassContext, x: Node, nodes: list[Node], s: torch.Tensor):
        ann = ctx.analyses[Analysis.ANNOTATE]
        consumers = set(nodes)
        only_ours = all(u in consumers for u in x.users)
        src = _through_layout_ops(x) if only_ours else x
        if only_ours and src.name in ann.norms:
            x = src
            if _fname(x) == "layer_norm":
                args = list(x.args)
                for i in (2, 3):
                    if i < len(args) and isinstance(args[i], Node):
                        val = eval_param_node(args[i], ann.values).float() / s
                        args[i] = add_constant(gm, f"{ann.norms[x.name]}_{i}_smoothed", val, x)
                x.args = tuple(args)
                return "norm", "norm:" + ann.norms[x.name]
            if x.name in ann.norm_gain:
                gain = ann.norm_gain[x.name]
                val = eval_param_node(gain, ann.values)
                const = add_constant(gm, f"{ann.norms[x.name]}_gain_smoothed", (val.float() / s).to(val.dtype), x)
                x.args = tuple(const if a is gain else a for a in x.args)
                return "norm", "norm:" + ann.norms[x.name]
        if only_ours:
            producer = self._producer_linear(x, ann)
            if producer is not None:
                pf = producer.meta[META_KEY].fqn
                old = ann.weights[pf]
                ann.weights[pf] = LinearWeights(old.w.float() / s[:, None],
                                                None if old.bias is None else old.bias.float() / s,
                                                old.transposed, modified=True)
                rows = ctx.analyses.setdefault(Analysis.ROW_SCALING, {})
                rows[pf] = rows[pf] / s if pf in rows else 1.0 / s   # output rows multiplied by this
                return "linear", "linear:" + pf
        inv = add_constant(gm, f"{nodes[0].meta[META_KEY].fqn}_inv_smooth", (1.0 / s).to(torch.float32), nodes[0])
        with gm.graph.inserting_before(nodes[0]):
            xs = gm.graph.call_function(operator.mul, (x, inv))
        for n in nodes:
            n.replace_input_with(x, xs)
        return "explicit", "explicit"

    @staticmethod
    def _producer_linear(x: Node, ann) -> Node | None:
        """A linear whose output is ``x`` or one factor of the elementwise product ``x``, read only there."""
        candidates = [x]
        if x.op == "call_function" and x.target in (operator.mul, torch.mul) and len(x.args) == 2 \
                and all(isinstance(a, Node) for a in x.args):
            candidates = list(x.args)
        for c in candidates:
            info = c.meta.get(META_KEY)
            if info is None or info.kind != "linear" or len(c.users) != 1:
                continue
            if len(ann.linears[info.fqn]) != 1:
                continue
            other_ok = c is x or all(
                isinstance(a, Node) and a.meta.get("example_value") is not None
                and a.meta["example_value"].shape == c.meta["example_value"].shape for a in x.args)
            if other_ok:
                return c
        return None


_LAYOUT_METHODS = {"to", "type_as", "float", "type", "contiguous", "view", "reshape", "half", "bfloat16"}


def _through_layout_ops(x: Node) -> Node:
    """Walk up casts and reshapes that keep the last (channel) dimension and have one user."""
    cur = x
    while cur.op == "call_method" and cur.target in _LAYOUT_METHODS and isinstance(cur.args[0], Node):
        parent = cur.args[0]
        if len(parent.users) != 1:
            break
        a, b = cur.meta.get("example_value"), parent.meta.get("example_value")
        if a is None or b is None or a.shape[-1] != b.shape[-1]:
            break
        cur = parent
    return cur
