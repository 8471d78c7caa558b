"""INT4 end to end: packed storage (ONNX's packing), the INT4 presets through torch.compile and
eager, GPTQ / AWQ in the pipeline, layer-by-layer calibration, and their errors and reports."""

from __future__ import annotations

import math

import ml_dtypes
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper

import qcompiler
from qcompiler import CalibrationError, recipes
from qcompiler.calibration.statistics import CalibrationCache
from qcompiler.calibration.layerwise import LayerwiseCalibration, find_decoder_blocks
from qcompiler.core.packing import pack_int4, unpack_int4
from qcompiler.recipes import FallbackSpec, GPTQSpec, Granularity, QuantDtype, Recipe, WeightSpec
from numerics_util import rel_err
from tiny_models import ARCHS, tiny_model, token_batches

_ops = torch.ops.qcompiler


# -- packed storage ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 33), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, signed, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8) if signed
         else torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, math.ceil(k / 2))
    assert torch.equal(unpack_int4(packed, k, signed), q)


@pytest.mark.parametrize("signed", [True, False])
def test_packing_is_onnx_int4_packing(signed):
    """For even K our bytes are exactly ONNX's INT4/UINT4 initializer bytes (no repacking on export)."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randint(-8, 8, (5, 12), generator=g, dtype=torch.int8) if signed
         else torch.randint(0, 16, (5, 12), generator=g, dtype=torch.uint8))
    onnx_t = numpy_helper.from_array(q.numpy().astype(ml_dtypes.int4 if signed else ml_dtypes.uint4))
    assert onnx_t.raw_data == pack_int4(q).numpy().tobytes()


def test_unpack_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8, True)
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 3))


@pytest.mark.parametrize("k,group,sym", [(64, 32, True), (72, 32, False), (50, 16, True), (33, 0, True)])
def test_int4_ops_match_dequantized_float(k, group, sym):
    """int4_gemm / w4a8_gemm compute with exactly the dequantized weight (fp64 reference)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(24, k, generator=g)
    spec = (WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=group, symmetric=sym) if group
            else WeightSpec(QuantDtype.INT4, Granularity.PER_CHANNEL, symmetric=sym))
    from qcompiler.core.layer_quant import quantize_weight
    qw = quantize_weight(w, spec)
    packed = qw.storage()
    wd = _ops.dequantize_int4(packed, qw.scale, qw.zero, group, k, torch.float32)
    assert torch.equal(wd, qw.dequantize())
    x = torch.randn(3, 5, k, generator=g)
    bias = torch.randn(24, generator=g)
    y = _ops.int4_gemm(x, packed, qw.scale, qw.zero, bias, group, k)
    ref = x.double() @ wd.double().t() + bias.double()
    assert rel_err(y, ref) < 1e-6
    xq, xs = _ops.quantize_per_token(x, "fp8_e4m3")
    y8 = _ops.w4a8_gemm(xq, xs, packed, qw.scale, qw.zero, bias, group, k, torch.float32)
    ref8 = (xq.double() * xs.double()) @ wd.double().t() + bias.double()
    assert rel_err(y8, ref8) < 1e-6


# -- presets through the pipeline ---------------------------------------------------------------
INT4_PRESETS = ["w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w4a8-awq", "w4a8-int8-sq-gptq"]


@pytest.mark.parametrize("preset", INT4_PRESETS)
def test_int4_presets_fuse_to_packed_gemms_and_report_bytes(preset):
    model = tiny_model("llama")
    calib, x = token_batches(4, 32), token_batches(1, 16, seed=7)[0]
    torch._dynamo.reset()
    qb = qcompiler.backend(preset, calibration=calib, progress=False)
    out = torch.compile(model, backend=qb)(x).logits
    with torch.no_grad():
        ref = model(x).logits
    assert 1e-4 < rel_err(out, ref) < 0.3
    targets = [n.target for n in qb.graphs[-1].graph.nodes if n.op == "call_function"]
    expect = _ops.w4a8_gemm if recipes.get(preset).activation is not None else _ops.int4_gemm
    assert targets.count(expect) == len(qb.report.quantized) > 0
    # stored packed: the graph holds uint8 [N, K/2] constants
    packed = [getattr(qb.graphs[-1], n.target) for n in qb.graphs[-1].graph.nodes
              if n.op == "get_attr" and n.target.endswith("_w_q")]
    assert packed and all(t.dtype == torch.uint8 for t in packed)
    for d in qb.report.quantized:
        # 4 bits per weight plus one fp32 scale per group of 64 (the last group may be partial)
        groups = math.ceil(d.in_features / 64)
        bits = 8 * d.weight_bytes_q / (d.in_features * d.out_features)
        assert bits == pytest.approx(4.0 + 32 * groups / d.in_features), (d.fqn, bits)


