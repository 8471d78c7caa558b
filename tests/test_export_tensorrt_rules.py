"""``qcompiler.export.check_tensorrt`` on small hand-built ONNX graphs: legal Q/DQ placements pass
(and run in onnxruntime); each illegal one is refused with the offending node and rule named."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qcompiler.export import RULES, TensorRTLegalityError, check_tensorrt, tensorrt_violations  # noqa: E402
from qcompiler.export.finalize import int4_initializer  # noqa: E402
from qcompiler.core.packing import pack_int4  # noqa: E402

import torch  # noqa: E402

K, N = 32, 16
RNG = np.random.default_rng(0)


def _init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, inits, opset: int = 21, x_type: int = TensorProto.FLOAT, extra_inputs=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", x_type, ["batch", "seq", K]), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _w8(shape=(K, N)) -> np.ndarray:
    return RNG.integers(-127, 128, size=shape, dtype=np.int8)


def _scales(n: int) -> np.ndarray:
    return RNG.uniform(0.001, 0.01, size=n).astype(np.float32)


def legal_int8(opset: int = 21) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(., DQ(W_q [K, N], per-channel axis 1)) -> y"""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_a", "zp_a"], ["x_q"], name="q_act"),
             helper.make_node("DequantizeLinear", ["x_q", "s_a", "zp_a"], ["x_dq"], name="dq_act"),
             helper.make_node("DequantizeLinear", ["w_q", "s_w"], ["w_dq"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="gemm")]
    inits = [_init("s_a", np.float32(0.05)), _init("zp_a", np.int8(0)), _init("w_q", _w8()), _init("s_w", _scales(N))]
    return _model(nodes, inits, opset)


