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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.fx.node import map_arg

from qcompiler.core import layer_quant
from qcompiler.pipeline import META_KEY, Analysis, PassContext, PassResult

from .annotate import GraphAnnotation, LinearWeights, _fname, eval_param_node, linear_parts
from .fallback import rule_reason

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


@dataclass(frozen=True)
class FoldTarget:
    """Where a group's ``1 / s`` goes: ``kind`` "norm" (``node`` the norm), "linear" (``node`` the
    producer; ``rows[c]`` the producer row input channel ``c`` reads) or "explicit" (``reason``)."""

    kind: str
    node: Node | None = None
    rows: torch.Tensor | None = None
    reason: str = ""
    positive: bool = False        # the path holds relu-like ops: the scale must be > 0
    through_cache: bool = False   # the path crosses a KV cache's concatenation: other graphs read it

    @property
    def where(self) -> str:
        """The report's ``smoothing`` entry."""
        return "explicit" if self.kind == "explicit" else f"{self.kind}:{self.node.meta[META_KEY].fqn}"


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
        src = _through_layout_ops(x)
        if src.name in ann.norms and (_fname(src) == "layer_norm" or src.name in ann.norm_gain):
            return FoldTarget("norm", src)
        kv = ctx.recipe.kv_cache
        kv_reason = None if kv is None else (
            "recipe.kv_cache calibrates static value scales on the float model's (unscaled) values"
            if kv.is_static("value") else "recipe.kv_cache quantizes the values on the path from the value projection")
        return _producer_target(x, fqns, ann, kv_reason)

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


# ---- proving a producer linear: which of its rows each input channel reads -------------------------

_SENTINEL = -1        # code of a value no producer row gives (the KV cache's earlier entries)
_MAX_DEPTH = 48
_MAX_PATHS = 8
_CASTS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone", "detach"}
_GATHER_METHODS = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "flatten",
                   "unflatten", "repeat_interleave", "repeat", "split", "chunk", "narrow", "movedim", "swapaxes"}
_GATHERS = (operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
            torch.flatten, torch.unflatten, torch.repeat_interleave, torch.split, torch.chunk, torch.narrow,
            torch.movedim, torch.swapaxes)
_POSITIVE_HOMOGENEOUS = (F.relu, torch.relu, F.leaky_relu, torch._C._nn.leaky_relu)   # f(z / s) = f(z) / s, s > 0
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_MATMULS = (torch.matmul, operator.matmul, torch.bmm)


class _Refused(Exception):
    """The path does not prove the fold; the message says why."""


def _step(node: Node) -> tuple[str, list[Node]] | None:
    """How ``node`` passes a producer's channels on: (kind, the inputs it may pass on), None if it
    computes something else. Kinds: cast, gather (a pure index map), scale (times or divided by
    another factor), positive (relu-like), attention (the values' side of ``weights @ V``), cache."""
    args, kw = node.args, node.kwargs
    first = [args[0]] if args and isinstance(args[0], Node) else []
    if node.op == "call_method":
        t = node.target
        kind = ("cast" if t in _CASTS else "gather" if t in _GATHER_METHODS else "positive" if t == "relu"
                else "scale" if t in ("mul", "div") and "rounding_mode" not in kw else None)
        if kind == "scale" and t == "mul" and len(args) > 1 and isinstance(args[1], Node):
            return kind, first + [args[1]]
        return (kind, first) if kind and first else None
    if node.op != "call_function":
        return None
    t = node.target
    if t in _GATHERS or t in _POSITIVE_HOMOGENEOUS:
        return ("gather" if t in _GATHERS else "positive", first) if first else None
    if t in (F.dropout, torch.dropout):
        training = kw.get("training", kw.get("train", args[2] if len(args) > 2 else t is F.dropout))
        return ("cast", first) if first and training is False else None
    if t in (operator.mul, torch.mul):
        return "scale", [a for a in args[:2] if isinstance(a, Node)]
    if t in (operator.truediv, torch.div) and "rounding_mode" not in kw:
        return ("scale", first) if first else None
    if t in _SDPA:
        value = args[2] if len(args) > 2 else kw.get("value")
        return ("attention", [value]) if isinstance(value, Node) else None
    if t in _MATMULS and len(args) == 2 and isinstance(args[1], Node):
        return "attention", [args[1]]
    if t is torch.cat and _cache_parts(node) is not None:
        return "cache", [node.args[0][-1]]
    return None


