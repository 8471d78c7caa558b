"""``ActQuantWeight``: a weight read outside a linear module (fused experts) whose matrix products quantize their
other operand per token, whichever product the experts implementation runs (``F.linear`` on one expert, a grouped
GEMM on the transposed tensor, a batched GEMM either way round); views of it stay wrapped."""

from __future__ import annotations

import pytest
import torch

from qcompiler.core import numerics
from qcompiler.core.expert_activations import ActQuantWeight
from qcompiler.recipes import ActivationSpec, Granularity, QuantDtype

_SPECS = [ActivationSpec(QuantDtype.INT8), ActivationSpec(QuantDtype.FP8_E4M3)]


def _per_token(x: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """The reference: one dynamic scale per row of ``x``'s last dimension."""
    q, s = numerics.quantize_per_token(x, spec.dtype.value)
    return numerics.dequantize(q, s, None, x.dtype)


def _weights(spec):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 24, 32, generator=g)
    x = torch.randn(10, 32, generator=g) * torch.logspace(-2, 1, 32)   # rows of very different ranges
    return w, ActQuantWeight(w, spec), x


@pytest.mark.parametrize("spec", _SPECS, ids=lambda s: s.dtype.value)
def test_every_product_quantizes_the_tokens_of_its_other_operand(spec):
    w, aw, x = _weights(spec)
    xq = _per_token(x, spec)
    assert not torch.equal(xq, x)
    F = torch.nn.functional
    assert torch.equal(F.linear(x, aw[1]), F.linear(xq, w[1]))                       # the eager loop
    assert torch.equal(F.linear(x, aw[1], torch.ones(24)), F.linear(xq, w[1], torch.ones(24)))
    assert torch.equal(x @ aw[2].t(), xq @ w[2].t())
    assert torch.equal(torch.mm(x, aw[2].t()), torch.mm(xq, w[2].t()))
    idx = torch.tensor([0, 3, 3, 1, 2, 0, 1, 1, 2, 3])
    # the batched GEMM, transposed layout (x as [T, 1, K]) and plain layout (W @ x as [T, K, 1])
    assert torch.equal(torch.bmm(x[:, None], aw[idx].transpose(1, 2)), torch.bmm(xq[:, None], w[idx].transpose(1, 2)))
    assert torch.equal(torch.bmm(aw[idx], x[:, :, None]), torch.bmm(w[idx], xq[:, :, None]))
    assert torch.equal(aw[2] @ x[0], w[2] @ _per_token(x[0], spec))                    # one token, as a vector
    # the grouped GEMM over rows sorted by expert
    offs = torch.tensor([2, 5, 7, 10], dtype=torch.int32)
    got = torch._grouped_mm(x, aw.transpose(-2, -1), offs=offs)
    assert torch.equal(got, torch._grouped_mm(xq, w.transpose(-2, -1), offs=offs))


def test_views_stay_wrapped_and_other_ops_read_the_float_tensor():
    w, aw, x = _weights(_SPECS[0])
    for view, want in [(aw[1], w[1]), (aw.transpose(-2, -1), w.transpose(-2, -1)),
                       (aw[torch.tensor([2, 0])], w[torch.tensor([2, 0])]), (aw.detach(), w), (aw[:, :3], w[:, :3])]:
        assert isinstance(view, ActQuantWeight) and torch.equal(view.dense, want)
    plain = aw + 1
    assert type(plain) is torch.Tensor and torch.equal(plain, w + 1)
    with torch.inference_mode():     # a wrapper made outside inference mode, viewed and multiplied inside it
        out = torch.nn.functional.linear(x, aw[3].t().t())
    assert torch.equal(out, torch.nn.functional.linear(_per_token(x, _SPECS[0]), w[3]))


def test_static_activation_scales_are_refused():
    with pytest.raises(ValueError, match="static scale"):
        ActQuantWeight(torch.zeros(2, 2), ActivationSpec(QuantDtype.INT8, Granularity.PER_TENSOR))