def legal_int4(group: int = 8, opset: int = 21) -> onnx.ModelProto:
    """INT4 weight-only: DQ(W_q [N, K] INT4, blocked along axis 1) -> Transpose -> MatMul."""
    q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s_w"], ["w_dq"], name="dq_w", axis=1, block_size=group),
             helper.make_node("Transpose", ["w_dq"], ["w_t"], name="transpose_w", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w_t"], ["y"], name="gemm")]
    inits = [int4_initializer("w_q", pack_int4(q).numpy(), K), _init("s_w", RNG.uniform(0.01, 0.1, (N, K // group)).astype(np.float32))]
    return _model(nodes, inits, opset)


def legal_fp8(opset: int = 19) -> onnx.ModelProto:
    fp8 = ml_dtypes.float8_e4m3fn
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_a", "zp_a"], ["x_q"], name="q_act"),
             helper.make_node("DequantizeLinear", ["x_q", "s_a", "zp_a"], ["x_dq"], name="dq_act"),
             helper.make_node("DequantizeLinear", ["w_q", "s_w"], ["w_dq"], name="dq_w"),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="gemm")]
    inits = [_init("s_a", np.float32(0.05)), _init("zp_a", np.zeros((), fp8)),
             _init("w_q", RNG.normal(size=(K, N)).astype(fp8)), _init("s_w", np.float32(0.01))]
    return _model(nodes, inits, opset)


H, T, D = 2, 5, 8          # an attention's heads, tokens, head dim


def legal_kv_attention(fp8: bool = False) -> onnx.ModelProto:
    """A quantized KV cache's attention (``Recipe.kv_cache``): ``softmax(q @ DQ(Q(K^T))) @ DQ(Q(V))``,
    one static per-tensor scale each for the keys and the values, each DQ feeding its batched matmul."""
    zero = np.zeros((), ml_dtypes.float8_e4m3fn if fp8 else np.int8)
    nodes = [helper.make_node("Transpose", ["k"], ["k_t"], name="transpose_k", perm=[0, 1, 3, 2]),
             helper.make_node("QuantizeLinear", ["k_t", "s_k", "zp_k"], ["k_q"], name="q_k"),
             helper.make_node("DequantizeLinear", ["k_q", "s_k", "zp_k"], ["k_dq"], name="dq_k"),
             helper.make_node("MatMul", ["q", "k_dq"], ["scores"], name="bmm1"),
             helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
             helper.make_node("QuantizeLinear", ["v", "s_v", "zp_v"], ["v_q"], name="q_v"),
             helper.make_node("DequantizeLinear", ["v_q", "s_v", "zp_v"], ["v_dq"], name="dq_v"),
             helper.make_node("MatMul", ["probs", "v_dq"], ["y"], name="bmm2")]
    inits = [_init("s_k", np.float32(0.02)), _init("zp_k", zero), _init("s_v", np.float32(0.03)), _init("zp_v", zero)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", H, "seq", D]) for n in ("q", "k", "v", "y")]
    graph = helper.make_graph(nodes, "attention", io[:3], io[3:], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _replace(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(_init(name, value))
    return model


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


@pytest.mark.parametrize("build", [legal_int8, legal_int4, legal_fp8, lambda: legal_int8(opset=13)],
                         ids=["int8", "int4-blocked", "fp8", "int8-opset13"])
def test_legal_graph_passes_checker_and_runs(build):
    model = build()
    onnx.checker.check_model(model, full_check=True)
    summary = check_tensorrt(model)
    assert summary.weight_dequantize == 1 and sum(summary.gemms.values()) == 1
    x = np.random.default_rng(1).normal(size=(2, 3, K)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.shape == (2, 3, N) and np.isfinite(y).all()


def test_summary_counts_gemm_kinds():
    assert check_tensorrt(legal_int8()).gemms == {"INT8/INT8": 1}
    assert check_tensorrt(legal_int4()).gemms == {"INT4/float": 1}
    assert check_tensorrt(legal_fp8()).gemms == {"FP8/FP8": 1}


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_kv_cache_attention_is_legal_and_runs_as_its_fake_quantization(fp8):
    model = legal_kv_attention(fp8)
    onnx.checker.check_model(model, full_check=True)
    summary = check_tensorrt(model)
    assert summary.gemms == {f"BMM {'FP8' if fp8 else 'INT8'}/float": 2}
    assert summary.activation_pairs == 2 and summary.weight_dequantize == 0
    g = np.random.default_rng(2)
    q, k, v = (g.normal(size=(2, H, T, D)).astype(np.float32) for _ in range(3))
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"q": q, "k": k, "v": v})[0]
    from qcompiler.core import numerics
    dtype = "fp8_e4m3" if fp8 else "int8"

    def fq(x, s):
        s = torch.tensor(s)
        return numerics.dequantize(numerics.quantize(torch.from_numpy(x), s, None, dtype), s, None).numpy()

    scores = q @ fq(k.transpose(0, 1, 3, 2).copy(), 0.02)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ fq(v, 0.03)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gemm_transb_and_per_tensor_weight_are_legal():
    m = legal_int8()
    w = _w8((N, K))
    _replace(m, "w_q", w)
    dq = _node(m, "dq_w")
    dq.attribute[0].i = 0                                        # output channels on axis 0 of [N, K]
    gemm = _node(m, "gemm")
    gemm.op_type = "Gemm"
    gemm.attribute.extend([helper.make_attribute("transB", 1)])
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K]))
    assert check_tensorrt(m).gemms == {"INT8/INT8": 1}
    m2 = _replace(legal_int8(), "s_w", np.float32(0.01))          # per-tensor weight scale
    assert check_tensorrt(m2).gemms == {"INT8/INT8": 1}


# -- illegal graphs: (rule, node that must be named, how to break a legal graph) -------------------------


def _nonzero_act_zero_point():
    m = legal_int8()
    m.graph.initializer.append(_init("zp_bad", np.int8(3)))
    _node(m, "dq_act").input[2] = "zp_bad"
    _node(m, "q_act").input[2] = "zp_bad"
    return m


def _per_channel_on_input_axis():
    m = _replace(legal_int8(), "s_w", _scales(K))
    _node(m, "dq_w").attribute[0].i = 0          # K scales on axis 0 of a [K, N] MatMul weight
    return m


def _per_channel_behind_transpose_wrong_axis():
    m = _replace(legal_int4(), "s_w", _scales(K))
    dq = _node(m, "dq_w")
    del dq.attribute[:]
    dq.attribute.extend([helper.make_attribute("axis", 1)])      # [N, K] weight: output channels are axis 0
    return m


def _scale_not_initializer():
    m = legal_int8()
    m.graph.node.insert(0, helper.make_node("Mul", ["s_a", "two"], ["s_a2"], name="scale_mul"))
    m.graph.initializer.append(_init("two", np.float32(2.0)))
    _node(m, "q_act").input[1] = "s_a2"
    _node(m, "dq_act").input[1] = "s_a2"
    return m


def _dynamic_per_token_scale():
    m = legal_int8()
    nodes = [helper.make_node("Abs", ["x"], ["x_abs"], name="abs"),
             helper.make_node("ReduceMax", ["x_abs"], ["amax"], name="amax", keepdims=1, axes=[-1]),
             helper.make_node("Div", ["amax", "qmax"], ["s_tok"], name="per_token_scale")]
    for n in reversed(nodes):
        m.graph.node.insert(0, n)
    m.graph.initializer.append(_init("qmax", np.float32(127.0)))
    m.opset_import[0].version = 17                                # ReduceMax takes axes as an attribute
    _node(m, "q_act").input[1] = "s_tok"
    _node(m, "dq_act").input[1] = "s_tok"
    return m


def _int4_at_opset_19():
    m = legal_int4()
    m.opset_import[0].version = 19
    return m


def _fp8_at_opset_17():
    m = legal_fp8()
    m.opset_import[0].version = 17
    return m


def _int8_at_opset_10():
    m = legal_int8()
    m.opset_import[0].version = 10
    return m


def _missing_activation_qdq():
    m = legal_int8()
    _node(m, "gemm").input[0] = "x"
    keep = [n for n in m.graph.node if n.name not in ("q_act", "dq_act")]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def _per_channel_activation():
    m = _replace(legal_int8(), "s_a", _scales(K))
    m.graph.initializer.append(_init("zp_k", np.zeros(K, np.int8)))
    for name in ("q_act", "dq_act"):
        node = _node(m, name)
        node.input[2] = "zp_k"
        node.attribute.extend([helper.make_attribute("axis", 2)])
    return m


def _blocked_int8_weight():
    m = _replace(legal_int8(), "s_w", _scales(K // 8 * N).reshape(K // 8, N))   # blocks of 8 along K
    _node(m, "dq_w").attribute[0].i = 0
    _node(m, "dq_w").attribute.extend([helper.make_attribute("block_size", 8)])
    return m


def _int4_blocked_along_output_axis():
    m = _replace(legal_int4(), "s_w", RNG.uniform(0.01, 0.1, (N // 8, K)).astype(np.float32))
    _node(m, "dq_w").attribute[0].i = 0
    return m


def _quantize_float_weight():
    m = legal_int8()
    m.graph.initializer.append(_init("w_float", RNG.normal(size=(K, N)).astype(np.float32)))
    m.graph.initializer.append(_init("zp_w", np.zeros(N, np.int8)))
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["w_float", "s_w", "zp_w"], ["w_q2"], name="q_weight", axis=1))
    _node(m, "dq_w").input[0] = "w_q2"
    return m


def _negative_scale():
    return _replace(legal_int8(), "s_w", -_scales(N))


def _uint8_activation():
    m = legal_int8()
    for name in ("q_act", "dq_act"):
        del _node(m, name).input[2]            # no zero-point: QuantizeLinear produces UINT8
    return m


def _pair_scales_differ():
    m = legal_int8()
    m.graph.initializer.append(_init("s_other", np.float32(0.07)))
    _node(m, "dq_act").input[1] = "s_other"
    return m


def _activation_dq_into_relu():
    m = legal_int8()
    m.graph.node.insert(3, helper.make_node("Relu", ["x_dq"], ["x_relu"], name="relu"))
    _node(m, "gemm").input[0] = "x_relu"
    return m


def _weight_into_activation_input():
    m = legal_int8()
    _replace(m, "w_q", _w8((3, K)))                # [3, K]: the DQ'd weight is MatMul's A input
    gemm = _node(m, "gemm")
    gemm.input[0], gemm.input[1] = "w_dq", "x_dq"
    _replace(m, "s_w", np.float32(0.01))
    return m


def _int8_weight_with_fp8_activation():
    m = legal_int8()
    _replace(m, "zp_a", np.zeros((), ml_dtypes.float8_e4m3fn))
    return m


def _int4_activation():
    m = legal_int8()
    _replace(m, "zp_a", np.zeros((), ml_dtypes.int4))
    return m


def _dq_of_graph_input():
    m = legal_int8()
    m.graph.input.append(helper.make_tensor_value_info("x_int8", TensorProto.INT8, ["batch", "seq", K]))
    _node(m, "dq_act").input[0] = "x_int8"
    return m


def _kv_per_head_scale():
    m = _replace(legal_kv_attention(), "s_k", np.full(H, 0.02, np.float32))
    m.graph.initializer.append(_init("zp_heads", np.zeros(H, np.int8)))
    for name in ("q_k", "dq_k"):
        node = _node(m, name)
        node.input[2] = "zp_heads"
        node.attribute.extend([helper.make_attribute("axis", 1)])
    return m


def _kv_dq_through_transpose():
    """The keys' Q/DQ before the transpose to K^T: the DQ no longer feeds the batched matmul."""
    m = legal_kv_attention()
    _node(m, "q_k").input[0] = "k"
    _node(m, "transpose_k").input[0] = "k_dq"
    _node(m, "transpose_k").output[0] = "k_t2"
    _node(m, "bmm1").input[1] = "k_t2"
    nodes = sorted(m.graph.node, key=lambda n: ["q_k", "dq_k", "transpose_k"].index(n.name)
                   if n.name in ("q_k", "dq_k", "transpose_k") else 3)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _kv_int4():
    m = legal_kv_attention()
    _replace(m, "zp_v", np.zeros((), ml_dtypes.int4))
    m.opset_import[0].version = 21
    return m


ILLEGAL = {
    "kv-cache-per-head-scale": ("activation-per-tensor", "q_k", _kv_per_head_scale),
    "kv-cache-dq-through-transpose": ("activation-placement", "dq_k", _kv_dq_through_transpose),
    "kv-cache-int4": ("quantized-type", "q_v", _kv_int4),
    "activation-zero-point-nonzero": ("zero-point", "dq_act", _nonzero_act_zero_point),
    "weight-scale-on-input-axis": ("weight-axis", "dq_w", _per_channel_on_input_axis),
    "transposed-weight-scale-on-input-axis": ("weight-axis", "dq_w", _per_channel_behind_transpose_wrong_axis),
    "scale-not-initializer": ("scale-initializer", "q_act", _scale_not_initializer),
    "dynamic-per-token-scale": ("scale-initializer", "dq_act", _dynamic_per_token_scale),
    "int4-below-opset-21": ("opset", "dq_w", _int4_at_opset_19),
    "fp8-below-opset-19": ("opset", "q_act", _fp8_at_opset_17),
    "qdq-below-opset-13": ("opset", "dq_w", _int8_at_opset_10),
    "gemm-missing-activation-qdq": ("gemm-activation", "gemm", _missing_activation_qdq),
    "int8-weight-fp8-activation": ("gemm-activation", "gemm", _int8_weight_with_fp8_activation),
    "per-channel-activation": ("activation-per-tensor", "q_act", _per_channel_activation),
    "blocked-int8-weight": ("weight-block", "dq_w", _blocked_int8_weight),
    "int4-blocked-along-output-axis": ("weight-block", "dq_w", _int4_blocked_along_output_axis),
    "quantize-of-float-weight": ("weight-placement", "q_weight", _quantize_float_weight),
    "weight-into-activation-input": ("weight-placement", "dq_w", _weight_into_activation_input),
    "negative-scale": ("scale-value", "dq_w", _negative_scale),
    "uint8-activation": ("quantized-type", "q_act", _uint8_activation),
    "int4-activation": ("quantized-type", "q_act", _int4_activation),
    "pair-scales-differ": ("activation-pair", "dq_act", _pair_scales_differ),
    "dq-of-graph-input": ("activation-pair", "dq_act", _dq_of_graph_input),
    "activation-dq-into-relu": ("activation-placement", "dq_act", _activation_dq_into_relu),
}


@pytest.mark.parametrize("case", list(ILLEGAL))
def test_illegal_graph_is_refused_naming_node_and_rule(case):
    rule, node, build = ILLEGAL[case]
    model = build()
    with pytest.raises(TensorRTLegalityError) as info:
        check_tensorrt(model)
    hits = [v for v in info.value.violations if v.rule == rule and v.node == node]
    assert hits, f"expected rule {rule!r} on node {node!r}, got {[str(v) for v in info.value.violations]}"
    assert f"node {node!r}" in str(info.value) and f"rule {rule!r}" in str(info.value)
    assert tensorrt_violations(model) == info.value.violations


def test_every_rule_has_an_illegal_case():
    assert {rule for rule, _, _ in ILLEGAL.values()} == set(RULES)


def test_checker_reads_files(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(_nonzero_act_zero_point(), str(path))
    assert any(v.rule == "zero-point" for v in tensorrt_violations(path))
    with pytest.raises(TensorRTLegalityError, match="zero-point"):
        check_tensorrt(str(path))
