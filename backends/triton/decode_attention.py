"""Decode attention over a quantized KV cache: the Triton kernel of ``qcompiler::kv_decode_attention``.

Contract (shapes, mask, GQA, float32 numerics) in ``qcompiler.core.ops.kv_decode_attention``; stored
layout in ``qcompiler.core.kv_format``. The unfused path reads the whole cache back to the model's dtype
(``kv_cache_read``: write and read [B, Hkv, Tq, D] in bf16) and then runs the attention over it; this
kernel reads the codes once, straight from the cache, and never materialises K or V.

Flash-decoding: one program per (batch, KV head, sequence split). A program holds the ``G * M`` query
rows that share its KV head (G = Hq / Hkv query heads times the M decode rows), so every code byte is
read once for the whole group, and streams over its part of the sequence in ``BLOCK_T``-token tiles
with an online softmax (running max ``m``, running sum ``l``, float32 accumulator):

- the codes part (tokens ``0 .. Tq``) is dequantized in registers: int8 / uint8 loaded as they are,
  fp8 e4m3 decoded from its bits with integer arithmetic (exact; needs no fp8 support from the GPU
  or the interpreter), int4 / uint4 unpacked from the ``qcompiler.core.packing`` nibbles (element 2j
  low nibble); then ``(code - zero) * scale`` in float32, the scale (and zero point) per tensor, per
  head, per head and channel, per token, or per head and channel for each block of ``GROUP``
  positions (``SCALE_MODE`` 1 / 2 / 3 / 4 below);
- the window part (tokens ``Tq .. T``) is read in its own dtype and widened to float32;
- scores ``sum_d q * k`` and ``sum_t p * v`` are float32 products reduced with ``tl.sum`` (no
  ``tl.dot``: at M <= 16 rows the kernel is bound by memory, and the interpreter's bf16 ``tl.dot``
  is wrong);
- with ``num_splits > 1`` each split writes its ``(acc, m, l)`` to a float32 workspace and a second
  launch combines the splits in split order (deterministic).

Numerics: the reference's values and float32 products; the differences are the summation order and
the online softmax's rescaling (~1e-7 relative in float32), plus the final rounding to q's dtype
(under the interpreter through ``common.cast``, which rounds to bfloat16 half to even as torch does).

``register()`` registers this kernel as the CPU / CUDA kernel of ``qcompiler::triton_kv_decode_attention``
(declared in ``qcompiler.core.ops``) with the backend's fallback to the reference, and returns the
``TritonKernel`` the lowering table would hold for ``qcompiler::kv_decode_attention``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompiler.core.ops import triton_op

from .availability import GPU, availability
from .checks import _device
from .common import cast

__all__ = ["kv_decode_attention_triton", "check_kv_decode_attention", "register", "KV_DTYPES", "MAX_HEAD_DIM",
           "MAX_ROWS"]

#: storage name -> (codes dtype, kind code of the kernel: 0 int8 / uint8, 1 fp8 e4m3, 2 int4, 3 uint4)
KV_DTYPES = {"int8": (torch.int8, 0), "uint8": (torch.uint8, 0), "fp8_e4m3": (torch.float8_e4m3fn, 1),
             "int4": (torch.uint8, 2), "uint4": (torch.uint8, 3)}
#: A program keeps a [G * M, head_dim] accumulator and [G * M, BLOCK_T, head_dim] products in registers.
MAX_HEAD_DIM = 256
MAX_ROWS = 128
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
#: elements of the [BLOCK_R, BLOCK_T, BLOCK_D] product a program reduces per tile
_TILE_BUDGET = {"gpu": 8192, "interpreter": 65536}


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _e4m3_to_f32(bits):
    """float8 e4m3fn bits (int32 0..255) -> float32, exactly: sign, 4-bit exponent (bias 7), 3-bit
    mantissa, subnormals below 2**-6, NaN at S.1111.111, no infinities."""
    e = (bits >> 3) & 0xF
    m = bits & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)        # subnormal: m * 2**-9
    val = tl.where((e == 15) & (m == 7), float("nan"), val)
    return tl.where((bits & 0x80) != 0, -val, val)


@triton.jit
def _static_scale(s_ptr, z_ptr, s_base, z_base, offs_d, D, stride_sd, stride_zd,
                  SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Scale and float zero point that hold for the whole sequence: one per (batch, head) (SCALE_MODE 1),
    or per channel as [1, BLOCK_D] (2); placeholders for per-token (3) and per-group (4) scales, loaded per tile."""
    s = 1.0
    z = 0.0
    if SCALE_MODE == 1:
        s = tl.load(s_ptr + s_base)
        if HAS_ZERO:
            z = tl.load(z_ptr + z_base).to(tl.float32)
    if SCALE_MODE == 2:
        d_ok = offs_d < D
        s = tl.load(s_ptr + s_base + offs_d * stride_sd, mask=d_ok, other=0.0)[None, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + z_base + offs_d * stride_zd, mask=d_ok, other=0).to(tl.float32)[None, :]
    return s, z


