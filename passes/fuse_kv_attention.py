"""Attention over qcompiler's quantized KV cache as one op, for targets with a fused kernel.

With ``QuantizedKVCache`` the traced graph reads each attention's keys as
``cat([qcompiler::kv_cache_read(codes, scale, zero, ...), window], dim=-2)`` (then, under
grouped-query attention, repeats the heads) and values likewise, then calls
``scaled_dot_product_attention``. Where the target's op table declares ``fuses_kv_decode_attention``
(the Triton table: a decode-attention kernel that reads the codes directly), this pass replaces the
read, the concatenation, the head repetition and the attention by ``qcompiler::kv_decode_attention``,
so the dequantized cache is never written to memory. Not fused: causal attention given as
``is_causal`` (prefill without a mask: the op takes the mask as its only causality), dropout.

A rotated / centered cache (``KVCacheSpec.rotate`` / ``center``) passes its rotation and center to the
read; the kernel then runs on the stored form: the query rotated (``stored_query``), the window put in the
stored form (``stored_window``; the keys' center shifts every score of a query by the same amount,
which softmax drops), and the output taken back (``attention_output``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcompiler.pipeline import PassContext, PassResult, target_declares

from qcompiler.core import kv_format

from .kv_cache import _CACHE_READS, _SDPA, _origin, _sequence_cat, _shape

__all__ = ["FuseKVDecodeAttention"]

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _cache_parts(read: Node) -> tuple[Node, Node, Any, Any] | None:
    """``(kv_cache_read node, window node, rotation, center)`` behind an attention input (rotation and
    center: the read's, a rotated / centered cache's, else None), or None."""
    parts = _sequence_cat(_origin(read))
    if parts is None or len(parts) != 2:
        return None
    first = _origin(parts[0])
    if first.target not in _CACHE_READS:
        return None
    args = dict(zip(("rotation", "center"), first.args[7:9])) | {k: v for k, v in first.kwargs.items()
                                                                 if k in ("rotation", "center")}
    return first, parts[1], args.get("rotation"), args.get("center")


def _group(read: Node) -> int:
    """The ``group`` argument of a ``kv_cache_read`` node (0: not per_group)."""
    return int(read.args[6] if len(read.args) > 6 else read.kwargs.get("group", 0))


class FuseKVDecodeAttention:
    """``target``: run only when that target's op table declares ``fuses_kv_decode_attention``."""

    name = "fuse_kv_decode_attention"
    requires = ("fuse",)
    reads = ()
    writes = ()

    def __init__(self, target: str | None = None):
        self.target = target

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if not target_declares(ctx, self.target, "fuses_kv_decode_attention"):
            return PassResult(gm, False, {"skipped_no_fused_kernel": 1})
        fused = skipped = transformed = 0
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _SDPA:
                continue
            call = dict(zip(_NAMES, node.args)) | dict(node.kwargs)
            key, value = _cache_parts(call["key"]), _cache_parts(call["value"])
            if key is None or value is None:
                continue
            if call.get("is_causal") or call.get("dropout_p"):
                skipped += 1
                continue
            q_shape = _shape(call["query"])
            scale = call.get("scale")
            if scale is None:
                scale = 1.0 / math.sqrt(q_shape[-1])
            (k_read, k_window, k_rot, k_center), (v_read, v_window, v_rot, v_center) = key, value
            kc, ks, kz, k_dtype = k_read.args[:4]
            vc, vs, vz, v_dtype = v_read.args[:4]
            k_group, v_group = _group(k_read), _group(v_read)
            query = call["query"]
            stored = any(t is not None for t in (k_rot, k_center, v_rot, v_center))
            with graph.inserting_before(node):
                if stored:
                    query = graph.call_function(kv_format.stored_query, (query, k_rot))
                    k_window = graph.call_function(kv_format.stored_window, (k_window, k_rot, k_center))
                    v_window = graph.call_function(kv_format.stored_window, (v_window, v_rot, v_center))
                new = graph.call_function(torch.ops.qcompiler.kv_decode_attention,
                                          (query, kc, ks, kz, k_window, vc, vs, vz, v_window,
                                           call.get("attn_mask"), float(scale), k_dtype, v_dtype, k_group, v_group))
                if stored:
                    new = graph.call_function(kv_format.attention_output, (new, v_rot, v_center))
                    transformed += 1
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            fused += 1
        if fused:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, bool(fused), {"fused_attentions": fused, "not_fused_causal": skipped,
                                            "fused_stored_form": transformed})
