"""SmoothQuant folding: migrate activation outliers into the weights (Xiao et al., 2023).

For the linears that read one input node (q/k/v after one norm, gate/up, ...) a per-channel
scale ``s_j = max|X_j|^a / max|W_j|^(1-a)`` divides the input and multiplies the weights'
columns, so ``(X / s) @ (W * s).T == X @ W.T``. Alpha is fixed, or searched per group on
calibration rows (the group's quantized-output error). ``1 / s`` is folded, found from the
graph, into

- a norm whose output only these linears read: the gain (RMSNorm ``w``, Gemma ``1 + w``, any
  parameter-only gain) or LayerNorm's weight and bias;
- the rows (and bias) of a linear producing the input, when the graph proves, channel by channel,
  that scaling those rows scales the input's channels and nothing else (``_trace_rows``). The path
  may hold layout ops (view, reshape, transpose, slices, split, grouped-query head repetition),
  casts, a product with a factor the scaled rows do not feed (gated MLPs: up -> down),
  ``relu`` / ``leaky_relu`` (``relu(z / s) == relu(z) / s`` for ``s > 0``: OPT's fc1 -> fc2) and
  an attention, whose output is ``weights @ V``: a per-channel scale on the values comes out on the
  same channels (o_proj's input from v_proj's rows, the KV cache's concatenation included: every
  value entering the cache comes from that projection, scaled alike). Input channels that read one
  producer row (query heads sharing a KV head) get one scale: the largest of their scales;

and otherwise applied as an explicit ``mul`` in front of the linears (the reason is logged and
added to the layers' notes).
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
from .smoothing_paths import FoldTarget, producer_target, through_layout_ops

__all__ = ["SmoothQuantFold", "FoldTarget", "smoothing_scale", "add_constant"]

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
            target = self._target(ctx, x, nodes, fqns)
            alpha, s = self._group_scale(ctx, fqns, ws, stats[fqns[0]], target)
            if s is None:
                counts["skipped"] += 1
                continue
            target = _agree_across_graphs(ctx, (self.name, *fqns), _admissible(target, s))
            self._apply(gm, ctx, x, nodes, target, s)
            _record(ctx, fqns, ws, s, alpha, target)
            counts["groups"] += 1
            counts[_COUNTERS[target.kind]] += 1
        return PassResult(gm, counts["groups"] > 0, counts)

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.recipe.smoothquant is not None

    def group_scale(self, ctx: PassContext, fqns: list[str], ws: list[torch.Tensor], st,
                    rows: torch.Tensor | None = None) -> tuple[float | None, torch.Tensor | None]:
        """(alpha, per-channel scale s) for the linears ``fqns`` sharing one input (s None: skip).
        ``rows``: input channels with equal entries share one scale (``_tied_scale``)."""
        spec = ctx.recipe.smoothquant
        w_absmax = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
        x_absmax, samples = st.absmax.to(w_absmax.device), st.samples.to(w_absmax.device)   # meet the weights
        memo = ctx.analyses.setdefault(Analysis.MEMO, {})
        key = ("smoothquant_alpha", tuple(fqns)) + (() if rows is None else ("tied",))
        if spec.search and key not in memo:
            memo[key] = self._search(ctx, fqns, ws, x_absmax, samples, w_absmax, rows)
        alpha = memo[key] if spec.search else spec.alpha
        return alpha, _tied_scale(x_absmax, w_absmax, alpha, rows)

    def _group_scale(self, ctx: PassContext, fqns: list[str], ws: list[torch.Tensor], st, target: FoldTarget):
        """``group_scale``, tied where the target's channels share producer rows. A subclass with a
        scale of its own (AWQFold) gets it untied: ``_admissible`` folds it only if it is tied already."""
        rows = target.rows if target.kind == "linear" and _has_ties(target.rows) else None
        if rows is not None and type(self).group_scale is SmoothQuantFold.group_scale:
            return self.group_scale(ctx, fqns, ws, st, rows)
        return self.group_scale(ctx, fqns, ws, st)

    @staticmethod
    def _search(ctx, fqns, ws, x_absmax, samples, w_absmax, rows=None) -> float:
        recipe = ctx.recipe
        x = samples.float()
        refs = [torch.nn.functional.linear(x, w) for w in ws]
        best, best_err = ctx.recipe.smoothquant.alpha, float("inf")
        for alpha in recipe.smoothquant.alpha_grid:
            s = _tied_scale(x_absmax, w_absmax, alpha, rows)    # the scale that would be folded
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

    def _target(self, ctx: PassContext, x: Node, nodes: list[Node], fqns: list[str]) -> FoldTarget:
        """Where ``1 / s`` of the group ``nodes`` reading ``x`` can go, from the graph."""
        ann = ctx.analyses[Analysis.ANNOTATE]
        if not all(u in set(nodes) for u in x.users):
            return FoldTarget("explicit", reason=f"its input {x.name} has readers outside this group")
        src = through_layout_ops(x)
        if src.name in ann.norms and (_fname(src) == "layer_norm" or src.name in ann.norm_gain):
            return FoldTarget("norm", src)
        kv = ctx.recipe.kv_cache
        kv_reason = None if kv is None else (
            "recipe.kv_cache calibrates static value scales on the float model's (unscaled) values"
            if kv.is_static("value") else "recipe.kv_cache quantizes the values on the path from the value projection")
        return producer_target(x, fqns, ann, kv_reason)

    def _apply(self, gm: GraphModule, ctx: PassContext, x: Node, nodes: list[Node], target: FoldTarget,
               s: torch.Tensor) -> None:
        """Fold ``1 / s`` where ``target`` says."""
        ann = ctx.analyses[Analysis.ANNOTATE]
        if target.kind == "norm":
            norm = target.node
            if _fname(norm) == "layer_norm":
                args = list(norm.args)
                for i in (2, 3):
                    if i < len(args) and isinstance(args[i], Node):
                        val = eval_param_node(args[i], ann.values).float() / s
                        args[i] = add_constant(gm, f"{ann.norms[norm.name]}_{i}_smoothed", val, norm)
                norm.args = tuple(args)
            else:
                gain = ann.norm_gain[norm.name]
                val = eval_param_node(gain, ann.values)
                const = add_constant(gm, f"{ann.norms[norm.name]}_gain_smoothed", (val.float() / s).to(val.dtype),
                                     norm)
                norm.args = tuple(const if a is gain else a for a in norm.args)
        elif target.kind == "linear":
            pf = target.node.meta[META_KEY].fqn
            old = ann.weights[pf]
            row = _row_scale(target.rows, s, old.w.shape[0])
            ann.weights[pf] = LinearWeights(old.w.float() / row[:, None],
                                            None if old.bias is None else old.bias.float() / row,
                                            old.transposed, modified=True)
            scaling = ctx.analyses.setdefault(Analysis.ROW_SCALING, {})
            scaling[pf] = scaling[pf] / row if pf in scaling else 1.0 / row   # output rows multiplied by this
        else:
            self._explicit(gm, x, nodes, s)

    @staticmethod
    def _explicit(gm: GraphModule, x: Node, nodes: list[Node], s: torch.Tensor) -> None:
        inv = add_constant(gm, f"{nodes[0].meta[META_KEY].fqn}_inv_smooth", (1.0 / s).to(torch.float32), nodes[0])
        with gm.graph.inserting_before(nodes[0]):
            xs = gm.graph.call_function(operator.mul, (x, inv))
        for n in nodes:
            n.replace_input_with(x, xs)


_COUNTERS = {"norm": "folded_into_norm", "linear": "folded_into_linear", "explicit": "explicit"}


def _record(ctx: PassContext, fqns: list[str], ws: list[torch.Tensor], s: torch.Tensor, alpha: float | None,
            target: FoldTarget) -> None:
    """The consumers' columns times ``s``, their scale, and the decision in their ``LayerDecision``."""
    ann = ctx.analyses[Analysis.ANNOTATE]
    if target.kind == "explicit":
        log.info("smoothquant: the input scale of %s is applied explicitly: %s", ", ".join(fqns), target.reason)
    for f, w in zip(fqns, ws):
        old = ann.weights[f]
        ann.weights[f] = LinearWeights(w * s[None, :], old.bias, old.transposed, modified=True)
        ctx.analyses[Analysis.SMOOTHING][f] = s
        d = ctx.layer_plan[f]
        d.alpha, d.smoothing = alpha, target.where
        if target.reason:
            note = f"input scale applied explicitly: {target.reason}"
            d.note = f"{d.note}; {note}" if d.note else note


