"""Graph annotation: map Dynamo's lifted parameters back to source names and classify nodes.

Every node gets a ``NodeInfo`` under ``node.meta[META_KEY]``; ``ctx.analyses[Analysis.ANNOTATE]``
holds the ``GraphAnnotation`` (real parameter values, linears, norms) and ``ctx.layer_plan``
gets one ``LayerDecision`` per linear module path. Nothing here depends on layer names:
linears are ``linear`` / ``addmm`` / ``matmul`` nodes whose weight is a 2-D parameter, norms
are ``layer_norm`` nodes or a per-channel parameter gain multiplied into an ``rsqrt``-scaled
activation, the output head is the linear whose result reaches the graph output.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcompiler.core.linear_probe import ROUTE_STOPS, ROUTER_DEPTH, is_scalar_gate
from qcompiler.pipeline import META_KEY, Analysis, LayerDecision, PassContext, PassResult

__all__ = ["NodeInfo", "LinearParts", "LinearWeights", "GraphAnnotation", "Annotate", "linear_parts", "eval_param_node"]

_PASSTHROUGH_METHODS = {"view", "reshape", "contiguous", "to", "float", "type", "clone", "half", "bfloat16"}
_CAST_METHODS = {"to", "float", "type", "type_as", "half", "bfloat16", "contiguous"}


@dataclass(frozen=True)
class NodeInfo:
    """qcompiler's annotation of one node."""

    kind: str                 # param, input, linear, output_head, norm, embedding, attention, matmul, other
    fqn: str = ""             # module path (ops) or parameter name (params)


@dataclass(frozen=True)
class LinearParts:
    """The operands of a linear node: ``y = x @ W.T + b`` with W [N, K] (``transposed``: stored [K, N])."""

    x: Node
    weight: Node
    bias: Node | None
    transposed: bool


@dataclass
class LinearWeights:
    """The current float weight [N, K] and bias of a linear; passes replace, never mutate, them."""

    w: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool
    modified: bool = False


@dataclass
class GraphAnnotation:
    """Analysis result of ``Annotate``."""

    param_fqn: dict[str, str] = field(default_factory=dict)          # placeholder name -> parameter name
    values: dict[str, torch.Tensor] = field(default_factory=dict)    # placeholder name -> real tensor
    linears: dict[str, list[str]] = field(default_factory=dict)      # module path -> linear node names
    norms: dict[str, str] = field(default_factory=dict)              # norm node name -> module path
    norm_gain: dict[str, Node] = field(default_factory=dict)         # norm node name -> gain operand
    linear_weight: dict[str, str] = field(default_factory=dict)      # linear node name -> weight placeholder name
    weights: dict[str, "LinearWeights"] = field(default_factory=dict)  # module path -> current float weights

    def param_value(self, node: Node) -> torch.Tensor | None:
        return self.values.get(node.name) if node.op == "placeholder" else None


def _fname(node: Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def linear_parts(node: Node, params: set[str]) -> LinearParts | None:
    """The parts of ``node`` if it is a linear whose weight is a 2-D parameter placeholder."""
    if node.op != "call_function":
        return None
    name = _fname(node)
    args, kw = node.args, node.kwargs
    if name == "linear" and node.target is not operator.matmul:
        x, w = args[0], args[1] if len(args) > 1 else kw.get("weight")
        b = args[2] if len(args) > 2 else kw.get("bias")
        parts = LinearParts(x, w, b, transposed=False)
    elif name == "addmm" and not {"beta", "alpha"} & set(kw) and len(args) == 3:
        parts = LinearParts(args[1], args[2], args[0], transposed=True)
    elif (node.target in (torch.matmul, operator.matmul)) and len(args) == 2:
        parts = LinearParts(args[0], args[1], None, transposed=True)
    else:
        return None
    w = parts.weight
    if not isinstance(w, Node) or w.name not in params:
        return None
    if parts.bias is not None and not (isinstance(parts.bias, Node) and parts.bias.name in params):
        return None
    if not isinstance(parts.x, Node):
        return None
    return parts


def eval_param_node(node: Any, values: dict[str, torch.Tensor]) -> Any:
    """Evaluate a node that depends only on parameters, from their real values."""
    if isinstance(node, Node):
        if node.op == "placeholder":
            return values[node.name]
        args = torch.fx.node.map_arg(node.args, lambda n: eval_param_node(n, values))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: eval_param_node(n, values))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise ValueError(f"cannot evaluate node {node.name} ({node.op})")
    return node


