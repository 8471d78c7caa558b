"""The KV cache's stored format: how one attention's keys (or values) are written to a quantized
cache and read back. One definition, used by the KV-cache pass (which quantizes and dequantizes in the
graph) and by the quantized cache (``qcompiler.runtime.kv_cache``, which stores the codes), so both
give back the same values.

Layout of one role (keys or values) of one attention, tensors ``[batch, kv_heads, tokens, head_dim]``:

- ``codes``: int8 (symmetric int8), uint8 (asymmetric int8), float8_e4m3fn (fp8), or uint8
  ``[..., head_dim / 2]`` for int4: two values per byte along the head dimension, element 2j in
  the low nibble (``qcompiler.core.packing``; two's complement for symmetric int4, 0..15 asymmetric);
- ``scale``: float32, broadcast over the codes: 0-d (per tensor), ``[1, H, 1, 1]`` (per head),
  ``[1, H, 1, D]`` (per head and channel) — static, from calibration — ``[B, H, T, 1]`` (per
  token and head, computed as each token is written, stored beside its codes), or ``[B, H, NB, D]``
  (per_group: per head and channel for each block of ``group`` positions, block ``i`` holding
  positions ``[i * group, (i + 1) * group)``, from the block's own range; read with ``group``);
- ``zero``: None (symmetric) or uint8 of the scale's shape (asymmetric integers).

``read(write(x))`` is ``dequantize(quantize(x))`` with ONNX QuantizeLinear / DequantizeLinear
semantics (``qcompiler.core.numerics``).

A spec with ``rotate`` / ``center`` stores ``to_stored(x) = (x - c) @ R`` (float32; ``c`` [1, H, 1, D]
the calibrated per-channel mid-range of ``x``, ``R`` [head_dim, head_dim] orthogonal) and reads
``from_stored(y) = y @ R^T + c``: the codes, scales and zero points above are those of ``to_stored(x)``,
the scales from its range (``stored_stats``).
"""

from __future__ import annotations

import math

import torch

from qcompiler.core import numerics
from qcompiler.core.packing import pack_int4, unpack_int4
from qcompiler.recipes import Granularity, KVCacheSpec, QuantDtype

__all__ = ["storage_name", "static_center", "stored_stats", "ROTATED", "to_stored", "from_stored", "stored_query",
           "stored_window", "attention_output", "static_scale",
           "block_scale", "expand_blocks", "quantize_dequantize_blocks", "write",
           "read", "windowed_attention", "recent_positions", "recent_or_quantized", "windowed_values",
           "KV_STATS_ATTR", "KV_PATHS_ATTR"]

#: where a model keeps its KV-cache calibration, ``(KVCacheSpec, [per attention in call order:
#: {"key": (min, max), "value": (min, max)}, tensors [observed heads, head_dim]])``: set by the
#: backend's calibration and by ``load_quantized``; read by ``qcompiler.kv_cache(model)``
KV_STATS_ATTR = "_qcompiler_kv_stats"
#: beside it, set by the backend's calibration: the path of the module that runs each attention (same
#: order), e.g. ``model.layers.0.self_attn``, for formats that name the attention (compressed-tensors)
KV_PATHS_ATTR = "_qcompiler_kv_paths"
#: the suffix of a calibration entry's role holding the range of ``x @ R`` (``KVCacheSpec.rotate``)
ROTATED = "_rotated"


def storage_name(spec: KVCacheSpec) -> str:
    """The codes' dtype name: int8 / uint8 / fp8_e4m3 / int4 / uint4."""
    name = spec.dtype.value
    return name if spec.symmetric else numerics.UNSIGNED[name]


def static_center(stats: tuple[torch.Tensor, torch.Tensor], heads: int) -> torch.Tensor:
    """The ``center`` offsets, float32 [1, heads, 1, head_dim]: the mid-range ``(min + max) / 2`` of
    each KV head's channels, from observed ``(min, max)`` [observed heads, head_dim] (folded onto
    ``heads`` as ``static_scale`` does)."""
    lo, hi = _fold_heads(stats, heads)
    return ((lo.float() + hi.float()) / 2).reshape(1, heads, 1, -1)


