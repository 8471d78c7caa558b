"""Scale refitting with the codes fixed (``qcompiler.algorithms.scale_refit``, ``GPTQSpec.scale_refit``): each row's
scales are the least-squares optimum of the layer's output error (checked against ``torch.linalg.lstsq`` on the
inputs themselves, float64), no row's error rises, codes and zero-points are kept, and GPTQ's rounds lower the
Hessian error of a correlated problem; the recipe field is validated and reaches a layer-by-layer run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcompiler.algorithms.gptq import gptq_quantize
from qcompiler.algorithms.scale_refit import refit_scales, row_errors
from qcompiler.calibration.layerwise import LayerwiseCalibration
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.errors import RecipeError
from qcompiler.recipes import Calibrator, GPTQSpec, Granularity, QuantDtype, Recipe, WeightSpec
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model

SPECS = [
    WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=16),
    WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=24, symmetric=False),   # K = 80: partial group
    WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL),
]
IDS = ["int4-g16", "uint4-g24", "int8-channel"]


def _problem(n: int = 12, k: int = 80, rows: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64)
         + torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5)) * (1 + 3 * torch.rand(k, generator=g))
    w = torch.randn(n, k, generator=g) / k ** 0.5
    return x, w, x.T @ x


def _lstsq_scales(qw, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row's scales minimizing ``||x w_n - x (c_n * s_n)||`` by least squares on x itself: the design matrix's
    column g is ``x[:, group g] @ c_n[group g]``."""
    c = qw.q.double() if qw.zero is None else qw.q.double() - qw.zero.double().repeat_interleave(
        qw.group_size or qw.q.shape[1], dim=1)[:, :qw.q.shape[1]]
    n, k = c.shape
    n_groups = qw.scale.shape[1]
    g = qw.group_size or k
    out = torch.empty(n, n_groups, dtype=torch.float64)
    for r in range(n):
        design = torch.stack([x[:, j * g:(j + 1) * g] @ c[r, j * g:(j + 1) * g] for j in range(n_groups)], dim=1)
        out[r] = torch.linalg.lstsq(design, (x @ w[r].double())[:, None]).solution[:, 0]
    return out


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_refitted_scales_are_the_least_squares_optimum_and_keep_the_codes(spec):
    x, w, h = _problem()
    qw = quantize_weight(w, spec)
    refitted, removed = refit_scales(qw, w, h)
    assert torch.equal(refitted.q, qw.q)
    assert (refitted.zero is None) == (qw.zero is None) and (qw.zero is None or torch.equal(refitted.zero, qw.zero))
    assert rel_err(refitted.scale.double(), _lstsq_scales(qw, w, x)) < 1e-6
    before, after = row_errors(qw, w, h), row_errors(refitted, w, h)
    assert (after <= before).all() and after.sum() < before.sum()
    assert removed == pytest.approx(float(1 - after.sum() / before.sum()), rel=1e-6)


def test_a_group_of_zero_codes_keeps_its_scale_and_the_others_are_fitted():
    x, w, h = _problem(k=48)
    spec = WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=16)
    qw = quantize_weight(w, spec)
    qw = dataclasses.replace(qw, q=qw.q.clone())
    qw.q[:, 16:32] = 0
    refitted, _ = refit_scales(qw, w, h)
    assert torch.equal(refitted.scale[:, 1], qw.scale[:, 1])
    assert not torch.equal(refitted.scale[:, 0], qw.scale[:, 0])
    assert (row_errors(refitted, w, h) <= row_errors(qw, w, h)).all()


def test_per_tensor_scales_are_refused():
    x, w, h = _problem()
    qw = quantize_weight(w, WeightSpec(QuantDtype.INT8, Granularity.PER_TENSOR))
    with pytest.raises(ValueError, match="per-channel or per-group"):
        refit_scales(qw, w, h)
    with pytest.raises(ValueError, match="scale_refit needs per-channel or per-group"):
        gptq_quantize(w, h.float(), WeightSpec(QuantDtype.INT8, Granularity.PER_TENSOR), n_samples=400, scale_refit=1)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gptq_rounds_lower_the_hessian_error_and_stay_in_range(spec):
    x, w, h = _problem(n=32, rows=1000)
    spec = dataclasses.replace(spec, calibrator=Calibrator.MSE)
    errors = []
    for rounds in range(4):
        qw, info = gptq_quantize(w, h.float(), spec, n_samples=1000, act_order=True, static_groups=True,
                                 scale_refit=rounds)
        err = float(row_errors(qw, w, h).sum())
        if rounds:
            assert info.loss == pytest.approx(err, rel=1e-6)
        errors.append(err)
        lo, hi = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127)}[qw.dtype]
        assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    assert errors[1] < errors[0] and errors[2] <= errors[1] and errors[3] <= errors[2]


def test_the_recipe_field_is_checked():
    with pytest.raises(RecipeError, match="non-negative integer"):
        GPTQSpec(scale_refit=-1)
    with pytest.raises(RecipeError, match="non-negative integer"):
        GPTQSpec(scale_refit=True)
    with pytest.raises(RecipeError, match="per_channel or per_group"):
        Recipe(name="x", weight=WeightSpec(QuantDtype.INT8, Granularity.PER_TENSOR), layerwise=True,
               weight_algorithm=GPTQSpec(scale_refit=1))
    recipe = Recipe(name="x", weight=SPECS[0], layerwise=True, weight_algorithm=GPTQSpec(scale_refit=2))
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_layer_by_layer_gptq_with_refit_lowers_each_linears_hessian_error():
    def run(rounds: int):
        recipe = Recipe(name="gptq", weight=SPECS[0], layerwise=True,
                        weight_algorithm=GPTQSpec(act_order=True, static_groups=True, min_samples=1,
                                                  scale_refit=rounds))
        cal = LayerwiseCalibration(calibration_batches(), recipe, progress=False)
        stats = cal.collect(tiny_model("llama"))
        return cal.results, stats
    plain, _ = run(0)
    refit, stats = run(1)
    assert plain.keys() == refit.keys() and plain
    first = next(f for f in sorted(plain) if ".0." in f)    # block 0 reads the same inputs in both runs
    assert torch.equal(plain[first].qweight.q, refit[first].qweight.q)
    assert not torch.equal(plain[first].qweight.scale, refit[first].qweight.scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_one_round_returns_the_refit_of_gptqs_own_result(act_order):
    """Round 1 never raises the error, so it is what comes back, with or without activation order (the baseline
    error is taken with H in the weight's own column order)."""
    x, w, h = _problem(n=32, rows=1000)
    spec = dataclasses.replace(SPECS[0], calibrator=Calibrator.MSE)
    kw = dict(n_samples=1000, act_order=act_order, static_groups=True)
    plain, _ = gptq_quantize(w, h.float(), spec, **kw)
    once, _ = gptq_quantize(w, h.float(), spec, scale_refit=1, **kw)
    expected, _ = refit_scales(plain, w, h.float().double())
    assert torch.equal(once.q, plain.q)
    assert torch.equal(once.scale, expected.scale)
