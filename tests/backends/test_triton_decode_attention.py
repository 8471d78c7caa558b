"""``qcompiler::kv_decode_attention``: its reference kernel against a float64 attention written here
(codes decoded independently of ``qcompiler.core.packing`` / ``kv_format``) and against torch's
``scaled_dot_product_attention``; the Triton kernel (``backends/triton/decode_attention.py``) against
the reference for every storage dtype, scale layout, GQA / MHA, window and codes lengths (0 included),
padding masks, M = 1 and 3, float32 and bfloat16 q, forced sequence splits; the twin op
``qcompiler::triton_kv_decode_attention`` and its fallback.

Runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest before triton is imported)
when there is no GPU. The reference tests need no triton.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qcompiler.backends.triton.availability import availability
from qcompiler.core import kv_format
from qcompiler.recipes import Granularity, KVCacheSpec, QuantDtype
from numerics_util import TOLERANCE, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

kernels = pytest.mark.skipif(not availability().runs_kernels,
                             reason=f"Triton kernels cannot run here: {availability().reason}")
DEVICE = "cuda" if availability().mode == "gpu" else "cpu"
DTYPES = ("int8", "uint8", "fp8_e4m3", "int4", "uint4")
LAYOUTS = ("tensor", "head", "channel", "token", "group")
#: positions per block of the "group" layout (per_group scales: [B, H, ceil(T / GROUP), D])
GROUP = 3
#: Triton against the reference: same float32 values, another summation order (observed ~2e-7 in fp32);
#: in bf16 / fp16 both round the same float32 result, a few elements one ulp apart.
KERNEL_BOUND = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def _gen(key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture(scope="module")
def launcher():
    from qcompiler.backends.triton.decode_attention import kv_decode_attention_triton
    return kv_decode_attention_triton


# ----------------------------------------------------------------------------- cases


def _codes(name: str, layout: str, b: int, h: int, t: int, d: int, gen: torch.Generator):
    """Random codes, scale and zero point of one role in the kv_format layout (values ~ unit size)."""
    if name == "int8":
        vals, zero_hi, unit = torch.randint(-128, 128, (b, h, t, d), generator=gen), None, 1 / 64
    elif name == "uint8":
        vals, zero_hi, unit = torch.randint(0, 256, (b, h, t, d), generator=gen), 256, 1 / 64
    elif name == "int4":
        vals, zero_hi, unit = torch.randint(-8, 8, (b, h, t, d), generator=gen), None, 1 / 4
    elif name == "uint4":
        vals, zero_hi, unit = torch.randint(0, 16, (b, h, t, d), generator=gen), 16, 1 / 4
    else:   # fp8: magnitudes from subnormal (2**-9) to ~16, both signs
        mag = torch.randn((b, h, t, d), generator=gen) * 2.0 ** torch.randint(-9, 3, (b, h, t, d), generator=gen)
        vals, zero_hi, unit = mag.to(torch.float8_e4m3fn), None, 1 / 4
    if name in ("int4", "uint4"):          # pack here, independently of qcompiler.core.packing
        nib = (vals & 0xF).to(torch.uint8)
        codes = (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()
    elif name == "int8":
        codes = vals.to(torch.int8)
    elif name == "uint8":
        codes = vals.to(torch.uint8)
    else:
        codes = vals
    shape = {"tensor": (), "head": (1, h, 1, 1), "channel": (1, h, 1, d), "token": (b, h, t, 1),
             "group": (b, h, -(-t // GROUP), d)}[layout]
    scale = (torch.rand(shape, generator=gen) + 0.5) * unit
    zero = None
    if zero_hi is not None:
        zero = torch.randint(zero_hi // 4, 3 * zero_hi // 4, shape, generator=gen).to(torch.uint8)
    return codes, scale, zero


def _mask(kind: str, b: int, m: int, t: int, dtype: torch.dtype, gen: torch.Generator, pad=None):
    """None, or HF-style [B, 1, M, T] masks: causal for the last M positions, left padding (``pad[i]``
    tokens of batch i); boolean or additive (0 / dtype's min)."""
    if kind == "none":
        return None
    pad = pad if pad is not None else [int(torch.randint(0, max(1, t - m), (), generator=gen)) for _ in range(b)]
    pos = torch.arange(t)
    rows = torch.arange(m) + t - m                                            # the query rows' positions
    keep = (pos[None, :] <= rows[:, None])[None, None].repeat(b, 1, 1, 1)
    for i, p in enumerate(pad):
        keep[i, ..., :p] = False
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def make_case(k_dtype="int8", v_dtype=None, k_layout="head", v_layout=None, b=1, hq=4, hkv=2, m=1, tq=20, tw=3,
              d=16, dv=None, mask="none", q_dtype=torch.float32, seed=0, pad=None, q_transposed=False):
    """The op's positional arguments for one configuration (on DEVICE)."""
    v_dtype, v_layout, dv = v_dtype or k_dtype, v_layout or k_layout, dv or d
    gen = _gen((k_dtype, v_dtype, k_layout, v_layout, b, hq, hkv, m, tq, tw, d, dv, mask, str(q_dtype), seed))
    if q_transposed:       # as HF holds it: [B, M, Hq, D] viewed as [B, Hq, M, D]
        q = torch.randn((b, m, hq, d), generator=gen).to(q_dtype).transpose(1, 2)
    else:
        q = torch.randn((b, hq, m, d), generator=gen).to(q_dtype)
    kc, ks, kz = _codes(k_dtype, k_layout, b, hkv, tq, d, gen)
    vc, vs, vz = _codes(v_dtype, v_layout, b, hkv, tq, dv, gen)
    kw = torch.randn((b, hkv, tw, d), generator=gen).to(q_dtype)
    vw = torch.randn((b, hkv, tw, dv), generator=gen).to(q_dtype)
    am = _mask(mask, b, m, tq + tw, q_dtype, gen, pad)
    args = [q, kc, ks, kz, kw, vc, vs, vz, vw, am, d ** -0.5, k_dtype, v_dtype,
            GROUP if k_layout == "group" else 0, GROUP if v_layout == "group" else 0]
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


# ----------------------------------------------------------------------------- float64 oracle


def _decode64(codes, scale, zero, name: str, d: int, group: int = 0) -> torch.Tensor:
    if name in ("int4", "uint4"):
        byte = codes.to(torch.int64)
        vals = torch.stack([byte & 0xF, byte >> 4], dim=-1).flatten(-2)[..., :d]
        if name == "int4":
            vals = torch.where(vals >= 8, vals - 16, vals)
        vals = vals.double()
    else:
        vals = codes.to(torch.float64)          # int8 / uint8 / fp8 e4m3: exact in float64
    if group:                                   # per_group: block t // group of each channel
        block = torch.arange(codes.shape[-2]) // group
        scale = scale[..., block, :]
        zero = zero[..., block, :] if zero is not None else None
    if zero is not None:
        vals = vals - zero.double()
    return vals * scale.double()


def attention64(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, attn_mask, sm_scale,
                k_dtype, v_dtype, k_group=0, v_group=0) -> torch.Tensor:
    k = torch.cat([_decode64(k_codes, k_scale, k_zero, k_dtype, k_window.shape[-1], k_group), k_window.double()], -2)
    v = torch.cat([_decode64(v_codes, v_scale, v_zero, v_dtype, v_window.shape[-1], v_group), v_window.double()], -2)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("bhmd,bhtd->bhmt", q.double(), k) * sm_scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    s = s.expand(*s.shape[:-1], k.shape[-2])
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhmt,bhtd->bhmd", p, v)


def _assert_close(out, ref, bound):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert ref.double().norm() > 0, "compare against a nonzero result"
    err = rel_err(out, ref)
    assert err <= bound, err


# ----------------------------------------------------------------------------- the reference kernel

REF_CASES = (
    [dict(k_dtype=n, k_layout=lay, b=2, mask="bool") for n in DTYPES for lay in LAYOUTS]
    + [dict(k_dtype="int4", v_dtype="fp8_e4m3", k_layout="token", v_layout="channel", hq=2, hkv=2, m=3, mask="float"),
       dict(k_dtype="uint8", q_dtype=torch.bfloat16, mask="float", m=3, b=2),
       dict(k_dtype="uint4", q_dtype=torch.float16, mask="bool", b=2, tw=0),
       dict(k_dtype="int8", tq=0, tw=5, m=3, mask="bool", dv=8)]
)


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_reference_matches_float64(case):
    args = make_case(**case)
    out = torch.ops.qcompiler.kv_decode_attention(*args)
    q = args[0]
    assert out.dtype == q.dtype and out.shape == (*q.shape[:-1], args[8].shape[-1])
    _assert_close(out, attention64(*args), TOLERANCE[q.dtype])


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_reference_is_sdpa_over_the_cache_read(mask):
    """Same as ``scaled_dot_product_attention(enable_gqa=True)`` over ``kv_cache_read`` + window, in float32."""
    args = make_case("uint4", "int8", "group", "head", b=2, m=3, mask=mask)
    q, kc, ks, kz, kw, vc, vs, vz, vw, am, scale, kd, vd, kg, vg = args
    k = torch.cat([torch.ops.qcompiler.kv_cache_read(kc, ks, kz, kd, kw.shape[-1], torch.float32, kg), kw], dim=-2)
    v = torch.cat([torch.ops.qcompiler.kv_cache_read(vc, vs, vz, vd, vw.shape[-1], torch.float32, vg), vw], dim=-2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=scale, enable_gqa=True)
    assert rel_err(torch.ops.qcompiler.kv_decode_attention(*args), sdpa) <= 1e-6


def test_reference_fully_masked_rows_and_empty_cache_give_zeros():
    args = make_case("int8", m=3, b=2, mask="bool")
    args[9][1, :, 1] = False                                     # batch 1, row 1 attends to nothing
    out = torch.ops.qcompiler.kv_decode_attention(*args)
    assert (out[1, :, 1] == 0).all() and (out[0] != 0).any()
    _assert_close(out, attention64(*args), TOLERANCE[torch.float32])
    empty = make_case("int4", tq=0, tw=0)
    assert torch.equal(torch.ops.qcompiler.kv_decode_attention(*empty), torch.zeros_like(empty[0]))


@pytest.mark.parametrize("layouts", [("token", "channel"), ("group", "group")])
def test_op_registration(layouts):
    args = make_case("uint4", "int8", *layouts, b=2, m=3, mask="bool")
    torch.library.opcheck(torch.ops.qcompiler.kv_decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- the Triton kernel

KERNEL_CASES = (
    # every storage dtype x scale layout: GQA 4 / 2, batch 2 with left padding, M = 1, window 3
    [dict(k_dtype=n, k_layout=lay, b=2, mask="bool") for n in DTYPES for lay in LAYOUTS]
    + [
        dict(k_dtype="int8", hq=2, hkv=2, tw=0),                            # MHA, no window, no mask
        dict(k_dtype="int4", v_dtype="uint8", k_layout="token", v_layout="head", hq=3, hkv=3, m=3, mask="float"),
        dict(k_dtype="uint4", tq=0, tw=7, m=3, b=2, mask="bool"),           # everything in the window
        dict(k_dtype="fp8_e4m3", m=3, b=2, mask="float", d=32, tq=30, tw=8),
        dict(k_dtype="int8", v_dtype="int4", k_layout="channel", v_layout="token", d=32, dv=16, m=3),   # Dv != D
        dict(k_dtype="uint8", q_dtype=torch.bfloat16, m=3, b=2, mask="float", k_layout="token"),
        dict(k_dtype="int4", q_dtype=torch.bfloat16, m=1, b=2, mask="bool", k_layout="channel", tw=0),
        dict(k_dtype="fp8_e4m3", q_dtype=torch.bfloat16, hq=2, hkv=2, m=3, tq=0, tw=6),
        dict(k_dtype="uint4", q_dtype=torch.float16, b=2, mask="bool", k_layout="head"),
        dict(k_dtype="int8", hq=8, hkv=2, m=3, b=2, mask="bool", q_transposed=True),   # strided q, G * M = 12
    ]
)


@kernels
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_matches_reference(launcher, case):
    args = make_case(**case)
    out = launcher(*args)
    ref = torch.ops.qcompiler.kv_decode_attention(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    _assert_close(out, ref, KERNEL_BOUND[ref.dtype])


@kernels
@pytest.mark.parametrize("splits,block_t", [(2, 4), (3, 8), (5, 2)])
@pytest.mark.parametrize("tq,tw", [(20, 5), (0, 9), (13, 0)])
def test_kernel_sequence_splits(launcher, splits, block_t, tq, tw):
    """Splits whose boundaries fall inside the codes, on the codes / window seam and inside the window."""
    args = make_case("uint4", "int8", "token", "channel", b=2, m=3, tq=tq, tw=tw, mask="bool")
    ref = torch.ops.qcompiler.kv_decode_attention(*args)
    _assert_close(launcher(*args, num_splits=splits, block_t=block_t), ref, KERNEL_BOUND[torch.float32])


@kernels
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_fully_masked_rows_and_empty_cache(launcher, splits):
    args = make_case("int4", m=3, b=2, mask="float", tq=16, tw=4)
    args[9][1, :, 1] = float("-inf")                             # batch 1, row 1 attends to nothing
    out = launcher(*args, num_splits=splits, block_t=4)
    ref = torch.ops.qcompiler.kv_decode_attention(*args)
    assert (out[1, :, 1] == 0).all()
    _assert_close(out, ref, KERNEL_BOUND[torch.float32])
    empty = make_case("uint8", tq=0, tw=0, m=3)
    assert torch.equal(launcher(*empty), torch.zeros_like(empty[0]))


@kernels
@pytest.mark.parametrize("name", DTYPES)
def test_kernel_reads_what_kv_format_writes(launcher, name):
    """Codes written by ``kv_format.write`` (per-token scales, asymmetric for the unsigned dtypes)."""
    signed = name in ("int8", "fp8_e4m3", "int4")
    base = {"uint8": "int8", "uint4": "int4"}.get(name, name)
    spec = KVCacheSpec(dtype=QuantDtype(base), key=Granularity.PER_TOKEN, value=Granularity.PER_TOKEN,
                       symmetric=signed)
    assert kv_format.storage_name(spec) == name
    gen = _gen(("write", name))
    q = torch.randn((2, 4, 1, 16), generator=gen)
    k, v = torch.randn((2, 2, 24, 16), generator=gen), torch.randn((2, 2, 24, 16), generator=gen)
    kc, ks, kz = kv_format.write(k[:, :, :20], spec)
    vc, vs, vz = kv_format.write(v[:, :, :20], spec)
    args = [q, kc, ks, kz, k[:, :, 20:], vc, vs, vz, v[:, :, 20:], None, 0.25, name, name, 0, 0]
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    ref = torch.ops.qcompiler.kv_decode_attention(*args)
    _assert_close(launcher(*args), ref, KERNEL_BOUND[torch.float32])
    _assert_close(ref, attention64(*args), 1e-5)


@kernels
@settings(max_examples=25, deadline=None)
@given(k_dtype=st.sampled_from(DTYPES), v_dtype=st.sampled_from(DTYPES), k_layout=st.sampled_from(LAYOUTS),
       v_layout=st.sampled_from(LAYOUTS), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       m=st.integers(1, 4), tq=st.integers(0, 24), tw=st.integers(0, 6), b=st.integers(1, 2),
       mask=st.sampled_from(["none", "bool", "float"]), q_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       d=st.sampled_from([8, 16]), splits=st.sampled_from([None, 2, 3]), block_t=st.sampled_from([None, 4, 8]),
       seed=st.integers(0, 2**16))
def test_kernel_property(k_dtype, v_dtype, k_layout, v_layout, hkv, group, m, tq, tw, b, mask, q_dtype, d, splits,
                         block_t, seed):
    from qcompiler.backends.triton.decode_attention import kv_decode_attention_triton
    tw = max(tw, m - tq, 1 - tq)           # at least one key, and at least M tokens for the causal rows
    args = make_case(k_dtype, v_dtype, k_layout, v_layout, b=b, hq=hkv * group, hkv=hkv, m=m, tq=tq, tw=tw, d=d,
                     mask=mask, q_dtype=q_dtype, seed=seed)
    ref = torch.ops.qcompiler.kv_decode_attention(*args)
    out = kv_decode_attention_triton(*args, num_splits=splits, block_t=block_t)
    _assert_close(out, ref, KERNEL_BOUND[q_dtype])


# ----------------------------------------------------------------------------- the twin op and its fallback


@kernels
def test_twin_op_runs_the_kernel_and_falls_back():
    from qcompiler.backends.triton.decode_attention import check_kv_decode_attention, register
    kernel = register()
    assert register() is kernel and kernel.op == torch.ops.qcompiler.triton_kv_decode_attention.default
    args = make_case("int4", "uint8", "token", "head", b=2, m=3, mask="bool")
    ref = torch.ops.qcompiler.kv_decode_attention(*args)
    assert check_kv_decode_attention(*args) is None
    _assert_close(torch.ops.qcompiler.triton_kv_decode_attention(*args), ref, KERNEL_BOUND[torch.float32])
    # keys and values split differently between codes and window: the reference takes it, the kernel does not
    keys, values = make_case("int8", tq=21, tw=2, seed=1), make_case("int8", tq=20, tw=3, seed=1)
    odd = [values[0], *keys[1:5], *values[5:9], None, 0.25, "int8", "int8", 0, 0]
    assert "not split alike" in check_kv_decode_attention(*odd)
    assert torch.equal(torch.ops.qcompiler.triton_kv_decode_attention(*odd),
                       torch.ops.qcompiler.kv_decode_attention(*odd))


@kernels
def test_checks_name_what_is_wrong():
    from qcompiler.backends.triton.decode_attention import check_kv_decode_attention
    args = make_case("int8", "uint8", "head", "token", b=2)
    bad_scale = list(args)
    bad_scale[2] = torch.ones(2, 2, 20, 16, device=DEVICE)          # per token and channel: not a kv_format layout
    assert "k_scale" in check_kv_decode_attention(*bad_scale)
    bad_group = list(args)
    bad_group[13] = 4                                               # per_group blocks of 4: 5 blocks, not 20 rows
    assert "per_group [2, 2, 5, 16]" in check_kv_decode_attention(*bad_group)
    bad_codes = list(args)
    bad_codes[11] = "int4"
    assert "k_codes" in check_kv_decode_attention(*bad_codes)
    bad_heads = list(args)
    bad_heads[0] = args[0][:, :3]
    assert "multiple" in check_kv_decode_attention(*bad_heads)
    bad_mask = list(args)
    bad_mask[9] = torch.ones(2, 1, 1, 7, dtype=torch.bool, device=DEVICE)
    assert "broadcast" in check_kv_decode_attention(*bad_mask)
