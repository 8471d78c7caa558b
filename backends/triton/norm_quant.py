"""Fused RMSNorm / LayerNorm (or none) + inverse SmoothQuant scale + per-token quantization.

The Triton kernel of ``qcompiler::norm_quantize_per_token`` (math and casts in
``qcompiler.core.ops``): one read of x [M, K] and one write of ``x_q`` [M, K] (int8 or fp8 e4m3)
plus ``scale`` [M, 1] float32, instead of norm (read x, write y), absmax (read y) and
quantize (read y, write x_q). Each program holds ``BLOCK_R`` whole rows in registers
(``BLOCK_K`` = K rounded up to a power of two, at most ``checks.MAX_NORM_K``).

Rounding follows the reference step by step in fp32: the norm's intermediate casts are
emulated with ``common.cast`` (bf16 / fp16 round trips, exact no-ops in fp32), the scale is
``max(absmax, 1e-12) / qmax`` and the quotient ``y / scale`` a true division, rounded half to
even (int8, saturated to [-128, 127]) or onto the e4m3 grid (saturated to +-448).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompiler.core import numerics

from .availability import availability
from .checks import check_norm_quantize_per_token
from .common import TL_DTYPE, cast, round_half_even, round_to_e4m3

__all__ = ["norm_quantize_per_token"]

_NORM_CODE = {"none": 0, "rms": 1, "layer": 2}


@triton.jit
def _norm_quant_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, smooth_ptr, q_ptr, scale_ptr,
    # sizes, strides, norm epsilon
    M, K, stride_xm, stride_qm, eps,
    # meta-parameters
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SMOOTH: tl.constexpr, IS_FP8: tl.constexpr,
    NORM_DTYPE: tl.constexpr, MUL_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    mask = (rows[:, None] < M) & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    kf = K * 1.0                 # fp32 K: the divisions below are IEEE round-to-nearest (div_rn)
    if NORM == 1:                                                       # RMSNorm
        r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x * x, axis=1), kf) + eps))
        y = cast(x * r[:, None], NORM_DTYPE, SOFT_BF16).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = cast(y * w[None, :], MUL_DTYPE, SOFT_BF16).to(tl.float32)
        y = cast(y, OUT_DTYPE, SOFT_BF16).to(tl.float32)
    elif NORM == 2:                                                     # LayerNorm
        mean = tl.div_rn(tl.sum(x, axis=1), kf)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(xc * xc, axis=1), kf) + eps))
        y = xc * r[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = cast(y, NORM_DTYPE, SOFT_BF16).to(tl.float32)
        y = cast(y, OUT_DTYPE, SOFT_BF16).to(tl.float32)
    else:
        y = x
    if HAS_SMOOTH:
        y = y * tl.load(smooth_ptr + cols, mask=col_ok, other=0.0)[None, :]
    y = tl.where(mask, y, 0.0)
    if IS_FP8:
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12), 448.0)
        q = round_to_e4m3(tl.div_rn(y, scale[:, None])).to(tl.float8e4nv)
    else:
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12), 127.0)
        q = tl.clamp(round_half_even(tl.div_rn(y, scale[:, None])), -128.0, 127.0).to(tl.int8)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


def norm_quantize_per_token(x: torch.Tensor, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            eps: float, smooth: torch.Tensor | None, dtype: str, norm_dtype: torch.dtype,
                            mul_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused norm + smoothing + per-token quantization; returns ``(x_q, scale [..., 1])``."""
    reason = check_norm_quantize_per_token(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype,
                                           out_dtype)
    if reason:
        raise ValueError(f"norm_quantize_per_token: {reason}")
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=numerics.STORAGE_DTYPE[dtype], device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        interp = availability().interpreter
        block_k = triton.next_power_of_2(k)
        block_r = max(1, min(64 if interp else 16, 8192 // block_k))
        num_warps = 4 if block_k <= 2048 else (8 if block_k <= 8192 else 16)
        params = [t.contiguous() if t is not None else x2 for t in (weight, bias)]
        sm = smooth.float().contiguous() if smooth is not None else x2
        _norm_quant_kernel[(triton.cdiv(m, block_r),)](
            x2, params[0], params[1], sm, q, scale, m, k, x2.stride(0), q.stride(0), float(eps),
            NORM=_NORM_CODE[norm], HAS_W=weight is not None, HAS_B=bias is not None, HAS_SMOOTH=smooth is not None,
            IS_FP8=dtype == "fp8_e4m3", NORM_DTYPE=TL_DTYPE[norm_dtype], MUL_DTYPE=TL_DTYPE[mul_dtype],
            OUT_DTYPE=TL_DTYPE[out_dtype], SOFT_BF16=interp, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
    return q.reshape(*lead, k), scale.reshape(*lead, 1)
