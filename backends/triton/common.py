"""Triton helpers shared by the kernel modules: program order, rounding, INT4 tiles, split-K.

Imported only after ``availability`` decided the mode (``@triton.jit`` reads
``TRITON_INTERPRET`` when it runs). Every helper is exact and runs the same under the
interpreter and on a GPU:

- ``round_half_even(x)``: ``(x + 1.5 * 2**23) - 1.5 * 2**23`` in fp32, exact for |x| < 2**22
  (torch.round / ONNX semantics; libdevice ``rint`` has no interpreter implementation).
- ``round_to_e4m3(x)``: x rounded half-to-even onto the float8 e4m3fn grid and saturated to
  +-448, still in fp32, so the final ``.to(tl.float8e4nv)`` is exact (the interpreter's own
  fp32 -> fp8 cast misrounds ties and carries into the exponent).
- ``cast(x, DTYPE, SOFT_BF16)``: ``x.to(DTYPE)`` with round-half-even to bfloat16; the
  interpreter's own fp32 -> bf16 cast truncates, so under it (``SOFT_BF16``) the value is
  first rounded in integer arithmetic (``round_to_bf16``), which makes the cast exact.
- ``int4_tile``: a [BLOCK_N, BLOCK_K] tile of int4 values unpacked from the
  ``qcompiler.core.packing`` layout (element 2j low nibble, 2j+1 high nibble).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["FP8_PARTIAL_DEPTH", "fp8_imprecise_acc", "program_tile", "round_half_even", "round_to_e4m3", "round_to_bf16", "cast", "int4_tile", "splitk_reduce",
           "TL_DTYPE"]

#: Products an fp8 ``tl.dot`` may sum in the tensor cores' reduced-precision accumulator before
#: adding them to the fp32 one: one sm_90 wgmma (K = 32). Triton's sm_90 default, 2**30, never
#: promotes; 0 turns wgmma off altogether (checked on sm_90 PTX, tests/backends/test_triton_sm90.py).
FP8_PARTIAL_DEPTH = 32


def fp8_imprecise_acc(block_k: int) -> int:
    """``max_num_imprecise_acc`` for an fp8 dot over a K tile of ``block_k`` (at most the tile)."""
    return min(FP8_PARTIAL_DEPTH, block_k)


#: torch dtype -> Triton dtype, for the constexpr rounding targets of the kernels.
TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def program_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``, GROUP_M row blocks at a time (L2 reuse of W tiles)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def round_half_even(x):
    return (x + 12582912.0) - 12582912.0


@triton.jit
def round_to_e4m3(x):
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127                      # unbiased exponent of |x|
    e = tl.maximum(e, -6) - 3                            # exponent of e4m3's step at |x| (subnormal below 2**-6)
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - e) << 23).to(tl.float32, bitcast=True)
    y = round_half_even(x * inv_step) * step             # scaling by powers of two is exact
    return tl.clamp(y, -448.0, 448.0)


@triton.jit
def round_to_bf16(x):
    """fp32 ``x`` rounded half-to-even to the nearest bfloat16 value, still fp32 (NaN kept)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x == x, rounded.to(tl.float32, bitcast=True), x)


@triton.jit
def cast(x, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    if SOFT_BF16:
        if DTYPE == tl.bfloat16:
            x = round_to_bf16(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def int4_tile(w_ptr, offs_n, k0, K, KB, stride_wn, SIGNED: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, N):
    """int32 [BLOCK_N, BLOCK_K] of unpacked int4 values for columns k0 .. k0 + BLOCK_K of rows
    ``offs_n`` (0 outside [0, N) x [0, K)). ``k0`` is even; ``KB`` = bytes per packed row."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask = (offs_n[:, None] < N) & (offs_b[None, :] < KB)
    b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :], mask=mask, other=0).to(tl.int32)
    w = tl.interleave(b & 0xF, (b >> 4) & 0xF)
    if SIGNED:
        w = w - ((w & 8) << 1)                           # two's complement nibble: 8..15 -> -8..-1
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.where(offs_k[None, :] < K, w, 0)


@triton.jit
def weight_scales(s_ptr, z_ptr, cols, stride_sn, SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr):
    """The scale and float zero point of output channels ``cols`` when they hold for the whole K loop
    (SCALE_MODE 0: one scale, 1: one per channel, as [BLOCK_N, 1]); placeholders for the per-group
    modes, which ``weight_tile`` loads per K tile."""
    s = 1.0
    z = 0.0
    if SCALE_MODE == 0:
        s = tl.load(s_ptr)
        if HAS_ZERO:
            z = tl.load(z_ptr).to(tl.float32)
    if SCALE_MODE == 1:
        s = tl.load(s_ptr + cols * stride_sn)[:, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + cols * stride_sn).to(tl.float32)[:, None]
    return s, z


@triton.jit
def weight_tile(w_ptr, s_ptr, z_ptr, s, z, cols, k0, kk, k_ok, K, KB, group_size, stride_wn, stride_sn, N,
                PACKED: tl.constexpr, SIGNED: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dequantized float32 weight tile [BLOCK_N, BLOCK_K] of rows ``cols``, columns ``kk`` (from
    ``k0``): int8 or packed int4 codes, minus the zero point, times the scale (``s`` / ``z`` from
    ``weight_scales`` for SCALE_MODE 0 and 1; loaded here per tile for 2: one group per tile, and
    3: gathered per element)."""
    if PACKED:
        q = int4_tile(w_ptr, cols, k0, K, KB, stride_wn, SIGNED, BLOCK_N, BLOCK_K, N)
    else:
        q = tl.load(w_ptr + cols[:, None] * stride_wn + kk[None, :], mask=k_ok[None, :], other=0)
    w = q.to(tl.float32)
    if SCALE_MODE == 2:
        g = k0 // group_size
        s = tl.load(s_ptr + cols * stride_sn + g)[:, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + cols * stride_sn + g).to(tl.float32)[:, None]
    if SCALE_MODE == 3:
        g = kk // group_size
        sz_ptrs = cols[:, None] * stride_sn + g[None, :]
        s = tl.load(s_ptr + sz_ptrs, mask=k_ok[None, :], other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + sz_ptrs, mask=k_ok[None, :], other=0).to(tl.float32)
    if HAS_ZERO:
        w = w - z
    return w * s


@triton.jit
def _splitk_reduce_kernel(p_ptr, bias_ptr, c_ptr, M, N, stride_cm,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """c[m, n] = sum_s p[s, m, n] + bias[n], cast to c's dtype. p is fp32 [SPLIT_K, M, N] contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + (offs // N) * stride_cm + n, cast(acc, c_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def splitk_reduce(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                  soft_bf16: bool) -> torch.Tensor:
    """Sum fp32 partials [SPLIT_K, M, N] into ``out`` [M, N] (plus bias), deterministically."""
    split, m, n = partials.shape
    block = 1024
    grid = (triton.cdiv(m * n, block),)
    _splitk_reduce_kernel[grid](partials, bias if bias is not None else partials, out, m, n, out.stride(0),
                                SPLIT_K=split, HAS_BIAS=bias is not None, SOFT_BF16=soft_bf16, BLOCK=block)
    return out
