"""torch.compile behaviour: graph breaks, recompiles and eager ``quantize`` share one calibration."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter

import pytest
import torch

import qcompiler
from qcompiler import recipes
from qcompiler.calibration.statistics import CalibrationCache
from qcompiler.core.ops import GEMM_OPS
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model, token_batches


class CountingCache(CalibrationCache):
    runs = 0

    def collect(self, model):
        if self.stats is None:
            type(self).runs += 1
        return super().collect(model)


def _gemm_count(gm) -> int:
    return sum(n.op == "call_function" and n.target in GEMM_OPS for n in gm.graph.nodes)


@pytest.mark.filterwarnings(r"ignore:graph \d+ has nothing quantizable")
def test_graph_break_quantizes_both_subgraphs_with_one_calibration():
    model = tiny_model("llama")
    model.model.layers[1].register_forward_pre_hook(lambda mod, args: torch._dynamo.graph_break())
    CountingCache.runs = 0
    cache = CountingCache(token_batches(2, 16), progress=False)
    qb = qcompiler.backend("w8a8-int8-sq", calibration=cache)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qb)
    x = token_batches(1, 8, seed=3)[0]
    with torch.no_grad():
        out = compiled(x).logits
        ref = model(x).logits
    with_gemms = [g for g in qb.graphs if _gemm_count(g) > 0]
    assert len(with_gemms) >= 2
    assert sum(_gemm_count(g) for g in qb.graphs) == len(qb.report.quantized)
    assert CountingCache.runs == 1
    quantized = {d.fqn for d in qb.report.quantized}
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"} <= quantized
    assert rel_err(out, ref) < 0.2


def test_recompile_for_a_new_shape_reuses_calibration_and_plan():
    model = tiny_model("llama")
    CountingCache.runs = 0
    qb = qcompiler.backend("w8a8-int8-sq", calibration=CountingCache(token_batches(2, 16), progress=False))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qb, dynamic=False)
    with torch.no_grad():
        compiled(token_batches(1, 8)[0])
        compiled(token_batches(1, 11)[0])
    assert len(qb.graphs) == 2 and CountingCache.runs == 1
    scales = [{n.target: n for n in g.graph.nodes if n.op == "get_attr"} for g in qb.graphs]
    first, second = (dict((k, getattr(g, k)) for k in s) for g, s in zip(qb.graphs, scales))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)   # same quantized weights and scales


@pytest.mark.parametrize("preset", ["w8a8-int8-sq", "w8a8-int8-sq-dynamic", "fp8", "w8a16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_eager_quantize_matches_the_compiled_graph(arch, preset):
    model = tiny_model(arch)
    calib = calibration_batches()
    x = token_batches(1, 10, seed=9)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qcompiler.backend(preset, calibration=calib, progress=False))
    with torch.no_grad():
        a = compiled(x).logits
    eager = qcompiler.quantize(copy.deepcopy(model), preset, calibration=calib, progress=False)
    with torch.no_grad():
        b = eager(x).logits
    assert rel_err(b, a) < 1e-4
    assert any(type(m).__name__ == "QuantizedLinear" for m in eager.modules())
    assert len(qcompiler.report(eager).quantized) == len(qcompiler.report(compiled).quantized)


@pytest.mark.parametrize("preset", ["w8a8-int8-sq", "w8a8-int8-sq-dynamic"])
def test_eager_asymmetric_int8_weights_with_int8_activations_match_the_compiled_graph(preset):
    """No fused GEMM takes weight zero points with quantized activations: the graph leaves those linears as
    Q/DQ, and the eager QuantizedLinear computes the same (it used to hand uint8 codes to the int8 GEMM,
    dropping the zero points)."""
    recipe = recipes.get(preset)
    recipe = recipe.replace(name=f"{preset}-asym", weight=dataclasses.replace(recipe.weight, symmetric=False))
    model, calib, x = tiny_model("llama"), calibration_batches(), token_batches(1, 10, seed=9)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qcompiler.backend(recipe, calibration=calib, progress=False))
    with torch.no_grad():
        a = compiled(x).logits
        plain = model(x).logits
    eager = qcompiler.quantize(copy.deepcopy(model), recipe, calibration=calib, progress=False)
    assert any(getattr(m, "w_zero", None) is not None for m in eager.modules())
    with torch.no_grad():
        b = eager(x).logits
    assert rel_err(b, a) < 1e-5 < rel_err(a, plain)


def test_generate_with_compiled_forward():
    model = tiny_model("llama")
    ref = model.generate(token_batches(1, 6)[0], max_new_tokens=5, do_sample=False)
    torch._dynamo.reset()
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=token_batches(2, 16), progress=False)
    model.forward = torch.compile(model.forward, backend=qb)
    out = model.generate(token_batches(1, 6)[0], max_new_tokens=5, do_sample=False)
    assert out.shape == ref.shape
    assert all(_gemm_count(g) > 0 for g in qb.graphs)


# --- many backends in one process: Dynamo's recompile limit ------------------------------------------
# Dynamo caches compiled code per code object and stops compiling one at config.recompile_limit (8)
# entries; each qcompiler backend is its own entry, and llama / qwen2 / mistral / gemma (and phi3)
# share one forward code object (transformers' deprecate_kwarg wrapper).

_SWEEP = [(arch, preset) for preset in ("w8a16", "w8a8-int8-sq", "fp8")
          for arch in ("llama", "qwen2", "mistral", "gemma", "gpt2")]


def _bypass_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "ran without qcompiler's backend" in str(w.message)]


def _assert_quantized(compiled, out, ref, label):
    rep = qcompiler.report(compiled)
    assert 1e-4 < rel_err(out, ref) < 0.3, label         # float logits would give exactly 0.0
    assert rep.quantized and rep.graph_runs >= 1 and rep.bypassed_calls == 0, (label, rep.summary())


def test_many_backends_in_one_process_all_quantize(one_thread):
    torch._dynamo.reset()
    calib = calibration_batches()
    x = token_batches(1, 10, seed=9)[0]
    models = [tiny_model(arch) for arch, _ in _SWEEP]
    shared = Counter(type(m).forward.__code__ for m in models).most_common(1)[0][1]
    assert shared > torch._dynamo.config.recompile_limit    # the sweep would exhaust Dynamo's limit
    done = []
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for model, (arch, preset) in zip(models, _SWEEP):
            ref = model(x).logits
            compiled = torch.compile(model, backend=qcompiler.backend(preset, calibration=calib, progress=False))
            out = compiled(x).logits
            _assert_quantized(compiled, out, ref, f"{arch} {preset}")
            done.append((compiled, out, ref, f"{arch} {preset}, run again"))
        for compiled, first, ref, label in done:     # models compiled earlier still run quantized (some recompile)
            out = compiled(x).logits
            assert rel_err(out, first) < 1e-5, label
            _assert_quantized(compiled, out, ref, label)
    assert not _bypass_warnings(caught)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:.*no calibration data, so the sensitivity fallback")
def test_calls_dynamo_runs_without_the_backend_are_reported_and_warned(one_thread):
    torch._dynamo.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=qcompiler.backend("w8a16", progress=False), dynamic=False)
    a, b = token_batches(1, 8)[0], token_batches(1, 11)[0]
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
            compiled(a)
            with pytest.warns(UserWarning, match="ran without qcompiler's backend .*eagerly.*not quantized"):
                with torch.compiler.set_stance("force_eager"):
                    compiled(a)
            with pytest.warns(UserWarning, match=r"ran without qcompiler's backend \(Dynamo hit "
                                                 r"torch._dynamo.config.recompile_limit \(1\).*not quantized"):
                out = compiled(b).logits         # a new shape needs a recompile: refused at the limit
            assert rel_err(out, model(b).logits) == 0.0
        rep = qcompiler.report(compiled)
        assert rep.graph_runs == 1 and rep.bypassed_calls == 2
        assert sum("ran without qcompiler's backend" in w for w in rep.warnings) == 2
        assert "calls that ran without the backend (not quantized): 2" in rep.summary()
    finally:
        torch._dynamo.reset()       # the refused forward stays eager-only until then


@pytest.mark.filterwarnings("ignore:.*no calibration data, so the sensitivity fallback")
def test_a_backend_dynamo_never_calls_is_reported(one_thread):
    torch._dynamo.reset()
    x = token_batches(1, 8)[0]
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
            torch.compile(tiny_model("llama"), backend="eager")(x)     # another backend fills the one slot
            model = tiny_model("llama", seed=1)
            compiled = torch.compile(model, backend=qcompiler.backend("w8a16", progress=False))
            out = compiled(x).logits
            assert rel_err(out, model(x).logits) == 0.0
            with pytest.warns(UserWarning, match="LlamaForCausalLM ran without qcompiler's backend .*recompile_limit"):
                rep = qcompiler.report(compiled)
        assert rep.graphs == 0 and "recompile_limit" in rep.warnings[-1]
        fresh = torch.compile(tiny_model("llama"), backend=qcompiler.backend("w8a16", progress=False))
        with pytest.raises(ValueError, match="has not compiled a graph .* run it once"):
            qcompiler.report(fresh)
    finally:
        torch._dynamo.reset()


def test_a_backend_shared_between_models_refuses_the_second_model():
    """The graph holds the first model's quantized weights: running it with another model's parameters
    (Dynamo's guards would let it) is an error naming the parameter, not silently mixed weights."""
    import qcompiler
    from qcompiler.errors import UnsupportedError
    from tiny_models import calibration_batches, tiny_model, token_batches
    torch._dynamo.reset()
    first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    qb = qcompiler.backend("w8a16", calibration=calibration_batches(), progress=False)
    x = token_batches(1, 12, seed=7)[0]
    with torch.no_grad():
        torch.compile(first, backend=qb)(x)
        with pytest.raises(UnsupportedError, match="create one qcompiler.backend per model"):
            torch.compile(second, backend=qb)(x)
        # the first model still runs (and the second one runs with a backend of its own)
        torch.compile(first, backend=qb)(x)
        torch.compile(second, backend=qcompiler.backend("w8a16", calibration=calibration_batches(),
                                                        progress=False))(x)
