"""``qcompiler.core.numerics`` against ONNX QuantizeLinear / DequantizeLinear, bit for bit.

The oracle is ``onnx.reference.ReferenceEvaluator`` running a one-node model at opset 21
(the reference implements DequantizeLinear only from opset 19). Inputs mix exact ties
(multiples of scale / 2, fp8 midpoints), arbitrary floats, huge magnitudes and signed zeros.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from qcompiler.core import numerics  # noqa: E402

# onnx.reference warns when x / scale overflows float32 or int32 (see saturate_where_oracle_overflows).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")]

OPSET = 21
SETTINGS = settings(max_examples=100, deadline=None)

# name -> (ONNX element type, numpy dtype of ONNX values, torch storage dtype)
INT_TYPES = {
    "int8": (TensorProto.INT8, np.int8, torch.int8),
    "uint8": (TensorProto.UINT8, np.uint8, torch.uint8),
    "int4": (TensorProto.INT4, ml_dtypes.int4, torch.int8),
    "uint4": (TensorProto.UINT4, ml_dtypes.uint4, torch.uint8),
}
FP8 = ml_dtypes.float8_e4m3fn
#: The 127 non-negative finite e4m3fn values (0x00 .. 0x7E = 448), as float32.
FP8_POS = np.arange(127, dtype=np.uint8).view(FP8).astype(np.float32)
_F32_1EM4, _F32_1EM3 = float(np.float32(1e-4)), float(np.float32(1e-3))


# ----------------------------------------------------------------------------- ONNX models


def _model(op: str, x_name: str, x_type: int, shape, inits: dict, out_type: int, **attrs):
    """A one-node ``op`` model: graph input ``x_name``, other operands as initializers."""
    names = [x_name, "scale"] + (["zero"] if "zero" in inits else [])
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(x_name, x_type, list(shape))],
        [helper.make_tensor_value_info("y", out_type, list(shape))],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model)


def onnx_quantize(x: np.ndarray, scale: np.ndarray, zero, out_type: int, **attrs) -> np.ndarray:
    inits = {"scale": scale} | ({} if zero is None else {"zero": zero})
    sess = _model("QuantizeLinear", "x", TensorProto.FLOAT, x.shape, inits, out_type, **attrs)
    return sess.run(None, {"x": x})[0]


def onnx_dequantize(q: np.ndarray, q_type: int, scale: np.ndarray, zero, **attrs) -> np.ndarray:
    inits = {"scale": scale} | ({} if zero is None else {"zero": zero})
    sess = _model("DequantizeLinear", "q", q_type, q.shape, inits, TensorProto.FLOAT, **attrs)
    return sess.run(None, {"q": q})[0]


def saturate_where_oracle_overflows(ref: np.ndarray, x: np.ndarray, s_full: np.ndarray, name: str) -> np.ndarray:
    """onnx.reference computes ``np.rint(x / s).astype(np.int32)``, which wraps (or gives
    INT_MIN) once |x / s| reaches 2**31, although the spec saturates. There the expected
    value is the end of the range on x's side; elsewhere it is ONNX's."""
    qmin, qmax = numerics.QRANGE[name]
    with np.errstate(over="ignore", divide="ignore"):
        huge = np.abs(x.astype(np.float64) / s_full.astype(np.float64)) >= 2.0**30
    return np.where(huge, np.where(x > 0, qmax, qmin), np.asarray(ref).astype(np.int32))


def assert_same_ints(onnx_out: np.ndarray, ours: torch.Tensor) -> None:
    # onnx.reference returns int4 / uint4 as ml_dtypes arrays: compare values as int.
    np.testing.assert_array_equal(ours.numpy().astype(np.int32), np.asarray(onnx_out).astype(np.int32))


def assert_same_bits_f32(onnx_out: np.ndarray, ours: torch.Tensor) -> None:
    a = np.ascontiguousarray(np.asarray(onnx_out, dtype=np.float32)).view(np.uint32)
    b = ours.to(torch.float32).contiguous().numpy().view(np.uint32)
    np.testing.assert_array_equal(b, a)


# ----------------------------------------------------------------------------- strategies


@st.composite
def scales(draw, shape) -> np.ndarray:
    """Positive float32 scales: powers of two (ties stay exact) or arbitrary."""
    if draw(st.booleans()):
        exps = draw(arrays(np.int32, shape, elements=st.integers(-10, 6)))
        return np.asarray(np.ldexp(np.float32(1), exps), np.float32)
    return np.asarray(draw(arrays(np.float32, shape, elements=st.floats(_F32_1EM4, 1e3, width=32))), np.float32)


@st.composite
def xs_for(draw, s_full: np.ndarray, qspan: int) -> np.ndarray:
    """float32 x, shaped like ``s_full``: half-multiples of the scale (ties, some past the
    range), arbitrary floats, huge magnitudes and signed zeros."""
    shape = s_full.shape
    kind = draw(arrays(np.int8, shape, elements=st.integers(0, 4)))
    halves = draw(arrays(np.int32, shape, elements=st.integers(-4 * qspan, 4 * qspan)))
    anyf = draw(arrays(np.float32, shape, elements=st.floats(-1e4, 1e4, width=32)))
    huge = draw(arrays(np.float32, shape, elements=st.sampled_from(
        [3.0e38, -3.0e38, 1e30, -1e30, 65504.0, -65504.0, 1e6, -1e6])))
    zero = np.where(draw(arrays(np.bool_, shape)), np.float32(-0.0), np.float32(0.0))
    with np.errstate(over="ignore"):
        tie = (halves.astype(np.float32) * s_full) * np.float32(0.5)
    x = np.select([kind == 0, kind == 1, kind == 2, kind == 3], [tie, anyf, huge, zero], tie + anyf)
    return x.astype(np.float32)


def zeros_strategy(name: str, shape):
    qmin, qmax = (int(v) for v in numerics.QRANGE[name])
    return arrays(np.int32, shape, elements=st.integers(qmin, qmax)).map(np.asarray)


def _expand(s: np.ndarray, shape, axis: int, block: int) -> np.ndarray:
    return np.repeat(s, block, axis=axis).take(np.arange(shape[axis]), axis=axis)


# ----------------------------------------------------------------------------- int8 / uint8


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["int8", "uint8"]),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
       with_zero=st.booleans())
def test_quantize_int8_per_tensor(data, name, shape, with_zero):
    onnx_type, np_dt, _ = INT_TYPES[name]
    s = data.draw(scales(()))
    zp = data.draw(zeros_strategy(name, ())) if with_zero else None
    x = data.draw(xs_for(np.broadcast_to(s, shape), 256))
    # Without a zero point ONNX outputs uint8, so an int8 model always carries one.
    zp_onnx = np.asarray(0 if zp is None else zp).astype(np_dt)
    ref = onnx_quantize(x, s, zp_onnx, onnx_type)
    ref = saturate_where_oracle_overflows(ref, x, np.broadcast_to(s, shape), name)
    ours = numerics.quantize(torch.from_numpy(x), torch.from_numpy(s),
                             None if zp is None else torch.from_numpy(zp), name)
    assert ours.dtype == INT_TYPES[name][2]
    assert_same_ints(ref, ours)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["int8", "uint8"]),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
       with_zero=st.booleans())
def test_quantize_int8_per_axis(data, name, shape, with_zero):
    onnx_type, np_dt, _ = INT_TYPES[name]
    axis = data.draw(st.integers(0, len(shape) - 1))
    s1 = data.draw(scales((shape[axis],)))
    zp1 = data.draw(zeros_strategy(name, (shape[axis],))) if with_zero else np.zeros(shape[axis], np.int32)
    ours_shape = [1] * len(shape)
    ours_shape[axis] = shape[axis]
    s_full = np.broadcast_to(s1.reshape(ours_shape), shape)
    x = data.draw(xs_for(s_full, 256))
    ref = onnx_quantize(x, s1, zp1.astype(np_dt), onnx_type, axis=axis)
    ref = saturate_where_oracle_overflows(ref, x, s_full, name)
    ours = numerics.quantize(torch.from_numpy(x), torch.from_numpy(s1.reshape(ours_shape)),
                             torch.from_numpy(zp1.reshape(ours_shape)) if with_zero else None, name)
    assert_same_ints(ref, ours)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["int8", "uint8"]),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
       per_axis=st.booleans())
def test_dequantize_int8(data, name, shape, per_axis):
    onnx_type, np_dt, sdt = INT_TYPES[name]
    q = data.draw(zeros_strategy(name, shape))
    if per_axis:
        axis = data.draw(st.integers(0, len(shape) - 1))
        s1 = data.draw(scales((shape[axis],)))
        zp1 = data.draw(zeros_strategy(name, (shape[axis],)))
        ours_shape = [1] * len(shape)
        ours_shape[axis] = shape[axis]
        ref = onnx_dequantize(q.astype(np_dt), onnx_type, s1, zp1.astype(np_dt), axis=axis)
        s_t, zp_t = torch.from_numpy(s1.reshape(ours_shape)), torch.from_numpy(zp1.reshape(ours_shape))
    else:
        s1, zp1 = data.draw(scales(())), data.draw(zeros_strategy(name, ()))
        ref = onnx_dequantize(q.astype(np_dt), onnx_type, s1, zp1.astype(np_dt))
        s_t, zp_t = torch.from_numpy(s1), torch.from_numpy(zp1)
    ours = numerics.dequantize(torch.from_numpy(q).to(sdt), s_t, zp_t.to(sdt))
    assert_same_bits_f32(ref, ours)


# ----------------------------------------------------------------------------- int4 / uint4, blocked


@st.composite
def blocked_case(draw, name):
    n, k = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    block = draw(st.integers(1, k + 2))
    nb = -(-k // block)
    s = draw(scales((n, nb)))
    zp = draw(zeros_strategy(name, (n, nb))) if draw(st.booleans()) else None
    return n, k, block, s, zp


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["int4", "uint4"]))
def test_quantize_int4_blocked(data, name):
    n, k, block, s, zp = data.draw(blocked_case(name))
    onnx_type, np_dt, sdt = INT_TYPES[name]
    s_full = _expand(s, (n, k), 1, block)
    x = data.draw(xs_for(s_full, 16))
    zp_onnx = np.zeros(s.shape, np.int32) if zp is None else zp
    ref = onnx_quantize(x, s, zp_onnx.astype(np_dt), onnx_type, axis=1, block_size=block)
    ref = saturate_where_oracle_overflows(ref, x, s_full, name)
    zp_t = None if zp is None else torch.from_numpy(zp).to(sdt)
    ours = numerics.quantize(torch.from_numpy(x), torch.from_numpy(s), zp_t, name, block_size=block)
    assert ours.dtype == sdt
    assert_same_ints(ref, ours)
    # Without block_size the block is inferred as ceil(K / groups): ONNX's whenever that
    # recovers the block size.
    nb = s.shape[1]
    if nb in (1, k) or -(-k // nb) == block:
        assert_same_ints(ref, numerics.quantize(torch.from_numpy(x), torch.from_numpy(s), zp_t, name))


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["int4", "uint4"]))
def test_dequantize_int4_blocked(data, name):
    n, k, block, s, zp = data.draw(blocked_case(name))
    onnx_type, np_dt, sdt = INT_TYPES[name]
    q = data.draw(zeros_strategy(name, (n, k)))
    ref = onnx_dequantize(q.astype(np_dt), onnx_type, s, None if zp is None else zp.astype(np_dt),
                          axis=1, block_size=block)
    ours = numerics.dequantize(torch.from_numpy(q).to(sdt), torch.from_numpy(s),
                               None if zp is None else torch.from_numpy(zp).to(sdt), block_size=block)
    assert_same_bits_f32(ref, ours)


def test_blocked_scale_shape_does_not_determine_block_size():
    """K=100, groups of 32 -> 4 scales, as groups of 25 would give: the inferred layout is
    the 25-wide one, so a non-dividing group size must be passed explicitly."""
    x = torch.arange(100, dtype=torch.float32).reshape(1, 100) / 10
    s = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    assert numerics.expand_blocks(s, x)[0, 25].item() == 2.0
    assert numerics.expand_blocks(s, x, 32)[0, 25].item() == 1.0
    assert numerics.expand_blocks(s, x, 32)[0, 96].item() == 8.0
    with pytest.raises(ValueError):
        numerics.expand_blocks(s, x, 20)


# ----------------------------------------------------------------------------- float8 e4m3fn


@st.composite
def fp8_inputs(draw, shape):
    """float32 x / scale, elementwise: e4m3 values, exact midpoints between neighbours
    (ties, subnormal ones included), values between 448 and 480 and far beyond, arbitrary
    floats, signed zeros."""
    mids = (FP8_POS[:-1] + FP8_POS[1:]) / 2
    kind = draw(arrays(np.int8, shape, elements=st.integers(0, 4)))
    idx = draw(arrays(np.int32, shape, elements=st.integers(0, 125)))
    sign = np.where(draw(arrays(np.bool_, shape)), np.float32(-1), np.float32(1))
    anyf = draw(arrays(np.float32, shape, elements=st.floats(-600, 600, width=32)))
    big = draw(arrays(np.float32, shape, elements=st.one_of(
        st.floats(448, 480, width=32), st.sampled_from([464.0, 465.0, 479.0, 480.0, 1e6, 3e38]))))
    y = np.select([kind == 0, kind == 1, kind == 2, kind == 3],
                  [FP8_POS[idx], mids[idx], big, np.float32(0)], anyf) * sign
    return y.astype(np.float32)


@SETTINGS
@given(data=st.data(), shape=st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple),
       exp=st.integers(-8, 8), arbitrary_scale=st.booleans())
def test_quantize_fp8_per_tensor(data, shape, exp, arbitrary_scale):
    if arbitrary_scale:
        s = np.float32(data.draw(st.floats(_F32_1EM3, 1e3, width=32)))
    else:
        s = np.float32(2.0**exp)  # y * s / s == y: the ties stay ties
    with np.errstate(over="ignore"):  # 3e38 * s may be inf: it saturates too
        x = (data.draw(fp8_inputs(shape)) * s).astype(np.float32)
    s = np.asarray(s, np.float32)
    ref = onnx_quantize(x, s, None, TensorProto.FLOAT8E4M3FN, output_dtype=TensorProto.FLOAT8E4M3FN,
                        saturate=1)
    ours = numerics.quantize(torch.from_numpy(x), torch.from_numpy(s), None, "fp8_e4m3")
    assert ours.dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(ours.view(torch.uint8).numpy(),
                                  np.asarray(ref).astype(FP8).view(np.uint8))
    assert ours.float().abs().max().item() <= 448.0


def test_quantize_fp8_ties_and_saturation_examples():
    """Explicit anchors: ties to even, and saturation instead of NaN / inf."""
    x = torch.tensor([0.0, -0.0, 17.0, 19.0, 21.0, 464.0, 465.0, -1e6, float("inf"), float("-inf")])
    got = numerics.quantize(x, torch.tensor(1.0), None, "fp8_e4m3").float()
    # 17 is between 16 and 18 (tie -> 16, even mantissa); 19 -> 20; 21 is between 20 and 22 -> 20.
    assert got.tolist() == [0.0, -0.0, 16.0, 20.0, 20.0, 448.0, 448.0, -448.0, 448.0, -448.0]


@SETTINGS
@given(data=st.data(), shape=st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple))
def test_round_to_e4m3_is_the_fp8_cast(data, shape):
    """The integer-op rounding the fp8 kernels fold into their GEMM equals ONNX's saturating cast."""
    y = torch.from_numpy(data.draw(fp8_inputs(shape)))
    ours, ref = numerics.round_to_e4m3(y), y.to(torch.float8_e4m3fn).float()
    assert torch.equal(ours, ref) and torch.equal(torch.signbit(ours), torch.signbit(ref))


