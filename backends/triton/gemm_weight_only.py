"""Weight-only GEMMs (W8A16, W4A16): dequantize the weight tile in the kernel, then ``tl.dot``.

``C = x @ dequantize(W).T + bias`` in x's dtype (fp32 / fp16 / bf16), with

- ``weight_only_gemm``: ``w_q`` int8 / uint8 [N, K], one value per byte (int8, uint8, and
  int4 / uint4 values kept one per byte);
- ``int4_gemm``: ``w_packed`` uint8 [N, ceil(K / 2)] in the ``qcompiler.core.packing`` layout
  (element 2j in the low nibble), signed int4 when ``w_zero`` is None, else uint4;
- ``w_scale`` float32 0-d, [N, 1] or [N, G] (groups of ``group_size`` along K, ONNX blocked
  layout, the last group partial); ``w_zero`` None or like ``w_scale`` (unpacked);
- ``bias`` [N] or None; x [..., K] is flattened to M rows.

Each W tile is dequantized exactly as the reference does — ``(q - z) * s`` in fp32, then
rounded to x's dtype — so the kernel multiplies the very weights the reference multiplies and
differs from it only in fp32 summation order. Group scales are loaded once per K tile when
BLOCK_K divides the group size (the launcher shrinks BLOCK_K to make it so when the group
size is a multiple of 16), else gathered per element.

Small M (decode) runs, by default, ``gemm_decode``'s kernel (FMA units, no ``tl.dot``, split-K
reduced in the same launch by the last program of each tile: deterministic); the ``tl.dot`` path
takes 16-row tiles and split-K there too, each of the ``SPLIT_K`` programs of an output tile writing
fp32 partials that ``common.splitk_reduce`` sums with the bias in a second launch. Which, with what
tiles and split, is picked by shape in ``config.default_config`` or by the autotuner.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config as cfgs
from .availability import availability
from .checks import check_int4_gemm, check_weight_only_gemm
from .common import TL_DTYPE, cast, program_tile, splitk_reduce, weight_scales, weight_tile
from .gemm_decode import decode_gemm

__all__ = ["weight_only_gemm", "int4_gemm", "scale_layout"]

#: SCALE_MODE values: one scale; one per output channel; one per group, BLOCK_K | group
#: (one load per tile); one per group, gathered per element.
PER_TENSOR, PER_CHANNEL, GROUP_ALIGNED, GROUP_GATHER = 0, 1, 2, 3


@triton.jit
def _weight_only_gemm_kernel(
    # pointers (c_ptr: the output, or fp32 partials [SPLIT_K, M, N] when SPLIT_K > 1)
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr,
    # sizes: KB = bytes per weight row; K_PER_SPLIT = K columns per split (a multiple of BLOCK_K)
    M, N, K, KB, group_size, K_PER_SPLIT,
    # strides (the K dimension of x and w is contiguous; scales / zero-points share strides)
    stride_xm, stride_wn, stride_sn, stride_cm, stride_cs,
    # meta-parameters
    PACKED: tl.constexpr, SIGNED: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, X_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = program_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    s, z = weight_scales(s_ptr, z_ptr, cols, stride_sn, SCALE_MODE, HAS_ZERO)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=k_ok[None, :], other=0.0)
        w = weight_tile(w_ptr, s_ptr, z_ptr, s, z, cols, k0, kk, k_ok, K, KB, group_size, stride_wn, stride_sn, N,
                        PACKED, SIGNED, SCALE_MODE, HAS_ZERO, BLOCK_N, BLOCK_K)
        w = cast(w, X_DTYPE, SOFT_BF16)                # the reference's weight, in x's dtype
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            b = cast(tl.load(bias_ptr + cols), X_DTYPE, SOFT_BF16)   # the reference adds the bias in x's dtype
            acc += b.to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, cast(acc, c_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
    else:
        c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc, mask=mask)


def scale_layout(w_scale: torch.Tensor, k: int, group_size: int) -> tuple[int, int, int]:
    """(SCALE_MODE, group size along K, row stride) of a weight scale; per-group scales report
    GROUP_ALIGNED, which becomes GROUP_GATHER for a K tile that the group size is no multiple of."""
    if w_scale.dim() == 0:
        return PER_TENSOR, k, 0
    if w_scale.shape[1] == 1:
        return PER_CHANNEL, k, w_scale.stride(0)
    block = group_size or -(-k // w_scale.shape[1])
    return GROUP_ALIGNED, block, w_scale.stride(0)


def _launch_gemm(x, w, w_scale, w_zero, bias, *, packed: bool, group_size: int, k: int,
                 config: cfgs.GemmConfig | None) -> torch.Tensor:
    lead = x.shape[:-1]
    n = w.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    w = w.contiguous()
    s = w_scale.float().contiguous()
    z = w_zero.contiguous() if w_zero is not None else None
    b = bias.contiguous() if bias is not None else None
    mode, block, stride_sn = scale_layout(s, k, group_size)
    interp = availability().interpreter

    def tile_mode(cfg: cfgs.GemmConfig) -> int:
        if mode != GROUP_ALIGNED:
            return mode
        return GROUP_ALIGNED if block % cfg.block_k == 0 else GROUP_GATHER

    def launch(cfg: cfgs.GemmConfig) -> None:
        if cfg.kernel == "fma":
            decode_gemm(x2, w, s, z, b, out, packed=packed, signed=packed and z is None, scale_mode=tile_mode(cfg),
                        group=block, k=k, stride_sn=stride_sn, x_dtype=TL_DTYPE[x.dtype], soft_bf16=interp,
                        block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k, split_k=cfg.split_k,
                        num_warps=cfg.num_warps, num_stages=None if interp else cfg.num_stages)
            return
        k_per_split = triton.cdiv(k, cfg.split_k * cfg.block_k) * cfg.block_k
        split = triton.cdiv(k, k_per_split)
        dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        meta = cfg.meta()
        meta["SPLIT_K"] = split
        if interp:
            meta.pop("num_stages")
        _weight_only_gemm_kernel[grid](
            x2, w, s, z if z is not None else s, b if b is not None else s, dst,
            m, n, k, w.shape[1], block, k_per_split,
            x2.stride(0), w.stride(0), stride_sn, dst.stride(-2), dst.stride(0) if split > 1 else 0,
            PACKED=packed, SIGNED=packed and z is None, SCALE_MODE=tile_mode(cfg), HAS_ZERO=z is not None,
            HAS_BIAS=b is not None, X_DTYPE=TL_DTYPE[x.dtype],
            DOT_F32=x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16), SOFT_BF16=interp, **meta)
        if split > 1:
            splitk_reduce(dst, b.to(x.dtype) if b is not None else None, out, soft_bf16=interp)

    def valid(cfg: cfgs.GemmConfig) -> bool:
        # Keep group scales on the one-load-per-tile path whenever the group size allows it.
        return cfgs.fits_groups(cfg, block if mode == GROUP_ALIGNED else 0)

    if config is None:
        config = cfgs.choose_config(m, n, k, kind="int4" if packed else "weight_only",
                                    variant=(mode, block, z is not None, b is not None, x.dtype, w.dtype),
                                    interpreter=interp, bench=cfgs.bencher(launch), valid=valid)
    launch(config)
    return out.reshape(*lead, n)


def weight_only_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                     bias: torch.Tensor | None, group_size: int = 0, *,
                     config: cfgs.GemmConfig | None = None) -> torch.Tensor:
    """W8A16 (or unpacked W4A16): ``x @ dequantize(w_q, w_scale, w_zero).T + bias`` in x's dtype."""
    reason = check_weight_only_gemm(x, w_q, w_scale, w_zero, bias, group_size)
    if reason:
        raise ValueError(f"weight_only_gemm: {reason}")
    return _launch_gemm(x, w_q, w_scale, w_zero, bias, packed=False, group_size=group_size or 0,
                        k=w_q.shape[1], config=config)


def int4_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
              bias: torch.Tensor | None, group_size: int, in_features: int, *,
              config: cfgs.GemmConfig | None = None) -> torch.Tensor:
    """W4A16 on packed INT4: ``x @ dequantize_int4(w_packed, ...).T + bias`` in x's dtype."""
    reason = check_int4_gemm(x, w_packed, w_scale, w_zero, bias, group_size, in_features)
    if reason:
        raise ValueError(f"int4_gemm: {reason}")
    return _launch_gemm(x, w_packed, w_scale, w_zero, bias, packed=True, group_size=group_size or 0,
                        k=in_features, config=config)
