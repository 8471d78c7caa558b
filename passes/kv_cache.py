"""The KV-cache target: keys and values quantized where each attention writes them to its cache
(``Recipe.kv_cache``, a ``KVCacheSpec``).

Found from the graph: every ``scaled_dot_product_attention``; from its key and value inputs the
pass walks back through what the cache read adds — the cache's concatenation along the sequence
(``cat([past, new], dim=-2)``), grouped-query head repetition (``x[:, :, None].expand(...).reshape``),
a crop along the sequence, ``contiguous`` — to the tensor that enters the cache: the new tokens'
keys after RoPE, values after their projection, laid out ``[batch, heads, tokens, head_dim]``. That
tensor is quantized and dequantized (Q/DQ) before it enters the cache, so the cache, and every later
read of it, holds exactly what a cache storing the quantized format gives back; prefill reads the
same values (as a quantized cache read in the same forward would).

Scales: per_tensor / per_head / per_channel are static, from the float model's key / value ranges
over the calibration batches (``KVObserver``: a ``TorchFunctionMode`` that sees every attention call,
paired with the graph's attentions by the path of the module that calls them, and the order of the
calls inside it); per_token scales are computed as each token is written (one per token and head);
per_group scales per head and channel for each block of ``group_size`` positions of the cached sequence
(always with a residual window at least that long, so the attention reads every block it quantizes whole).
Under grouped-query attention the observed (repeated) heads are folded back onto the KV heads.
``rotate`` / ``center`` (``kv_format.to_stored``): the Q/DQ is of ``(x - c) @ R``, read back through
``kv_format.from_stored``; the observer also records the rotated ranges, from which
``kv_format.stored_stats`` gives the stored form's range (the scales of what the codes hold).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.overrides import TorchFunctionMode

from qcompiler.algorithms.hadamard import has_hadamard, random_hadamard
from qcompiler.core import kv_format, numerics
from qcompiler.errors import CalibrationError, UnsupportedError
from qcompiler.pipeline import PassContext, TensorDecision
from qcompiler.recipes import Granularity, KVCacheSpec, QuantDtype
from qcompiler.targets import QuantTarget, register_target

from .annotate import _module_path_from_stack
from .smoothquant import add_constant

__all__ = ["KV_CACHE", "KVObserver", "attention_inputs", "kv_rotation"]

_ops = torch.ops.qcompiler
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_PASS_THROUGH_METHODS = ("contiguous", "clone")
_CACHE_READS = (_ops.kv_cache_read, _ops.kv_cache_read.default)


# ---- the graph ------------------------------------------------------------------------------

def _shape(node: Any) -> tuple[int, ...] | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _dtype(node: Node) -> torch.dtype:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32


def _sequence_cat(node: Node) -> list[Node] | None:
    """The inputs of a concatenation along the sequence of 4-D tensors (a cache update), else None."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    shape = _shape(node)
    if shape is None or len(shape) != 4 or dim not in (2, -2):
        return None
    parts = node.args[0]
    return list(parts) if isinstance(parts, (list, tuple)) and all(isinstance(p, Node) for p in parts) else None


