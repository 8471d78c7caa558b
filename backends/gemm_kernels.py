"""The GEMM kernels a quantized layer can run on, beside each fused op's reference kernel.

Each ``GemmKernel`` implements one fused op (``int8_gemm``, ``fp8_gemm``, ``weight_only_gemm``,
``int4_gemm``, ``w4a8_gemm``) with the op's signature, except that ``prepare`` may turn the
weight argument into a kernel-specific form once, at lowering (oneDNN's prepacked weight). The
``run`` functions are plain torch code (plus extern custom ops), so the reference target runs
them eagerly and the inductor target compiles them, fusing what surrounds the GEMM.

Numerics contracts (``Contract``), checked per machine by ``probe`` and per layer by
``layer_contract``:

- ``exact``: integer products summed exactly in int32 (or float32 sums that provably never round):
  the same output as the reference kernel, bit for bit.
- ``fp32``: products summed in float32 (the reference contract of the float-activation and FP8
  ops); two such kernels differ by summation order only, ``|err| <= K * 2**-24 * sum|a*w|``.
- ``int16-pairs``: oneDNN's / fbgemm's u8s8 GEMM on CPUs without VNNI sums the products of
  ``a + 128`` (uint8) and ``w`` (int8) in adjacent pairs along K with int16 saturation
  (``vpmaddubsw``), exactly as ``int16_pair_reference`` models it. A layer whose every weight pair
  has ``|w[2j]| + |w[2j+1]| <= 128`` cannot saturate, so it is exact; other layers carry the
  bounded error, which the report states with the share of weight pairs that can saturate.

Which kernel runs is decided by ``qcompiler.backends.kernel_choice``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from qcompiler.core import numerics
from qcompiler.core.formats import op_format
from qcompiler.core.packing import unpack_int4

from . import reference as ref

__all__ = ["Contract", "GemmKernel", "KERNELS", "REFERENCE_CONTRACT", "kernels_for", "int16_pair_reference",
           "layer_contract", "onednn_float_available"]

_ops = torch.ops.qcompiler


class Contract(str, enum.Enum):
    EXACT = "exact"
    FP32 = "fp32"
    INT16_PAIRS = "int16-pairs"

    @property
    def strength(self) -> int:
        """Higher is stronger: exact > fp32 > int16-pairs."""
        return {"exact": 2, "fp32": 1, "int16-pairs": 0}[self.value]


#: what each op's reference kernel guarantees; ``kernels="exact"`` admits nothing weaker
REFERENCE_CONTRACT: dict[str, Contract] = {
    "int8_gemm": Contract.EXACT, "fp8_gemm": Contract.FP32, "weight_only_gemm": Contract.FP32,
    "int4_gemm": Contract.FP32, "w4a8_gemm": Contract.FP32,
}


@dataclass(frozen=True)
class GemmKernel:
    """One implementation of a fused GEMM op.

    ``run`` has the op's signature with argument ``weight_arg`` replaced by ``prepare(weight,
    args)`` (``args``: the op's arguments) when ``prepare`` is set. ``accepts(args) -> reason | None`` refuses argument forms the
    kernel does not take (e.g. group scales); ``available(device) -> reason | None`` refuses
    machines. ``reference``: this is the op's own reference kernel. ``from_float``: the kernel with
    the float activation in place of the quantized one, the activation quantization folded in (same
    values); the lowering uses it where the activation comes straight from a quantize op with the
    GEMM's activation scale.
    """

    name: str
    op: str
    run: Callable
    summary: str
    devices: tuple[str, ...] = ("cpu",)
    prepare: Callable[[torch.Tensor, list], torch.Tensor] | None = None
    weight_arg: int | None = None      # default: the op's weight argument (``qcompiler.core.formats``)
    accepts: Callable[..., str | None] = field(default=lambda *args: None)
    available: Callable[[torch.device], str | None] = field(default=lambda device: None)
    reference: bool = False
    from_float: Callable | None = None

    def __post_init__(self):
        if self.weight_arg is None:
            object.__setattr__(self, "weight_arg", op_format(self.op).weight_arg)


def _rows(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, a.shape[-1])


# ---- int8 x int8 ---------------------------------------------------------------------------

def _onednn_available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "oneDNN's int8 linear runs on CPU only"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
    return None


def _onednn_prepack(w_q: torch.Tensor, args=None) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None)


def int8_gemm_onednn(a_q, a_scale, w_packed, w_scale, bias, out_dtype):
    """``int8_gemm`` on oneDNN's u8s8 int8 linear; the reference's float32 epilogue."""
    acc = _ops.onednn_int8_mm(_rows(a_q), w_packed, w_packed.shape[1])
    return ref._epilogue(acc, a_scale, w_scale, bias, out_dtype, a_q.shape[:-1])


def int8_gemm_fp32(a_q, a_scale, w_q, w_scale, bias, out_dtype):
    """``int8_gemm`` as a float32 GEMM of the integer values (exact while no sum reaches 2**24)."""
    acc = F.linear(_rows(a_q).float(), w_q.float())
    return ref._epilogue(acc, a_scale, w_scale, bias, out_dtype, a_q.shape[:-1])


def int16_pair_reference(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """The int32 sums a u8s8 GEMM without VNNI returns: ``a + 128`` (uint8) times ``w`` summed
    in adjacent pairs along K with int16 saturation, minus ``128 * sum(w)``. [M, K] x [N, K] -> [M, N] int64."""
    u = a_q.to(torch.int64) + 128
    w = w_q.to(torch.int64)
    k = u.shape[-1]
    if k % 2:
        u, w = F.pad(u, (0, 1)), F.pad(w, (0, 1))
    prod = u[:, None, :] * w[None, :, :]
    pairs = (prod[..., 0::2] + prod[..., 1::2]).clamp_(-32768, 32767)
    return pairs.sum(-1) - 128 * w.sum(-1)[None, :]


def _int8_pairs_at_risk(w_q: torch.Tensor) -> float:
    """Share of adjacent weight pairs (along K) with ``|w[2j]| + |w[2j+1]| > 128``: only these can
    saturate an int16 pair sum, whatever the activations."""
    w = w_q.to(torch.int32).abs()
    if w.shape[-1] % 2:
        w = F.pad(w, (0, 1))
    pair = w[..., 0::2] + w[..., 1::2]
    return float((pair > 128).float().mean())


def _fp32_sums_exact(w_q: torch.Tensor, a_max: int = 128) -> bool:
    """Every partial sum of int8 products stays below 2**24 in magnitude, so float32 sums are exact."""
    return bool(a_max * w_q.to(torch.int64).abs().sum(-1).max() < 2 ** 24)


def layer_contract(kernel: GemmKernel, machine: Contract, w_q: torch.Tensor) -> tuple[Contract, str]:
    """The contract ``kernel`` keeps for one layer's weight, given what it keeps on this machine."""
    if kernel.op == "int8_gemm" and machine is Contract.INT16_PAIRS:
        risky = _int8_pairs_at_risk(w_q)
        if risky == 0.0:
            return Contract.EXACT, "no weight pair can reach int16 saturation"
        return Contract.INT16_PAIRS, (f"{100 * risky:.2f}% of weight pairs can saturate an int16 pair sum "
                                      "(this CPU has no VNNI)")
    if kernel.name == "int8-fp32":
        if _fp32_sums_exact(w_q):
            return Contract.EXACT, "every float32 partial sum is an exact integer (< 2**24)"
        return Contract.FP32, "float32 sums of int8 products may round above 2**24"
    return machine, ""


# ---- fp8 x fp8 -----------------------------------------------------------------------------

def _e4m3_from_top_byte(t: torch.Tensor) -> torch.Tensor:
    """float32 values of e4m3fn codes held in bits 24-31 of int32 ``t``, by integer shifts and masks
    and one bit cast (every SIMD ISA vectorizes these; a direct fp8 conversion is scalar without
    fp8 instructions). Exponent and mantissa are moved into float32's with the bias difference added
    (120), so normal codes land on their value; a subnormal code lands on ``(1 + m/8) 2**-7`` and is
    mapped to ``m 2**-9`` exactly (no float32 denormal is formed, so flush-to-zero modes do not
    matter); S.1111.111 is NaN; the sign comes last, so -0.0 stays -0.0."""
    mag = (t >> 4) & 0x07F00000
    f = (mag + (120 << 23)).view(torch.float32)
    f = torch.where(mag < (1 << 23), (f - 2.0 ** -7) * 2.0, f)
    f = torch.where(mag == 0x07F00000, float("nan"), f)
    return torch.where(t < 0, -f, f)


def fp8_to_float_via_bits(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 by integer ops (``_e4m3_from_top_byte``): the same value for every
    code, NaN for NaN, -0.0 for -0.0."""
    return _e4m3_from_top_byte(q.view(torch.uint8).to(torch.int32) << 24)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes of ``bits`` bits (8 or 4; signed or not, only their low bits are kept) -> [N, K*bits/32]
    int32 words whose field j (bits ``j*bits`` up) holds column ``i + j*K/F`` of word i (F fields per
    word): field j of every word is one contiguous F-th of the row, so a kernel decodes the weight with
    int32 shifts and masks, which every SIMD ISA vectorizes (widening bytes or nibbles is element by
    element in AVX2 code). Same number of bytes as the codes packed densely. K % F == 0."""
    fields = 32 // bits
    n, k = codes.shape
    u = (codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes).to(torch.int32) & ((1 << bits) - 1)
    u = u.reshape(n, fields, k // fields)
    words = torch.zeros(n, k // fields, dtype=torch.int32)
    for j in range(fields):
        words |= u[:, j] << (bits * j)
    return words


def word_fields(words: torch.Tensor, bits: int, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The [N, K] row of ``pack_words``' words: ``decode`` applied to each field moved to the top of the
    word (bits ``32 - bits`` up; the fields below it stay below), the F-ths concatenated in column order."""
    fields = 32 // bits
    # one broadcast shift, not F slices and a cat: a single pointwise kernel writes the row in place
    shifts = 32 - bits * torch.arange(1, fields + 1, dtype=torch.int32, device=words.device)
    return decode(words.unsqueeze(-2) << shifts.unsqueeze(-1)).reshape(*words.shape[:-1], -1)


def _signed_field(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda top: top >> (32 - bits)               # arithmetic shift: two's complement


def _unsigned_field(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda top: (top >> (32 - bits)) & ((1 << bits) - 1)


def _words_accepts(k: int, bits: int) -> str | None:
    fields = 32 // bits
    return f"needs K divisible by {fields} (K {k})" if k % fields else None


def _fp8_operands(a_q, a_scale, w_q, w_scale, to_float=lambda q: q.float()) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 values of an ``fp8_gemm``'s operands (activation rows folded to 2-d)."""
    a = to_float(_rows(a_q)) * (a_scale.float().reshape(-1, 1) if a_scale.dim() else a_scale.float())
    w = to_float(w_q) * (w_scale.float().reshape(-1, 1) if w_scale.dim() else w_scale.float())
    return a, w


def _fp8_dequant_linear(a_q, a_scale, w_q, w_scale, bias, out_dtype, linear, a=None):
    """Dequantize + ``linear``; ``a``: the activation's E4M3 values already in float32 rows (folded form)."""
    a_vals, w = _fp8_operands(a_q if a is None else a, a_scale, w_q, w_scale)
    out = linear(a_vals, w, None if bias is None else bias.float())
    return out.to(out_dtype).reshape(*a_q.shape[:-1], w_q.shape[0])


def _e4m3_rows(x: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """``quantize(x, a_scale, fp8_e4m3).float()`` as [M, K] rows, by float32 / int32 operations."""
    return _rows(numerics.round_to_e4m3(x.float() / a_scale.float()))


def fp8_gemm_dequant(a_q, a_scale, w_q, w_scale, bias, out_dtype):
    """``fp8_gemm`` as dequantize + float32 GEMM (what ``_scaled_mm`` computes, summation aside)."""
    return _fp8_dequant_linear(a_q, a_scale, w_q, w_scale, bias, out_dtype, F.linear)


def fp8_gemm_dequant_from_float(x, a_scale, w_q, w_scale, bias, out_dtype):
    """``fp8_gemm_dequant`` of ``quantize(x, a_scale, fp8_e4m3)``, the quantization folded in
    (``numerics.round_to_e4m3``: the fp8 cast's values, vectorized without fp8 instructions)."""
    return _fp8_dequant_linear(x, a_scale, w_q, w_scale, bias, out_dtype, F.linear, _e4m3_rows(x, a_scale))


def fp8_gemm_dequant_onednn(a_q, a_scale, w_q, w_scale, bias, out_dtype):
    """``fp8_gemm`` as dequantize + oneDNN's float32 GEMM."""
    return _fp8_dequant_linear(a_q, a_scale, w_q, w_scale, bias, out_dtype, _ops.onednn_linear)


def fp8_gemm_dequant_onednn_from_float(x, a_scale, w_q, w_scale, bias, out_dtype):
    """``fp8_gemm_dequant_onednn`` with the activation's quantization folded in (as ``fp8_gemm_dequant_from_float``)."""
    return _fp8_dequant_linear(x, a_scale, w_q, w_scale, bias, out_dtype, _ops.onednn_linear,
                               _e4m3_rows(x, a_scale))


def _fp8_words_prepack(w_q: torch.Tensor, args=None) -> torch.Tensor:
    return pack_words(w_q, 8)


def _fp8_words_accepts(a_q, a_scale, w_q, *args) -> str | None:
    return _words_accepts(int(w_q.shape[-1]), 8)


def _fp8_words_linear(a: torch.Tensor, a_scale, w_words, w_scale, bias, out_dtype, lead,
                      linear=_ops.onednn_linear) -> torch.Tensor:
    """[M, K] E4M3 activation values (unscaled, float32) times the byte-word weight, on ``linear``."""
    a = a * (a_scale.float().reshape(-1, 1) if a_scale.dim() else a_scale.float())
    w = word_fields(w_words, 8, _e4m3_from_top_byte) \
        * (w_scale.float().reshape(-1, 1) if w_scale.dim() else w_scale.float())
    out = linear(a, w, None if bias is None else bias.float())
    return out.to(out_dtype).reshape(*lead, w_words.shape[0])


def fp8_gemm_words_onednn(a_q, a_scale, w_words, w_scale, bias, out_dtype):
    """``fp8_gemm`` on the byte-word weight layout (``pack_words``): both operands decoded by
    integer ops (``_e4m3_from_top_byte``), scaled, then oneDNN's float32 GEMM."""
    return _fp8_words_linear(fp8_to_float_via_bits(_rows(a_q)), a_scale, w_words, w_scale, bias, out_dtype,
                             a_q.shape[:-1])


def fp8_gemm_words_onednn_from_float(x, a_scale, w_words, w_scale, bias, out_dtype):
    """``fp8_gemm_words_onednn`` of ``quantize(x, a_scale, fp8_e4m3)``, the quantization folded in: the
    E4M3 values come from ``numerics.round_to_e4m3`` (the same values as the fp8 cast, by float32 and
    int32 operations), so no fp8 tensor is formed."""
    return _fp8_words_linear(_e4m3_rows(x, a_scale), a_scale, w_words, w_scale, bias, out_dtype, x.shape[:-1])


def fp8_gemm_words(a_q, a_scale, w_words, w_scale, bias, out_dtype):
    """``fp8_gemm_words_onednn`` on ``F.linear``'s float32 GEMM (faster than oneDNN's at small shapes)."""
    return _fp8_words_linear(fp8_to_float_via_bits(_rows(a_q)), a_scale, w_words, w_scale, bias, out_dtype,
                             a_q.shape[:-1], F.linear)


def fp8_gemm_words_from_float(x, a_scale, w_words, w_scale, bias, out_dtype):
    """``fp8_gemm_words`` with the activation's quantization folded in (as ``fp8_gemm_words_onednn_from_float``)."""
    return _fp8_words_linear(_e4m3_rows(x, a_scale), a_scale, w_words, w_scale, bias, out_dtype, x.shape[:-1],
                             F.linear)


# ---- weight-only ---------------------------------------------------------------------------

def weight_only_gemm_dequant(x, w_q, w_scale, w_zero, bias, group_size=0):
    return ref.weight_only_gemm_ref(x, w_q, w_scale, w_zero, bias, group_size or None)


def _onednn_float_accepts(x, *args) -> str | None:
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"takes float32 / bfloat16 activations, got {x.dtype}"
    return None


def weight_only_gemm_dequant_onednn(x, w_q, w_scale, w_zero, bias, group_size=0):
    """The reference's dequantized weight, then oneDNN's float GEMM."""
    w = numerics.dequantize(w_q, w_scale, w_zero, torch.float32, block_size=group_size or None).to(x.dtype)
    return _ops.onednn_linear(x, w, None if bias is None else bias.to(x.dtype))


def _int8_words_accepts(x, w_q, w_scale, w_zero, bias, group_size=0) -> str | None:
    if w_q.dtype not in (torch.int8, torch.uint8):
        return f"takes int8 / uint8 weights, got {w_q.dtype}"
    return _words_accepts(int(w_q.shape[-1]), 8) or _onednn_float_accepts(x)


def _int8_words_prepack(w_q: torch.Tensor, args) -> torch.Tensor:
    return pack_words(w_q, 8)


def weight_only_gemm_words_onednn(x, w_words, w_scale, w_zero, bias, group_size=0):
    """W8A16 on the byte-word layout (``pack_words``): the weight decoded by int32 shifts (sign-extended
    for int8, masked for uint8 with its zero point), dequantized as the reference does, then oneDNN's GEMM."""
    w = int8_words_weight(w_words, w_scale, w_zero, group_size).to(x.dtype)
    return _ops.onednn_linear(x, w, None if bias is None else bias.to(x.dtype))


def int8_words_weight(w_words, w_scale, w_zero, group_size=0) -> torch.Tensor:
    """The byte-word int8 / uint8 weight dequantized in float32: the reference's weight bit for bit."""
    q = word_fields(w_words, 8, _unsigned_field(8) if w_zero is not None else _signed_field(8))
    return numerics.dequantize(q, w_scale, w_zero, torch.float32, block_size=group_size or None)


def _int8pack_accepts(x, w_q, w_scale, w_zero, bias, group_size=0) -> str | None:
    if w_q.dtype != torch.int8 or w_zero is not None or group_size or w_scale.dim() != 2 or w_scale.shape[1] != 1:
        return "takes symmetric per-channel int8 weights only"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"takes float activations, got {x.dtype}"
    return None


def weight_only_gemm_int8pack(x, w_q, w_scale, w_zero, bias, group_size=0):
    """W8A16 on ``torch._weight_int8pack_mm``: ``(x @ w_q.T) * scale``, float32 accumulate."""
    out = torch._weight_int8pack_mm(_rows(x), w_q, w_scale.reshape(-1).to(x.dtype))
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


# ---- INT4 weight-only -----------------------------------------------------------------------

def _int4_group(args) -> tuple[int, int] | None:
    """(group length, groups) of an ``int4_gemm``'s weight when every group is whole and even."""
    w_scale, group_size, k = args[2], args[5], args[6]
    g = group_size or k
    if g % 2 or k % g or (w_scale.dim() == 2 and w_scale.shape[1] not in (1, k // g)):
        return None
    return g, k // g


def _int4_groups_accepts(x, w_packed, w_scale, w_zero, bias, group_size, in_features) -> str | None:
    if _int4_group((x, w_packed, w_scale, w_zero, bias, group_size, in_features)) is None:
        return f"needs even groups that tile K (group {group_size or in_features}, K {in_features})"
    return None


def _int4_groups_prepack(w_packed: torch.Tensor, args) -> torch.Tensor:
    """Repack the interleaved INT4 layout (columns 2j, 2j + 1 share byte j) group by group: byte
    j of a group holds its column j in the low nibble and column j + g/2 in the high one, so a
    group unpacks as two contiguous runs (no interleave, no per-column group index). Same bytes."""
    g, groups = _int4_group(args)
    nib = unpack_int4(w_packed, g * groups, signed=False).reshape(w_packed.shape[0], groups, g)
    return (nib[..., : g // 2] | (nib[..., g // 2:] << 4)).contiguous()


def _int4_groups_weight(w_groups, w_scale, w_zero, in_features, dtype) -> torch.Tensor:
    """The group-halves INT4 weight dequantized: the reference's weight bit for bit."""
    n, groups, half = w_groups.shape
    if w_zero is None:      # two's complement nibbles, sign-extended by arithmetic shifts
        lo = ((w_groups << 4).view(torch.int8) >> 4).float()
        hi = (w_groups.view(torch.int8) >> 4).float()
    else:
        z = w_zero.float().reshape(n, -1, 1)
        lo, hi = (w_groups & 0xF).float() - z, (w_groups >> 4).float() - z
    s = w_scale.float().reshape(n, -1, 1) if w_scale.dim() else w_scale.float()
    return torch.cat([lo * s, hi * s], dim=-1).reshape(n, in_features).to(dtype)


def int4_gemm_groups(x, w_groups, w_scale, w_zero, bias, group_size, in_features):
    """W4A16 on the group-halves layout: the reference's dequantized weight bit for bit, then
    the same float GEMM."""
    w = _int4_groups_weight(w_groups, w_scale, w_zero, in_features, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def int4_gemm_groups_onednn(x, w_groups, w_scale, w_zero, bias, group_size, in_features):
    """W4A16 on the group-halves layout, then oneDNN's float GEMM."""
    w = _int4_groups_weight(w_groups, w_scale, w_zero, in_features, x.dtype)
    return _ops.onednn_linear(x, w, None if bias is None else bias.to(x.dtype))


def _int4_groups_onednn_accepts(x, *args) -> str | None:
    return _int4_groups_accepts(x, *args) or _onednn_float_accepts(x)


def _int4_words_accepts(x, w_packed, w_scale, w_zero, bias, group_size, in_features) -> str | None:
    return _int4_groups_accepts(x, w_packed, w_scale, w_zero, bias, group_size, in_features) \
        or _words_accepts(in_features, 4) or _onednn_float_accepts(x)


def _int4_words_prepack(w_packed: torch.Tensor, args) -> torch.Tensor:
    signed = args[3] is None
    return pack_words(unpack_int4(w_packed, args[6], signed=signed), 4)


def int4_gemm_words_onednn(x, w_words, w_scale, w_zero, bias, group_size, in_features):
    """W4A16 on the nibble-word layout (``pack_words``, 8 nibbles per int32): the weight decoded by int32
    shifts, dequantized per group as the reference does (bit for bit), then oneDNN's float GEMM."""
    w = int4_words_weight(w_words, w_scale, w_zero, group_size, in_features).to(x.dtype)
    return _ops.onednn_linear(x, w, None if bias is None else bias.to(x.dtype))


def int4_words_weight(w_words, w_scale, w_zero, group_size, in_features) -> torch.Tensor:
    """The nibble-word INT4 weight dequantized per group in float32: the reference's weight bit for bit."""
    n = w_words.shape[0]
    q = word_fields(w_words, 4, _unsigned_field(4) if w_zero is not None else _signed_field(4)).float()
    q = q.reshape(n, -1, group_size or in_features)
    if w_zero is not None:
        q = q - w_zero.float().reshape(n, -1, 1)
    s = w_scale.float().reshape(n, -1, 1) if w_scale.dim() else w_scale.float()
    return (q * s).reshape(n, in_features)


def onednn_float_available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "oneDNN's float linear runs on CPU only"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN float linear (torch.ops.mkldnn._linear_pointwise)"
    return None


_ANY = ("cpu", "cuda")

KERNELS: tuple[GemmKernel, ...] = (
    GemmKernel("int_mm", "int8_gemm", ref.int8_gemm_ref, "torch._int_mm (int8 x int8 -> int32)", _ANY,
               reference=True),
    GemmKernel("onednn-u8s8", "int8_gemm", int8_gemm_onednn,
               "oneDNN int8 linear (u8s8, prepacked weight)", prepare=_onednn_prepack, available=_onednn_available),
    GemmKernel("int8-fp32", "int8_gemm", int8_gemm_fp32, "float32 GEMM of the int8 values", _ANY),
    GemmKernel("scaled_mm", "fp8_gemm", _ops.fp8_gemm, "torch._scaled_mm (fp8 x fp8, float32 accumulate)", _ANY,
               reference=True),
    GemmKernel("fp8-dequant", "fp8_gemm", fp8_gemm_dequant, "dequantize to float32 + float32 GEMM", _ANY,
               from_float=fp8_gemm_dequant_from_float),
    GemmKernel("fp8-dequant-onednn", "fp8_gemm", fp8_gemm_dequant_onednn,
               "dequantize to float32 + oneDNN's float32 GEMM", available=onednn_float_available,
               from_float=fp8_gemm_dequant_onednn_from_float),
    GemmKernel("fp8-words", "fp8_gemm", fp8_gemm_words,
               "fp8 weight bytes in int32 words, both operands decoded by integer ops + float32 GEMM (F.linear)",
               _ANY, prepare=_fp8_words_prepack, accepts=_fp8_words_accepts, from_float=fp8_gemm_words_from_float),
    GemmKernel("fp8-words-onednn", "fp8_gemm", fp8_gemm_words_onednn,
               "fp8 weight bytes in int32 words, both operands decoded by integer ops (vectorizes without fp8 "
               "instructions) + oneDNN's float32 GEMM", prepare=_fp8_words_prepack, accepts=_fp8_words_accepts,
               available=onednn_float_available, from_float=fp8_gemm_words_onednn_from_float),
    GemmKernel("dequant", "weight_only_gemm", weight_only_gemm_dequant,
               "dequantize the weight to the activation dtype + float GEMM", _ANY, reference=True),
    GemmKernel("int8pack", "weight_only_gemm", weight_only_gemm_int8pack,
               "torch._weight_int8pack_mm (int8 weight, scale after the sum)", _ANY,
               accepts=_int8pack_accepts),
    GemmKernel("dequant-onednn", "weight_only_gemm", weight_only_gemm_dequant_onednn,
               "dequantize the weight + oneDNN's float GEMM", accepts=_onednn_float_accepts,
               available=onednn_float_available),
    GemmKernel("int8-words-onednn", "weight_only_gemm", weight_only_gemm_words_onednn,
               "int8 weight bytes in int32 words, decoded by integer shifts (vectorizes on every ISA) + dequantize "
               "+ oneDNN's float GEMM", prepare=_int8_words_prepack, accepts=_int8_words_accepts,
               available=onednn_float_available),
    GemmKernel("dequant", "int4_gemm", ref.int4_gemm_ref, "unpack + dequantize the INT4 weight + float GEMM", _ANY,
               reference=True),
    GemmKernel("int4-groups", "int4_gemm", int4_gemm_groups,
               "INT4 repacked per group in two nibble halves (same bytes; unpacks without interleaving) + "
               "dequantize + float GEMM", _ANY, prepare=_int4_groups_prepack,
               accepts=_int4_groups_accepts),
    GemmKernel("int4-groups-onednn", "int4_gemm", int4_gemm_groups_onednn,
               "INT4 repacked per group in two nibble halves + dequantize + oneDNN's float GEMM",
               prepare=_int4_groups_prepack, accepts=_int4_groups_onednn_accepts,
               available=onednn_float_available),
    GemmKernel("int4-words-onednn", "int4_gemm", int4_gemm_words_onednn,
               "INT4 in int32 words of 8 nibbles, decoded by integer shifts (vectorizes on every ISA) + dequantize "
               "+ oneDNN's float GEMM", prepare=_int4_words_prepack, accepts=_int4_words_accepts,
               available=onednn_float_available),
    GemmKernel("dequant", "w4a8_gemm", _ops.w4a8_gemm, "unpack + dequantize both operands + float32 GEMM", _ANY,
               reference=True),
)


def kernels_for(op: str, device: torch.device) -> list[GemmKernel]:
    """The kernels of ``op`` that run on ``device``'s type (reference first)."""
    return [k for k in KERNELS if k.op == op and device.type in k.devices]