def _cache_parts(node: Node) -> list[Node] | None:
    """The earlier entries of a KV cache's ``cat([past, new], dim=-2)`` of 4-D tensors: graph inputs or
    constants (an empty cache), none of them computed here; None if ``node`` is no such concatenation."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    parts = node.args[0]
    shape = _shape(node)
    if shape is None or len(shape) != 4 or dim not in (2, -2) or not isinstance(parts, (list, tuple)) \
            or len(parts) < 2 or not all(isinstance(p, Node) for p in parts):
        return None
    past = list(parts[:-1])
    ok = all((p.op == "placeholder" and getattr(p.meta.get(META_KEY), "kind", "") == "input")
             or (p.op == "call_function" and not p.all_input_nodes) for p in past)
    return past if ok else None


def _paths(node: Node, refusals: list[str], kv_reason: str | None, depth: int = 0) -> Iterator[list[Node]]:
    """Paths ``[producer linear, ..., node]`` of steps that may pass the producer's channels on."""
    info = node.meta.get(META_KEY)
    if info is not None and info.kind == "linear":
        yield [node]
        return
    step = _step(node) if depth < _MAX_DEPTH else None
    if step is not None and step[0] == "attention" and kv_reason is not None:
        refusals.append(f"the value path of attention {node.name}: {kv_reason}")
        return
    if step is None:
        refusals.append(f"the path stops at {node.name} ({_fname(node)}), not a layout, attention or positively "
                        "homogeneous op")
        return
    for src in step[1]:
        for path in _paths(src, refusals, kv_reason, depth + 1):
            yield path + [node]


def _producer_target(x: Node, fqns: list[str], ann: GraphAnnotation, kv_reason: str | None) -> FoldTarget:
    """A producer linear whose rows ``x``'s channels provably read, else explicit with the reason."""
    refusals: list[str] = []
    try:
        for i, path in enumerate(_paths(x, refusals, kv_reason)):
            if i == _MAX_PATHS:
                break
            pf = path[0].meta[META_KEY].fqn
            if pf in fqns or len(ann.linears[pf]) != 1:
                refusals.append(f"{pf} is applied more than once or reads its own output")
                continue
            try:
                return _trace_rows(path)
            except _Refused as e:
                refusals.append(f"folding into {pf}: {e}")
    except _Refused as e:          # a size the graph does not know
        refusals.append(str(e))
    return FoldTarget("explicit", reason="; ".join(dict.fromkeys(refusals[:3])) or "no norm or linear produces it")


def _trace_rows(path: list[Node]) -> FoldTarget:
    """Prove the fold into ``path[0]`` by running the path on codes: the producer's output holds its
    row index in every position, each step maps codes as it maps values (layout ops are pure index
    maps; casts, relu and factors keep them; attention takes a channel from the attended positions of
    the values, which must agree). Refused unless each channel of ``path[-1]`` reads one row everywhere
    and everything else that reads the path reads none of those rows (a KV cache leaving the graph
    aside)."""
    shape = _shape(path[0])
    if not shape:
        raise _Refused(f"{path[0].name} has no known shape")
    codes = torch.arange(shape[-1]).expand(shape).contiguous()
    kinds = ["producer"] + [_step(n)[0] for n in path[1:]]
    # the cache handed back to the model: read from its concatenation up to the attention
    cache = range(kinds.index("cache"), kinds.index("attention")) if "cache" in kinds and "attention" in kinds \
        else range(0)
    side: list[tuple[Node, torch.Tensor | None, bool]] = []   # (reader, codes it reads or None: all, is the cache)
    for i, node in enumerate(path):
        if i:
            codes = _map_codes(node, path[i - 1], codes, kinds[i])
        if i + 1 < len(path):
            side += [(u, _read_codes(u, node, codes), i in cache) for u in node.users if u is not path[i + 1]]
    flat = codes.reshape(-1, codes.shape[-1])
    rows = flat[0]
    if bool((rows < 0).any()) or not bool((flat == rows).all()):
        raise _Refused(f"the channels of {path[-1].name} do not each read one producer row everywhere")
    scaled = torch.zeros(shape[-1], dtype=torch.bool)
    scaled[rows] = True
    for u, read, in_cache in side:      # the cache's earlier entries (sentinel) hold scaled values too
        hit = read is None or bool((read < 0).any()) or bool(scaled[read[read >= 0]].any())
        if hit and not (in_cache and _leaves_graph(u)):
            raise _Refused(f"the rows it scales also reach {u.name} ({_fname(u)})")
    return FoldTarget("linear", path[0], rows.clone(), positive="positive" in kinds, through_cache="cache" in kinds)


