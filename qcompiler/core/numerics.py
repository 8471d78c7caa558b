"""Quantization arithmetic, matching ONNX QuantizeLinear / DequantizeLinear.

Integers: ``q = saturate(round_half_even(x / scale) + zero_point)``; FP8 E4M3:
``q = saturate_cast(x / scale)`` (round half to even, +-448). Dequantize:
``(q - zero_point) * scale``. Scales broadcast ONNX-style: a scale has the rank of ``x``
(or is 0-d) and each of its dimensions is 1, equal to x's, or x's divided by a block size.
All arithmetic is in float32. ``int7`` / ``uint7`` are 7-bit ranges held (and stored) as int8 /
uint8: reduced-range weights (``WeightSpec.reduce_range``).
"""

from __future__ import annotations

import torch

from qcompiler.recipes import QuantDtype

__all__ = ["QRANGE", "STORAGE_DTYPE", "UNSIGNED", "storage_name", "expand_blocks", "quantize", "dequantize",
           "choose_scale",
           "quantize_per_token", "quantize_per_token_asymmetric", "fake_quantize", "round_to_e4m3", "sqnr_db"]

#: (qmin, qmax) of each quantized dtype; fp8 saturates at +-448.
QRANGE: dict[str, tuple[float, float]] = {
    "int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15),
    "int7": (-64, 63), "uint7": (0, 127), "fp8_e4m3": (-448.0, 448.0),
}
#: torch dtype each quantized dtype is held in (int4 unpacked, one value per int8).
STORAGE_DTYPE: dict[str, torch.dtype] = {
    "int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8, "uint4": torch.uint8,
    "int7": torch.int8, "uint7": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn,
}
_STORED_AS = {"int7": "int8", "uint7": "uint8"}
_TINY = 1e-12


def _name(dtype) -> str:
    return dtype.value if isinstance(dtype, QuantDtype) else str(dtype)


def storage_name(dtype) -> str:
    """The format ``dtype``'s values are stored in, in graphs and files: int8 / uint8 for the 7-bit
    ranges, the dtype itself otherwise."""
    name = _name(dtype)
    return _STORED_AS.get(name, name)


def expand_blocks(scale: torch.Tensor, like: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Broadcast ``scale`` to ``like``'s shape, repeating blocked dimensions (ONNX block_size).

    The scale's shape does not determine the block size when it does not divide the
    dimension (K=100 with blocks of 32 or of 25 both give 4 scales): pass ``block_size`` to
    get ONNX's layout (full blocks, the last one partial). Without it the block is taken as
    ``ceil(n / s)``, which is ONNX's only when ``block_size == ceil(n / ceil(n / block_size))``.
    """
    if scale.dim() == 0:
        return scale
    if scale.dim() != like.dim():
        raise ValueError(f"scale of shape {tuple(scale.shape)} must be 0-d or have the rank of "
                         f"x {tuple(like.shape)}")
    for d, (s, n) in enumerate(zip(scale.shape, like.shape)):
        if s not in (1, n):
            block = block_size if block_size is not None else -(-n // s)
            if -(-n // block) != s:
                raise ValueError(f"scale dimension {d} of size {s} does not match x's size {n} "
                                 f"with block_size {block}")
            # a gather, not repeat_interleave + narrow: TorchInductor 2.13 miscompiles that
            # (and expand + reshape + narrow) when the block does not divide n (K=96, block 64)
            index = torch.arange(n, device=scale.device) // block
            scale = scale.index_select(d, index)
    return scale


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype, *,
             block_size: int | None = None) -> torch.Tensor:
    """Quantize ``x`` (QuantizeLinear semantics); returns the storage dtype of ``dtype``.

    ``block_size``: ONNX's, for blocked scales (see ``expand_blocks``)."""
    name = _name(dtype)
    qmin, qmax = QRANGE[name]
    s = expand_blocks(scale.float(), x, block_size)
    y = x.float() / s
    if name == "fp8_e4m3":
        return y.to(torch.float8_e4m3fn)  # rounds half to even and saturates to +-448
    y = torch.round(y)
    if zero_point is not None:
        y = y + expand_blocks(zero_point.float(), x, block_size)
    return y.clamp_(qmin, qmax).to(STORAGE_DTYPE[name])


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               out_dtype: torch.dtype = torch.float32, *, block_size: int | None = None) -> torch.Tensor:
    """Dequantize ``q`` (DequantizeLinear semantics), computing in float32."""
    y = q.float()
    if zero_point is not None:
        y = y - expand_blocks(zero_point.float(), q, block_size)
    return (y * expand_blocks(scale.float(), q, block_size)).to(out_dtype)


