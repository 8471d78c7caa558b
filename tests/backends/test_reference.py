"""The reference GEMM kernels against float64 GEMMs on the *same* quantized operands.

Each reference dequantizes the very integer / fp8 tensors and scales the kernel receives,
so what is measured is the kernel's own error (accumulation, epilogue), not quantization
error. Also: the ``torch.ops.qcompiler`` ops return the ``_ref`` functions' tensors, and
they trace under ``torch.compile(fullgraph=True)`` through their fake kernels.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import qcompiler.core.ops  # noqa: F401  (registers torch.ops.qcompiler.*)
from qcompiler.core import numerics
from qcompiler.backends.reference import fp8_gemm_ref, int8_gemm_ref, weight_only_gemm_ref
from numerics_util import TOLERANCE, gemm_ref64, rel_err

# (M, N, K): M=1 (decode), N=1, odd sizes, and a couple of regular ones.
SHAPES = [(1, 7, 5), (3, 33, 17), (17, 64, 48), (64, 128, 96), (1, 128, 96), (2, 1, 17)]
# (activation scale, weight scale)
SCALE_MODES = [("tensor", "tensor"), ("token", "channel"), ("tensor", "channel"), ("token", "tensor")]
LEAD = [(), (2,)]  # leading batch dims of the activation: [M, K] and [2, M, K]


def _gen(key) -> torch.Generator:
    """A generator seeded from ``key`` (stable across runs, unlike ``hash`` of strings)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _scales(mode_a: str, mode_w: str, lead, m: int, n: int, g: torch.Generator):
    sa = (torch.rand((), generator=g) + 0.01) / 50 if mode_a == "tensor" \
        else (torch.rand(*lead, m, 1, generator=g) + 0.01) / 50
    sw = (torch.rand((), generator=g) + 0.01) / 50 if mode_w == "tensor" \
        else (torch.rand(n, 1, generator=g) + 0.01) / 50
    return sa.float(), sw.float()


def _bias(with_bias: bool, n: int, g: torch.Generator):
    return torch.randn(n, generator=g) if with_bias else None


def _check(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, out_dtype: torch.dtype) -> None:
    assert out.dtype == out_dtype and out.shape == ref.shape
    tol = TOLERANCE[out_dtype]
    assert rel_err(out, ref) <= tol
    # Elementwise, against the magnitude of the summands (robust to cancellation).
    err = (out.double() - ref).abs()
    assert (err <= tol * mag + 1e-30).all(), float((err / mag.clamp(min=1e-30)).max())


# ----------------------------------------------------------------------------- INT8 (W8A8)


def _int8(shape, g):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


@pytest.mark.parametrize("lead", LEAD, ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("modes", SCALE_MODES, ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("mnk", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_gemm(mnk, modes, with_bias, lead):
    m, n, k = mnk
    g = _gen((mnk, modes, with_bias, lead))
    a, w = _int8((*lead, m, k), g), _int8((n, k), g)
    sa, sw = _scales(*modes, lead, m, n, g)
    bias = _bias(with_bias, n, g)
    out = int8_gemm_ref(a, sa, w, sw, bias, torch.float32)
    ref, mag = gemm_ref64(a, sa, w, sw, bias)
    _check(out, ref, mag, torch.float32)


@pytest.mark.parametrize("mnk", SHAPES + [(5, 3, 1024)], ids=lambda s: "x".join(map(str, s)))
def test_int8_accumulation_is_exact(mnk):
    """Unit scales, no bias: the fp32 result is the integer matmul itself (|acc| <= 2**24)."""
    m, n, k = mnk
    g = _gen(k)
    one = torch.tensor(1.0)
    cases = [(_int8((m, k), g), _int8((n, k), g)),
             # Extremes: every product is +16384 (-128 * -128), or -16256 (-128 * 127).
             (torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), -128, dtype=torch.int8)),
             (torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), 127, dtype=torch.int8))]
    for a, w in cases:
        expect = a.double() @ w.double().T
        assert expect.abs().max() <= 2**24  # every integer up to 2**24 is exact in fp32
        out = int8_gemm_ref(a, one, w, one, None, torch.float32)
        assert torch.equal(out.double(), expect)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_int8_gemm_half_output(out_dtype):
    g = _gen(7)
    a, w = _int8((2, 17, 48), g), _int8((33, 48), g)
    sa, sw = _scales("token", "channel", (2,), 17, 33, g)
    bias = torch.randn(33, generator=g)
    out = int8_gemm_ref(a, sa, w, sw, bias, out_dtype)
    ref, mag = gemm_ref64(a, sa, w, sw, bias)
    _check(out, ref, mag, out_dtype)