def test_group_size_that_does_not_divide_is_padded_and_reported():
    model = tiny_model("llama")   # hidden 64, intermediate 96
    recipe = Recipe(name="g40", weight=WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=40))
    torch._dynamo.reset()
    qb = qcompiler.backend(recipe, progress=False)
    torch.compile(model, backend=qb)(token_batches(1, 8)[0])
    notes = {d.fqn: d.note for d in qb.report.quantized}
    assert any("not a multiple of group 40" in n for n in notes.values()), notes


def test_gptq_beats_rtn_and_eager_matches_compiled():
    model = tiny_model("qwen2")
    calib, x = token_batches(8, 32), token_batches(2, 16, seed=7)
    with torch.no_grad():
        ref = torch.cat([model(i).logits for i in x])
    errs = {}
    for name in ("w4a16-rtn", "w4a16-gptq"):
        torch._dynamo.reset()
        qb = qcompiler.backend(name, calibration=calib, progress=False)
        compiled = torch.compile(model, backend=qb)
        out = torch.cat([compiled(i).logits for i in x])
        errs[name] = rel_err(out, ref)
    assert errs["w4a16-gptq"] < errs["w4a16-rtn"], errs
    torch._dynamo.reset()
    eager = qcompiler.quantize(tiny_model("qwen2"), "w4a16-gptq", calibration=calib, progress=False)
    with torch.no_grad():
        out_eager = torch.cat([eager(i).logits for i in x])
    assert rel_err(out_eager, out) < 1e-4


def test_gptq_with_fp8_weights_and_activations_runs_through_the_pipeline():
    """GPTQ on an fp8 grid (per-channel e4m3 weights, per-token e4m3 activations): stored fp8,
    fused into fp8 GEMMs, the report names GPTQ, and the output is closer than fp8 RTN's."""
    from qcompiler.recipes import ActivationSpec
    model = tiny_model("llama")
    calib, x = token_batches(8, 32), token_batches(2, 16, seed=7)
    with torch.no_grad():
        ref = torch.cat([model(i).logits for i in x])
    gptq = recipes.get("fp8-dynamic")
    assert gptq.gptq is not None and gptq.layerwise   # the preset itself runs GPTQ layer by layer
    fp8 = gptq.replace(name="fp8-dynamic-rtn", weight_algorithm=None, layerwise=False)
    errs = {}
    for recipe in (fp8, gptq):
        torch._dynamo.reset()
        qb = qcompiler.backend(recipe, calibration=calib, progress=False)
        out = torch.cat([torch.compile(model, backend=qb)(i).logits for i in x])
        errs[recipe.name] = rel_err(out, ref)
    gm = qb.graphs[-1]
    gemms = [n for n in gm.graph.nodes if n.target is _ops.fp8_gemm]
    assert gemms and all(getattr(gm, n.args[2].target).dtype is torch.float8_e4m3fn for n in gemms)
    assert any("gptq" in d.note for d in qb.report.layers.values())
    assert isinstance(gptq.activation, ActivationSpec)
    assert errs["fp8-dynamic"] < errs["fp8-dynamic-rtn"], errs


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_blocks_are_found_from_the_module_tree(arch):
    model = tiny_model(arch)
    path, blocks = find_decoder_blocks(model)
    assert len(blocks) == 2 and path.endswith(("layers", "h"))


def test_layerwise_bounds_calibration_state_and_feeds_quantized_inputs():
    model = tiny_model("llama")
    calib = token_batches(4, 32)
    recipe = recipes.get("w4a16-gptq")
    whole = CalibrationCache(calib, recipe.samples_per_layer, progress=False, hessian=True).collect(model)
    blocks_path, _ = find_decoder_blocks(model)
    # accumulated as they are held during calibration: X^T X in float64, sampled rows in float32
    whole_bytes = sum(s.hessian.numel() * 8 + s.samples.numel() * 4 for f, s in whole.items()
                      if f.startswith(blocks_path + "."))
    lw = LayerwiseCalibration(calib, recipe, progress=False)
    stats = lw.collect(model)
    block_linears = [f for f in stats if f.startswith(blocks_path + ".")]
    assert set(block_linears) == set(lw.results)
    assert all(stats[f].hessian is None for f in block_linears)    # dropped after each block
    # one block's statistics at a time: half of the two blocks' (same shapes), up to small accumulators
    assert whole_bytes / 2 <= lw.peak_state_bytes < 0.6 * whole_bytes
    assert lw.activation_bytes > 0
    # block 0 sees float inputs (identical statistics); block 1 sees block 0's quantized outputs
    first = f"{blocks_path}.0.self_attn.q_proj"
    second = f"{blocks_path}.1.self_attn.q_proj"
    assert torch.allclose(stats[first].absmax, whole[first].absmax)
    assert not torch.allclose(stats[second].absmax, whole[second].absmax)
    # the model's own weights are restored
    with torch.no_grad():
        fresh = tiny_model("llama")
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


