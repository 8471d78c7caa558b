"""End-to-end scale tuning (``recipe.end_to_end``, ``qcompiler.calibration.end_to_end``): at the start the effective
weights are the layer-by-layer ones bit for bit; the tuning lowers the quantized model's KL from the float model on
every tiny architecture (checked with the tuned weights written into a copy of the model, not through the tuner's
own forward), moves only the scales, and gives back the start when the probe's KL rises; the recipe field is
validated, round-trips through JSON and reaches ``qcompiler.quantize``'s report."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.calibration.end_to_end import ScaleTuning, tune_scales_end_to_end
from qcompiler.calibration.layerwise import LayerwiseCalibration
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.core.linear_probe import linear_orientation
from qcompiler.errors import RecipeError
from qcompiler.recipes import (ActivationSpec, EndToEndSpec, GPTQSpec, Granularity, QuantDtype, Recipe,
                               WeightSpec)
from numerics_util import rel_err
from tiny_models import ARCHS, calibration_batches, tiny_model

INT4_G16 = WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=16)
SPECS = [INT4_G16,
         WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=24, symmetric=False),   # K = 80: partial group
         WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL)]
TUNE = EndToEndSpec(epochs=4.0, lr=1e-2, compute_dtype="float32", probe=4)


def _recipe(end_to_end: EndToEndSpec | None = TUNE) -> Recipe:
    return Recipe(name="gptq-e2e", weight=INT4_G16, layerwise=True,
                  weight_algorithm=GPTQSpec(act_order=True, static_groups=True, min_samples=1), end_to_end=end_to_end)


def _mean_kl(float_model, quant_model, batches) -> float:
    """Mean KL(float || quantized) per position over ``batches``, float64, by plain forward calls."""
    total = 0.0
    with torch.no_grad():
        for b in batches:
            p = F.log_softmax(float_model(input_ids=b).logits.double(), -1)
            q = F.log_softmax(quant_model(input_ids=b).logits.double(), -1)
            total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(batches)


def _with_weights(model, results) -> torch.nn.Module:
    """A copy of ``model`` with each result's effective weight written into its module (AWQ input scale divided out)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, r in results.items():
            module = out.get_submodule(fqn)
            param, transposed = linear_orientation(module, r.qweight.shape[1])
            w = r.qweight.dequantize()
            if r.scale is not None:
                w = w / r.scale[None, :]
            param.copy_(w.t() if transposed else w)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=["int4-g16", "uint4-g24", "int8-channel"])
@pytest.mark.parametrize("input_scale", [False, True], ids=["plain", "awq-scale"])
def test_start_is_the_layer_by_layer_weight(spec, input_scale):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 80, generator=g)
    s = 0.5 + torch.rand(80, generator=g) if input_scale else None
    qw = quantize_weight(w, spec)
    t = ScaleTuning(qw, s, torch.device("cpu"))
    want = qw.dequantize() if s is None else qw.dequantize() / s[None, :]
    assert rel_err(t.weight().detach().double(), want.double()) < 1e-6
    back = t.tuned()
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.q, qw.q)
    assert (back.zero is None) == (qw.zero is None) and (qw.zero is None or torch.equal(back.zero, qw.zero))


@pytest.mark.parametrize("arch", ARCHS)
def test_tuning_lowers_the_kl_and_moves_only_scales(arch):
    model, batches = tiny_model(arch), calibration_batches()
    plain = LayerwiseCalibration(batches, _recipe(None), progress=False)
    plain.collect(model)
    tuned = LayerwiseCalibration(batches, _recipe(), progress=False)
    tuned.collect(model)
    summary = tuned.end_to_end
    assert summary is not None and summary.kept, summary
    assert summary.kl_after < summary.kl_before
    assert plain.results.keys() == tuned.results.keys() and plain.results
    moved = 0
    for f, r in tuned.results.items():
        a, b = plain.results[f].qweight, r.qweight
        assert torch.equal(a.q, b.q) and (a.zero is None or torch.equal(a.zero, b.zero)), f
        assert torch.all(b.scale > 0), f
        moved += not torch.equal(a.scale, b.scale)
        assert "scales tuned end to end" in r.note
    assert moved == len(tuned.results)
    # the tuned weights, written into a copy of the model, are closer to the float model on the calibration text
    assert _mean_kl(model, _with_weights(model, tuned.results), batches) \
        < _mean_kl(model, _with_weights(model, plain.results), batches)
    # the teacher is untouched: the model computes what it did (float weights back in place)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_the_start_comes_back_when_the_probe_kl_rises():
    model, batches = tiny_model("llama"), calibration_batches()
    cal = LayerwiseCalibration(batches, _recipe(None), progress=False)
    cal.collect(model)
    qweights = {f: (r.qweight, r.scale) for f, r in cal.results.items()}
    wild = EndToEndSpec(epochs=1.0, lr=0.9, compute_dtype="float32", probe=4)    # steps of ~90% of each scale
    out, summary = tune_scales_end_to_end(model, qweights, batches, wild, progress=False)
    assert not summary.kept and summary.kl_after >= summary.kl_before
    assert all(out[f] is qweights[f][0] for f in qweights)
    assert "not kept" in summary.text()


def test_bfloat16_steps_also_lower_the_kl():
    model, batches = tiny_model("llama"), calibration_batches()
    cal = LayerwiseCalibration(batches, _recipe(dataclasses.replace(TUNE, compute_dtype="bfloat16")), progress=False)
    cal.collect(model)
    assert cal.end_to_end.kept and cal.end_to_end.kl_after < cal.end_to_end.kl_before


def test_recipe_rules_and_json_round_trip():
    recipe = _recipe()
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(RecipeError, match="layerwise=True"):
        Recipe(name="x", weight=INT4_G16, weight_algorithm=GPTQSpec(), end_to_end=EndToEndSpec())
    with pytest.raises(RecipeError, match="weight-only"):
        Recipe(name="x", weight=WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL), layerwise=True,
               weight_algorithm=GPTQSpec(), activation=ActivationSpec(), end_to_end=EndToEndSpec())
    with pytest.raises(RecipeError, match="EndToEndSpec"):
        dataclasses.replace(recipe, end_to_end={"epochs": 1})
    for bad in (dict(epochs=0), dict(epochs=-1.0), dict(lr=0.0), dict(lr=1.5), dict(compute_dtype="float16"),
                dict(probe=0), dict(seed=-1), dict(epochs="1")):
        with pytest.raises(RecipeError, match="end_to_end"):
            EndToEndSpec(**bad)


def test_quantize_reports_the_tuning():
    model = tiny_model("llama")
    qcompiler.quantize(model, _recipe(), calibration=calibration_batches(), progress=False)
    report = qcompiler.report(model)
    assert "tuned end to end" in report.end_to_end and "probe KL" in report.end_to_end
    assert report.end_to_end in report.summary()
    assert report.to_dict()["end_to_end"] == report.end_to_end