_STACK_INDEX = re.compile(r"\[(\d+)\]")
_SOURCE_KEY = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]")


def _module_path_from_stack(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # the root is L['self'], or L['args'][0] when a decorator passes the module positionally
    path = re.sub(r"^L\['[^']+'\](?:\[\d+\])*\.?", "", path)
    return _STACK_INDEX.sub(r".\1", path)


def _param_fqn_from_source(node: Node) -> str | None:
    src = getattr(node, "_dynamo_source", None)
    if src is None:
        return None
    name = src.name if isinstance(getattr(src, "name", None), str) else src.name()
    if "_parameters[" not in name and "_buffers[" not in name:
        return None
    return ".".join(_SOURCE_KEY.findall(name))


class Annotate:
    """Attach ``NodeInfo`` to every node and open a ``LayerDecision`` per linear."""

    name = "annotate"
    reads = ()
    writes = (Analysis.ANNOTATE,)
    requires: tuple[str, ...] = ()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        ann = GraphAnnotation()
        names_by_id: dict[int, list[str]] = ctx.analyses.get(Analysis.PARAM_NAMES, {})
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, ctx.example_inputs):
            fqn = None
            if isinstance(value, torch.Tensor) and id(value) in names_by_id:
                fqn = names_by_id[id(value)][0]
            if fqn is None and isinstance(value, torch.nn.Parameter):
                fqn = _param_fqn_from_source(node) or node.name
            if fqn is None and isinstance(value, torch.Tensor):
                fqn = _param_fqn_from_source(node)
            if fqn is not None and isinstance(value, torch.Tensor):
                ann.param_fqn[node.name] = fqn
                ann.values[node.name] = value
                node.meta[META_KEY] = NodeInfo("param", fqn)
            else:
                node.meta[META_KEY] = NodeInfo("input")
        params = set(ann.param_fqn)
        act_dependent = self._activation_dependent(gm, params)

        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            path = _module_path_from_stack(node)
            parts = linear_parts(node, params)
            name = _fname(node)
            if parts is not None and ann.values[parts.weight.name].dim() == 2 \
                    and ann.values[parts.weight.name].is_floating_point():
                fqn = self._linear_fqn(parts.weight, path, ann, names_by_id)
                node.meta[META_KEY] = NodeInfo("linear", fqn)
                ann.linears.setdefault(fqn, []).append(node.name)
                ann.linear_weight[node.name] = parts.weight.name
            elif name in ("layer_norm", "rms_norm", "group_norm"):
                path = self._norm_fqn(node.all_input_nodes[1:], path, ann, names_by_id)
                node.meta[META_KEY] = NodeInfo("norm", path)
                ann.norms[node.name] = path
            elif name == "embedding":
                node.meta[META_KEY] = NodeInfo("embedding", path)
            elif name == "scaled_dot_product_attention":
                node.meta[META_KEY] = NodeInfo("attention", path)
            elif name in ("matmul", "bmm", "baddbmm") or node.target is operator.matmul:
                node.meta[META_KEY] = NodeInfo("matmul", path)
            elif name == "mul" and self._norm_gain(node, act_dependent, ann) is not None:
                gain = self._norm_gain(node, act_dependent, ann)
                path = self._norm_fqn([gain], path, ann, names_by_id)
                node.meta[META_KEY] = NodeInfo("norm", path)
                ann.norms[node.name] = path
                ann.norm_gain[node.name] = gain
            else:
                node.meta[META_KEY] = NodeInfo("other", path)

        heads = self._output_heads(gm)
        for fqn, node_names in ann.linears.items():
            node = next(n for n in gm.graph.nodes if n.name == node_names[0])
            kind = "output_head" if any(n in heads for n in node_names) else \
                "router" if _routes(node) or _scalar_gate(node) else "linear"
            if kind == "output_head":
                for n in gm.graph.nodes:
                    if n.name in node_names:
                        n.meta[META_KEY] = NodeInfo("output_head", fqn)
            parts = linear_parts(node, params)
            w, transposed = ann.values[parts.weight.name], parts.transposed
            bias = ann.values[parts.bias.name] if parts.bias is not None else None
            ann.weights[fqn] = LinearWeights(w.detach().t() if transposed else w.detach(),
                                             None if bias is None else bias.detach(), transposed)
            n_out, k_in = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            if fqn not in ctx.layer_plan:
                ctx.layer_plan[fqn] = LayerDecision(fqn, kind, int(k_in), int(n_out),
                                                    weight_bytes_fp=w.numel() * w.element_size())
        ctx.analyses[Analysis.ANNOTATE] = ann
        stats = {"params": len(ann.param_fqn), "linears": sum(len(v) for v in ann.linears.values()),
                 "norms": len(ann.norms), "output_heads": len(heads)}
        return PassResult(gm, modified=False, stats=stats)

    @staticmethod
    def _activation_dependent(gm: GraphModule, params: set[str]) -> set[str]:
        dep: set[str] = set()
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if node.name not in params:
                    dep.add(node.name)
            elif any(a.name in dep for a in node.all_input_nodes):
                dep.add(node.name)
        return dep

    @staticmethod
    def _norm_gain(node: Node, act_dependent: set[str], ann: GraphAnnotation) -> Node | None:
        """For ``mul(gain, normed)``: the gain if it is a 1-D parameter-only value and the other
        operand is an ``rsqrt``-normalized activation (RMSNorm and its variants)."""
        if len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
            return None
        for gain, other in (node.args, node.args[::-1]):
            if gain.name in act_dependent or other.name not in act_dependent:
                continue
            if not any(p.name in ann.values for p in _ancestors(gain)):
                continue
            val = gain.meta.get("example_value")
            if val is not None and val.dim() != 1:
                continue
            cur = other
            while cur.op == "call_method" and cur.target in _CAST_METHODS:
                cur = cur.args[0]
            if _fname(cur) == "mul" and any(isinstance(a, Node) and _fname(a) == "rsqrt" for a in cur.args):
                return gain
        return None

    @staticmethod
    def _output_heads(gm: GraphModule) -> set[str]:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        heads: set[str] = set()
        stack = list(out.all_input_nodes)
        seen: set[str] = set()
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            info = n.meta.get(META_KEY)
            if info is not None and info.kind == "linear":
                heads.add(n.name)
                continue
            passthrough = (n.op == "call_method" and n.target in _PASSTHROUGH_METHODS) or \
                (n.op == "call_function" and _fname(n) in ("getitem", "mul", "truediv", "div", "tanh", "contiguous"))
            if passthrough:
                stack.extend(n.all_input_nodes)
        return heads

    @staticmethod
    def _norm_fqn(params: list[Node], stack_path: str, ann: GraphAnnotation, names_by_id) -> str:
        """The norm's module path from its parameters' names in the root model (the module stack of a
        graph Dynamo resumed inside a submodule's forward, after a graph break, is relative to it)."""
        candidates = [n.rsplit(".", 1)[0] for p in params for a in _ancestors(p) if a.name in ann.values
                      for n in names_by_id.get(id(ann.values[a.name]), [])]
        for c in candidates:
            if not stack_path or c == stack_path or c.endswith("." + stack_path):
                return c
        return stack_path or (candidates[0] if candidates else "")

    @staticmethod
    def _linear_fqn(weight: Node, stack_path: str, ann: GraphAnnotation, names_by_id) -> str:
        value = ann.values[weight.name]
        candidates = [n.rsplit(".", 1)[0] for n in names_by_id.get(id(value), [])]
        for c in candidates:
            if stack_path and (c == stack_path or c.endswith("." + stack_path)):
                return c
        if candidates:
            return candidates[0]
        return stack_path or ann.param_fqn[weight.name].rsplit(".", 1)[0]


def _scalar_gate(linear: Node) -> bool:
    """A linear with one output channel (``is_scalar_gate``): op kind ``router`` too."""
    out = linear.meta.get("val", linear.meta.get("example_value"))
    return isinstance(out, torch.Tensor) and is_scalar_gate(out.shape)


def _routes(linear: Node) -> bool:
    """A mixture-of-experts router: the linear's output reaches a ``topk`` (the experts each token goes
    to) within a few ops (softmax / sigmoid, casts, a bias), not through another linear or matmul. Its
    op kind is ``router``: a discrete choice that rounding flips, kept in float by default."""
    frontier, seen = [linear], {linear}
    for _ in range(ROUTER_DEPTH):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op not in ("call_function", "call_method"):
                    continue
                if _fname(u) == "topk":
                    return True
                if _fname(u) in ROUTE_STOPS:
                    continue
                seen.add(u)
                nxt.append(u)
        frontier = nxt
    return False


def _ancestors(node: Node) -> list[Node]:
    out, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "placeholder":
            out.append(n)
        stack.extend(n.all_input_nodes)
    return out
