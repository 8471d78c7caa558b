"""2:4 weights stored compressed: the kept values [N, K/2] and their positions as metadata, in the layout
NVIDIA's sparse tensor cores read (CUTLASS's, which ``torch.sparse.to_sparse_semi_structured`` uses).

The conversion is torch's own (``torch.sparse._semi_structured_conversions``, plain tensor ops that run
on CPU): 8-bit codes (int8, and FP8 E4M3 by its bytes) compress to int8 values with int32 metadata
(2 bits per kept value), 16-bit floats to int16 metadata: the ``packed`` / ``meta`` pair of
``torch.sparse.SparseSemiStructuredTensorCUTLASS``. A pruned position must hold the code 0: true of
symmetric formats, whose pruned weights round to 0. An asymmetric code holds its zero point there instead:
``compress_around(q, fill)`` takes the kept positions from ``q != fill`` (``fill``: each position's zero
point), and ``decompress_around`` puts ``fill`` back around the kept codes; the values are CUTLASS's order
all the same (a quad's two kept codes in position order, quads in row order), the metadata the positions'. Sizes the conversion takes: rows in multiples of 16 (8-bit) or 32 (16-bit), K in
multiples of 64 (8-bit) or 32 (16-bit). 8-bit codes take 0.625x their dense bytes, 16-bit 0.5625x.
"""

from __future__ import annotations

import torch

__all__ = ["why_not_compressible", "compress", "decompress", "compress_around", "decompress_around",
           "compressed_nbytes"]

_ROWS = {1: 16, 2: 32}          # element bytes -> row multiple
_COLS = {1: 64, 2: 32}          # element bytes -> K multiple (the metadata columns interleave in pairs)
_AS_BYTES = {torch.float8_e4m3fn: torch.int8, torch.uint8: torch.int8}


def why_not_compressible(q: torch.Tensor) -> str:
    """Why ``q`` [N, K] cannot be stored 2:4-compressed ("" when it can)."""
    if q.dim() != 2:
        return f"a {q.dim()}-D tensor (2-D weights only)"
    dtype = _AS_BYTES.get(q.dtype, q.dtype)
    if dtype not in (torch.int8, torch.float16, torch.bfloat16):
        return f"dtype {str(q.dtype).removeprefix('torch.')} (int8, fp8 e4m3, fp16 and bf16 compress)"
    n, k = q.shape
    size = dtype.itemsize
    if n % _ROWS[size] or k % _COLS[size]:
        return f"shape {n}x{k} (rows must be a multiple of {_ROWS[size]} and K of {_COLS[size]})"
    nonzero = (_bytes(q) != 0).reshape(n, k // 4, 4).sum(-1)
    if (nonzero > 2).any():
        return "more than 2 non-zero codes in some run of 4"
    return ""


def _bytes(q: torch.Tensor) -> torch.Tensor:
    return q.view(_AS_BYTES[q.dtype]) if q.dtype in _AS_BYTES else q


def compress(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, K/2], metadata)`` of a 2:4 ``q``; ``ValueError`` saying why when it does not compress."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
    why = why_not_compressible(q)
    if why:
        raise ValueError(f"2:4 compression: {why}")
    values, meta = sparse_semi_structured_from_dense_cutlass(_bytes(q).contiguous())
    return values.view(q.dtype) if q.dtype in _AS_BYTES else values, meta


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] codes of ``compress``'s output, bit for bit."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass
    dense = sparse_semi_structured_to_dense_cutlass(_bytes(values).contiguous(), meta)
    return dense.view(values.dtype) if values.dtype in _AS_BYTES else dense


def _kept(meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bool [n, k]: the two positions of each run of 4 that ``meta`` keeps."""
    return decompress(torch.ones(n, k // 2, dtype=torch.int8), meta) != 0


def compress_around(q: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, K/2], metadata)`` of a 2:4 ``q`` whose pruned positions hold ``fill`` (same shape and
    dtype, e.g. each position's zero point) rather than 0; ``ValueError`` saying why when it does not compress."""
    if fill.shape != q.shape or fill.dtype != q.dtype:
        raise ValueError(f"2:4 compression: fill has shape {tuple(fill.shape)} / {fill.dtype}, codes "
                         f"{tuple(q.shape)} / {q.dtype}")
    if q.element_size() != 1:
        raise ValueError(f"2:4 compression around a fill: 8-bit codes only, got {q.dtype}")
    _, meta = compress((q != fill).to(torch.int8))          # the kept positions: where q is not its fill
    kept = _kept(meta, *q.shape)
    return q[kept].reshape(q.shape[0], q.shape[1] // 2), meta


def decompress_around(values: torch.Tensor, meta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] codes of ``compress_around``'s output: ``fill`` with the kept codes put back, bit for bit."""
    n, k = fill.shape
    if values.shape != (n, k // 2) or values.dtype != fill.dtype:
        raise ValueError(f"2:4 decompression: values {tuple(values.shape)} / {values.dtype} do not fit fill "
                         f"{tuple(fill.shape)} / {fill.dtype}")
    out = fill.clone()
    out[_kept(meta, n, k)] = values.reshape(-1)
    return out


def compressed_nbytes(values: torch.Tensor, meta: torch.Tensor) -> int:
    return values.numel() * values.element_size() + meta.numel() * meta.element_size()
