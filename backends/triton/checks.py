"""What each Triton kernel takes: one function per op, returning None or why it cannot.

The checks read only dtypes, shapes and devices, so they run on real tensors (each launch)
and on the fake tensors of a traced graph (the Lower pass, which then keeps the op on its
reference kernel and records the reason in the compile report). No triton import here.
"""

from __future__ import annotations

import math

import torch

from .availability import GPU, availability, fp8_supported

__all__ = ["CHECKS", "check_int8_gemm", "check_fp8_gemm", "check_weight_only_gemm", "check_int4_gemm",
           "check_w4a8_gemm", "check_norm_quantize_per_token", "check_hadamard_transform", "MAX_NORM_K",
           "MAX_HADAMARD_TILE"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FP8 = torch.float8_e4m3fn
#: The fused norm + quantize kernel keeps a row in registers.
MAX_NORM_K = 32768
#: The Hadamard kernel keeps a row as an [m rounded up to a power of two, n / m] tile in registers.
MAX_HADAMARD_TILE = 32768


def _tensors(*ts) -> list[torch.Tensor]:
    return [t for t in ts if isinstance(t, torch.Tensor)]


def _device(*ts) -> str | None:
    """Why these tensors cannot be used on this machine's mode, or None."""
    devices = {t.device.type for t in _tensors(*ts)}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(devices)}"
    if availability().mode == GPU and devices != {"cuda"}:
        return f"tensors on {sorted(devices)}, the GPU kernels take CUDA tensors"
    return None


def _rows(a: torch.Tensor) -> int:
    return math.prod(a.shape[:-1])


def _act_scale(a_scale, m: int, name: str = "a_scale") -> str | None:
    if not isinstance(a_scale, torch.Tensor) or not a_scale.is_floating_point():
        return f"{name} must be a float tensor"
    if a_scale.dim() and a_scale.numel() != m:
        return f"{name} of shape {tuple(a_scale.shape)} is neither 0-d nor one scale per row ({m} rows)"
    return None


def _bias(bias, n: int) -> str | None:
    if bias is None:
        return None
    if not bias.is_floating_point() or bias.numel() != n:
        return f"bias must be a float [N={n}] tensor, got {bias.dtype} {tuple(bias.shape)}"
    return None


def _scaled_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype, dtype: torch.dtype) -> str | None:
    if a_q.dtype != dtype or w_q.dtype != dtype:
        return f"a_q / w_q must be {dtype}, got {a_q.dtype} / {w_q.dtype}"
    if a_q.dim() < 1 or w_q.dim() != 2 or a_q.shape[-1] != w_q.shape[1]:
        return f"shapes a_q {tuple(a_q.shape)} and w_q {tuple(w_q.shape)} are not [..., K] and [N, K]"
    n = w_q.shape[0]
    if w_q.shape[1] == 0 or n == 0:
        return "empty K or N"
    if out_dtype not in _FLOATS:
        return f"out_dtype {out_dtype} is not one of float32, float16, bfloat16"
    if not isinstance(w_scale, torch.Tensor) or not w_scale.is_floating_point() or w_scale.numel() not in (1, n):
        return f"w_scale must be a float 0-d or [N={n}, 1] tensor"
    return _act_scale(a_scale, _rows(a_q)) or _bias(bias, n) or _device(a_q, a_scale, w_q, w_scale, bias)


def check_int8_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype) -> str | None:
    return _scaled_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype, torch.int8)


def check_fp8_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype) -> str | None:
    if not fp8_supported():
        return "fp8 tl.dot needs a GPU of compute capability 8.9 or newer"
    return _scaled_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype, _FP8)


