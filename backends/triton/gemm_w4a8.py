"""W4A8 GEMM: FP8 E4M3 or INT8 activations x packed INT4 weights.

``C = (a_q * a_scale) @ dequantize_int4(W).T + bias`` in ``out_dtype``, with ``a_q``
float8_e4m3fn or int8 [..., K], ``a_scale`` float32 0-d or [..., 1], the weight in the
``qcompiler.core.packing`` layout (``w_packed`` uint8 [N, ceil(K / 2)], ``w_scale`` 0-d / [N, 1] /
[N, G], ``w_zero`` None (int4) or uint8 [N, G] (uint4)) and ``bias`` [N] or None.

Integer weights ``q - z`` lie in [-15, 15], which fp8 e4m3 holds exactly, so when a K tile
lies inside one scale group (per-tensor, per-channel, or BLOCK_K dividing the group size) the
tile is an fp8 x fp8 ``tl.dot`` — exact products, fp32 sums past each 32-deep wgmma partial
(``IMPRECISE_ACC``; see ``gemm_w8a8``) — scaled by the group's [N] scales after the dot. INT8
activations take an int8 x int8 -> int32 ``tl.dot`` per tile instead (the weight tile ``q - z`` as
int8): exact sums within the tile, converted to fp32 and scaled as above.
Other group sizes dequantize the tile to fp32 (``(q - z) * s`` per element) and take an fp32
dot. The activation scale is applied once, in the epilogue. Small M uses split-K as in
``gemm_weight_only``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config as cfgs
from .availability import availability
from .checks import check_w4a8_gemm
from .common import fp8_imprecise_acc, cast, int4_tile, program_tile, splitk_reduce
from .gemm_weight_only import GROUP_ALIGNED, GROUP_GATHER, scale_layout

__all__ = ["w4a8_gemm"]


@triton.jit
def _w4a8_gemm_kernel(
    # pointers (c_ptr: the output, or fp32 partials [SPLIT_K, M, N] when SPLIT_K > 1)
    a_ptr, a_scale_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr,
    # sizes: KB = bytes per packed weight row; K_PER_SPLIT = a multiple of BLOCK_K
    M, N, K, KB, group_size, K_PER_SPLIT,
    # strides (the K dimension of a and w is contiguous)
    stride_am, stride_wn, stride_sn, stride_cm, stride_cs,
    # meta-parameters
    SIGNED: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, A_PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr, IS_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
):
    pid_m, pid_n = program_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    if SCALE_MODE == 0:
        s = tl.load(s_ptr)
        if HAS_ZERO:
            z = tl.load(z_ptr).to(tl.int32)
    if SCALE_MODE == 1:
        s = tl.load(s_ptr + cols * stride_sn)[None, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + cols * stride_sn).to(tl.int32)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :], mask=k_ok[None, :], other=0)
        if IS_FP8:
            a = a.to(tl.float8e4nv, bitcast=True)
        q = int4_tile(w_ptr, cols, k0, K, KB, stride_wn, SIGNED, BLOCK_N, BLOCK_K, N)
        if SCALE_MODE == 3:
            g = kk // group_size
            sz_ptrs = cols[:, None] * stride_sn + g[None, :]
            w = q.to(tl.float32)
            if HAS_ZERO:
                w = w - tl.load(z_ptr + sz_ptrs, mask=k_ok[None, :], other=0).to(tl.float32)
            w = w * tl.load(s_ptr + sz_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            if SCALE_MODE == 2:
                g = k0 // group_size
                s = tl.load(s_ptr + cols * stride_sn + g)[None, :]
                if HAS_ZERO:
                    z = tl.load(z_ptr + cols * stride_sn + g).to(tl.int32)[:, None]
            if HAS_ZERO:
                q = tl.where(k_ok[None, :], q - z, 0)
            if IS_FP8:
                w = q.to(tl.float32).to(tl.float8e4nv)           # exact: |q - z| <= 15
                if SCALE_MODE == 2:
                    acc += tl.dot(a, tl.trans(w), max_num_imprecise_acc=IMPRECISE_ACC) * s
                else:
                    acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=IMPRECISE_ACC)
            else:
                part = tl.dot(a, tl.trans(q.to(tl.int8))).to(tl.float32)   # exact int32 tile sums
                if SCALE_MODE == 2:
                    acc += part * s
                else:
                    acc += part
    if SCALE_MODE < 2:
        acc = acc * s
    if A_PER_ROW:
        acc = acc * tl.load(a_scale_ptr + rows)[:, None]
    else:
        acc = acc * tl.load(a_scale_ptr)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, cast(acc, c_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
    else:
        c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc, mask=mask)


def w4a8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
              w_zero: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, in_features: int,
              out_dtype: torch.dtype, *, config: cfgs.GemmConfig | None = None) -> torch.Tensor:
    """W4A8 GEMM (see the module docstring); ``config`` overrides the tile choice."""
    reason = check_w4a8_gemm(a_q, a_scale, w_packed, w_scale, w_zero, bias, group_size, in_features, out_dtype)
    if reason:
        raise ValueError(f"w4a8_gemm: {reason}")
    k = in_features
    lead, n = a_q.shape[:-1], w_packed.shape[0]
    is_fp8 = a_q.dtype == torch.float8_e4m3fn
    a2 = a_q.reshape(-1, k).contiguous()
    a2 = a2.view(torch.uint8) if is_fp8 else a2
    m = a2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out.reshape(*lead, n)
    w = w_packed.contiguous()
    s = w_scale.float().contiguous()
    z = w_zero.contiguous() if w_zero is not None else None
    b = bias.contiguous() if bias is not None else None
    a_per_row = a_scale.dim() > 0
    sa = a_scale.float().reshape(-1).contiguous()
    mode, block, stride_sn = scale_layout(s, k, group_size or 0)
    interp = availability().interpreter

    def launch(cfg: cfgs.GemmConfig) -> None:
        k_per_split = triton.cdiv(k, cfg.split_k * cfg.block_k) * cfg.block_k
        split = triton.cdiv(k, k_per_split)
        dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=a_q.device)
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        tile_mode = GROUP_ALIGNED if mode == GROUP_ALIGNED and block % cfg.block_k == 0 else \
            (GROUP_GATHER if mode == GROUP_ALIGNED else mode)
        meta = cfg.meta()
        meta["SPLIT_K"] = split
        if interp:
            meta.pop("num_stages")
        _w4a8_gemm_kernel[grid](
            a2, sa, w, s, z if z is not None else s, b if b is not None else s, dst,
            m, n, k, w.shape[1], block, k_per_split,
            a2.stride(0), w.stride(0), stride_sn, dst.stride(-2), dst.stride(0) if split > 1 else 0,
            SIGNED=z is None, SCALE_MODE=tile_mode, HAS_ZERO=z is not None, A_PER_ROW=a_per_row,
            HAS_BIAS=b is not None, SOFT_BF16=interp, IS_FP8=is_fp8,
            IMPRECISE_ACC=fp8_imprecise_acc(cfg.block_k), **meta)
        if split > 1:
            splitk_reduce(dst, b, out, soft_bf16=interp)

    def valid(cfg: cfgs.GemmConfig) -> bool:
        # Keep group scales on the one-load-per-tile path whenever the group size allows it.
        return cfgs.fits_groups(cfg, block if mode == GROUP_ALIGNED else 0)

    if config is None:
        config = cfgs.choose_config(m, n, k, kind="w4a8",
                                    variant=(mode, block, z is not None, a_per_row, b is not None, out_dtype,
                                             a_q.dtype),
                                    interpreter=interp, bench=cfgs.bencher(launch), valid=valid)
    launch(config)
    return out.reshape(*lead, n)
