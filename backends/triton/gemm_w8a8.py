"""W8A8 GEMMs: INT8 x INT8 -> INT32 and FP8 E4M3 x FP8 E4M3 -> FP32, scales, bias and cast fused.

``C = (A_q * s_a) @ (W_q * s_w).T + bias`` with

- ``a_q`` [..., K] int8 or float8_e4m3fn (flattened to M rows, made contiguous);
- ``a_scale`` float32 0-d (static) or [..., 1] (dynamic, one per token);
- ``w_q`` [N, K] of the same dtype, row-major (K contiguous: the K-major B that 8-bit
  wgmma wants); ``w_scale`` float32 0-d or [N, 1] (per output channel);
- ``bias`` [N] float or None; the result [..., N] in ``out_dtype`` (fp32 / fp16 / bf16).

The K loop accumulates in int32 (exact until |sum| >= 2**31, like ``torch._int_mm``) or fp32
(fp8 products are exact in fp32). On sm_90 an fp8 ``tl.dot`` would by default sum the whole K
loop in the tensor cores' reduced-precision accumulator (Triton's ``max_num_imprecise_acc``
default is 2**30 there); ``IMPRECISE_ACC = common.fp8_imprecise_acc(BLOCK_K)`` (32) promotes
each wgmma's partial sum (32 products deep) into the fp32 accumulator, so only those 32-deep
partials carry the reduced precision (DeepSeek-V3 measured about 14 mantissa bits: a partial of
32 products is within about ``2**-13 * sum|a*w|`` of exact), and every longer sum is fp32. The
epilogue runs in fp32 in the reference's order:
``acc * (s_w * s_a)`` for a static activation scale, ``(acc * s_a) * s_w`` per token, then
``+ bias``, then one cast. fp8 operands are loaded as uint8 and bitcast (the interpreter
cannot mask-load fp8 with an integer fill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config as cfgs
from .availability import availability
from .checks import check_fp8_gemm, check_int8_gemm
from .common import fp8_imprecise_acc, cast, program_tile

__all__ = ["int8_gemm", "fp8_gemm"]


@triton.jit
def _w8a8_gemm_kernel(
    # pointers
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides (the K dimension of a and w is contiguous)
    stride_am, stride_wn, stride_cm,
    # meta-parameters
    IS_FP8: tl.constexpr, A_PER_ROW: tl.constexpr, W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, SOFT_BF16: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
):
    pid_m, pid_n = program_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows / columns past the edge re-read valid ones (no mask in the loop); the store drops them.
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]          # [BLOCK_K, BLOCK_N] view of W.T
    if IS_FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
        if IS_FP8:
            a = a.to(tl.float8e4nv, bitcast=True)
            w = w.to(tl.float8e4nv, bitcast=True)
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=IMPRECISE_ACC)
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = acc.to(tl.float32)
    if W_PER_COL:
        s_w = tl.load(w_scale_ptr + cols)[None, :]
    else:
        s_w = tl.load(w_scale_ptr)
    if A_PER_ROW:
        out = (out * tl.load(a_scale_ptr + rows)[:, None]) * s_w
    else:
        out = out * (s_w * tl.load(a_scale_ptr))
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast(out, c_ptr.dtype.element_ty, SOFT_BF16), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype, *, is_fp8: bool, config: cfgs.GemmConfig | None):
    lead, k = a_q.shape[:-1], a_q.shape[-1]
    n = w_q.shape[0]
    a2 = a_q.reshape(-1, k).contiguous()
    m = a2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out.reshape(*lead, n)
    w = w_q.contiguous()
    if is_fp8:
        a2, w = a2.view(torch.uint8), w.view(torch.uint8)
    a_per_row, w_per_col = a_scale.dim() > 0, w_scale.numel() > 1
    sa = a_scale.float().reshape(-1).contiguous()
    sw = w_scale.float().reshape(-1).contiguous()
    b = bias.contiguous() if bias is not None else None
    interp = availability().interpreter

    def launch(cfg: cfgs.GemmConfig) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        meta = cfg.meta()
        if interp:
            meta.pop("num_stages")
        _w8a8_gemm_kernel[grid](a2, sa, w, sw, b if b is not None else sw, out, m, n, k,
                                a2.stride(0), w.stride(0), out.stride(0),
                                IS_FP8=is_fp8, A_PER_ROW=a_per_row, W_PER_COL=w_per_col, HAS_BIAS=b is not None,
                                SOFT_BF16=interp, IMPRECISE_ACC=fp8_imprecise_acc(cfg.block_k),
                                **meta)

    if config is None:
        config = cfgs.choose_config(m, n, k, kind="fp8" if is_fp8 else "int8",
                                    variant=(a_per_row, w_per_col, b is not None, out_dtype), interpreter=interp,
                                    bench=cfgs.bencher(launch), valid=lambda c: c.split_k == 1)
    launch(config)
    return out.reshape(*lead, n)


def int8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, *,
              config: cfgs.GemmConfig | None = None) -> torch.Tensor:
    """W8A8 INT8 GEMM (see the module docstring); ``config`` overrides the tile choice."""
    reason = check_int8_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype)
    if reason:
        raise ValueError(f"int8_gemm: {reason}")
    return _gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype, is_fp8=False, config=config)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, *,
             config: cfgs.GemmConfig | None = None) -> torch.Tensor:
    """W8A8 FP8 E4M3 GEMM (see the module docstring); ``config`` overrides the tile choice."""
    reason = check_fp8_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype)
    if reason:
        raise ValueError(f"fp8_gemm: {reason}")
    return _gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype, is_fp8=True, config=config)
