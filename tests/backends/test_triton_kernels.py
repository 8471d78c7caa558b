"""The Triton GEMM kernels against float64 GEMMs on the same quantized operands and against
the reference backend, on fresh random inputs.

Runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before any kernel is
defined) when there is no GPU, on the GPU otherwise. Shapes cover M = 1, sizes that are no
multiple of any tile, K not a multiple of the quantization group, and forced tile configs
(split-K, a K tile that straddles groups). Bounds (documented in the README):

- INT8 accumulation is exact (unit scales: the result is the integer matmul);
- against float64: the ``numerics_util.TOLERANCE`` of the output dtype, norm-wise and
  elementwise against the magnitude of the summands;
- against the reference backend: relative error <= 1e-3 for every path (in practice ~1e-7
  in fp32: both compute the same products and differ in summation order only).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import triton_interpreter  # noqa: E402,F401  (interpreter without a GPU; skip without triton)

from qcompiler.core import numerics  # noqa: E402
from qcompiler.backends import reference as ref  # noqa: E402
from qcompiler.backends.triton.availability import availability  # noqa: E402
from qcompiler.backends.triton.config import GemmConfig  # noqa: E402
from qcompiler.core.packing import pack_int4  # noqa: E402
from numerics_util import TOLERANCE, gemm_ref64, rel_err  # noqa: E402

if not availability().runs_kernels:
    pytest.skip(f"Triton kernels cannot run here: {availability().reason}", allow_module_level=True)

from qcompiler.backends.triton.gemm_w4a8 import w4a8_gemm  # noqa: E402
from qcompiler.backends.triton.gemm_w8a8 import fp8_gemm, int8_gemm  # noqa: E402
from qcompiler.backends.triton.gemm_weight_only import int4_gemm, weight_only_gemm  # noqa: E402

DEVICE = "cuda" if availability().mode == "gpu" else "cpu"
REF_BOUND = 1e-3
# (M, N, K): decode rows, odd sizes, no multiple of any tile, and one that needs several tiles.
SHAPES = [(1, 7, 5), (3, 33, 17), (17, 130, 200), (1, 96, 384), (70, 144, 272)]
SCALE_MODES = [("tensor", "tensor"), ("token", "channel"), ("tensor", "channel"), ("token", "tensor")]
# A 16-row tile with split-K 4 (decode path) and a K tile of 32 (straddles groups of 12 / 48),
# forced on the smaller shapes (the interpreter's cost grows with the number of tiles); the weight-only
# kernels also take the FMA decode kernel (gemm_decode), alone and with split-K reduced in the launch.
FORCED = {"splitk": GemmConfig(16, 64, 64, 1, 4, 4, 2), "k32": GemmConfig(16, 64, 32, 4, 1, 4, 2),
          "fma": GemmConfig(4, 32, 32, 1, 1, 4, 2, kernel="fma"),
          "fma-splitk": GemmConfig(2, 16, 32, 1, 4, 4, 2, kernel="fma")}
DOT_CONFIGS = ("splitk", "k32")
SHAPE_CONFIGS = [(s, None) for s in SHAPES] + [(s, c) for s in SHAPES[1:4] for c in FORCED]


def _gen(key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _dev(*ts):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ts]


def _ids(s) -> str:
    return "x".join(map(str, s))


def _cases(formats, forced_formats, configs=DOT_CONFIGS):
    """(shape, config, format): every format on every shape with the default tiles, the forced
    ``configs`` on ``forced_formats`` only."""
    return [(s, c, f) for s, c in SHAPE_CONFIGS for f in formats
            if c is None or (f in forced_formats and c in configs)]


def _case_id(case) -> str:
    s, c, f = case
    return "-".join([_ids(s), f] + ([c] if c else []))


def _check(out, ref64, mag, out_dtype, ref_backend):
    out = out.cpu()
    assert out.dtype == out_dtype and out.shape == ref64.shape
    tol = TOLERANCE[out_dtype]
    assert rel_err(out, ref64) <= tol
    err = (out.double() - ref64).abs()
    assert (err <= tol * mag + 1e-30).all(), float((err / mag.clamp(min=1e-30)).max())
    assert rel_err(out, ref_backend.cpu()) <= REF_BOUND


def _scales(mode_a, mode_w, m, n, g):
    sa = (torch.rand(() if mode_a == "tensor" else (m, 1), generator=g) + 0.01) / 50
    sw = (torch.rand(() if mode_w == "tensor" else (n, 1), generator=g) + 0.01) / 50
    return sa.float(), sw.float()


# ----------------------------------------------------------------------------- W8A8


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("modes", SCALE_MODES, ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("mnk", SHAPES, ids=_ids)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_gemm_matches_reference(fmt, mnk, modes, with_bias):
    m, n, k = mnk
    g = _gen((fmt, mnk, modes, with_bias))
    if fmt == "int8":
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        kernel, ref_fn = int8_gemm, ref.int8_gemm_ref
    else:   # wide normals: the whole e4m3 range, +-448 and subnormals included
        a = (torch.randn(m, k, generator=g) * 100).to(torch.float8_e4m3fn)
        w = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn)
        kernel, ref_fn = fp8_gemm, ref.fp8_gemm_ref
    sa, sw = _scales(*modes, m, n, g)
    bias = torch.randn(n, generator=g) if with_bias else None
    out = kernel(*_dev(a, sa, w, sw, bias), torch.float32)
    ref64, mag = gemm_ref64(a, sa, w, sw, bias)
    _check(out, ref64, mag, torch.float32, ref_fn(a, sa, w, sw, bias, torch.float32))


@pytest.mark.parametrize("mnk", [(1, 3, 1024), (19, 40, 300)], ids=_ids)
def test_int8_accumulation_is_exact(mnk):
    """Unit scales, no bias: the fp32 result is the int32 matmul itself (|acc| <= 2**24)."""
    m, n, k = mnk
    g = _gen(mnk)
    one = torch.tensor(1.0)
    cases = [(torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g),
              torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)),
             (torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), -128, dtype=torch.int8)),
             (torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), 127, dtype=torch.int8))]
    for a, w in cases:
        expect = a.double() @ w.double().T
        assert expect.abs().max() <= 2**24
        out = int8_gemm(*_dev(a, one, w, one, None), torch.float32).cpu()
        assert torch.equal(out.double(), expect)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_gemm_half_output_and_batch_dims(fmt, out_dtype):
    g = _gen((fmt, out_dtype))
    if fmt == "int8":
        a = torch.randint(-128, 128, (2, 17, 48), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (33, 48), dtype=torch.int8, generator=g)
        kernel, ref_fn = int8_gemm, ref.int8_gemm_ref
    else:
        a = (torch.randn(2, 17, 48, generator=g) * 100).to(torch.float8_e4m3fn)
        w = (torch.randn(33, 48, generator=g) * 100).to(torch.float8_e4m3fn)
        kernel, ref_fn = fp8_gemm, ref.fp8_gemm_ref
    sa = (torch.rand(2, 17, 1, generator=g) + 0.01) / 50
    sw = (torch.rand(33, 1, generator=g) + 0.01) / 50
    bias = torch.randn(33, generator=g)
    out = kernel(*_dev(a, sa, w, sw, bias), out_dtype)
    ref64, mag = gemm_ref64(a, sa, w, sw, bias)
    _check(out, ref64, mag, out_dtype, ref_fn(a, sa, w, sw, bias, out_dtype))
    assert out.shape == (2, 17, 33)


# ----------------------------------------------------------------------------- weight-only


# format -> (numerics dtype, asymmetric, group size; None: per channel, 0: per tensor)
WEIGHT_FORMATS = {
    "int8-channel": ("int8", False, None),
    "uint8-channel-asym": ("uint8", True, None),
    "int8-tensor": ("int8", False, 0),
    "int4-g16": ("int4", False, 16),
    "int4-g32-nondividing": ("int4", False, 32),
    "uint4-g12-asym-nondividing": ("uint4", True, 12),
}


def _weight(fmt, n, k, g):
    name, asym, group = WEIGHT_FORMATS[fmt]
    qmin, qmax = (int(v) for v in numerics.QRANGE[name])
    w_q = torch.randint(qmin, qmax + 1, (n, k), generator=g).to(numerics.STORAGE_DTYPE[name])
    shape = () if group == 0 else (n, 1 if group is None else -(-k // group))
    scale = (torch.rand(shape, generator=g) + 0.05) / 20
    zero = torch.randint(qmin, qmax + 1, shape, generator=g).to(w_q.dtype) if asym else None
    return w_q, scale, zero, group or 0


def _weight64(w_q, scale, zero, group, k):
    def blocked(t):
        if t.dim() == 0 or t.shape[-1] == 1:
            return t
        return t.repeat_interleave(group, dim=1)[:, :k]
    w = w_q.double()
    if zero is not None:
        w = w - blocked(zero.double())
    return w * blocked(scale.double())


def _x_ref64(x, w64, bias):
    out, mag = x.double() @ w64.T, x.double().abs() @ w64.abs().T
    if bias is not None:
        out, mag = out + bias.double(), mag + bias.double().abs()
    return out, mag


@pytest.mark.parametrize("case", _cases(WEIGHT_FORMATS, ("int8-channel", "int4-g32-nondividing",
                                                          "uint4-g12-asym-nondividing"), tuple(FORCED)), ids=_case_id)
def test_weight_only_gemm_matches_reference(case):
    mnk, config, fmt = case
    m, n, k = mnk
    g = _gen((mnk, fmt, config))
    w_q, scale, zero, group = _weight(fmt, n, k, g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    out = weight_only_gemm(*_dev(x, w_q, scale, zero, bias), group, config=FORCED.get(config))
    ref64, mag = _x_ref64(x, _weight64(w_q, scale, zero, group, k), bias)
    _check(out, ref64, mag, torch.float32, ref.weight_only_gemm_ref(x, w_q, scale, zero, bias, group or None))


# packed int4: (asymmetric, group size; 0 = per channel)
INT4_FORMATS = {"sym-channel": (False, 0), "sym-g32": (False, 32), "asym-g64": (True, 64),
                "sym-g6-nondividing": (False, 6), "asym-g48-nondividing": (True, 48)}


def _int4(fmt, n, k, g):
    asym, group = INT4_FORMATS[fmt]
    q = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8) if asym else \
        torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    cols = 1 if group == 0 else -(-k // group)
    scale = (torch.rand(n, cols, generator=g) + 0.05) / 20
    zero = torch.randint(0, 16, (n, cols), generator=g).to(torch.uint8) if asym else None
    return q, pack_int4(q), scale, zero, group


@pytest.mark.parametrize("case", _cases(INT4_FORMATS, ("sym-channel", "sym-g32", "asym-g48-nondividing"),
                                        tuple(FORCED)), ids=_case_id)
def test_int4_gemm_matches_reference(case):
    mnk, config, fmt = case
    m, n, k = mnk
    g = _gen((mnk, fmt, config, "int4"))
    q, packed, scale, zero, group = _int4(fmt, n, k, g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if m % 2 else None
    out = int4_gemm(*_dev(x, packed, scale, zero, bias), group, k, config=FORCED.get(config))
    ref64, mag = _x_ref64(x, _weight64(q, scale, zero, group or k, k), bias)
    _check(out, ref64, mag, torch.float32, ref.int4_gemm_ref(x, packed, scale, zero, bias, group, k))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", [None, "splitk", "fma-splitk"])
def test_int4_gemm_half_activations(x_dtype, config):
    """Half activations: the kernel rounds each dequantized weight to x's dtype, as the
    reference does, so against the reference only fp32 summation order differs."""
    g = _gen((x_dtype, config))
    q, packed, scale, zero, group = _int4("asym-g48-nondividing", 40, 200, g)
    x = torch.randn(2, 3, 200, generator=g).to(x_dtype)
    bias = torch.randn(40, generator=g).to(x_dtype)
    out = int4_gemm(*_dev(x, packed, scale, zero, bias), group, 200, config=FORCED.get(config)).cpu()
    assert out.dtype == x_dtype and out.shape == (2, 3, 40)
    ref64 = x.double() @ _weight64(q, scale, zero, group, 200).T + bias.double()
    assert rel_err(out, ref64) <= TOLERANCE[x_dtype]
    assert rel_err(out, ref.int4_gemm_ref(x, packed, scale, zero, bias, group, 200)) <= REF_BOUND


def test_fma_decode_split_k_is_deterministic_and_leaves_its_counters_at_zero():
    """The fused split-K sums the partials in split order whichever program finishes last: the same
    bits as the two-launch reduction of the same partials, and every tile counter back at zero."""
    from qcompiler.backends.triton.gemm_decode import tile_counters
    g = _gen("fma-determinism")
    q, packed, scale, zero, group = _int4("sym-g32", 48, 256, g)
    x, bias = torch.randn(3, 256, generator=g), torch.randn(48, generator=g)
    args = _dev(x, packed, scale, zero, bias)
    cfg = GemmConfig(4, 16, 32, 1, 4, 4, 2, kernel="fma")
    first, second = (int4_gemm(*args, group, 256, config=cfg).cpu() for _ in range(2))
    assert torch.equal(first, second)
    assert not tile_counters(torch.device(DEVICE), 1).any()
    # split partials summed by hand, in split order, as the last program does
    per_split = [int4_gemm(*_dev(x[:, i * 64:(i + 1) * 64], pack_int4(q[:, i * 64:(i + 1) * 64]),
                                 scale[:, 2 * i:2 * i + 2], None, None), group, 64,
                           config=GemmConfig(4, 16, 32, 1, 1, 4, 2, kernel="fma")).cpu() for i in range(4)]
    total = per_split[0].clone()
    for p in per_split[1:]:
        total += p
    assert torch.equal(first, total + bias)


# ----------------------------------------------------------------------------- W4A8


def _w4a8_activations(shape, dtype, g):
    """fp8 e4m3 or int8 activation codes of ``shape``."""
    a = torch.randn(shape, generator=g) * 100
    return a.to(torch.float8_e4m3fn) if dtype == "fp8" else a.round().clamp(-127, 127).to(torch.int8)


@pytest.mark.parametrize("act", ["fp8", "int8"])
@pytest.mark.parametrize("case", _cases(INT4_FORMATS, ("sym-channel", "asym-g64", "sym-g6-nondividing")),
                         ids=_case_id)
def test_w4a8_gemm_matches_reference(case, act):
    mnk, config, fmt = case
    m, n, k = mnk
    g = _gen((mnk, fmt, config, "w4a8") if act == "fp8" else (mnk, fmt, config, "w4a8", act))
    q, packed, scale, zero, group = _int4(fmt, n, k, g)
    a = _w4a8_activations((m, k), act, g)
    sa = (torch.rand(m, 1, generator=g) + 0.01) / 50 if m % 2 else torch.tensor(0.013)
    bias = torch.randn(n, generator=g)
    out = w4a8_gemm(*_dev(a, sa, packed, scale, zero, bias), group, k, torch.float32, config=FORCED.get(config))
    ref64, mag = gemm_ref64(a, sa, _weight64(q, scale, zero, group or k, k), torch.tensor(1.0), bias)
    _check(out, ref64, mag, torch.float32, ref.w4a8_gemm_ref(a, sa, packed, scale, zero, bias, group, k, torch.float32))


@pytest.mark.parametrize("act", ["fp8", "int8"])
def test_w4a8_gemm_bf16_output(act):
    g = _gen("w4a8-bf16" if act == "fp8" else f"w4a8-bf16-{act}")
    q, packed, scale, zero, group = _int4("sym-g32", 64, 96, g)
    a = _w4a8_activations((2, 5, 96), act, g)
    sa = (torch.rand(2, 5, 1, generator=g) + 0.01) / 50
    out = w4a8_gemm(*_dev(a, sa, packed, scale, zero, None), group, 96, torch.bfloat16)
    ref64, mag = gemm_ref64(a.reshape(10, 96), sa.reshape(10, 1), _weight64(q, scale, zero, group, 96),
                        torch.tensor(1.0), None)
    _check(out.reshape(10, 64), ref64, mag, torch.bfloat16,
           ref.w4a8_gemm_ref(a, sa, packed, scale, zero, None, group, 96, torch.bfloat16).reshape(10, 64))


# ----------------------------------------------------------------------------- input checks


def test_launchers_reject_bad_operands():
    a = torch.zeros(4, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8_gemm: a_q / w_q must be torch.int8"):
        int8_gemm(a.float(), torch.tensor(1.0), a, torch.tensor(1.0), None, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        int8_gemm(a, torch.tensor(1.0), a, torch.tensor(1.0), None, torch.int32)
    with pytest.raises(ValueError, match="int4_gemm: .*do not hold K=16"):
        int4_gemm(torch.zeros(4, 16), torch.zeros(4, 7, dtype=torch.uint8), torch.ones(4, 1), None, None, 0, 16)
    with pytest.raises(ValueError, match="groups"):
        weight_only_gemm(torch.zeros(4, 48), torch.zeros(4, 48, dtype=torch.int8), torch.ones(4, 2), None, None, 16)
