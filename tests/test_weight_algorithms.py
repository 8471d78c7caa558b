"""The weight-algorithm registry: algorithms found by their spec type, one per type, and every caller
(graph passes, layer-by-layer calibration) dispatching through it."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import qcompiler
from qcompiler import recipes
from qcompiler.algorithms import registry as weight_algorithms
from qcompiler.calibration.statistics import LayerStats
from qcompiler.errors import RecipeError, UnsupportedError
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.recipes import AWQSpec, GPTQSpec, Recipe, WeightSpec
from tiny_models import calibration_batches, tiny_model, token_batches
from qcompiler.algorithms.registry import WeightAlgorithm, register_weight_algorithm


@dataclasses.dataclass(frozen=True)
class HalfSpec:
    """A third party's spec: quantize the weight halved (easy to recognise)."""

    factor: float = 0.5


def _halved(fqn, w, st, recipe, spec):
    return quantize_weight(w * spec.factor, recipe.weight), f"halved x{spec.factor}"


@pytest.fixture
def registry(monkeypatch):
    """The registry and the recipes' spec types, restored after the test."""
    monkeypatch.setattr(weight_algorithms, "_ALGORITHMS", dict(weight_algorithms.registered_algorithms()))
    saved = dict(recipes.ALGORITHM_SPECS)
    yield weight_algorithms
    recipes.ALGORITHM_SPECS.clear()
    recipes.ALGORITHM_SPECS.update(saved)


def test_builtins_are_registered_by_spec_type():
    found = weight_algorithms.registered_algorithms()
    assert found[GPTQSpec].name == "gptq" and found[GPTQSpec].needs_hessian and found[GPTQSpec].input_scale is None
    assert found[AWQSpec].name == "awq" and not found[AWQSpec].needs_hessian and found[AWQSpec].input_scale
    gptq, awq, rtn = recipes.get("w4a16-gptq"), recipes.get("w4a16-awq"), recipes.get("w4a16-rtn")
    assert weight_algorithms.needs_hessian(gptq) and not weight_algorithms.needs_hessian(awq)
    assert weight_algorithms.has_input_scale(awq) and not weight_algorithms.has_input_scale(gptq)
    assert weight_algorithms.algorithm_of(rtn) is None and weight_algorithms.input_scale(None, [], rtn) == (None, None)


def test_a_registered_spec_type_is_dispatched_to_its_algorithm(registry):
    register_weight_algorithm(WeightAlgorithm("halved", HalfSpec, _halved))
    recipe = types.SimpleNamespace(name="r", weight=WeightSpec(), weight_algorithm_spec=HalfSpec(0.25))
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    qw, note = weight_algorithms.quantize_linear("l", w, None, recipe)
    assert note == "halved x0.25"
    assert torch.equal(qw.dequantize(), quantize_weight(w * 0.25, WeightSpec()).dequantize())
    assert not weight_algorithms.needs_hessian(recipe) and not weight_algorithms.has_input_scale(recipe)


def test_one_algorithm_per_spec_type_and_unknown_specs_are_refused(registry):
    with pytest.raises(ValueError, match="already registered for GPTQSpec: 'gptq'"):
        register_weight_algorithm(WeightAlgorithm("mine", GPTQSpec, _halved))
    with pytest.raises(TypeError, match="spec_type must be a dataclass type"):
        register_weight_algorithm(WeightAlgorithm("mine", dict, _halved))
    recipe = types.SimpleNamespace(name="r", weight=WeightSpec(), weight_algorithm_spec=HalfSpec())
    with pytest.raises(UnsupportedError, match="no weight algorithm is registered for HalfSpec"):
        weight_algorithms.quantize_linear("l", torch.randn(4, 8), None, recipe)


def test_scaled_stats_divides_every_statistic():
    g = torch.Generator().manual_seed(1)
    st = LayerStats(torch.rand(6, generator=g) + 1, torch.randn(3, 6, generator=g), 3, torch.rand(6, generator=g),
                    torch.eye(6) * 2)
    s = torch.rand(6, generator=g) + 0.5
    out = weight_algorithms.scaled_stats(st, s)
    assert torch.equal(out.absmax, st.absmax / s) and torch.equal(out.samples, st.samples / s)
    assert torch.equal(out.absmean, st.absmean / s) and out.tokens == 3
    assert torch.equal(out.hessian, st.hessian / (s[:, None] * s[None, :]))
    assert weight_algorithms.scaled_stats(st, None) is st


def test_a_registered_spec_is_a_recipe_weight_algorithm_that_round_trips_json(registry):
    register_weight_algorithm(WeightAlgorithm("halved", HalfSpec, _halved))
    r = Recipe(name="halved", weight_algorithm=HalfSpec(0.25))
    assert r.weight_algorithm_spec == HalfSpec(0.25) and r.gptq is None and r.awq is None
    assert "HalfSpec" in r.calibration_required_by
    text = r.to_json()
    assert '"type": "HalfSpec"' in text and Recipe.from_json(text) == r
    bad = text.replace('"type": "HalfSpec"', '"type": "NoSuchSpec"')
    with pytest.raises(RecipeError, match="unknown weight-algorithm spec 'NoSuchSpec'"):
        Recipe.from_json(bad)


def test_recipe_weight_algorithm_refuses_unregistered_specs_and_reads_builtins_through_shorthands():
    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        x: int = 1
    with pytest.raises(RecipeError, match="Unregistered, which no weight algorithm is registered for"):
        Recipe(weight_algorithm=Unregistered())
    assert Recipe(weight_algorithm=GPTQSpec()).gptq == GPTQSpec() and Recipe(weight_algorithm=GPTQSpec()).awq is None
    assert Recipe(weight=WeightSpec(dtype="int4", granularity="per_group", group_size=64),
                  weight_algorithm=AWQSpec()).awq == AWQSpec()
    with pytest.raises(TypeError, match="gptq"):      # one slot: no field of its own per algorithm
        Recipe(gptq=GPTQSpec())
    with pytest.raises(TypeError, match="frozen dataclass"):
        recipes.register_algorithm_spec(dict)


def test_the_example_third_party_algorithm_runs_through_torch_compile():
    """examples/custom_weight_algorithm.py: registered from outside the package, selected by a recipe,
    run by the compile's weight-algorithm pass on every quantized linear."""
    import importlib.util
    import sys
    from pathlib import Path
    name = "qcompiler_example_custom_weight_algorithm"
    module = sys.modules.get(name)
    if module is None:
        path = Path(__file__).resolve().parents[1] / "examples" / "custom_weight_algorithm.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    recipe = recipes.get("w4a16-rtn").replace(name="w4a16-output-clip", weight_algorithm=module.OutputClipSpec())
    assert Recipe.from_json(recipe.to_json()) == recipe
    model, x = tiny_model("llama"), token_batches(1, 12, seed=7)[0]
    torch._dynamo.reset()
    qb = qcompiler.backend(recipe, calibration=calibration_batches(), progress=False)
    with torch.no_grad():
        out = torch.compile(model, backend=qb)(x).logits
    torch._dynamo.reset()
    assert qb.report.quantized and all("output clip (" in d.note for d in qb.report.quantized)
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "weight_algorithm")
    assert stats["computed"] == len(qb.report.quantized)
    with torch.no_grad():
        ref = model(x).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    with pytest.raises(Exception, match="needs calibration data for OutputClipSpec"):
        qcompiler.backend(recipe, progress=False)