def _has_ties(rows: torch.Tensor | None) -> bool:
    return rows is not None and rows.unique().numel() < rows.numel()


def _tied_max(v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``v`` (non-negative) with each entry replaced by the maximum over the entries of its row."""
    if rows is None:
        return v
    rows = rows.to(v.device)
    top = torch.zeros(int(rows.max()) + 1, dtype=v.dtype, device=v.device).scatter_reduce(0, rows, v, "amax")
    return top[rows]


def _tied_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, rows: torch.Tensor | None
                ) -> torch.Tensor:
    """SmoothQuant's scale; where ``rows`` ties channels, the largest of the group's scales (one of its
    channels' SmoothQuant scale), so no channel's smoothed activation range exceeds what its own scale
    gives: the range a static activation scale must cover does not grow."""
    return _tied_max(smoothing_scale(x_absmax, w_absmax, alpha), rows)


def _row_scale(rows: torch.Tensor, s: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The producer's per-row divisor: ``s[c]`` on the row channel ``c`` reads, 1 on rows no channel reads."""
    row = torch.ones(n_rows, dtype=torch.float32, device=s.device)
    row[rows.to(s.device)] = s.float()
    return row


def _admissible(target: FoldTarget, s: torch.Tensor) -> FoldTarget:
    """``target``, or explicit where the scale cannot be folded there: it differs across channels that
    read one producer row, or is not positive on a path through relu."""
    if target.kind != "linear":
        return target
    pf = target.node.meta[META_KEY].fqn
    if not torch.equal(_row_scale(target.rows, s, int(target.rows.max()) + 1)[target.rows.to(s.device)], s.float()):
        return FoldTarget("explicit", reason=f"its scale differs across input channels that read one row of {pf} "
                                             "(query heads sharing a KV head), and this pass's scale is not tied")
    if target.positive and not bool((s > 0).all()):
        return FoldTarget("explicit", reason=f"the path from {pf} passes a relu, which only a positive scale crosses")
    return target


def _agree_across_graphs(ctx: PassContext, group: tuple[str, ...], target: FoldTarget) -> FoldTarget:
    """Keep one backend's graphs (prefill, decode steps) to one decision for ``group`` (pass name, consumer
    paths) where a fold crosses the KV cache: values one graph writes to the cache, the next reads back."""
    memo = ctx.analyses.setdefault(Analysis.MEMO, {})
    key = ("smoothquant_target", group)
    now = (target.where, target.through_cache)
    earlier = memo.setdefault(key, now)
    if earlier == now:
        return target
    if earlier[1]:
        raise RuntimeError(f"{group[0]} of {list(group[1:])}: an earlier graph folded the scale into {earlier[0]} "
                           f"through the KV cache, so the cache holds scaled values, but this graph chose {now[0]!r}"
                           + (f" ({target.reason})" if target.reason else ""))
    if now[1]:
        return FoldTarget("explicit", reason=f"an earlier graph of this model chose {earlier[0]!r}, and the KV cache "
                                             "it wrote holds values this fold would not match")
    return target
