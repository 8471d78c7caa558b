"""Weight-only decode GEMMs (W8A16, W4A16 at small M) on the FMA units, split-K reduced in the same launch.

At decode a GEMM reads every weight byte once for a handful of rows: it is bound by memory, not by
math. ``tl.dot`` on Hopper wants its B operand in shared memory (wgmma), so a weight tile that is
dequantized in registers makes a register -> shared round trip per K step before the tensor cores
see it. This kernel never calls ``tl.dot``: each program dequantizes a ``BLOCK_N x BLOCK_K`` weight
tile in registers exactly as the reference does (``(q - z) * s`` in fp32, rounded to x's dtype) and
accumulates ``sum_k x[m, k] * w[n, k]`` for its ``BLOCK_M`` rows with fp32 multiply-adds (a
``BLOCK_M x BLOCK_N x BLOCK_K`` product reduced along K), so the tile goes from global memory to
registers to the accumulator and nowhere else.

Split-K without a second launch: with ``SPLIT_K > 1`` each of the programs of one output tile writes
its fp32 partial to a workspace and increments the tile's counter (``tl.atomic_add``, acquire-release);
the program that finds the counter at ``SPLIT_K - 1`` is the last, sums the ``SPLIT_K`` partials in
split order (0, 1, ...: the result does not depend on which program finished last, and is what
``common.splitk_reduce`` computes), adds the bias in x's dtype, writes the output and puts the counter
back to 0, so the counters (one int32 per output tile, kept per device) are zero between calls.
Launches that share a device must then not run concurrently on several streams.

Numerics: the weights are the reference's; products and sums in fp32; only the summation order
differs from the reference (``tl.sum`` reduces each K tile as a tree).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast, weight_scales, weight_tile

__all__ = ["decode_gemm", "tile_counters"]

_COUNTERS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _decode_kernel(
    # pointers; p_ptr: fp32 partials [SPLIT_K, M, N]; lock_ptr: int32 counters, one per output tile
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, p_ptr, lock_ptr,
    M, N, K, KB, group_size, K_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_cm,
    PACKED: tl.constexpr, SIGNED: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, X_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tile // n_tiles
    pid_n = tile % n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    s, z = weight_scales(s_ptr, z_ptr, cols, stride_sn, SCALE_MODE, HAS_ZERO)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        w = weight_tile(w_ptr, s_ptr, z_ptr, s, z, cols, k0, kk, k_ok, K, KB, group_size, stride_wn, stride_sn, N,
                        PACKED, SIGNED, SCALE_MODE, HAS_ZERO, BLOCK_N, BLOCK_K)
        w = cast(w, X_DTYPE, SOFT_BF16).to(tl.float32)     # the reference's weight, in x's dtype
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    mask = m_ok[:, None] & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += cast(tl.load(bias_ptr + cols), X_DTYPE, SOFT_BF16).to(tl.float32)[None, :]
        tl.store(c_ptrs, cast(acc, c_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
    else:
        part = offs_m[:, None] * N + offs_n[None, :]
        tl.store(p_ptr + pid_k * M * N + part, acc, mask=mask)
        done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:          # the last program of this tile: reduce in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in range(SPLIT_K):
                total += tl.load(p_ptr + sk * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += cast(tl.load(bias_ptr + cols), X_DTYPE, SOFT_BF16).to(tl.float32)[None, :]
            tl.store(c_ptrs, cast(total, c_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The int32 counters of ``tiles`` output tiles on ``device``: zeros, kept between calls (each
    launch leaves them at zero)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < tiles:
        have = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = have
    return have


def decode_gemm(x2, w, s, z, b, out, *, packed: bool, signed: bool, scale_mode: int, group: int, k: int,
                stride_sn: int, x_dtype, soft_bf16: bool, block_m: int, block_n: int, block_k: int,
                split_k: int, num_warps: int = 4, num_stages: int | None = 2) -> torch.Tensor:
    """Launch the FMA decode kernel: ``out[M, N] = x2 @ dequantize(w).T + b`` (see the module docstring).

    Arguments as ``gemm_weight_only``'s launcher prepares them; ``num_stages`` None under the interpreter."""
    m, n = out.shape
    k_per_split = triton.cdiv(k, split_k * block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    partials = torch.empty((split, m, n), dtype=torch.float32, device=out.device) if split > 1 else out
    counters = tile_counters(out.device, tiles) if split > 1 else out
    meta = dict(num_warps=num_warps)
    if num_stages is not None:
        meta["num_stages"] = num_stages
    _decode_kernel[(tiles, split)](
        x2, w, s, z if z is not None else s, b if b is not None else s, out, partials, counters,
        m, n, k, w.shape[1], group, k_per_split,
        x2.stride(0), w.stride(0), stride_sn, out.stride(0),
        PACKED=packed, SIGNED=signed, SCALE_MODE=scale_mode, HAS_ZERO=z is not None, HAS_BIAS=b is not None,
        X_DTYPE=x_dtype, SOFT_BF16=soft_bf16, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        **meta)
    return out
