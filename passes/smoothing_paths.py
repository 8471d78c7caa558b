"""Proving that a linear's input comes from the rows of a producer linear, channel by channel:
the paths from the input back to the producer (layout ops, casts, gated products, relu-like ops,
attention over cached values) and, by running each path on channel codes, which producer row each
input channel reads (``producer_target``). Used by ``SmoothQuantFold`` to fold ``1 / s`` into the
producer's rows; anything it cannot prove is refused with the reason."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.fx.node import map_arg

from qcompiler.pipeline import META_KEY

from .annotate import GraphAnnotation, _fname

__all__ = ["FoldTarget", "producer_target", "through_layout_ops"]


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


def producer_target(x: Node, fqns: list[str], ann: GraphAnnotation, kv_reason: str | None) -> FoldTarget:
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


def through_layout_ops(x: Node) -> Node:
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