def _group(scale, zero, n: int, k: int, group_size: int) -> str | None:
    """Scales 0-d, [N, 1] or [N, G] with G = ceil(K / block); zero-points None or like the scale."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        return "w_scale must be a float tensor"
    if scale.dim() and (scale.dim() != 2 or scale.shape[0] != n):
        return f"w_scale of shape {tuple(scale.shape)} is not 0-d, [N, 1] or [N, G]"
    if scale.dim() and scale.shape[1] > 1:
        block = group_size or -(-k // scale.shape[1])
        if -(-k // block) != scale.shape[1]:
            return f"w_scale has {scale.shape[1]} groups, which group_size {block} does not give for K={k}"
    if zero is not None:
        if zero.shape != scale.shape or zero.dtype in (_FP8, torch.bool) or zero.is_complex():
            return f"w_zero must have w_scale's shape {tuple(scale.shape)}, got {zero.dtype} {tuple(zero.shape)}"
    return None


def check_weight_only_gemm(x, w_q, w_scale, w_zero, bias, group_size=0) -> str | None:
    if x.dtype not in _FLOATS:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if w_q.dtype not in (torch.int8, torch.uint8):
        return f"w_q must be int8 or uint8 (one value per byte), got {w_q.dtype}"
    if w_q.dim() != 2 or x.shape[-1] != w_q.shape[1] or 0 in w_q.shape:
        return f"shapes x {tuple(x.shape)} and w_q {tuple(w_q.shape)} are not [..., K] and [N, K]"
    n, k = w_q.shape
    return (_group(w_scale, w_zero, n, k, group_size or 0) or _bias(bias, n)
            or _device(x, w_q, w_scale, w_zero, bias))


def check_int4_gemm(x, w_packed, w_scale, w_zero, bias, group_size, in_features) -> str | None:
    if x.dtype not in _FLOATS:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    return _packed(x, w_packed, w_scale, w_zero, bias, group_size, in_features)


def _packed(a, w_packed, w_scale, w_zero, bias, group_size, in_features) -> str | None:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        return f"w_packed must be uint8 [N, ceil(K / 2)], got {w_packed.dtype} {tuple(w_packed.shape)}"
    n, k = w_packed.shape[0], in_features
    if a.shape[-1] != k or w_packed.shape[1] != (k + 1) // 2 or n == 0 or k == 0:
        return f"shapes {tuple(a.shape)} and w_packed {tuple(w_packed.shape)} do not hold K={k}"
    if w_zero is not None and w_zero.dtype != torch.uint8:
        return f"w_zero must be uint8 (unpacked uint4 zero-points), got {w_zero.dtype}"
    return _group(w_scale, w_zero, n, k, group_size) or _bias(bias, n) or _device(a, w_packed, w_scale, w_zero, bias)


def check_w4a8_gemm(a_q, a_scale, w_packed, w_scale, w_zero, bias, group_size, in_features, out_dtype) -> str | None:
    if a_q.dtype not in (_FP8, torch.int8):
        return f"a_q must be float8_e4m3fn or int8, got {a_q.dtype}"
    if a_q.dtype == _FP8 and not fp8_supported():
        return "fp8 tl.dot needs a GPU of compute capability 8.9 or newer"
    if out_dtype not in _FLOATS:
        return f"out_dtype {out_dtype} is not one of float32, float16, bfloat16"
    return _act_scale(a_scale, _rows(a_q)) or _packed(a_q, w_packed, w_scale, w_zero, bias, group_size, in_features)


def check_norm_quantize_per_token(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype,
                                  out_dtype) -> str | None:
    if x.dtype not in _FLOATS:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if dtype not in ("int8", "fp8_e4m3"):
        return f"dtype {dtype!r} is not one of ['int8', 'fp8_e4m3']"
    if norm not in ("none", "rms", "layer"):
        return f"norm {norm!r} is not one of ['none', 'rms', 'layer']"
    if any(d not in _FLOATS for d in (norm_dtype, mul_dtype, out_dtype)):
        return "the intermediate dtypes must be float32, float16 or bfloat16"
    if norm == "layer" and norm_dtype != x.dtype:
        return f"layer_norm's output dtype is x's ({x.dtype}), got norm_dtype {norm_dtype}"
    k = x.shape[-1] if x.dim() else 0
    if not 0 < k <= MAX_NORM_K:
        return f"K={k} is outside the fused kernel's 1..{MAX_NORM_K}"
    for name, t in (("weight", weight), ("bias", bias), ("smooth", smooth)):
        if t is not None and (t.numel() != k or not t.is_floating_point()):
            return f"{name} must be a float [K={k}] tensor, got {t.dtype} {tuple(t.shape)}"
    return _device(x, weight, bias, smooth)


def check_hadamard_transform(x, h_block, scale) -> str | None:
    if x.dtype not in _FLOATS:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    n = x.shape[-1] if x.dim() else 0
    m = h_block.shape[0] if h_block.dim() == 2 else 0
    if not m or h_block.shape != (m, m) or n % m or (n // m) & (n // m - 1):
        return f"x's last dim {n} is not h_block's order {m} times a power of two (h_block {tuple(h_block.shape)})"
    tile = (1 << (m - 1).bit_length()) * (n // m)
    if tile > MAX_HADAMARD_TILE:
        return f"the row tile ({tile} values) is above the kernel's {MAX_HADAMARD_TILE}"
    return _device(x, h_block)


#: op name -> check
CHECKS = {"int8_gemm": check_int8_gemm, "fp8_gemm": check_fp8_gemm, "weight_only_gemm": check_weight_only_gemm,
          "int4_gemm": check_int4_gemm, "w4a8_gemm": check_w4a8_gemm,
          "norm_quantize_per_token": check_norm_quantize_per_token, "hadamard_transform": check_hadamard_transform}
