"""Fuse dynamic per-token quantization with the norm before it (targets whose table has the fused kernel: "triton").

Each ``qcompiler::quantize_per_token(y, dtype)`` becomes one
``qcompiler::norm_quantize_per_token`` (declared in ``qcompiler.core.ops``), found from
the graph alone:

- ``y = a * c`` with ``c`` a float32 [K] constant (a SmoothQuant scale that could not be
  folded into a norm or a producing linear): ``c`` moves into the fused op as ``smooth``;
- ``a`` (through casts, and views that keep the last dimension) is an RMSNorm —
  ``gain * cast(h * rsqrt(mean(h ** 2, -1, keepdim=True) + eps))`` in either operand order,
  ``h`` a float32 cast of the input, ``gain`` parameter-only (Llama's ``w``, Gemma's
  ``1 + w.float()``, a smoothed constant) or absent — or ``layer_norm(x, [K], w, b, eps)``:
  the norm moves into the fused op, which reads the norm's *input*;
- otherwise the op quantizes ``a`` as is (``norm="none"``), still absorbing ``c``.

Quantizers of one value (q, k and v read one norm) become one fused op. The norm's own nodes
stay only if something else reads them (dead-code elimination removes the rest), so a
prefill reads the activations once instead of three times (norm, absmax, quantize).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qcompiler.core import ops  # noqa: F401  (declares the fused op)
from qcompiler.pipeline import Analysis, PassContext, PassResult, target_declares

from .smoothquant import add_constant

__all__ = ["FuseNormQuant"]

_ops = torch.ops.qcompiler
_CASTS = {"to", "float", "type_as", "type", "half", "bfloat16", "contiguous"}
_VIEWS = {"view", "reshape", "contiguous"}
_MUL = (operator.mul, torch.mul)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Norm:
    kind: str                    # "rms" / "layer"
    x: Node                      # the norm's input
    weight: Node | None          # gain node (placeholder / get_attr / parameter-only expression)
    bias: Node | None
    eps: float
    norm_dtype: torch.dtype
    mul_dtype: torch.dtype


def _fn(node) -> bool:
    return isinstance(node, Node) and node.op in ("call_function", "call_method")


def _is_method(node, *names) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def _is_call(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _val(node):
    return node.meta.get("example_value") if isinstance(node, Node) else None


def _dtype(node) -> torch.dtype | None:
    v = _val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _strip(node: Node, names) -> Node:
    """Walk up single-input ``call_method`` nodes in ``names`` (casts / views)."""
    while _is_method(node, *names) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


class _Graph:
    """What the matcher needs about the graph: parameter-only nodes and their values."""

    def __init__(self, gm: GraphModule, ctx: PassContext):
        ann = ctx.analyses.get(Analysis.ANNOTATE)
        self.gm = gm
        self.params: dict[str, torch.Tensor] = dict(ann.values) if ann is not None else {}
        self.param_only: set[Node] = set()
        for n in gm.graph.nodes:
            if n.op == "get_attr" or (n.op == "placeholder" and n.name in self.params):
                self.param_only.add(n)
            elif _fn(n) and n.all_input_nodes and all(a in self.param_only for a in n.all_input_nodes):
                self.param_only.add(n)

    def value(self, node: Node) -> torch.Tensor:
        """Evaluate a parameter-only node from the real parameter values and buffers."""
        if node.op == "get_attr":
            return getattr(self.gm, node.target)
        if node.op == "placeholder":
            return self.params[node.name]
        args = torch.fx.node.map_arg(node.args, self.value)
        kwargs = torch.fx.node.map_arg(node.kwargs, self.value)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)


def _match_rms(a: Node, g: _Graph) -> _Norm | None:
    """``a`` = cast(gain * cast(h * rsqrt(mean(h**2, -1, keepdim) + eps))) or without the gain."""
    node = _strip(a, _CASTS)
    gain = None
    mul_dtype = _dtype(node)
    normed = node
    if _is_call(node, *_MUL) and len(node.args) == 2 and all(isinstance(x, Node) for x in node.args):
        p, q = node.args
        for cand, other in ((p, q), (q, p)):
            if cand in g.param_only and other not in g.param_only:
                gain, normed = cand, other
                break
    norm_dtype = _dtype(normed)
    prod = _strip(normed, _CASTS)
    if not (_is_call(prod, *_MUL) and len(prod.args) == 2):
        return None
    h, r = prod.args
    if _is_call(h, torch.rsqrt):
        h, r = r, h
    if not _is_call(r, torch.rsqrt) or not isinstance(h, Node):
        return None
    add = r.args[0]
    if not (_is_call(add, operator.add, torch.add) and len(add.args) == 2 and isinstance(add.args[1], float)):
        return None
    mean, eps = add.args
    if not _is_method(mean, "mean"):
        return None
    dim = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if keepdim is not True or dim not in (-1, [-1], (-1,)):
        return None
    pw = mean.args[0]
    if not (_is_method(pw, "pow") and pw.args[0] is h and pw.args[1:] == (2,)):
        return None
    if _dtype(h) != torch.float32:
        return None
    x = h
    if _is_method(h, "to", "float") and _dtype(h.args[0]) in _FLOATS and _val(h.args[0]).device == _val(h).device:
        x = h.args[0]   # h = x.float(): exact, the kernel converts as it loads
    if gain is not None:
        gv = g.value(gain)
        if gv.dim() != 1 or gv.numel() != _val(h).shape[-1]:
            return None
    else:
        mul_dtype = norm_dtype
    if norm_dtype not in _FLOATS or mul_dtype not in _FLOATS:
        return None
    return _Norm("rms", x, gain, None, float(eps), norm_dtype, mul_dtype)


def _match_layer(a: Node) -> _Norm | None:
    node = _strip(a, _CASTS)
    if not _is_call(node, torch.nn.functional.layer_norm, torch.layer_norm):
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, node.args))
    bound.update({k: v for k, v in node.kwargs.items() if k in names})
    x, shape = bound.get("input"), bound.get("normalized_shape")
    k = _val(x).shape[-1] if _val(x) is not None else None
    if not isinstance(x, Node) or shape is None or list(shape) != [k]:
        return None
    dt = _dtype(node)
    if dt not in _FLOATS or dt != _dtype(x):
        return None
    return _Norm("layer", x, bound.get("weight"), bound.get("bias"), float(bound.get("eps", 1e-5)), dt, dt)


class FuseNormQuant:
    """``target``: run only when that target's op table declares ``fuses_norm_quantize`` (it has a fused
    kernel for ``norm_quantize_per_token``, as the Triton table does; elsewhere the compiler fuses the
    pieces itself); None: always."""

    name = "fuse_norm_quant"
    requires = ("fuse",)
    reads = ()
    writes = ()

    def __init__(self, target: str | None = None):
        self.target = target

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if not target_declares(ctx, self.target, "fuses_norm_quantize"):
            return PassResult(gm, False, {"skipped_no_fused_kernel": 1})
        g = _Graph(gm, ctx)
        counts = {"fused_rms": 0, "fused_layer_norm": 0, "fused_quant_only": 0, "smoothing_absorbed": 0,
                  "quantizers_merged": 0}
        fused: dict[tuple, Node] = {}
        consts: dict[Node, Node] = {}
        for node in list(gm.graph.nodes):
            if not _is_call(node, _ops.quantize_per_token):
                continue
            y, dtype = node.args[0], node.args[1]
            if not isinstance(y, Node):
                continue
            # A norm's own gain multiply is not a smoothing scale: match the norm first.
            smooth, a, norm = None, y, self._norm(y, g)
            if norm is None:
                smooth, a = self._smoothing(y, gm)
                norm = self._norm(a, g)
            out_dtype = _dtype(a)
            if out_dtype not in _FLOATS:
                continue   # no traced value to read the dtype from: leave the quantizer as it is
            if norm is not None:
                key = ("norm", norm, smooth, dtype, out_dtype, a if _rank(a) != _rank(norm.x) else None)
            else:
                key = ("none", a, smooth, dtype)
            if key in fused:
                node.replace_all_uses_with(fused[key])
                gm.graph.erase_node(node)
                counts["quantizers_merged"] += 1
                continue
            with gm.graph.inserting_before(node):
                if norm is not None:
                    x = norm.x
                    if _rank(a) != _rank(norm.x):
                        x = gm.graph.call_method("reshape", (x, -1, _val(a).shape[-1]))
                    weight = self._param(norm.weight, gm, g, consts, node)
                    bias = self._param(norm.bias, gm, g, consts, node)
                    args = (x, norm.kind, weight, bias, norm.eps, smooth, dtype, norm.norm_dtype, norm.mul_dtype,
                            out_dtype)
                    counts["fused_rms" if norm.kind == "rms" else "fused_layer_norm"] += 1
                else:
                    args = (a, "none", None, None, 0.0, smooth, dtype, out_dtype, out_dtype, out_dtype)
                    counts["fused_quant_only"] += 1
                new = gm.graph.call_function(_ops.norm_quantize_per_token, args)
            new.meta = dict(node.meta)
            counts["smoothing_absorbed"] += smooth is not None
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            fused[key] = new
        gm.graph.eliminate_dead_code()
        return PassResult(gm, any(counts.values()), counts)

    @staticmethod
    def _smoothing(y: Node, gm: GraphModule) -> tuple[Node | None, Node]:
        """(the float32 [K] constant multiplying ``y``, the other factor) or (None, y)."""
        if _is_call(y, *_MUL) and len(y.args) == 2 and all(isinstance(a, Node) for a in y.args):
            for c, a in (y.args, y.args[::-1]):
                if c.op != "get_attr" or _val(a) is None or _dtype(a) not in _FLOATS:
                    continue
                t = getattr(gm, c.target)
                if t.dtype == torch.float32 and t.dim() == 1 and t.numel() == _val(a).shape[-1]:
                    return c, a
        return None, y

    @staticmethod
    def _norm(a: Node, g: _Graph) -> _Norm | None:
        """The norm producing ``a`` (through casts and last-dim-preserving views), if any."""
        src = _strip(a, _CASTS | _VIEWS)
        norm = _match_layer(src) or _match_rms(src, g)
        if norm is None or _val(norm.x) is None or _val(a) is None:
            return None
        if _val(norm.x).shape[-1] != _val(a).shape[-1]:
            return None
        if _rank(a) != _rank(norm.x) and _rank(a) != 2:
            return None
        return norm

    @staticmethod
    def _param(node, gm: GraphModule, g: _Graph, consts: dict[Node, Node], before: Node):
        """A placeholder or get_attr as is; a parameter-only expression folded into a constant."""
        if not isinstance(node, Node) or node.op in ("placeholder", "get_attr"):
            return node
        if node not in consts:
            consts[node] = add_constant(gm, f"{node.name}_folded", g.value(node).detach(), before)
        return consts[node]


def _rank(node: Node) -> int | None:
    v = _val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None