# -- bad input ---------------------------------------------------------------------------------
def test_too_few_samples_for_a_hessian_names_the_count():
    # counted from the token ids before calibrating (a layer that still sees too few is named:
    # tests/test_errors.py::test_too_few_rows_reaching_one_layer_names_it)
    recipe = recipes.get("w4a16-gptq").replace(weight_algorithm=GPTQSpec(min_samples=1000), layerwise=False)
    with pytest.raises(CalibrationError, match=r"GPTQ needs at least 1000 calibration rows \(tokens\) per linear, got 8"):
        qcompiler.backend(recipe, calibration=token_batches(1, 8), progress=False)


def test_non_positive_definite_hessian_raises_dampening_and_reports_it():
    # one calibration token: H has rank 1; with a tiny dampening Cholesky fails and GPTQ retries
    model = tiny_model("llama")
    recipe = recipes.get("w4a16-gptq").replace(weight_algorithm=GPTQSpec(min_samples=1, dampening=1e-12), layerwise=False)
    torch._dynamo.reset()
    qb = qcompiler.backend(recipe, calibration=[torch.tensor([[5]])], progress=False)
    torch.compile(model, backend=qb)(token_batches(1, 8)[0])
    notes = [d.note for d in qb.report.quantized]
    assert any("raised from" in n for n in notes), notes


def test_int4_layer_kept_high_precision_is_reported_not_quantized():
    model = tiny_model("llama")
    recipe = recipes.get("w4a16-gptq").replace(fallback=FallbackSpec(keep_modules=("*.mlp.down_proj",)))
    torch._dynamo.reset()
    qb = qcompiler.backend(recipe, calibration=token_batches(4, 32), progress=False)
    torch.compile(model, backend=qb)(token_batches(1, 8)[0])
    kept = {d.fqn: d.reason for d in qb.report.fallbacks}
    assert all("keep_modules" in kept[f"model.layers.{i}.mlp.down_proj"] for i in range(2))
    assert not any(f.endswith("down_proj") for f in qb.last_context.analyses["weight_algorithm"])


def test_recipe_refuses_bad_algorithm_combinations():
    from qcompiler.errors import RecipeError
    from qcompiler.recipes import AWQSpec, ActivationSpec, SmoothQuantSpec
    with pytest.raises(RecipeError, match="fp8"):
        Recipe(weight=WeightSpec(QuantDtype.FP8_E4M3, Granularity.PER_CHANNEL), weight_algorithm=AWQSpec())
    # GPTQ's error compensation works for any weight grid, fp8 and per-tensor included
    Recipe(weight=WeightSpec(QuantDtype.FP8_E4M3, Granularity.PER_TENSOR), weight_algorithm=GPTQSpec())
    with pytest.raises(RecipeError, match="layerwise"):
        Recipe(layerwise=True)
    with pytest.raises(RecipeError, match="gptq.dampening"):
        GPTQSpec(dampening=0.0)
    with pytest.raises(RecipeError, match="choose one"):
        Recipe(weight=WeightSpec(), activation=ActivationSpec(), smoothquant=SmoothQuantSpec(), weight_algorithm=AWQSpec())


def test_layerwise_replays_equal_length_batches_merged_with_the_same_statistics():
    model = tiny_model("llama")
    calib = token_batches(6, 32)
    recipe = recipes.get("w4a16-gptq")
    merged = LayerwiseCalibration(calib, recipe, progress=False, replay_batch=4)
    single = LayerwiseCalibration(calib, recipe, progress=False, replay_batch=1)
    a, b = merged.collect(model), single.collect(model)
    assert a.keys() == b.keys()
    for f in a:
        assert a[f].tokens == b[f].tokens
        assert torch.allclose(a[f].absmax, b[f].absmax, rtol=1e-4, atol=1e-5), f
        assert torch.allclose(a[f].absmean, b[f].absmean, rtol=1e-4, atol=1e-6), f