def _reads_through(node: Node) -> Node | None:
    """The input ``node`` passes on unchanged but for layout: the head repetition of grouped-query
    attention (5-D expand / reshape back to 4-D, ``x[:, :, None]``), a crop along the sequence,
    ``contiguous``. None when ``node`` computes something."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    src, out = _shape(node.args[0]), _shape(node)
    if src is None or out is None:
        return None
    if node.op == "call_method" and node.target in _PASS_THROUGH_METHODS:
        return node.args[0]
    is_reshape = (node.op == "call_method" and node.target in ("reshape", "view")) or node.target is torch.reshape
    if is_reshape and len(src) == 5 and len(out) == 4 and src[-1] == out[-1] and src[-2] == out[-2] \
            and src[1] * src[2] == out[1]:
        return node.args[0]                                          # [B, Hkv, rep, T, D] -> [B, H, T, D]
    if node.op == "call_method" and node.target == "expand" and len(src) == len(out) == 5:
        return node.args[0]
    if node.target is operator.getitem and isinstance(node.args[1], tuple):
        if len(src) == 4 and len(out) == 5 and out[2] == 1:          # x[:, :, None]
            return node.args[0]
        if len(src) == len(out) == 4 and src[:2] == out[:2] and src[3] == out[3]:   # a crop of the sequence
            return node.args[0]
    if node.target is torch.unsqueeze and len(src) == 4 and len(out) == 5:
        return node.args[0]
    return None


def _origin(node: Node) -> Node:
    while True:
        source = _reads_through(node)
        if source is None:
            return node
        node = source


_ROTATIONS: dict[int, torch.Tensor] = {}


def kv_rotation(head_dim: int) -> torch.Tensor:
    """The orthogonal matrix of ``KVCacheSpec.rotate``, float32 [head_dim, head_dim]: a randomized
    Hadamard (seed 0). Built once per order and shared (do not modify it): a cache that first meets its
    head_dim inside a compiled forward then finds it without a random generator, which Dynamo cannot trace."""
    if head_dim in _ROTATIONS:
        return _ROTATIONS[head_dim]
    if not has_hadamard(head_dim):
        raise UnsupportedError(f"recipe.kv_cache.rotate=True needs a Hadamard matrix of order head_dim={head_dim}, "
                               "which has none here (orders 1, 2 and multiples of 4 built from Sylvester and Paley-I "
                               "blocks): set kv_cache.rotate=False")
    _ROTATIONS[head_dim] = random_hadamard(head_dim, seed=0).float()
    return _ROTATIONS[head_dim]


def _read_from_quantized_cache(read: Node) -> bool:
    """Whether the attention input ``read`` comes from qcompiler's quantized cache (its codes read by
    ``qcompiler::kv_cache_read``, then the full-precision window appended)."""
    cur = _origin(read)
    parts = _sequence_cat(cur)
    return parts is not None and any(_origin(p).target in _CACHE_READS for p in parts)


def _cache_entry(read: Node, attention: Node) -> tuple[Node, Node]:
    """``(entry, consumer)``: the tensor that enters the cache for the attention input ``read``, and
    the node on the path that reads it (the cache's concatenation, or the attention itself)."""
    consumer, cur = _reader(read, attention), read
    while True:
        parts = _sequence_cat(cur)
        if parts is not None:
            return parts[-1], cur
        source = _reads_through(cur)
        if source is None:
            return cur, consumer
        consumer, cur = cur, source


_MATMULS = (torch.matmul, operator.matmul, torch.bmm)
#: ops between the attention scores' matmul and the softmax (scaling, mask, soft-capping), or between
#: the softmax and the matmul with the values (casts, dropout)
_SCORE_FUNCTIONS = (operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub,
                    torch.div, torch.tanh, torch.where, F.dropout, torch.dropout)
_SCORE_METHODS = ("to", "float", "type_as", "mul", "add", "sub", "div", "tanh", "masked_fill", "contiguous")


def _is_softmax(node: Node) -> bool:
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_function" and getattr(node.target, "__name__", "") in ("softmax", "_softmax")


def _score_op(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _SCORE_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _SCORE_METHODS)


def _transposed_last_two(node: Any) -> Node | None:
    """``x`` when ``node`` is ``x`` with its last two dimensions swapped (``x.transpose(2, 3)``)."""
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return None
    is_transpose = (node.op == "call_method" and node.target == "transpose") or node.target is torch.transpose
    rank = len(_shape(node) or ())
    dims = {d % rank for d in node.args[1:3] if isinstance(d, int)} if is_transpose and rank else set()
    return node.args[0] if dims == {rank - 2, rank - 1} else None


def _eager_attention(softmax: Node) -> tuple[Node, Node, Node, Node] | None:
    """``(key, value, scores matmul, values matmul)`` of an attention written as
    ``softmax(q @ k^T ...) @ v``, found around its softmax."""
    scores, frontier, seen = None, [softmax.args[0]], set()
    for _ in range(8):                      # back through scaling, mask and soft-capping to the scores
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target in _MATMULS:
                scores = scores or n
            elif _score_op(n):
                nxt += [a for a in n.args if isinstance(a, Node)]
        if scores is not None or not nxt:
            break
        frontier = nxt
    key = _transposed_last_two(scores.args[1]) if scores is not None else None
    cur = softmax
    for _ in range(6):                      # on through casts and dropout to the product with the values
        users = list(cur.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_function" and user.target in _MATMULS and user.args[0] is cur:
            if key is None or not isinstance(user.args[1], Node):
                return None
            return key, user.args[1], scores, user
        if not _score_op(user):
            return None
        cur = user
    return None


def _eager_inputs(softmax: Node) -> tuple[Node, Node] | None:
    """Key and value of an attention written as ``softmax(q @ k^T ...) @ v``, found around its softmax."""
    found = _eager_attention(softmax)
    return found[:2] if found is not None else None


def _reader(read: Node, attention: Node) -> Node:
    """The node of ``attention`` that reads ``read``: the attention itself, or for matmul attention the
    transpose or matmul that takes it."""
    if attention.target in _SDPA:
        return attention
    return next(u for u in read.users if u.op in ("call_function", "call_method")
                and (_transposed_last_two(u) is read or (u.target in _MATMULS and read in u.args)))


def attention_inputs(node: Node) -> tuple[Node, Node]:
    """The key and value inputs of an attention: a ``scaled_dot_product_attention`` node, or the
    softmax of one written out as matmuls (keys as the scores' matmul reads them, transposed back)."""
    if node.target in _SDPA:
        key = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
        value = node.args[2] if len(node.args) > 2 else node.kwargs["value"]
        return key, value
    found = _eager_inputs(node)
    if found is None:
        raise UnsupportedError(f"recipe.kv_cache: no key / value found around softmax {node.name}")
    return found


def _attention_keys(nodes: list[Node]) -> list[tuple[str, Node]]:
    """Each attention's key: the calling module's path, ``#i`` after it for its i-th call past the first."""
    seen: dict[str, int] = {}
    out = []
    for node in nodes:
        path = _module_path_from_stack(node)
        i = seen.get(path, 0)
        seen[path] = i + 1
        out.append((path if i == 0 else f"{path}#{i}", node))
    return out


def _find(gm: GraphModule, ann) -> list[tuple[str, Node]]:
    nodes = [n for n in gm.graph.nodes if (n.op == "call_function" and n.target in _SDPA)
             or (_is_softmax(n) and _eager_inputs(n) is not None)]
    if not nodes and ann.linears:
        raise UnsupportedError("recipe.kv_cache is set, but this graph has no attention (scaled_dot_product_attention, "
                               "or softmax(q @ k^T) @ v) whose keys and values could be found: the model writes no KV "
                               "cache qcompiler can quantize (set kv_cache=None to quantize the rest)")
    return _attention_keys(nodes)


# ---- scales ---------------------------------------------------------------------------------

def _describe_scale(scale: torch.Tensor, granularity: Granularity, group: int = 0) -> str:
    if granularity is Granularity.PER_TOKEN:
        return "per token and head, computed as written"
    if granularity is Granularity.PER_GROUP:
        return f"per head and channel for each block of {group} positions, from the block's range"
    if scale.dim() == 0:
        return f"static per tensor ({float(scale):.3g})"
    what = "head" if granularity is Granularity.PER_HEAD else "head and channel"
    return f"static per {what} ({scale.numel()} scales, {float(scale.min()):.3g}-{float(scale.max()):.3g})"


# ---- the rewrite ----------------------------------------------------------------------------

def _qdq(gm: GraphModule, x: Node, before: Node, role: str, spec: KVCacheSpec, entry: dict | None, name: str,
         device: torch.device) -> tuple[Node, str]:
    """Q/DQ of ``x`` inserted before ``before``: ``(dequantized node, description of its scales)``;
    of ``kv_format.to_stored(x)`` when the spec rotates or centers, read back through ``from_stored``."""
    out_dtype = _dtype(x)
    graph = gm.graph
    granularity = spec.key if role == "key" else spec.value
    heads = _shape(x)[1]
    if spec.rotate or spec.center:
        rotation = center = None
        matrix = kv_rotation(_shape(x)[-1]) if spec.rotate else None
        if spec.rotate:
            # its own copy: one tensor under two names would be one buffer on the CPU and two after .to(device)
            rotation = add_constant(gm, f"{name}_rotation", matrix.to(device, copy=True), before)
        if spec.center:
            center = add_constant(gm, f"{name}_center", kv_format.static_center(entry[role], heads).to(device), before)
        stats = kv_format.stored_stats(entry, role, heads, spec, matrix) if entry is not None else None
        with graph.inserting_before(before):
            x = graph.call_function(kv_format.to_stored, (x, rotation, center))
        dq, info = _plain_qdq(gm, x, before, granularity, spec, stats, name, device, heads, torch.float32)
        with graph.inserting_before(before):
            dq = graph.call_function(kv_format.from_stored, (dq, rotation, center, out_dtype))
        how = " and ".join(w for w, on in (("centered per channel", spec.center), ("rotated per head", spec.rotate))
                           if on)
        return dq, f"{info}, {how}"
    stats = entry[role] if entry is not None else None
    return _plain_qdq(gm, x, before, granularity, spec, stats, name, device, heads, out_dtype)


def _plain_qdq(gm: GraphModule, x: Node, before: Node, granularity: Granularity, spec: KVCacheSpec, stats, name: str,
               device: torch.device, heads: int, out_dtype: torch.dtype) -> tuple[Node, str]:
    graph = gm.graph
    if granularity is Granularity.PER_GROUP:        # the whole cached sequence (positions from 0): blocks of it
        with graph.inserting_before(before):
            dq = graph.call_function(kv_format.quantize_dequantize_blocks,
                                     (x, spec.group_size, spec.dtype.value, spec.symmetric))
        return dq, _describe_scale(None, granularity, spec.group_size)
    if granularity is Granularity.PER_TOKEN:
        with graph.inserting_before(before):
            if spec.symmetric:
                qs = graph.call_function(_ops.quantize_per_token, (x, spec.dtype.value))
            else:
                qs = graph.call_function(numerics.quantize_per_token_asymmetric, (x, spec.dtype.value))
            parts = [graph.call_function(operator.getitem, (qs, i)) for i in range(2 if spec.symmetric else 3)]
            dq = graph.call_function(_ops.dequantize, (parts[0], parts[1], parts[2] if len(parts) > 2 else None,
                                                       out_dtype))
        scale = None
    else:
        scale, zero = kv_format.static_scale(stats, heads, granularity, spec)
        s = add_constant(gm, f"{name}_scale", scale.to(device), before)
        z = add_constant(gm, f"{name}_zero", zero.to(device), before) if zero is not None else None
        with graph.inserting_before(before):
            q = graph.call_function(_ops.quantize, (x, s, z, kv_format.storage_name(spec)))
            dq = graph.call_function(_ops.dequantize, (q, s, z, out_dtype))
    return dq, _describe_scale(scale, granularity)


def _read_chain(read: Node) -> tuple[Node, list[Node]]:
    """``(top, chain)``: the cache's concatenation (or, without a cache, the tensor the new tokens'
    keys are) that the attention input ``read`` comes from, and the layout nodes from it to ``read``."""
    chain, cur = [], read
    while _sequence_cat(cur) is None:
        source = _reads_through(cur)
        if source is None:
            break
        chain.append(cur)
        cur = source
    return cur, chain[::-1]


def _dequantized_read(gm: GraphModule, read: Node, before: Node, role: str, spec: KVCacheSpec, stats, fqn: str,
                      device) -> tuple[Node, str]:
    """The attention input ``read`` again, read through Q/DQ: Q/DQ where the cache's concatenation (or
    the new tokens' tensor) is, then the same layout steps (GQA repetition, crops) copied."""
    graph = gm.graph
    top, chain = _read_chain(read)
    dq, info = _qdq(gm, top, before, role, spec, stats, f"{fqn}_{role}", device)
    prev, cur = top, dq
    with graph.inserting_before(before):
        for n in chain:
            mapping = {prev: cur}
            prev, cur = n, graph.node_copy(n, lambda a: mapping.get(a, a))
    return cur, f"{role}s {info}"


def _windowed(gm: GraphModule, node: Node, fqn: str, spec: KVCacheSpec, stats, device) -> list[str]:
    """Residual window: the attention reads its last ``spec.residual_window`` positions' keys and
    values in full precision and older ones quantized, which is what the quantized cache gives at
    each decode step (the cache itself keeps full-precision values here). SDPA becomes
    ``kv_format.windowed_attention``; an attention written as matmuls gets its scores chosen per
    position between the two key reads and its value product split the same way."""
    graph = gm.graph
    if node.target in _SDPA:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = dict(zip(names, node.args))
        call.update(node.kwargs)
        reads, described = {}, []
        for role in ("key", "value"):
            reads[role], info = _dequantized_read(gm, call[role], node, role, spec, stats, fqn, device)
            described.append(info)
        with graph.inserting_before(node):
            new = graph.call_function(kv_format.windowed_attention,
                                      (call["query"], call["key"], call["value"], reads["key"], reads["value"]),
                                      {k: call[k] for k in names[3:] if k in call} | {"window": spec.residual_window})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return described
    key, value, scores, product = _eager_attention(node)
    k_dq, k_info = _dequantized_read(gm, key, scores, "key", spec, stats, fqn, device)
    v_dq, v_info = _dequantized_read(gm, value, product, "value", spec, stats, fqn, device)
    transposed = scores.args[1]
    with graph.inserting_before(scores):
        mapping = {key: k_dq}
        kt_dq = graph.node_copy(transposed, lambda a: mapping.get(a, a))
        mapping = {transposed: kt_dq}
        scores_dq = graph.node_copy(scores, lambda a: mapping.get(a, a))
    with graph.inserting_after(scores):
        chosen = graph.call_function(kv_format.recent_or_quantized, (scores, scores_dq, spec.residual_window))
    for user in list(scores.users):
        if user is not chosen:
            user.replace_input_with(scores, chosen)
    with graph.inserting_before(product):
        new = graph.call_function(kv_format.windowed_values,
                                  (product.args[0], value, v_dq, spec.residual_window))
    new.meta = dict(product.meta)
    product.replace_all_uses_with(new)
    graph.erase_node(product)
    return [k_info, v_info]


def _check_shapes(key: Node, entries: dict[str, Node], spec: KVCacheSpec, fqn: str) -> None:
    observed = _shape(key)
    for role, entry in entries.items():
        shape = _shape(entry)
        if shape is None or len(shape) != 4 or observed is None or shape[-1] != observed[-1]:
            raise UnsupportedError(f"recipe.kv_cache: the {role}s entering the cache of attention {fqn} are not laid "
                                   f"out [batch, heads, tokens, head_dim] (shape {shape}; the attention reads "
                                   f"{observed})")
        if observed[1] % shape[1]:
            raise UnsupportedError(f"recipe.kv_cache: attention {fqn} reads {observed[1]} heads, which its "
                                   f"{shape[1]} cached {role} heads do not divide")
        if spec.dtype is QuantDtype.INT4 and shape[-1] % 2:
            raise UnsupportedError(f"recipe.kv_cache.dtype='int4' packs two values per byte along the head "
                                   f"dimension, which is odd ({shape[-1]}) in attention {fqn}")


def _apply(gm: GraphModule, node: Node, fqn: str, spec: KVCacheSpec, ctx: PassContext) -> TensorDecision:
    decision = TensorDecision(fqn, "kv_cache", format=spec.describe())
    key, value = attention_inputs(node)
    if _read_from_quantized_cache(key) and _read_from_quantized_cache(value):
        decision.note = ("keys and values read from qcompiler's quantized KV cache (QuantizedKVCache: it stores "
                         "the codes; nothing added in the graph)")
        return decision
    entries = {}
    for role, read in (("key", key), ("value", value)):
        entries[role] = _cache_entry(read, node)
    _check_shapes(key, {r: e for r, (e, _) in entries.items()}, spec, fqn)
    stats = None
    if spec.static:
        observed = (ctx.calibration.tensors if ctx.calibration is not None else {}).get("kv_cache")
        if observed is None:
            raise CalibrationError("recipe.kv_cache has static scales (every granularity but per_token): it needs "
                                   "calibration data (pass calibration=batches)")
        stats = observed.get(fqn)
        if stats is None:
            raise CalibrationError(f"recipe.kv_cache: calibration never saw attention {fqn} run (observed: "
                                   f"{sorted(observed)[:4]}...)")
    key_entry, key_consumer = entries["key"]
    shape = _shape(key_entry)
    where = "in the cache" if _sequence_cat(key_consumer) is not None else "no cache in this graph"
    if spec.residual_window:
        cached = _windowed(gm, node, fqn, spec, stats, ctx.device)
        decision.note = (f"{'; '.join(cached)}; {shape[1]} KV heads x {shape[-1]}, {where} (the attention reads "
                         f"its last {spec.residual_window} positions in full precision, older ones through Q/DQ: "
                         "the cache holds full-precision values; qcompiler.kv_cache stores them quantized)")
        return decision
    cached = []
    for role, (entry, consumer) in entries.items():
        dq, info = _qdq(gm, entry, consumer, role, spec, stats, f"{fqn}_{role}", ctx.device)
        consumer.replace_input_with(entry, dq)
        cached.append(f"{role}s {info}")
    decision.note = (f"{'; '.join(cached)}; {shape[1]} KV heads x {shape[-1]}, {where} (Q/DQ where "
                     "the cache is written: the cache holds the dequantized values; qcompiler.kv_cache "
                     "stores the codes)")
    return decision


# ---- calibration ----------------------------------------------------------------------------

class KVObserver(TorchFunctionMode):
    """Per attention (by calling module path, ``#i`` for its later calls in one forward): the running
    min and max of its key and value per head and channel, ``{path: {"key": (min, max), ...}}``
    with tensors [heads, head_dim] (heads as the attention reads them, repeated under GQA). An
    attention is a ``scaled_dot_product_attention`` call, or ``softmax(q @ k^T ...) @ v`` (a matmul,
    a softmax, then a matmul, in one module)."""

    def __init__(self, model: torch.nn.Module, rotate: bool = False):
        super().__init__()
        self.model = model
        self.rotate = rotate             # also record the ranges of key / value @ kv_rotation(head_dim), as "key_rotated"
        self.stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._stack: list[str] = []
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self._rhs: torch.Tensor | None = None     # matmul attention: the last product's right operand (k^T)
        self._key: torch.Tensor | None = None     # ... and the keys once a softmax followed it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in _SDPA:
            self._record(args[1] if len(args) > 1 else kwargs["key"], args[2] if len(args) > 2 else kwargs["value"])
        elif name in ("matmul", "__matmul__", "bmm") and len(args) > 1:
            if self._key is not None:        # softmax(q @ k^T ...) @ v: the product with the values
                self._record(self._key, args[1])
                self._key = None
            else:
                self._rhs = args[1]
        elif name in ("softmax", "_softmax") and self._rhs is not None:
            self._key, self._rhs = self._rhs.transpose(-1, -2), None     # the scores' k^T, transposed back
        return func(*args, **kwargs)

    def _record(self, key: torch.Tensor, value: torch.Tensor) -> None:
        path = self._stack[-1] if self._stack else ""
        i = self._calls.get(path, 0)
        self._calls[path] = i + 1
        entry = self.stats.setdefault(path if i == 0 else f"{path}#{i}", {})
        for role, t in (("key", key), ("value", value)):
            t = t.detach().float()
            seen = [(role, t)]
            if self.rotate:
                seen.append((role + kv_format.ROTATED, t @ kv_rotation(t.shape[-1]).to(t.device)))
            for name, x in seen:
                lo, hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
                old = entry.get(name)
                entry[name] = (lo, hi) if old is None else (torch.minimum(old[0], lo), torch.maximum(old[1], hi))

    def __enter__(self):
        def push(name):
            def hook(module, args):
                if not self._stack:
                    self._calls.clear()          # a new forward of the model
                self._stack.append(name)
            return hook

        def pop(module, args, output):
            if self._stack:
                self._stack.pop()

        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(push(name)))
            self._handles.append(module.register_forward_hook(pop, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def result(self) -> dict:
        return {path: {role: (lo.cpu(), hi.cpu()) for role, (lo, hi) in entry.items()}
                for path, entry in self.stats.items()}

    @staticmethod
    def merge(results: list[dict]) -> dict:
        """The ranks' ``result()``s as one: minimum of minima, maximum of maxima (any order gives the same)."""
        out: dict = {}
        for res in results:
            for path, entry in res.items():
                mine = out.setdefault(path, {})
                for role, (lo, hi) in entry.items():
                    old = mine.get(role)
                    mine[role] = (lo, hi) if old is None else (torch.minimum(old[0], lo), torch.maximum(old[1], hi))
        return out


def _observe(model: torch.nn.Module, spec: KVCacheSpec) -> KVObserver:
    return KVObserver(model, rotate=spec.rotate)


KV_CACHE = register_target(QuantTarget("kv_cache", spec=lambda recipe: recipe.kv_cache, find=_find, apply=_apply,
                                       observe=_observe))