@triton.jit
def _code_tile(c_ptr, s_ptr, z_ptr, s, z, c_base, s_base, z_base, offs_t, t_ok, D,
               stride_ct, stride_cd, stride_st, stride_zt, stride_sd, stride_zd, GROUP,
               KIND: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_D: tl.constexpr):
    """float32 [BLOCK_T, BLOCK_D]: the dequantized rows ``offs_t`` of one head's codes (0 outside
    ``t_ok`` x [0, D)). ``s`` / ``z`` from ``_static_scale``."""
    offs_d = tl.arange(0, BLOCK_D)
    if KIND >= 2:                                       # packed int4: byte j holds elements 2j (low), 2j + 1
        offs_b = tl.arange(0, BLOCK_D // 2)
        ok = t_ok[:, None] & (offs_b[None, :] < (D + 1) // 2)
        b = tl.load(c_ptr + c_base + offs_t[:, None] * stride_ct + offs_b[None, :] * stride_cd, mask=ok,
                    other=0).to(tl.int32)
        q = tl.interleave(b & 0xF, (b >> 4) & 0xF)
        if KIND == 2:
            q = q - ((q & 8) << 1)                      # two's complement nibble: 8..15 -> -8..-1
        x = q.to(tl.float32)
    else:
        ok = t_ok[:, None] & (offs_d[None, :] < D)
        raw = tl.load(c_ptr + c_base + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd, mask=ok, other=0)
        if KIND == 1:
            x = _e4m3_to_f32(raw.to(tl.int32) & 0xFF)   # fp8 codes arrive as their uint8 bits
        else:
            x = raw.to(tl.float32)
    if SCALE_MODE == 3:                                 # per token: [BLOCK_T, 1]
        s = tl.load(s_ptr + s_base + offs_t * stride_st, mask=t_ok, other=0.0)[:, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + z_base + offs_t * stride_zt, mask=t_ok, other=0).to(tl.float32)[:, None]
    if SCALE_MODE == 4:                                 # per group: block t // GROUP, per channel: [BLOCK_T, BLOCK_D]
        blk = (offs_t // GROUP)[:, None]
        s_ok = t_ok[:, None] & (offs_d[None, :] < D)
        s = tl.load(s_ptr + s_base + blk * stride_st + offs_d[None, :] * stride_sd, mask=s_ok, other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + z_base + blk * stride_zt + offs_d[None, :] * stride_zd, mask=s_ok,
                        other=0).to(tl.float32)
    if HAS_ZERO:
        x = x - z
    x = x * s
    return tl.where(t_ok[:, None] & (offs_d[None, :] < D), x, 0.0)


@triton.jit
def _window_tile(w_ptr, w_base, offs_t, t_ok, D, stride_wt, stride_wd, BLOCK_D: tl.constexpr):
    """float32 [BLOCK_T, BLOCK_D]: window rows ``offs_t`` (window positions), 0 outside."""
    offs_d = tl.arange(0, BLOCK_D)
    ok = t_ok[:, None] & (offs_d[None, :] < D)
    return tl.load(w_ptr + w_base + offs_t[:, None] * stride_wt + offs_d[None, :] * stride_wd, mask=ok,
                   other=0.0).to(tl.float32)


@triton.jit
def _online_step(q, k, v, t_abs, t_ok, mask_ptr, mask_rows, r_ok, stride_mt, sm_scale, m_i, l_i, acc,
                 MASK_KIND: tl.constexpr):
    """One tile of the online softmax: scores of the rows against keys ``k`` [BLOCK_T, BLOCK_D], the
    mask at absolute positions ``t_abs``, then ``m``, ``l`` and ``acc`` rescaled and updated with ``v``."""
    s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * sm_scale            # [BLOCK_R, BLOCK_T]
    if MASK_KIND == 1:                                  # boolean (as uint8): True attends
        keep = tl.load(mask_ptr + mask_rows[:, None] + t_abs[None, :] * stride_mt,
                       mask=r_ok[:, None] & t_ok[None, :], other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if MASK_KIND == 2:                                  # additive
        add = tl.load(mask_ptr + mask_rows[:, None] + t_abs[None, :] * stride_mt,
                      mask=r_ok[:, None] & t_ok[None, :], other=0.0)
        s = s + add.to(tl.float32)
    s = tl.where(t_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)                     # rows with nothing to attend yet
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _store_rows(out_ptr, acc, l_i, b, hkv, G, M, DV, so_b, so_h, so_m, so_d, SOFT_BF16: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out[b, hkv * G + r // M, r % M, :] = acc[r] / l[r] (0 where l = 0), in out's dtype."""
    rows = tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    safe = tl.where(l_i > 0, l_i, 1.0)
    res = tl.where((l_i > 0)[:, None], tl.div_rn(acc, safe[:, None]), 0.0)
    head = hkv * G + rows // M
    ptrs = out_ptr + b * so_b + head[:, None] * so_h + (rows % M)[:, None] * so_m + offs_dv[None, :] * so_d
    ok = (rows < G * M)[:, None] & (offs_dv[None, :] < DV)
    tl.store(ptrs, cast(res, out_ptr.dtype.element_ty, SOFT_BF16), mask=ok)


@triton.jit
def _decode_attention_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, mask_ptr, out_ptr, part_ptr,
    HKV, G, M, TQ, TW, D, DV, T_PER_SPLIT, sm_scale, K_GROUP, V_GROUP,
    sq_b, sq_h, sq_m, sq_d,
    skc_b, skc_h, skc_t, skc_d, sks_b, sks_h, sks_t, sks_d, skz_b, skz_h, skz_t, skz_d, skw_b, skw_h, skw_t, skw_d,
    svc_b, svc_h, svc_t, svc_d, svs_b, svs_h, svs_t, svs_d, svz_b, svz_h, svz_t, svz_d, svw_b, svw_h, svw_t, svw_d,
    sm_b, sm_h, sm_m, sm_t,
    so_b, so_h, so_m, so_d,
    K_KIND: tl.constexpr, K_SCALE_MODE: tl.constexpr, K_HAS_ZERO: tl.constexpr,
    V_KIND: tl.constexpr, V_SCALE_MODE: tl.constexpr, V_HAS_ZERO: tl.constexpr,
    MASK_KIND: tl.constexpr, SPLIT: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    rows = tl.arange(0, BLOCK_R)                        # row r: query head hkv * G + r // M, decode row r % M
    r_ok = rows < G * M
    head = hkv * G + rows // M
    mrow = rows % M
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + mrow[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    mask_rows = b * sm_b + head * sm_h + mrow * sm_m

    ks, kz = _static_scale(ks_ptr, kz_ptr, b * sks_b + hkv * sks_h, b * skz_b + hkv * skz_h, offs_d, D,
                           sks_d, skz_d, K_SCALE_MODE, K_HAS_ZERO)
    vs, vz = _static_scale(vs_ptr, vz_ptr, b * svs_b + hkv * svs_h, b * svz_b + hkv * svz_h, offs_dv, DV,
                           svs_d, svz_d, V_SCALE_MODE, V_HAS_ZERO)

    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.float32)
    start = sp * T_PER_SPLIT
    end = tl.minimum(start + T_PER_SPLIT, TQ + TW)
    arange_t = tl.arange(0, BLOCK_T)

    # the codes: tokens [start, min(end, TQ))
    for t0 in range(start, tl.minimum(end, TQ), BLOCK_T):
        offs_t = t0 + arange_t
        t_ok = offs_t < tl.minimum(end, TQ)
        k = _code_tile(kc_ptr, ks_ptr, kz_ptr, ks, kz, b * skc_b + hkv * skc_h, b * sks_b + hkv * sks_h,
                       b * skz_b + hkv * skz_h, offs_t, t_ok, D, skc_t, skc_d, sks_t, skz_t, sks_d, skz_d, K_GROUP,
                       K_KIND, K_SCALE_MODE, K_HAS_ZERO, BLOCK_D)
        v = _code_tile(vc_ptr, vs_ptr, vz_ptr, vs, vz, b * svc_b + hkv * svc_h, b * svs_b + hkv * svs_h,
                       b * svz_b + hkv * svz_h, offs_t, t_ok, DV, svc_t, svc_d, svs_t, svz_t, svs_d, svz_d, V_GROUP,
                       V_KIND, V_SCALE_MODE, V_HAS_ZERO, BLOCK_DV)
        m_i, l_i, acc = _online_step(q, k, v, offs_t, t_ok, mask_ptr, mask_rows, r_ok, sm_t, sm_scale,
                                     m_i, l_i, acc, MASK_KIND)

    # the window: tokens [max(start, TQ), end), window positions t - TQ
    for t0 in range(tl.maximum(start, TQ), end, BLOCK_T):
        offs_t = t0 + arange_t
        t_ok = offs_t < end
        k = _window_tile(kw_ptr, b * skw_b + hkv * skw_h, offs_t - TQ, t_ok, D, skw_t, skw_d, BLOCK_D)
        v = _window_tile(vw_ptr, b * svw_b + hkv * svw_h, offs_t - TQ, t_ok, DV, svw_t, svw_d, BLOCK_DV)
        m_i, l_i, acc = _online_step(q, k, v, offs_t, t_ok, mask_ptr, mask_rows, r_ok, sm_t, sm_scale,
                                     m_i, l_i, acc, MASK_KIND)

    if SPLIT == 1:
        _store_rows(out_ptr, acc, l_i, b, hkv, G, M, DV, so_b, so_h, so_m, so_d, SOFT_BF16, BLOCK_R, BLOCK_DV)
    else:
        # workspace per (bh, split): acc [BLOCK_R, BLOCK_DV], then m [BLOCK_R], then l [BLOCK_R]
        base = part_ptr + (bh * SPLIT + sp) * (BLOCK_R * BLOCK_DV + 2 * BLOCK_R)
        tl.store(base + rows[:, None] * BLOCK_DV + offs_dv[None, :], acc)
        tl.store(base + BLOCK_R * BLOCK_DV + rows, m_i)
        tl.store(base + BLOCK_R * BLOCK_DV + BLOCK_R + rows, l_i)


@triton.jit
def _combine_kernel(part_ptr, out_ptr, HKV, G, M, DV, so_b, so_h, so_m, so_d,
                    SPLIT: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the SPLIT partial softmaxes of one (batch, KV head), in split order."""
    bh = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    size = BLOCK_R * BLOCK_DV + 2 * BLOCK_R
    first = part_ptr + bh * SPLIT * size
    m_g = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    for sp in range(SPLIT):
        m_g = tl.maximum(m_g, tl.load(first + sp * size + BLOCK_R * BLOCK_DV + rows))
    m_use = tl.where(m_g == float("-inf"), 0.0, m_g)
    l_g = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.float32)
    for sp in range(SPLIT):
        base = first + sp * size
        w = tl.exp(tl.load(base + BLOCK_R * BLOCK_DV + rows) - m_use)
        l_g += tl.load(base + BLOCK_R * BLOCK_DV + BLOCK_R + rows) * w
        acc += tl.load(base + rows[:, None] * BLOCK_DV + offs_dv[None, :]) * w[:, None]
    _store_rows(out_ptr, acc, l_g, bh // HKV, bh % HKV, G, M, DV, so_b, so_h, so_m, so_d, SOFT_BF16,
                BLOCK_R, BLOCK_DV)


# ----------------------------------------------------------------------------- checks and launcher


def _scale_layout(name: str, scale, zero, b: int, h: int, t: int, d: int, group: int = 0) -> str | None:
    """Scale 0-d, [1, H, 1, 1], [1, H, 1, D] or [B, H, T, 1] (any dims that broadcast the same way, but
    not varying along both tokens and channels), or with ``group`` > 0 [B, H, ceil(T / group), D];
    zero None or integer of the scale's shape."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        return f"{name}_scale must be a float tensor"
    if not isinstance(group, int) or group < 0:
        return f"{name}_group must be an integer >= 0, got {group!r}"
    if group:
        want = (b, h, -(-t // group), d)
        if tuple(scale.shape) != want:
            return f"{name}_scale of shape {tuple(scale.shape)} is not per_group {list(want)} (blocks of {group})"
    elif scale.dim():
        ok = scale.dim() == 4 and all(s in (1, full) for s, full in zip(scale.shape, (b, h, t, d)))
        if not ok or (scale.shape[2] != 1 and scale.shape[3] != 1):
            return (f"{name}_scale of shape {tuple(scale.shape)} is not 0-d, per head [1, {h}, 1, 1], per head and "
                    f"channel [1, {h}, 1, {d}] or per token [{b}, {h}, {t}, 1]")
    if zero is not None:
        if zero.shape != scale.shape or zero.dtype not in (torch.uint8, torch.int8):
            return (f"{name}_zero must be uint8 or int8 of {name}_scale's shape {tuple(scale.shape)}, got "
                    f"{zero.dtype} {tuple(zero.shape)}")
    return None


def _role(name: str, codes, scale, zero, window, dtype: str, b: int, h: int, d: int | None,
          group: int = 0) -> str | None:
    if dtype not in KV_DTYPES:
        return f"{name}_dtype {dtype!r} is not one of {sorted(KV_DTYPES)}"
    if not isinstance(window, torch.Tensor) or window.dtype not in _FLOATS or window.dim() != 4:
        return f"{name}_window must be a float32 / float16 / bfloat16 [B, Hkv, Tw, D] tensor"
    wd = window.shape[-1]
    if tuple(window.shape[:2]) != (b, h) or (d is not None and wd != d):
        return f"{name}_window of shape {tuple(window.shape)} is not [{b}, {h}, Tw, {d if d is not None else 'Dv'}]"
    if not 0 < wd <= MAX_HEAD_DIM:
        return f"head dim {wd} is outside the kernel's 1..{MAX_HEAD_DIM}"
    want, kind = KV_DTYPES[dtype]
    per_row = (wd + 1) // 2 if kind >= 2 else wd
    if codes.dtype != want or codes.dim() != 4 or tuple(codes.shape[:2]) != (b, h) or codes.shape[3] != per_row:
        return (f"{name}_codes must be {want} [{b}, {h}, Tq, {per_row}] for {dtype!r}, got {codes.dtype} "
                f"{tuple(codes.shape)}")
    return _scale_layout(name, scale, zero, b, h, codes.shape[2], wd, group)


def check_kv_decode_attention(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, attn_mask,
                              sm_scale, k_dtype, v_dtype, k_group=0, v_group=0) -> str | None:
    """Why the Triton kernel cannot take these arguments (real or fake tensors), or None."""
    if not isinstance(q, torch.Tensor) or q.dtype not in _FLOATS or q.dim() != 4:
        return "q must be a float32 / float16 / bfloat16 [B, Hq, M, D] tensor"
    b, hq, m, d = q.shape
    if not isinstance(k_codes, torch.Tensor) or k_codes.dim() != 4:
        return "k_codes must be a [B, Hkv, Tq, D or D / 2] tensor"
    hkv = k_codes.shape[1]
    if hkv == 0 or hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} KV heads"
    if (hq // hkv) * m > MAX_ROWS:
        return f"{hq // hkv} query heads per KV head x {m} rows exceed the kernel's {MAX_ROWS} rows per program"
    reason = (_role("k", k_codes, k_scale, k_zero, k_window, k_dtype, b, hkv, d, k_group)
              or _role("v", v_codes, v_scale, v_zero, v_window, v_dtype, b, hkv, None, v_group))
    if reason:
        return reason
    if v_codes.shape[2] != k_codes.shape[2] or v_window.shape[2] != k_window.shape[2]:
        return (f"keys ({k_codes.shape[2]} codes + {k_window.shape[2]} window) and values ({v_codes.shape[2]} + "
                f"{v_window.shape[2]}) are not split alike")
    if attn_mask is not None:
        t = k_codes.shape[2] + k_window.shape[2]
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in _FLOATS:
            return f"attn_mask must be bool or float, got {attn_mask.dtype}"
        full = (b, hq, m, t)
        shape = tuple(attn_mask.shape)
        if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
            return f"attn_mask of shape {shape} does not broadcast to {full}"
    return _device(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, attn_mask)


def _broadcast_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 0-d or 4-d tensor as broadcast over [B, H, T, D]: 0 along its size-1 dims. (Not
    ``expand``: an expansion over Tq = 0 tokens has no elements, and the interpreter then has no
    storage to read a static scale from.)"""
    if t.dim() == 0:
        return 0, 0, 0, 0
    return tuple(st if n != 1 else 0 for st, n in zip(t.stride(), t.shape))


def _scale_args(scale: torch.Tensor, zero: torch.Tensor | None, group: int = 0):
    """(scale, zero or scale, SCALE_MODE, broadcast strides of the scale and of the zero)."""
    s = scale.float()
    z = zero if zero is not None else s
    if group:
        mode = 4
    elif scale.dim() and scale.shape[3] != 1:
        mode = 2
    elif scale.dim() and scale.shape[2] != 1:
        mode = 3
    else:
        mode = 1
    return s, z, mode, _broadcast_strides(s), _broadcast_strides(z)


def kv_decode_attention_triton(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, attn_mask,
                               sm_scale, k_dtype, v_dtype, k_group=0, v_group=0, *, block_t: int | None = None,
                               num_splits: int | None = None) -> torch.Tensor:
    """``qcompiler::kv_decode_attention`` by the Triton kernel (see the module docstring).

    ``block_t``: tokens per tile (a power of two; default from a register budget); ``num_splits``: sequence
    splits per (batch, KV head) (default: 1 under the interpreter; on a GPU enough programs for ~2 per SM,
    at least 256 tokens each)."""
    reason = check_kv_decode_attention(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window,
                                       attn_mask, sm_scale, k_dtype, v_dtype, k_group, v_group)
    if reason:
        raise ValueError(f"kv_decode_attention: {reason}")
    b, hq, m, d = q.shape
    hkv, tq, tw, dv = k_codes.shape[1], k_codes.shape[2], k_window.shape[2], v_window.shape[-1]
    g, t = hq // hkv, tq + tw
    out = torch.empty((b, hq, m, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    interp = availability().interpreter
    block_r = triton.next_power_of_2(g * m)
    block_d, block_dv = max(2, triton.next_power_of_2(d)), max(2, triton.next_power_of_2(dv))
    if block_t is None:
        budget = _TILE_BUDGET["interpreter" if interp else "gpu"]
        block_t = max(1, min(64, budget // (block_r * max(block_d, block_dv))))
        block_t = 1 << (block_t.bit_length() - 1)          # a power of two
        block_t = min(block_t, max(1, triton.next_power_of_2(t)))
    if num_splits is None:
        num_splits = 1
        if availability().mode == GPU and q.is_cuda:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = max(1, min(triton.cdiv(2 * sms, b * hkv), triton.cdiv(t, 256)))
    t_per_split = max(1, triton.cdiv(triton.cdiv(t, max(1, num_splits)), block_t)) * block_t
    split = max(1, triton.cdiv(t, t_per_split))

    kc = k_codes.view(torch.uint8) if k_codes.dtype == torch.float8_e4m3fn else k_codes
    vc = v_codes.view(torch.uint8) if v_codes.dtype == torch.float8_e4m3fn else v_codes
    ks, kz, k_mode, sks, skz = _scale_args(k_scale, k_zero, k_group)
    vs, vz, v_mode, svs, svz = _scale_args(v_scale, v_zero, v_group)
    if attn_mask is None:
        mask, mask_kind, smask = q, 0, (0, 0, 0, 0)
    else:
        mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))     # a view: leading 1s
        mask_kind, smask = (1 if attn_mask.dtype == torch.bool else 2), _broadcast_strides(mask)
    part = (torch.empty(b * hkv * split * (block_r * block_dv + 2 * block_r), dtype=torch.float32, device=q.device)
            if split > 1 else out)
    soft_bf16 = interp
    _decode_attention_kernel[(b * hkv, split)](
        q, kc, ks, kz, k_window, vc, vs, vz, v_window, mask, out, part,
        hkv, g, m, tq, tw, d, dv, t_per_split, float(sm_scale), max(1, k_group), max(1, v_group),
        *q.stride(),
        *kc.stride(), *sks, *skz, *k_window.stride(),
        *vc.stride(), *svs, *svz, *v_window.stride(),
        *smask, *out.stride(),
        K_KIND=KV_DTYPES[k_dtype][1], K_SCALE_MODE=k_mode, K_HAS_ZERO=k_zero is not None,
        V_KIND=KV_DTYPES[v_dtype][1], V_SCALE_MODE=v_mode, V_HAS_ZERO=v_zero is not None,
        MASK_KIND=mask_kind, SPLIT=split, SOFT_BF16=soft_bf16,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=4)
    if split > 1:
        _combine_kernel[(b * hkv,)](part, out, hkv, g, m, dv, *out.stride(), SPLIT=split, SOFT_BF16=soft_bf16,
                                    BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4)
    return out


# ----------------------------------------------------------------------------- registration


@functools.cache
def register():
    """Register the kernel as the CPU / CUDA kernel of ``qcompiler::triton_kv_decode_attention`` (reference
    fallback, logged and reported, when ``check_kv_decode_attention`` refuses the arguments); return its
    ``TritonKernel``, the lowering table's entry for ``torch.ops.qcompiler.kv_decode_attention``."""
    from .lowering import TritonKernel

    class _DecodeAttentionKernel(TritonKernel):
        def __init__(self):                            # TritonKernel's, without the KERNELS / CHECKS tables
            self.name = "kv_decode_attention"
            self.__name__ = "triton_kv_decode_attention"
            self.op = triton_op(self.name)
            self.reference = torch.ops.qcompiler.kv_decode_attention.default
            self._module, self._launcher = "decode_attention", "kv_decode_attention_triton"
            self._check = check_kv_decode_attention
            self._kernel = kv_decode_attention_triton

    kernel = _DecodeAttentionKernel()
    torch.library.register_kernel(kernel.op, ("cpu", "cuda"), kernel)
    return kernel
