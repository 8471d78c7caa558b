"""The residual stream of a decoder, found from the graph: what writes it (embeddings, the linears
whose outputs are added into it), what reads it (norms, and the linears reading each norm), and
whether an orthogonal rotation of it can be folded into those weights (QuaRot / SpinQuant):

- the stream starts at embedding lookups and continues through additions, casts, dropout and
  products with a constant scalar (Gemma's ``sqrt(hidden)``); every other use of a stream value must be a norm
  that does not subtract the mean (RMSNorm: ``rms(x Q) == rms(x)``), reached through its own
  arithmetic (casts, ``pow``, ``mean``, ``rsqrt``, products);
- what is added into the stream comes from a linear (through layout ops and casts), or is an
  embedding lookup (GPT-2's positions);
- each norm's output is read by linears only (through layout ops and casts).

Anything else is a ``RotationRefused`` naming the node and why (LayerNorm: its mean subtraction
does not commute with a rotation; a norm writing the stream, Gemma-2's sandwich norms; the stream
leaving the graph). Nothing here depends on module names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from qcompiler.pipeline import META_KEY

from .annotate import GraphAnnotation, _fname

__all__ = ["ResidualStream", "RotationRefused", "find_residual_stream"]

_ADDS = {"add", "iadd", "add_"}
_LAYOUT_METHODS = {"view", "reshape", "contiguous", "to", "float", "type", "type_as", "half", "bfloat16", "clone",
                   "detach"}
_LAYOUT_FUNCTIONS = {"reshape", "dropout", "contiguous", "clone", "view", "identity"}
_CASTS = {"to", "float", "type", "half", "bfloat16", "double", "contiguous", "clone"}
_NORM_ARITHMETIC = {"pow", "mean", "rsqrt", "mul", "add", "to", "float", "type", "type_as", "sqrt", "div",
                    "truediv", "reciprocal", "square"}


class RotationRefused(Exception):
    """The graph does not let a residual rotation be folded into the weights; the message says where."""


@dataclass
class ResidualStream:
    """Parameter placeholders by role: ``embeddings`` ([V, d] tables writing the stream), ``writers``
    (linear node -> its weight and bias placeholders), ``norms`` (norm node -> the linear nodes reading it)."""

    hidden: int
    embeddings: list[Node] = field(default_factory=list)
    writers: list[Node] = field(default_factory=list)
    norms: dict[Node, list[Node]] = field(default_factory=dict)


def _is_add(n: Node) -> bool:
    return n.op in ("call_function", "call_method") and (_fname(n) in _ADDS or n.target is operator.add)


def _is_scalar_scale(n: Node, stream: set[Node]) -> bool:
    """``x * c`` or ``x / c`` with ``c`` a Python number or a 0-d tensor that is not the stream."""
    if _fname(n) not in ("mul", "truediv", "div") or n.target is operator.matmul:
        return False
    others = [a for a in n.args if not (isinstance(a, Node) and a in stream)]
    if len(others) != 1:
        return False
    c = others[0]
    if isinstance(c, (int, float)):
        return True
    val = c.meta.get("example_value") if isinstance(c, Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _row_select(n: Node) -> bool:
    """``x[..., :]``-style indexing that selects rows (tokens) and keeps the last (channel) dimension whole
    (transformers' ``hidden_states[:, -logits_to_keep:, :]``)."""
    if n.op != "call_function" or n.target is not operator.getitem:
        return False
    idx = n.args[1]
    return isinstance(idx, tuple) and len(idx) > 1 and idx[-1] == slice(None, None, None)


def _is_layout(n: Node) -> bool:
    return (n.op == "call_method" and n.target in _LAYOUT_METHODS) or \
        (n.op == "call_function" and _fname(n) in _LAYOUT_FUNCTIONS) or _row_select(n)


def _through_layout(n: Node) -> Node:
    """Back through layout ops and casts to the node producing the values."""
    while _is_layout(n):
        n = n.args[0]
    return n


def _dtype_template_only(use: Node, value: Node) -> bool:
    """``y.type_as(value)`` / ``y.to(value)``: ``value`` gives only a dtype (Gemma's RMSNorm)."""
    return use.op == "call_method" and use.target in ("type_as", "to") and use.args[0] is not value \
        and value not in use.args[2:] and value not in use.kwargs.values()


def _linear_readers(norm: Node, ann: GraphAnnotation) -> list[Node]:
    """The linear nodes reading ``norm``'s output through layout ops; refused if anything else reads it."""
    readers, stack = [], list(norm.users)
    while stack:
        u = stack.pop()
        info = u.meta.get(META_KEY)
        if u.name in ann.linear_weight and _through_layout(u.args[0]) is norm:
            readers.append(u)
        elif _is_layout(u):
            stack.extend(u.users)
        else:
            kind = getattr(info, "kind", "?")
            raise RotationRefused(f"norm {norm.name} is read by {u.name} ({kind} {_fname(u)}), not only by linears: "
                                  "the rotation cannot be folded into its readers")
    if not readers:
        raise RotationRefused(f"norm {norm.name} reads the residual stream but no linear reads it")
    return readers


def _norm_of(use: Node, stream: set[Node], ann: GraphAnnotation) -> Node:
    """The norm (an annotated RMSNorm gain or ``rms_norm`` op) that ``use`` of a stream value belongs
    to, following the norm's own arithmetic forward; refused otherwise."""
    seen, stack, norms = set(), [use], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        name = _fname(n)
        if n.name in ann.norms:
            if name == "layer_norm" or name == "group_norm":
                raise RotationRefused(f"{n.name} ({name}) reads the residual stream: it subtracts the mean, which an "
                                      "orthogonal rotation of its input does not preserve (LayerNorm models: refused)")
            norms.add(n)
            continue
        if n.op == "output":
            raise RotationRefused(f"the residual stream leaves the graph at {use.name} (an output other than the logits)")
        if name not in _NORM_ARITHMETIC and not (n.op == "call_method" and n.target in _LAYOUT_METHODS):
            raise RotationRefused(f"{n.name} ({name}) uses the residual stream and is neither a norm's arithmetic, "
                                  "an addition into the stream, nor a scalar scale")
        stack.extend(n.users)
    if len(norms) != 1:
        raise RotationRefused(f"{use.name}: the residual stream reaches {len(norms)} norms through one use")
    return norms.pop()


def find_residual_stream(gm: GraphModule, ann: GraphAnnotation) -> ResidualStream:
    """The residual stream of ``gm`` (annotated by ``Annotate``): its writers and its norms' readers."""
    params = set(ann.values)
    embeds = [n for n in gm.graph.nodes if _fname(n) == "embedding" and n.op == "call_function"
              and isinstance(n.args[1], Node) and n.args[1].name in params]
    if not embeds:
        raise RotationRefused("no embedding lookup with a parameter table: no residual stream to rotate")
    hidden = int(ann.values[embeds[0].args[1].name].shape[1])
    result = ResidualStream(hidden)
    stream: set[Node] = set(embeds)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    frontier = sorted(embeds, key=order.get)
    while frontier:
        s = frontier.pop(0)
        for u in list(s.users):
            if u in stream or _dtype_template_only(u, s):
                continue
            if _is_add(u) or _is_scalar_scale(u, stream) or _fname(u) == "dropout" or \
                    (u.op == "call_method" and u.target in _CASTS and u.args[0] is s):
                stream.add(u)
                frontier.append(u)
                continue
            norm = _norm_of(u, stream, ann)
            if norm not in result.norms:
                result.norms[norm] = _linear_readers(norm, ann)
        frontier.sort(key=order.get)
    for a in (n for n in stream if _is_add(n)):
        for x in a.args:
            if not isinstance(x, Node) or x in stream:
                continue
            src = _through_layout(x)
            if src.name in ann.linear_weight:
                result.writers.append(src)
            elif src in embeds or (_fname(src) == "embedding" and src.args[1].name in params):
                if src not in result.embeddings:
                    result.embeddings.append(src)
            else:
                info = src.meta.get(META_KEY)
                raise RotationRefused(f"{src.name} ({getattr(info, 'kind', '?')} {_fname(src)}) is added into the "
                                      "residual stream and is not a linear's output (e.g. a norm writing the stream, "
                                      "Gemma-2's sandwich norm): the rotation cannot be folded into it")
    for e in embeds:
        if any(u in stream for u in e.users) and e not in result.embeddings:
            result.embeddings.append(e)
    if not result.norms:
        raise RotationRefused("no norm reads the residual stream")
    return result