def _map_codes(node: Node, prev: Node, codes: Any, kind: str) -> Any:
    """The codes of ``node`` from those of ``prev`` (the path's previous node)."""
    uses = sum(a is prev for a in _flat_args(node))
    if uses != 1:
        raise _Refused(f"{node.name} reads {prev.name} {uses} times")
    if kind == "cast":             # a cast may read another tensor for its dtype (type_as)
        return codes
    if kind == "positive":
        if len(_flat_args(node)) > 1:
            raise _Refused(f"{node.name} ({_fname(node)}) takes another tensor")
        return codes
    if kind == "scale":
        divides = node.target in (operator.truediv, torch.div, "div")
        if _shape(node) != _shape(prev) or (divides and node.args[0] is not prev):
            raise _Refused(f"{node.name} ({_fname(node)}) broadcasts or divides by the path")
        return codes
    if kind == "attention":
        return _attention_codes(node, prev, codes)
    past = {}
    for p in _cache_parts(node) if kind == "cache" else ():
        if _shape(p) is None:
            raise _Refused(f"the cache entry {p.name} has no known shape")
        past[p] = torch.full(_shape(p), _SENTINEL, dtype=codes.dtype)
    out = _run(node, prev, codes, past)
    if isinstance(out, torch.Tensor) and tuple(out.shape) != _shape(node):
        raise _Refused(f"{node.name} ({_fname(node)}) gives shape {tuple(out.shape)} on the codes, not {_shape(node)}")
    return out


def _attention_codes(node: Node, prev: Node, codes: torch.Tensor) -> torch.Tensor:
    """Codes of an attention's output from its values' (``prev``): channel d of a head is the values'
    channel d of that head (of its KV head under grouped-query SDPA), over all attended positions."""
    if node.target in _SDPA:
        gqa = bool(node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False))
    else:
        gqa = False
    if codes.dim() < 2:
        raise _Refused(f"attention {node.name} reads 1-D values")
    top = codes.amax(-2, keepdim=True)           # the earlier cache entries' sentinel is below every row
    if bool((top < 0).any()) or not bool(((codes == top) | (codes == _SENTINEL)).all()):
        raise _Refused(f"the values of attention {node.name} mix producer rows along the attended positions")
    out = _shape(node)
    if out is None or len(out) != codes.dim():
        raise _Refused(f"attention {node.name} has no known output shape")
    if gqa and codes.dim() >= 3 and top.shape[-3] != out[-3]:
        top = top.repeat_interleave(out[-3] // top.shape[-3], dim=-3)    # query head h reads KV head h // rep
    try:
        return top.expand(out).contiguous()
    except RuntimeError as e:
        raise _Refused(f"attention {node.name}: values {tuple(codes.shape)} do not broadcast to {out}") from e


def _read_codes(user: Node, node: Node, codes: Any) -> torch.Tensor | None:
    """The codes ``user`` reads from ``node``: those of its result where it is a gather of ``node`` alone,
    else None (all of them)."""
    step = _step(user)
    if step is None or step[0] != "gather" or sum(a is node for a in _flat_args(user)) != 1:
        return None
    try:
        out = _run(user, node, codes, {})
    except (_Refused, RuntimeError, TypeError, IndexError, ValueError):
        return None
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([p.reshape(-1) for p in parts]).unique()


def _leaves_graph(node: Node) -> bool:
    """Whether ``node`` reaches nothing but the graph's output, through gathers and casts (a KV cache
    handed back to the model)."""
    if node.op == "output":
        return True
    step = _step(node)
    return step is not None and step[0] in ("gather", "cast") and all(_leaves_graph(u) for u in node.users)


def _run(node: Node, prev: Node, codes: Any, given: dict[Node, Any]) -> Any:
    """Run ``node``'s op with ``codes`` for ``prev``, ``given`` values for those nodes, and every other
    argument at its traced value (sizes; a tensor there refuses)."""
    def value(a: Node) -> Any:
        if a is prev:
            return codes
        if a in given:
            return given[a]
        v = a.meta.get("example_value", a.meta.get("val"))
        if v is None or isinstance(v, torch.Tensor):
            raise _Refused(f"{node.name} ({_fname(node)}) also reads {a.name}")
        return _hint(v)
    args, kwargs = map_arg(node.args, value), map_arg(node.kwargs, value)
    try:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        raise _Refused(f"{node.name} ({_fname(node)}) does not run on the codes: {e}") from e


def _hint(v: Any) -> Any:
    """``v`` with symbolic sizes replaced by the values they were traced with."""
    if isinstance(v, torch.SymInt):
        try:
            return optimization_hint(v)
        except Exception as e:      # an unbacked size: no value to run the codes with
            raise _Refused(f"size {v} has no traced value") from e
    if isinstance(v, (tuple, list)):
        return type(v)(_hint(a) for a in v) if not isinstance(v, torch.Size) else tuple(_hint(a) for a in v)
    return v


def _shape(node: Node) -> tuple[int, ...] | None:
    v = node.meta.get("example_value", node.meta.get("val"))
    return tuple(_hint(tuple(v.shape))) if isinstance(v, torch.Tensor) else None


def _flat_args(node: Node) -> list[Any]:
    out: list[Any] = []
    map_arg((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


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
