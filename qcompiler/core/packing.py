"""INT4 storage: two values per byte, the layout every consumer reads without repacking.

Layout of a quantized INT4 weight [N, K] (output channel first):

- ``packed`` uint8 [N, ceil(K / 2)]: byte j of row n holds element 2j in its low nibble and
  element 2j + 1 in its high nibble (two's complement nibbles for signed int4). For even K this
  is exactly ONNX's INT4 / UINT4 packing of the [N, K] tensor, so an ONNX initializer takes the
  bytes as they are; for odd K each row ends with one zero nibble.
- ``scale`` float32 [N, G], G = ceil(K / group_size) (ONNX blocked quantization along axis 1,
  the last group partial when group_size does not divide K), or [N, 1] per channel.
- ``zero`` None (symmetric, signed int4) or uint8 [N, G] with values 0..15 (asymmetric, uint4;
  kept one per byte: it is 1/group_size of the weight).

The Triton kernels and the ONNX exporter read this layout directly.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "packed_int4_shape"]


def packed_int4_shape(n: int, k: int) -> tuple[int, int]:
    return n, (k + 1) // 2


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 in [-8, 7] or uint8 in [0, 15]) along the last dim, two per byte."""
    if q.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"pack_int4 takes int8 or uint8 values, got {q.dtype}")
    k = q.shape[-1]
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    if k % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    nib = nib.reshape(*nib.shape[:-1], nib.shape[-1] // 2, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int, signed: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: [..., ceil(k / 2)] bytes -> int8 (signed) or uint8 [..., k]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"{packed.shape[-1]} packed bytes per row cannot hold k={k} int4 values")
    lo = packed & 0xF
    hi = packed >> 4
    out = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :k]
    if signed:
        out = out.to(torch.int8)
        return torch.where(out > 7, out - 16, out)
    return out.contiguous()
