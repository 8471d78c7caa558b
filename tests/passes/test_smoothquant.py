"""SmoothQuant folding keeps float outputs unchanged, and folds where the graph allows."""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler.passes import InsertQDQ, planning_passes
from qcompiler.passes.smoothquant import smoothing_scale
from qcompiler.pipeline import PassResult
from qcompiler.recipes import SmoothQuantSpec
from numerics_util import rel_err
from tiny_models import ARCHS, tiny_model, token_batches


class KeepEverythingFloat:
    """Test pass: after planning, keep every linear in float, so only the folding changes the graph."""

    name = "keep_everything_float"
    requires = ("sensitivity_fallback",)

    def run(self, gm, ctx):
        for d in ctx.layer_plan.values():
            d.quantize, d.reason = False, "test"
        return PassResult(gm, False, {})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_folded_float_graph_matches_the_original(arch, alpha):
    model = tiny_model(arch)
    recipe = qcompiler.recipes.get("w8a8-int8-sq").replace(smoothquant=SmoothQuantSpec(alpha=alpha))
    qb = qcompiler.backend(recipe, calibration=token_batches(2, 16), progress=False)

    def be(gm, example_inputs):
        return qb.run_passes(gm, example_inputs, planning_passes() + [KeepEverythingFloat(), InsertQDQ()])

    x = token_batches(1, 12, seed=4)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x).logits
        ref = model(x).logits
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "smoothquant_fold")
    assert stats["groups"] >= 2 * model.config.num_hidden_layers
    assert stats["folded_into_norm"] >= model.config.num_hidden_layers   # at least one norm per layer
    assert rel_err(out, ref) < 1e-5


def test_gated_mlp_folds_into_the_up_projection():
    model = tiny_model("llama")
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=token_batches(2, 16), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=qb)(token_batches(1, 8)[0])
    plan = qb.report.layers
    for i in range(2):
        down = plan[f"model.layers.{i}.mlp.down_proj"]
        if down.quantize:
            assert down.smoothing == f"linear:model.layers.{i}.mlp.up_proj"
        assert plan[f"model.layers.{i}.self_attn.q_proj"].smoothing == f"norm:model.layers.{i}.input_layernorm"
        assert plan[f"model.layers.{i}.self_attn.o_proj"].smoothing == "explicit"


def test_smoothing_scale_formula():
    x = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scale(x, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0   # zero channels are clamped, never 0 or inf
