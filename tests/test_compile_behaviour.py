"""torch.compile behaviour: graph breaks, recompiles and eager ``quantize`` share one calibration."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompiler
from qcompiler.calibration import CalibrationCache
from qcompiler.ops import GEMM_OPS
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


@pytest.mark.filterwarnings("ignore:graph 0 has nothing quantizable")
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


def test_generate_with_compiled_forward():
    model = tiny_model("llama")
    ref = model.generate(token_batches(1, 6)[0], max_new_tokens=5, do_sample=False)
    torch._dynamo.reset()
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=token_batches(2, 16), progress=False)
    model.forward = torch.compile(model.forward, backend=qb)
    out = model.generate(token_batches(1, 6)[0], max_new_tokens=5, do_sample=False)
    assert out.shape == ref.shape
    assert all(_gemm_count(g) > 0 for g in qb.graphs)
