"""SmoothQuant / AWQ scales go into the norms that feed the scaled linears (``qcompiler.runtime.norm_fold``):
``qcompiler.quantize`` leaves no scale at a linear's input that a norm can hold, refolds Gemma's ``1 + w``
gain, and keeps the scale at the input (with the reason) where folding would change another reader."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import qcompiler
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.runtime.norm_fold import folded_norm_params

from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model


def _randomized(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(-0.5, 1.5)
    return norm


class _SquaredGain(nn.Module):
    """A norm whose output is not linear in its parameter."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, n))

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True) * self.weight ** 2


@pytest.mark.parametrize("make", [lambda: LlamaRMSNorm(32), lambda: GemmaRMSNorm(32), lambda: nn.LayerNorm(32)],
                         ids=["rmsnorm", "gemma-1+w", "layernorm"])
def test_a_folded_norm_scales_its_output(make):
    norm = _randomized(make())
    inv = torch.linspace(0.25, 4.0, 32)
    x = torch.randn(8, 32)
    original = copy.deepcopy(norm)
    params = folded_norm_params(norm, inv)
    assert isinstance(params, dict)
    assert all(torch.equal(p, q) for p, q in zip(norm.parameters(), original.parameters()))   # left unchanged
    folded = copy.deepcopy(norm)
    with torch.no_grad():
        for k, v in params.items():
            getattr(folded, k).copy_(v)
    assert rel_err(folded(x), norm(x) * inv) < 1e-5
    assert not torch.equal(folded.weight, norm.weight)


def test_a_norm_not_linear_in_its_gain_is_refused_with_the_reason():
    why = folded_norm_params(_SquaredGain(32), torch.linspace(0.25, 4.0, 32))
    assert isinstance(why, str) and "not linear in its parameters" in why


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_quantize_folds_smoothquant_scales_into_the_norms(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("norm.weight")}
    qcompiler.quantize(model, "w8a8-int8-sq", calibration=calibration_batches(), progress=False)
    report = qcompiler.report(model)
    folded = {d.smoothing[len("norm:"):] for d in report.layers.values() if d.smoothing.startswith("norm:")}
    assert folded, "SmoothQuant folded no scale into a norm"
    for fqn, d in report.layers.items():
        m = model.get_submodule(fqn)
        if d.smoothing.startswith("norm:") and isinstance(m, QuantizedLinear):
            assert m.inv_smooth is None, fqn
    after = model.state_dict()
    assert all(not torch.equal(after[f"{n}.weight"], before[f"{n}.weight"]) for n in folded)


class _SharedNorm(nn.Module):
    """One norm module called at two places: before a linear, and straight into the residual."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Embedding(64, 32), _randomized(LlamaRMSNorm(32))
        self.a, self.head = nn.Linear(32, 32), nn.Linear(32, 64)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        x = x + self.a(self.norm(x))
        return self.head(x + self.norm(x))


def test_a_norm_called_at_two_places_keeps_the_scale_at_its_linears_input():
    torch.manual_seed(0)
    model = _SharedNorm()
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(4)]
    want = model(batches[0]).detach()
    qcompiler.quantize(model, "w8a8-int8-sq", calibration=batches, progress=False)
    d = qcompiler.report(model).layers["a"]
    assert d.quantize and d.smoothing == "explicit" and "calls this norm module at 2 places" in d.note
    assert model.a.inv_smooth is not None
    with torch.no_grad():     # folding into the shared norm would also scale the residual (error ~0.4)
        assert rel_err(model(batches[0]), want) < 0.02