@pytest.mark.parametrize("compiled", [False, True])
def test_round_to_e4m3_on_every_grid_point_midpoint_and_neighbour(compiled):
    """Every E4M3 value, every midpoint between neighbours and the float32 values one ulp either side
    of it, float32 denormals, +-inf and NaN; eager and compiled by TorchInductor (the kernels' form)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    pos = grid[(grid >= 0) & grid.isfinite()].unique()
    mids = (pos[1:] + pos[:-1]) / 2
    near = torch.cat([pos, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9)),
                      torch.tensor([448.0, 464.0, 464.00003, 480.0, 1e6, 3e38, float("inf"), 1e-45, 1e-39])])
    y = torch.cat([near, -near, torch.tensor([float("nan"), -0.0])])
    fn = torch.compile(numerics.round_to_e4m3) if compiled else numerics.round_to_e4m3
    ours, ref = fn(y), y.to(torch.float8_e4m3fn).float()
    assert torch.equal(ours.isnan(), ref.isnan()) and int(ref.isnan().sum()) == 1
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    assert torch.equal(torch.signbit(ours[~ref.isnan()]), torch.signbit(ref[~ref.isnan()]))


@SETTINGS
@given(bits=arrays(np.uint8, st.integers(1, 64)),
       s=st.one_of(st.floats(_F32_1EM4, 1e4, width=32), st.integers(-10, 10).map(lambda e: 2.0**e)))
def test_dequantize_fp8_per_tensor(bits, s):
    s = np.asarray(s, np.float32)
    q = bits.view(FP8)
    ref = onnx_dequantize(q, TensorProto.FLOAT8E4M3FN, s, None)
    ours = numerics.dequantize(torch.from_numpy(bits).view(torch.float8_e4m3fn), torch.from_numpy(s), None)
    a = np.asarray(ref, np.float32)
    nan = np.isnan(a)
    assert (np.isnan(ours.numpy()) == nan).all()
    assert_same_bits_f32(a[~nan], ours[torch.from_numpy(~nan)])


# ----------------------------------------------------------------------------- per-token


@SETTINGS
@given(x=arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 33)),
                elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.just(0.0))),
       name=st.sampled_from(["int8", "int4"]))
def test_quantize_per_token(x, name):
    xt = torch.from_numpy(x)
    q, s = numerics.quantize_per_token(xt, name)
    qmax = numerics.QRANGE[name][1]
    assert s.shape == (*x.shape[:-1], 1) and s.dtype == torch.float32
    assert q.dtype == numerics.STORAGE_DTYPE[name] and q.shape == xt.shape
    absmax = xt.abs().amax(-1, keepdim=True)
    # absmax / qmax; an all-zero row gets the floor 1e-12 / qmax instead of 0.
    torch.testing.assert_close(s, absmax.clamp(min=1e-12) / qmax, rtol=0, atol=0)
    assert int(q.abs().max()) <= qmax
    err = (numerics.dequantize(q, s, None).double() - xt.double()).abs()
    assert (err <= s.double() / 2 * (1 + 1e-6) + 1e-30).all()
    # Each row above the 1e-12 floor reaches the end of the grid.
    nonzero = absmax.squeeze(-1) > 1e-12
    assert (q.abs().amax(-1)[nonzero] == qmax).all()


@SETTINGS
@given(x=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 33)),
                elements=st.floats(-1e4, 1e4, width=32)))
def test_quantize_per_token_fp8(x):
    xt = torch.from_numpy(x)
    q, s = numerics.quantize_per_token(xt, "fp8_e4m3")
    torch.testing.assert_close(s, xt.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448, rtol=0, atol=0)
    assert q.dtype == torch.float8_e4m3fn and q.float().abs().max().item() <= 448
    # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 for normals; subnormal step 2^-9.
    err = (numerics.dequantize(q, s, None).double() - xt.double()).abs()
    bound = xt.double().abs() * 2.0**-4 * (1 + 1e-6) + s.double() * 2.0**-10 * (1 + 1e-6)
    assert (err <= bound).all()
