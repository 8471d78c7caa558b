"""``qcompiler::norm_quantize_per_token``: a norm, an unfolded SmoothQuant scale and dynamic
per-token quantization as one op (written by ``passes/fuse_norm_quant.py`` for target "triton").

``norm_quantize_per_token(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype, out_dtype)
-> (x_q, scale)`` computes, for x [..., K]:

- ``norm="rms"``: ``n = h * rsqrt(mean(h**2, -1) + eps)`` with ``h = x.float()``; ``n`` is
  rounded to ``norm_dtype``, multiplied by ``weight`` (rounded to ``mul_dtype``), then cast to
  ``out_dtype`` — the casts of HF's RMSNorm variants (Llama: ``w * n.to(x.dtype)``; Gemma:
  ``(n * (1 + w.float())).type_as(x)``), which are no-ops in float32 models;
- ``norm="layer"``: ``layer_norm(x, [K], weight, bias, eps)`` cast to ``out_dtype``;
- ``norm="none"``: ``x``;

then ``y * smooth`` when ``smooth`` (float32 [K], the inverse SmoothQuant scale) is given, and
``numerics.quantize_per_token(y, dtype)``: ``scale = max|y| / qmax`` per row (float32
[..., 1]), ``x_q = saturate(round_half_even(y / scale))`` in int8 or fp8 e4m3. The pure-torch
kernel below is the op's reference; the Triton backend lowers it to ``norm_quant.py``.
"""

from __future__ import annotations

import torch

from qcompiler import numerics

__all__ = ["NORM_KINDS", "norm_quantize_per_token", "norm_quantize_per_token_ref"]

NORM_KINDS = ("none", "rms", "layer")


def norm_quantize_per_token_ref(x: torch.Tensor, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                eps: float, smooth: torch.Tensor | None, dtype: str, norm_dtype: torch.dtype,
                                mul_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of the fused op (see the module docstring)."""
    if norm == "rms":
        h = x.float()
        y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(norm_dtype)
        if weight is not None:
            y = (y.float() * weight.float()).to(mul_dtype)
        y = y.to(out_dtype)
    elif norm == "layer":
        y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(out_dtype)
    elif norm == "none":
        y = x
    else:
        raise ValueError(f"norm={norm!r} is not supported; expected one of {list(NORM_KINDS)}")
    if smooth is not None:
        y = y * smooth
    return numerics.quantize_per_token(y, dtype)


@torch.library.custom_op("qcompiler::norm_quantize_per_token", mutates_args=())
def norm_quantize_per_token(x: torch.Tensor, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            eps: float, smooth: torch.Tensor | None, dtype: str, norm_dtype: torch.dtype,
                            mul_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return norm_quantize_per_token_ref(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype, out_dtype)


@norm_quantize_per_token.register_fake
def _(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype, out_dtype):
    return (torch.empty_like(x, dtype=numerics.STORAGE_DTYPE[dtype]),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))
