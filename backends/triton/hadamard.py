"""Online Hadamard transform (QuaRot's online rotation): the Triton kernel of
``qcompiler::hadamard_transform`` (math in ``qcompiler.core.reference_kernels.hadamard_transform_ref``).

Each program holds ``BLOCK_R`` rows as an [R, MB, P] tile (``MB`` = ``m`` rounded up to a power of two,
``P = n / m``): the fast Walsh-Hadamard butterflies run along P as reshapes and ``tl.split`` /
``tl.join`` (no ``tl.dot``: every value is one ``a + b`` or ``a - b`` per stage, as in the reference),
then the m x m mix adds ``h_block[i, j] * slice_j`` for ``j = 0 .. m-1`` in that order, and the scale
multiplies last, and the cast to x's dtype rounds to nearest even (``common.cast``: the interpreter's own
bf16 cast does not); so the result equals the reference bit for bit (interpreter and GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .availability import availability
from .checks import check_hadamard_transform
from .common import TL_DTYPE, cast

__all__ = ["hadamard_transform"]


@triton.jit
def _hadamard_kernel(x_ptr, h_ptr, y_ptr, M, stride_x, stride_y, scale,
                     BLOCK_R: tl.constexpr, MB: tl.constexpr, M_BLOCK: tl.constexpr, P: tl.constexpr,
                     LOG_P: tl.constexpr, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    sub = tl.arange(0, MB)
    cols = tl.arange(0, P)
    offs = sub[None, :, None] * P + cols[None, None, :]
    mask = (rows[:, None, None] < M) & (sub[None, :, None] < M_BLOCK)
    y = tl.load(x_ptr + rows[:, None, None] * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(LOG_P):                       # butterflies at stride h = 2**s
        pairs = tl.permute(tl.reshape(y, (BLOCK_R, MB, P // (2 << s), 2, 1 << s)), (0, 1, 2, 4, 3))
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 2, 4, 3)), (BLOCK_R, MB, P))
    acc = tl.zeros((BLOCK_R, MB, P), dtype=tl.float32)
    for j in tl.static_range(M_BLOCK):                     # slice i += h_block[i, j] * slice j, j in order
        slice_j = tl.sum(tl.where(sub[None, :, None] == j, y, 0.0), axis=1)
        h_col = tl.load(h_ptr + sub * M_BLOCK + j, mask=sub < M_BLOCK, other=0.0)
        acc = acc + h_col[None, :, None] * slice_j[:, None, :]
    out = acc * scale
    tl.store(y_ptr + rows[:, None, None] * stride_y + offs, cast(out, OUT_DTYPE, SOFT_BF16), mask=mask)


def hadamard_transform(x: torch.Tensor, h_block: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (h_block kron H_p) x`` along x's last dim (see the module docstring)."""
    reason = check_hadamard_transform(x, h_block, scale)
    if reason:
        raise ValueError(f"hadamard_transform: {reason}")
    n, m = x.shape[-1], h_block.shape[0]
    p = n // m
    x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    if rows:
        mb = triton.next_power_of_2(m)
        block_r = max(1, min(16, 4096 // (mb * p)))
        _hadamard_kernel[(triton.cdiv(rows, block_r),)](
            x2, h_block.float().contiguous(), y, rows, x2.stride(0), y.stride(0), float(scale),
            BLOCK_R=block_r, MB=mb, M_BLOCK=m, P=p, LOG_P=p.bit_length() - 1,
            OUT_DTYPE=TL_DTYPE[x.dtype], SOFT_BF16=availability().interpreter)
    return y.reshape(x.shape)