#: the unsigned range an asymmetric integer dtype is stored in (its zero point shifts it)
UNSIGNED = {"int8": "uint8", "int7": "uint7", "int4": "uint4"}


def choose_scale(absmax: torch.Tensor, dtype, *, minimum: torch.Tensor | None = None,
                 maximum: torch.Tensor | None = None, symmetric: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero-point when asymmetric) covering ``absmax`` or ``[minimum, maximum]``.

    Symmetric integers use ``absmax / qmax`` (127 for int8, 63 for int7, 7 for int4); fp8 ``absmax / 448``.
    Asymmetric integers map ``[min(minimum, 0), max(maximum, 0)]`` onto the unsigned range
    with an integer zero-point.
    """
    name = _name(dtype)
    if symmetric:
        qmax = QRANGE[name][1]
        return (absmax.float().clamp(min=_TINY) / qmax), None
    uname = UNSIGNED.get(name, name)
    if uname not in ("uint8", "uint7", "uint4"):
        raise ValueError(f"asymmetric quantization needs an integer dtype, got {name!r}")
    qmin, qmax = QRANGE[uname]
    lo = minimum.float().clamp(max=0.0)
    hi = maximum.float().clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_TINY)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def quantize_per_token(x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization with one scale per row of the last dimension.

    Returns ``(x_q, scale)`` with ``scale`` of shape ``x.shape[:-1] + (1,)`` in float32.
    """
    absmax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale, _ = choose_scale(absmax, dtype)
    return quantize(x, scale, None, dtype), scale


def quantize_per_token_asymmetric(x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic asymmetric quantization with one scale and integer zero point per row of the last
    dimension, onto the unsigned range of ``dtype`` (int8 -> uint8, int4 -> uint4).

    Returns ``(x_q, scale, zero_point)``, the last two of shape ``x.shape[:-1] + (1,)`` in float32."""
    lo = x.detach().amin(dim=-1, keepdim=True).float()
    hi = x.detach().amax(dim=-1, keepdim=True).float()
    scale, zero = choose_scale(None, dtype, minimum=lo, maximum=hi, symmetric=False)
    uname = UNSIGNED[_name(dtype)]
    return quantize(x, scale, zero, uname), scale, zero


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype) -> torch.Tensor:
    """``dequantize(quantize(x))`` in x's dtype."""
    return dequantize(quantize(x, scale, zero_point, dtype), scale, zero_point, x.dtype)


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """float32 ``y`` rounded onto the FP8 E4M3 grid: ``y.to(torch.float8_e4m3fn).float()`` (round half
    to even, saturation to +-448, NaN kept), computed with float32 and int32 operations only, which
    compilers vectorize on every ISA (the fp8 conversion is element by element without fp8
    instructions). Normal values round their float32 mantissa to 3 bits in the integer bits;
    values below 2**-6 round to multiples of 2**-9 (E4M3's subnormal step)."""
    v = y.float().clamp(-448.0, 448.0)
    b = v.view(torch.int32)
    normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & ~0xFFFFF).view(torch.float32)
    out = torch.where(v.abs() < 2.0 ** -6, torch.round(v * 512.0) * (1.0 / 512.0), normal)
    # NaN's bits are any NaN's (compiled clamps set them all); ``v != v`` vectorizes where isnan does not
    return torch.where(v != v, v, out)


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` in dB (float64)."""
    ref = ref.double()
    noise = (x.double() - ref).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
