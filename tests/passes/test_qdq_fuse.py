"""Q/DQ insertion then fusion: node counts and order, pt2e style."""

from __future__ import annotations


import pytest
import torch

import qcompiler
from qcompiler.passes import Annotate, Calibrate, FallbackRules, InsertQDQ, OutlierAnalysis, SensitivityFallback, \
    SmoothQuantFold, FuseQuantizedGemm
from tiny_models import calibration_batches, tiny_model, token_batches

ops = torch.ops.qcompiler


def _run(preset: str, passes):
    model = tiny_model("llama")
    qb = qcompiler.backend(preset, calibration=calibration_batches(), progress=False)

    def be(gm, example_inputs):
        return qb.run_passes(gm, example_inputs, passes)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=be)(token_batches(1, 8)[0])
    gm = qb.graphs[-1]
    return [n.target for n in gm.graph.nodes if n.op == "call_function"], qb


PLAN = [Annotate(), Calibrate(), OutlierAnalysis(), FallbackRules(), SmoothQuantFold(), SensitivityFallback()]


@pytest.mark.parametrize("preset,act_q", [("w8a8-int8-naive", ops.quantize), ("w8a8-int8-sq-dynamic", ops.quantize_per_token),
                                          ("w8a16", None)])
def test_qdq_inserts_one_pattern_per_quantized_linear(preset, act_q):
    targets, qb = _run(preset, PLAN + [InsertQDQ()])
    n_q = len(qb.report.quantized)
    shared = next(p["stats"] for p in qb.report.passes if p["name"] == "insert_qdq")["shared_activation_quantizers"]
    assert targets.count(ops.dequantize) == n_q + (0 if act_q is None else n_q - shared)
    if act_q is not None:
        assert targets.count(act_q) == n_q - shared
        assert shared > 0       # q / k / v read one tensor (and gate / up another)
    else:
        assert shared == 0
    linears = [t for t in targets if t is torch.nn.functional.linear]
    assert len(linears) == len(qb.report.layers)   # quantized ones, plus the float head and any fallback
    assert ops.int8_gemm not in targets


@pytest.mark.parametrize("preset,gemm", [("w8a8-int8-naive", ops.int8_gemm), ("w8a8-int8-sq-dynamic", ops.int8_gemm),
                                         ("fp8", ops.fp8_gemm), ("fp8-dynamic", ops.fp8_gemm),
                                         ("w8a16", ops.weight_only_gemm)])
def test_fusion_leaves_only_quantized_gemms(preset, gemm):
    targets, qb = _run(preset, PLAN + [InsertQDQ(), FuseQuantizedGemm()])
    n_q = len(qb.report.quantized)
    assert targets.count(gemm) == n_q
    assert ops.dequantize not in targets    # every DQ was absorbed into a GEMM
    assert sum(t is torch.nn.functional.linear for t in targets) == len(qb.report.fallbacks)   # float head, fallbacks
    # order: each activation quantize sits right before its GEMM's use
    if gemm is not ops.weight_only_gemm:
        q = ops.quantize_per_token if "dynamic" in preset else ops.quantize
        shared = next(p["stats"] for p in qb.report.passes if p["name"] == "insert_qdq")["shared_activation_quantizers"]
        assert targets.count(q) == n_q - shared
        first_q, first_gemm = targets.index(q), targets.index(gemm)
        assert first_q < first_gemm
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "fuse")
    assert sum(stats.values()) == n_q


@pytest.mark.parametrize("preset", ["w8a8-int8-naive", "fp8", "w8a8-int8-sq-dynamic"])
def test_linears_share_an_activation_quantizer_only_for_one_input_and_one_scale(preset):
    """One quantizer per (input tensor, scale): every linear behind a shared quantizer reads that
    quantizer's input, and (static) its own calibrated scale equals the shared one."""
    _, qb = _run(preset, PLAN + [InsertQDQ()])
    gm = qb.graphs[-1]
    quantizers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (ops.quantize, ops.quantize_per_token)]
    sharing = 0
    for qn in quantizers:
        readers = [u for u in qn.users] if qn.target is ops.quantize else [g for u in qn.users for g in u.users]
        linears = {lin for dq in readers for lin in dq.users}
        assert linears and all(lin.target is torch.nn.functional.linear for lin in linears)
        sharing += len(linears) > 1
        if qn.target is ops.quantize:
            scale = float(getattr(gm, qn.args[1].target))
            fqns = [lin.meta[qcompiler.pipeline.META_KEY].fqn for lin in linears]
            assert all(qb.report.layers[f].act_scale == pytest.approx(scale, rel=0, abs=0) for f in fqns)
    assert sharing > 0
