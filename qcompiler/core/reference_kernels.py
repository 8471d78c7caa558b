"""The reference kernel of every ``qcompiler::`` GEMM op and of the fused norm + quantize op, in pure
torch: the ops' own implementation (``qcompiler.core.ops``), what the ``reference`` backend runs, what a
Triton kernel falls back to, and the tests' twin. They live beside the op schemas, below every backend.

Shapes: ``a_q`` [..., K] (flattened to M rows), ``w_q`` [N, K] (row-major, output channel
first), ``a_scale`` 0-d (static) or [..., 1] (per token), ``w_scale`` 0-d or [N, 1],
``bias`` [N] or None. Every GEMM accumulates in int32 (INT8) or float32 and returns
[..., N] in ``out_dtype``.
"""

from __future__ import annotations

import torch

from qcompiler.core import numerics
from qcompiler.core.packing import unpack_int4

__all__ = ["quantize_ref", "dequantize_ref", "int8_gemm_ref", "fp8_gemm_ref", "weight_only_gemm_ref", "dequantize_int4_ref", "int4_gemm_ref",
           "w4a8_gemm_ref", "NORM_KINDS", "norm_quantize_per_token_ref", "hadamard_transform_ref"]

#: ``norm`` values of ``qcompiler::norm_quantize_per_token``
NORM_KINDS = ("none", "rms", "layer")


def _rows(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, a.shape[-1])


def quantize_ref(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: str,
                 block_size: int = 0) -> torch.Tensor:
    """``qcompiler::quantize``: ONNX QuantizeLinear (``block_size`` 0 = none)."""
    return numerics.quantize(x, scale, zero_point, dtype, block_size=block_size or None)


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, out_dtype: torch.dtype,
                   block_size: int = 0) -> torch.Tensor:
    """``qcompiler::dequantize``: ONNX DequantizeLinear (``block_size`` 0 = none)."""
    return numerics.dequantize(q, scale, zero_point, out_dtype, block_size=block_size or None)


def _epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype, lead) -> torch.Tensor:
    """``acc * a_scale * w_scale + bias`` in float32 with as few passes over [M, N] as possible."""
    w_row = w_scale.float().reshape(1, -1) if w_scale.dim() else w_scale.float().reshape(1, 1)
    if a_scale.dim() == 0:
        # static activations: one combined per-channel scale, a single pass over acc
        combined = w_row * a_scale.float()
        out = acc * combined if bias is None else torch.addcmul(bias.float(), acc, combined)
    else:
        out = acc * a_scale.float().reshape(-1, 1)
        out = out.mul_(w_row) if bias is None else torch.addcmul(bias.float(), out, w_row)
    return out.to(out_dtype).reshape(*lead, -1)


def int8_gemm_ref(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(a_q * a_scale) @ (w_q * w_scale).T + bias`` through ``torch._int_mm`` (exact int32)."""
    lead = a_q.shape[:-1]
    a2 = _rows(a_q)
    if a2.device.type == "cuda" and a2.shape[0] <= 16:
        # _int_mm on CUDA needs M > 16; pad rows (cheap at decode sizes).
        pad = torch.zeros(17 - a2.shape[0], a2.shape[1], dtype=a2.dtype, device=a2.device)
        acc = torch._int_mm(torch.cat([a2, pad]), w_q.t())[: a2.shape[0]]
    else:
        acc = torch._int_mm(a2, w_q.t())
    return _epilogue(acc, a_scale, w_scale, bias, out_dtype, lead)


def fp8_gemm_ref(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(a_q * a_scale) @ (w_q * w_scale).T + bias`` through ``torch._scaled_mm`` (fp32 accumulate)."""
    lead = a_q.shape[:-1]
    a2 = _rows(a_q)
    m, n = a2.shape[0], w_q.shape[0]
    sa, sw = a_scale.float(), w_scale.float()
    if sa.dim() == 0 and sw.dim() == 0:
        out = torch._scaled_mm(a2, w_q.t(), sa, sw, bias=None, out_dtype=torch.float32)
    else:
        # repeat, not expand: an expanded [1, 1] has stride 0 and counts as contiguous, but
        # _scaled_mm wants stride(1) == 1 (per-tensor activation scale at M=1 failed).
        sa = (sa.reshape(-1, 1) if sa.dim() else sa.reshape(1, 1).repeat(m, 1)).contiguous()
        sw = (sw.reshape(1, -1) if sw.dim() else sw.reshape(1, 1).repeat(1, n)).contiguous()
        out = torch._scaled_mm(a2, w_q.t(), sa, sw, bias=None, out_dtype=torch.float32)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*lead, n)