def _fold_heads(stats: tuple[torch.Tensor, torch.Tensor], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed ``(min, max)`` [observed heads, head_dim] folded onto ``heads`` KV heads, [H, D] each
    (grouped-query attention repeats each KV head over consecutive observed heads)."""
    lo, hi = stats
    rep = lo.shape[0] // heads
    return lo.reshape(heads, rep, -1).amin(1), hi.reshape(heads, rep, -1).amax(1)


def stored_stats(entry: dict, role: str, heads: int, spec: KVCacheSpec, rotation: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed ``(min, max)`` [observed heads, head_dim] of what the codes of ``role`` hold,
    ``to_stored(x)``: from ``entry`` (one attention's calibration: ``{role: (min, max)}`` of ``x`` and,
    when the spec rotates, ``{role + "_rotated": ...}`` of ``x @ R``); centering shifts each stored
    channel by a constant (``c`` or ``c @ R``), so the shifted range is exact."""
    lo, hi = entry[role + ROTATED] if spec.rotate else entry[role]
    if spec.center:
        shift = static_center(entry[role], heads)[0, :, 0]                 # [H, D]
        if spec.rotate:
            shift = shift @ rotation.to(shift.device).float()
        rep = lo.shape[0] // heads
        shift = shift[:, None].expand(-1, rep, -1).reshape(lo.shape)
        lo, hi = lo - shift, hi - shift
    return lo, hi


def to_stored(x: torch.Tensor, rotation: torch.Tensor | None, center: torch.Tensor | None) -> torch.Tensor:
    """``x`` [B, H, T, D] as a rotated / centered cache quantizes it: ``(x - center) @ rotation`` in float32."""
    y = x.float()
    if center is not None:
        y = y - center
    return y @ rotation if rotation is not None else y


def from_stored(y: torch.Tensor, rotation: torch.Tensor | None, center: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``to_stored``: ``y @ rotation^T + center``, in ``out_dtype``."""
    y = y.float()
    if rotation is not None:
        y = y @ rotation.T
    if center is not None:
        y = y + center
    return y.to(out_dtype)


def stored_query(query: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """The query a rotated cache's attention scores take against the stored keys: ``q @ R`` (same dtype);
    ``q . (k_stored @ R^T + c) = (q @ R) . k_stored + q . c``, and softmax drops ``q . c`` (one
    constant per query)."""
    return query if rotation is None else (query.float() @ rotation).to(query.dtype)


def stored_window(window: torch.Tensor, rotation: torch.Tensor | None, center: torch.Tensor | None) -> torch.Tensor:
    """The full-precision window in the stored form, ``to_stored`` in its own dtype, so an attention over
    stored codes and window reads both alike."""
    return to_stored(window, rotation, center).to(window.dtype)


def attention_output(out: torch.Tensor, rotation: torch.Tensor | None, center: torch.Tensor | None) -> torch.Tensor:
    """An attention's output [B, heads, T, D] over stored values back in the values' own form:
    ``out @ R^T + c`` (the probabilities sum to one), ``c`` repeated over the query heads of a KV head."""
    y = out.float()
    if rotation is not None:
        y = y @ rotation.T
    if center is not None:
        y = y + center.repeat_interleave(out.shape[1] // center.shape[1], dim=1)
    return y.to(out.dtype)


def static_scale(stats: tuple[torch.Tensor, torch.Tensor], heads: int, granularity: Granularity,
                 spec: KVCacheSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) from observed ``(min, max)`` [observed heads, head_dim], folded onto
    ``heads`` KV heads (grouped-query attention repeats them) and shaped to broadcast over
    ``[batch, heads, tokens, head_dim]``."""
    if granularity is Granularity.PER_TOKEN:
        raise ValueError("per_token scales are computed as tokens are written, not from calibration")
    lo, hi = _fold_heads(stats, heads)                                                    # [H, D]
    if granularity is Granularity.PER_TENSOR:
        lo, hi = lo.amin(), hi.amax()
    elif granularity is Granularity.PER_HEAD:
        lo, hi = lo.amin(-1).reshape(1, heads, 1, 1), hi.amax(-1).reshape(1, heads, 1, 1)
    else:
        lo, hi = lo.reshape(1, heads, 1, -1), hi.reshape(1, heads, 1, -1)
    if spec.symmetric:
        return numerics.choose_scale(torch.maximum(lo.abs(), hi.abs()), spec.dtype.value)
    scale, zero = numerics.choose_scale(None, spec.dtype.value, minimum=lo, maximum=hi, symmetric=False)
    return scale, zero.to(torch.uint8)


def block_scale(x: torch.Tensor, group: int, dtype: str, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scales (and uint8 zero points) of ``x`` [B, H, T, D]: per head and channel for each
    block of ``group`` positions, [B, H, ceil(T / group), D], from the block's absmax (symmetric) or its
    range with 0 included (asymmetric); a last, partial block from the positions it has."""
    b, h, t, d = x.shape
    blocks = -(-t // group)
    x = torch.nn.functional.pad(x.detach().float(), (0, 0, 0, blocks * group - t)).reshape(b, h, blocks, group, d)
    if symmetric:                      # padding with zeros changes neither the absmax nor a range holding 0
        return numerics.choose_scale(x.abs().amax(3), dtype)
    scale, zero = numerics.choose_scale(None, dtype, minimum=x.amin(3), maximum=x.amax(3), symmetric=False)
    return scale, zero.to(torch.uint8)


def expand_blocks(t: torch.Tensor, group: int, tokens: int) -> torch.Tensor:
    """Per-block ``t`` [B, H, NB, D] repeated over the ``tokens`` positions its blocks hold, [B, H, tokens, D]."""
    return t.repeat_interleave(group, dim=-2)[..., :tokens, :]


def quantize_dequantize_blocks(x: torch.Tensor, group: int, dtype: str, symmetric: bool) -> torch.Tensor:
    """``x`` [B, H, T, D] (positions from 0) quantized with per_group scales (``block_scale``) and
    dequantized: what a per_group cache gives back for every complete block."""
    scale, zero = block_scale(x, group, dtype, symmetric)
    t = x.shape[-2]
    scale = expand_blocks(scale, group, t)
    zero = expand_blocks(zero, group, t) if zero is not None else None
    name = dtype if symmetric else numerics.UNSIGNED[dtype]
    return numerics.dequantize(numerics.quantize(x, scale, zero, name), scale, zero, x.dtype)


def write(x: torch.Tensor, spec: KVCacheSpec, scale: torch.Tensor | None = None,
          zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scale, zero)`` of ``x`` [B, H, T, D]: with the static ``scale`` / ``zero`` given,
    or per token and head when ``scale`` is None."""
    name = storage_name(spec)
    if scale is None:
        if spec.symmetric:
            codes, scale = numerics.quantize_per_token(x, spec.dtype.value)
        else:
            codes, scale, zero = numerics.quantize_per_token_asymmetric(x, spec.dtype.value)
            zero = zero.to(torch.uint8)
    else:
        codes = numerics.quantize(x, scale, zero, name)
    if spec.dtype is QuantDtype.INT4:
        codes = pack_int4(codes)
    return codes, scale, zero


def read(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, name: str, head_dim: int,
         out_dtype: torch.dtype, group: int = 0) -> torch.Tensor:
    """The values ``codes`` stand for, in ``out_dtype`` (``name``: ``storage_name`` of the spec);
    ``group`` > 0: ``scale`` / ``zero`` are per_group, [B, H, NB, D] for blocks of ``group`` positions."""
    if group:
        scale = expand_blocks(scale, group, codes.shape[-2])
        zero = expand_blocks(zero, group, codes.shape[-2]) if zero is not None else None
    if name in ("int4", "uint4"):
        codes = unpack_int4(codes, head_dim, signed=name == "int4")
    return numerics.dequantize(codes, scale, zero, out_dtype)


def windowed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_dq: torch.Tensor,
                       value_dq: torch.Tensor, attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                       is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                       window: int) -> torch.Tensor:
    """``scaled_dot_product_attention`` in which the query at position i reads the keys and values
    of positions j with ``i - j < window`` from ``key`` / ``value`` (full precision) and older ones
    from ``key_dq`` / ``value_dq`` (quantized and dequantized): a cache with a full-precision
    residual window, as each decode step reads it. Queries are the last positions of the keys."""
    if dropout_p:
        raise ValueError("windowed_attention: dropout is not supported (inference only)")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value, key_dq, value_dq = (t.repeat_interleave(rep, dim=-3) for t in (key, value, key_dq, value_dq))
    tq, tk = query.shape[-2], key.shape[-2]
    recent = recent_positions(tq, tk, window, query.device)
    s = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.where(recent, query @ key.transpose(-1, -2), query @ key_dq.transpose(-1, -2)) * s
    if is_causal:
        scores = scores.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    p = scores.softmax(dim=-1)
    return (p * recent) @ value + (p * ~recent) @ value_dq


def recent_positions(tq: int, tk: int, window: int, device=None) -> torch.Tensor:
    """bool [tq, tk]: whether query i (the last tq of tk positions) reads key j in full precision,
    ``i - j < window``."""
    pos = torch.arange(tq, device=device) + (tk - tq)
    return (pos[:, None] - torch.arange(tk, device=device)[None, :]) < window


def recent_or_quantized(scores: torch.Tensor, scores_dq: torch.Tensor, window: int) -> torch.Tensor:
    """Attention scores [..., tq, tk] from the full-precision keys for the recent positions, from the
    dequantized keys for older ones."""
    return torch.where(recent_positions(scores.shape[-2], scores.shape[-1], window, scores.device), scores, scores_dq)


def windowed_values(probs: torch.Tensor, value: torch.Tensor, value_dq: torch.Tensor, window: int) -> torch.Tensor:
    """``probs @ values`` with the recent positions' values in full precision and older ones dequantized."""
    recent = recent_positions(probs.shape[-2], probs.shape[-1], window, probs.device)
    return (probs * recent) @ value + (probs * ~recent) @ value_dq