# ----------------------------------------------------------------------------- FP8 (W8A8)


def _fp8(shape, g):
    # Saturating cast of wide normals: covers the whole e4m3 range, +-448 and subnormals included.
    return (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("lead", LEAD, ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("modes", SCALE_MODES, ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("mnk", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp8_gemm(mnk, modes, with_bias, lead):
    m, n, k = mnk
    g = _gen((mnk, modes, with_bias, lead, "fp8"))
    a, w = _fp8((*lead, m, k), g), _fp8((n, k), g)
    sa, sw = _scales(*modes, lead, m, n, g)
    bias = _bias(with_bias, n, g)
    out = fp8_gemm_ref(a, sa, w, sw, bias, torch.float32)
    ref, mag = gemm_ref64(a, sa, w, sw, bias)
    _check(out, ref, mag, torch.float32)


def test_fp8_gemm_bf16_output():
    g = _gen(11)
    a, w = _fp8((2, 3, 48), g), _fp8((64, 48), g)
    sa, sw = _scales("token", "channel", (2,), 3, 64, g)
    bias = torch.randn(64, generator=g)
    out = fp8_gemm_ref(a, sa, w, sw, bias, torch.bfloat16)
    ref, mag = gemm_ref64(a, sa, w, sw, bias)
    _check(out, ref, mag, torch.bfloat16)


# ----------------------------------------------------------------------------- weight-only


def _blocked(t: torch.Tensor, k: int, group: int | None) -> torch.Tensor:
    """Expand a [N, G] per-group tensor to [N, K] with ONNX block layout (full blocks first)."""
    if t.dim() == 0 or t.shape[-1] == 1:
        return t
    return t.repeat_interleave(group, dim=1)[:, :k]


# format -> (numerics dtype name, asymmetric (with zero points), group size; None: per-channel)
WEIGHT_FORMATS = {
    "int8-channel": ("int8", False, None),
    "uint8-channel-asym": ("uint8", True, None),
    "int4-g16": ("int4", False, 16),           # divides K=48 / 96 only
    "int4-g32-nondividing": ("int4", False, 32),  # K=5, 17, 48 (48 = 32 + 16), 96
    "uint4-g8-asym": ("uint4", True, 8),
    "uint4-g12-asym-nondividing": ("uint4", True, 12),
}


def _weight(fmt: str, n: int, k: int, g: torch.Generator):
    name, asym, group = WEIGHT_FORMATS[fmt]
    qmin, qmax = (int(v) for v in numerics.QRANGE[name])
    sdt = numerics.STORAGE_DTYPE[name]
    cols = 1 if group is None else -(-k // group)
    w_q = torch.randint(qmin, qmax + 1, (n, k), generator=g).to(sdt)
    scale = (torch.rand(n, cols, generator=g) + 0.05) / 20
    zero = torch.randint(qmin, qmax + 1, (n, cols), generator=g).to(sdt) if asym else None
    return w_q, scale, zero, group


def _weight_ref64(w_q, scale, zero, group, k):
    w = w_q.double()
    if zero is not None:
        w = w - _blocked(zero.double(), k, group)
    return w * _blocked(scale.double(), k, group)


@pytest.mark.parametrize("lead", LEAD, ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
@pytest.mark.parametrize("mnk", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_only_gemm(mnk, fmt, with_bias, lead):
    m, n, k = mnk
    g = _gen((mnk, fmt, with_bias, lead))
    w_q, scale, zero, group = _weight(fmt, n, k, g)
    x = torch.randn(*lead, m, k, generator=g)
    bias = _bias(with_bias, n, g)
    out = weight_only_gemm_ref(x, w_q, scale, zero, bias, group)
    w64 = _weight_ref64(w_q, scale, zero, group, k)
    ref = x.double() @ w64.T
    mag = x.double().abs() @ w64.abs().T
    if bias is not None:
        ref, mag = ref + bias.double(), mag + bias.double().abs()
    _check(out, ref, mag, torch.float32)


def test_weight_only_gemm_group_size_needed_when_not_dividing():
    """K=48 in groups of 32 (a full group, then 16 columns) gives 2 scales, as groups of 24
    would; inferring the block from the scale's shape takes 24 and is wrong."""
    g = _gen(3)
    w_q, scale, zero, group = _weight("int4-g32-nondividing", 8, 48, g)
    x = torch.randn(4, 48, generator=g)
    ref = x.double() @ _weight_ref64(w_q, scale, zero, group, 48).T
    assert rel_err(weight_only_gemm_ref(x, w_q, scale, zero, None, 32), ref) <= 1e-6
    assert rel_err(weight_only_gemm_ref(x, w_q, scale, zero, None), ref) > 1e-3


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_weight_only_gemm_half_activations(x_dtype):
    g = _gen(5)
    w_q, scale, zero, group = _weight("uint4-g8-asym", 33, 48, g)
    x = torch.randn(2, 3, 48, generator=g).to(x_dtype)
    bias = torch.randn(33, generator=g).to(x_dtype)
    out = weight_only_gemm_ref(x, w_q, scale, zero, bias, group)
    assert out.dtype == x_dtype and out.shape == (2, 3, 33)
    ref = x.double() @ _weight_ref64(w_q, scale, zero, group, 48).T + bias.double()
    assert rel_err(out, ref) <= TOLERANCE[x_dtype]


# ----------------------------------------------------------------------------- the custom ops


def _op_cases():
    """(name, op, ref function, args) for each GEMM op, with leading batch dims and bias."""
    g = _gen(0)
    a8, w8 = _int8((2, 3, 17), g), _int8((33, 17), g)
    sa, sw = _scales("token", "channel", (2,), 3, 33, g)
    af, wf = _fp8((2, 3, 17), g), _fp8((33, 17), g)
    bias = torch.randn(33, generator=g)
    # A group (6) that does not divide K=17 but is recovered from the scale's shape
    # (ceil(17 / ceil(17 / 6)) == 6): the op carries no group size.
    w4 = torch.randint(0, 16, (33, 17), generator=g).to(torch.uint8)
    s4 = torch.rand(33, 3, generator=g) / 10 + 0.01
    z4 = torch.randint(0, 16, (33, 3), generator=g).to(torch.uint8)
    x = torch.randn(2, 3, 17, generator=g)
    ops = torch.ops.qcompiler
    return [
        ("int8", ops.int8_gemm, int8_gemm_ref, (a8, sa, w8, sw, bias, torch.float32)),
        ("int8-pertensor-bf16", ops.int8_gemm, int8_gemm_ref,
         (a8, torch.tensor(0.02), w8, torch.tensor(0.03), None, torch.bfloat16)),
        ("fp8", ops.fp8_gemm, fp8_gemm_ref, (af, sa, wf, sw, bias, torch.float32)),
        ("fp8-pertensor", ops.fp8_gemm, fp8_gemm_ref,
         (af[0, :1], torch.tensor(0.02), wf, torch.tensor(0.03), None, torch.float32)),
        ("weight_only-uint4-g6", ops.weight_only_gemm, weight_only_gemm_ref, (x, w4, s4, z4, bias)),
        ("weight_only-int8", ops.weight_only_gemm, weight_only_gemm_ref,
         (x[0], w8, sw, None, None)),
    ]


OP_CASES = _op_cases()


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_matches_ref(case):
    _, op, ref_fn, args = case
    out = op(*args)
    assert torch.equal(out, ref_fn(*args))


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_opcheck(case):
    """Schema, fake kernel (shapes / dtypes / strides) and dispatch are consistent."""
    _, op, _, args = case
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        # opcheck's schema check compares inputs with allclose, which has no fp8 kernel.
        utils = utils[1:]
    torch.library.opcheck(op.default, args, test_utils=utils)


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_compiles_fullgraph(case):
    _, op, ref_fn, args = case
    torch._dynamo.reset()

    def fn(*a):
        return op(*a) * 1.0

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert torch.equal(compiled(*args), ref_fn(*args) * 1.0)


def test_dynamic_int8_chain_compiles_fullgraph():
    """quantize_per_token -> int8_gemm, traced as one graph through both fake kernels."""
    torch._dynamo.reset()
    g = _gen(1)
    w8 = _int8((33, 17), g)
    sw = torch.rand(33, 1, generator=g) / 50
    bias = torch.randn(33, generator=g)
    ops = torch.ops.qcompiler

    def fn(x):
        q, s = ops.quantize_per_token(x, "int8")
        return ops.int8_gemm(q, s, w8, sw, bias, torch.float32)

    x = torch.randn(2, 5, 17, generator=g)
    q, s = numerics.quantize_per_token(x, "int8")
    expect = int8_gemm_ref(q, s, w8, sw, bias, torch.float32)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), expect)


def test_backend_names_are_registered_once(monkeypatch):
    from qcompiler import backends
    from qcompiler.errors import RecipeError
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    original = backends.BACKENDS["reference"]
    with pytest.raises(RecipeError, match="'reference' is already registered"):
        backends.register_backend("reference")(lambda: {})
    assert backends.BACKENDS["reference"] is original
    backends.register_backend("reference")(original)     # the same factory again (a module reload) is fine

    @backends.register_backend("plugin-test")
    def _table():
        return {}

    assert backends.get_backend("plugin-test") == {}