def weight_only_gemm_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         w_zero: torch.Tensor | None, bias: torch.Tensor | None,
                         group_size: int | None = None) -> torch.Tensor:
    """``x @ dequantize(w_q, w_scale, w_zero).T + bias`` with the weight dequantized to x's dtype.

    ``group_size``: the per-group block along K (ONNX ``block_size``); needed when it does not
    divide K, since the scale's shape alone does not determine it (see ``numerics.expand_blocks``).
    """
    w = numerics.dequantize(w_q, w_scale, w_zero, torch.float32, block_size=group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def dequantize_int4_ref(w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                        group_size: int, in_features: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack (``qcompiler.core.packing`` layout) and dequantize an INT4 weight to [N, in_features]."""
    q = unpack_int4(w_packed, in_features, signed=w_zero is None)
    return numerics.dequantize(q, w_scale, w_zero, out_dtype, block_size=group_size or None)


def int4_gemm_ref(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                  bias: torch.Tensor | None, group_size: int, in_features: int) -> torch.Tensor:
    """W4A16: ``x @ dequantize_int4(w).T + bias`` in x's dtype."""
    w = dequantize_int4_ref(w_packed, w_scale, w_zero, group_size, in_features, torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def w4a8_gemm_ref(a_q: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                  w_zero: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, in_features: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """W4A8 (``a_q`` fp8 or int8): ``(a_q * a_scale) @ dequantize_int4(w).T + bias``, float32 accumulate."""
    a = a_q.float() * a_scale.float()
    w = dequantize_int4_ref(w_packed, w_scale, w_zero, group_size, in_features, torch.float32)
    out = torch.nn.functional.linear(a, w, None if bias is None else bias.float())
    return out.to(out_dtype)


def norm_quantize_per_token_ref(x: torch.Tensor, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                eps: float, smooth: torch.Tensor | None, dtype: str, norm_dtype: torch.dtype,
                                mul_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``qcompiler::norm_quantize_per_token`` (math and casts in ``qcompiler.core.ops``): the norm, then
    ``y * smooth``, then ``numerics.quantize_per_token(y, dtype)``."""
    if norm == "rms":
        h = x.float()
        y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(norm_dtype)
        if weight is not None:
            y = (y.float() * weight.float()).to(mul_dtype)
        y = y.to(out_dtype)
    elif norm == "layer":
        y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(out_dtype)
    elif norm == "none":
        y = x
    else:
        raise ValueError(f"norm={norm!r} is not supported; expected one of {list(NORM_KINDS)}")
    if smooth is not None:
        y = y * smooth
    return numerics.quantize_per_token(y, dtype)


__all__.append("kv_decode_attention_ref")


def kv_decode_attention_ref(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor | None,
                            k_window: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                            v_zero: torch.Tensor | None, v_window: torch.Tensor, attn_mask: torch.Tensor | None,
                            sm_scale: float, k_dtype: str, v_dtype: str, k_group: int = 0,
                            v_group: int = 0) -> torch.Tensor:
    """``qcompiler::kv_decode_attention`` (contract in ``qcompiler.core.ops``): attention of q [B, Hq, M, D]
    over ``K = cat([read(k_codes), k_window], -2)`` and ``V`` likewise, everything in float32.

    The codes are dequantized straight to float32 (``kv_format.read``), the window and q are widened
    to float32; ``scores = (q @ K^T) * sm_scale (+ mask)``, softmax over the T keys (rows whose keys
    are all masked give 0, as ``scaled_dot_product_attention`` does), ``P @ V``, cast to q's dtype.
    """
    from qcompiler.core import kv_format       # here, not at the top: kv_format pulls in qcompiler.recipes

    b, hq, m, _ = q.shape
    k = torch.cat([kv_format.read(k_codes, k_scale, k_zero, k_dtype, k_window.shape[-1], torch.float32, k_group),
                   k_window.float()], dim=-2)
    v = torch.cat([kv_format.read(v_codes, v_scale, v_zero, v_dtype, v_window.shape[-1], torch.float32, v_group),
                   v_window.float()], dim=-2)
    hkv, t = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    g = hq // hkv                                          # query head h reads KV head h // g
    if t == 0:                                             # nothing cached: every row attends to nothing
        return q.new_zeros((b, hq, m, v.shape[-1]))
    qf = q.float().reshape(b, hkv, g * m, q.shape[-1])
    scores = (torch.matmul(qf, k.transpose(-1, -2)) * sm_scale).reshape(b, hq, m, t)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    top = scores.amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)   # fully masked rows: exp(-inf) = 0
    p = torch.exp(scores - top)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p.reshape(b, hkv, g * m, t), v).reshape(b, hq, m, v.shape[-1])
    out = torch.where(denom > 0, out / denom, torch.zeros_like(out))
    return out.to(q.dtype)


def hadamard_transform_ref(x: torch.Tensor, h_block: torch.Tensor, scale: float) -> torch.Tensor:
    """``qcompiler::hadamard_transform``: ``scale * (h_block kron H_p) x`` along the last dim, in float32
    (float64 for a float64 x).

    ``x`` [..., n] with ``n = m * p`` (``m = h_block.shape[0]``, ``p`` a power of two, ``H_p`` Sylvester's).
    Each of the ``m`` slices of ``p`` values goes through the fast Walsh-Hadamard butterflies
    (``a, b -> a + b, a - b`` at strides 1, 2, 4, ...), then slice ``i`` becomes
    ``sum_j h_block[i, j] * slice_j``, summed in order ``j = 0 .. m-1``, then everything is multiplied by
    ``scale``; the result is cast to x's dtype. The Triton kernel runs the same steps in the same order.
    """
    n, m = x.shape[-1], h_block.shape[0]
    p = n // m
    compute = torch.promote_types(x.dtype, torch.float32)
    rows = x.reshape(-1, n)
    tokens = rows.shape[0]
    hb = h_block.to(compute)
    # +-1 entries (every block online_hadamard builds): each product is exact, so one fused multiply-add adds
    # the same value; any other block multiplies, then adds
    signs = bool((hb.abs() == 1).all())
    # A chunk of tokens at a time, laid out [n, tokens] so that every step runs over contiguous rows of the
    # chunk's tokens (the token-major layout has rows of p values, as short as 8) while the chunk stays in
    # cache: the same additions in the same order, 5-8x faster on CPU (benchmarks/hadamard_kernel.py).
    per_chunk = max(1, _HADAMARD_CACHE_FLOATS // n)
    result = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    buffers = torch.empty((2, n * min(per_chunk, tokens)), dtype=compute, device=x.device)
    for start in range(0, tokens, per_chunk):
        t = min(per_chunk, tokens - start)
        y, out = buffers[0, :n * t].view(m, p, t), buffers[1, :n * t].view(m, p, t)
        y.view(n, t).copy_(rows[start:start + t].t())
        h = 1
        while h < p:
            a, o = y.view(m, p // (2 * h), 2, h * t), out.view(m, p // (2 * h), 2, h * t)
            torch.add(a[:, :, 0], a[:, :, 1], out=o[:, :, 0])
            torch.sub(a[:, :, 0], a[:, :, 1], out=o[:, :, 1])
            y, out = out, y
            h *= 2
        slices, acc = y.view(m, p * t), out.view(m, p * t).zero_()
        for j in range(m):
            if signs:
                acc.addcmul_(hb[:, j, None], slices[j])
            else:
                acc.add_(hb[:, j, None] * slices[j])
        result[start:start + t].copy_(acc.mul_(scale).view(n, t).t())
    return result.view(x.shape)


#: floats of one token chunk in ``hadamard_transform_ref`` (512 KB in float32: the chunk's two buffers stay in a
#: core's L2 cache through every step)
_HADAMARD_CACHE_FLOATS = 1 << 17
