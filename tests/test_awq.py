"""AWQ: scale search (alpha grid, duo scaling, shared inputs) and clipping search."""

from __future__ import annotations

import pytest
import torch

from qcompiler.algorithms import awq
from qcompiler.errors import CalibrationError, UnsupportedError
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.recipes import WeightSpec
from numerics_util import rel_err

SPECS = [WeightSpec("int4", "per_group", 32), WeightSpec("int4", "per_group", 24, symmetric=False),
         WeightSpec("int4", "per_channel"), WeightSpec("int8", "per_channel", symmetric=False)]
IDS = ["int4-g32", "uint4-g24", "int4-channel", "uint8-channel"]
K = 80   # 80 = 2 * 32 + 16 and 3 * 24 + 8: partial last groups


def _outlier_inputs(rows: int, seed: int) -> torch.Tensor:
    """Activations with a few salient channels 30x larger, as in LLM norms' outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    x[:, [5, 37, 70]] *= 30.0
    return x


def _weights(shapes, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, K, generator=g) / K ** 0.5 for n in shapes]


def _awq_output(x, w, s, spec, max_val=None):
    """What the deployed linear computes: the preceding op divides by s, the weight is Q(w s)."""
    qw = quantize_weight(w * s, spec) if max_val is None else awq.quantize_with_clip(w * s, max_val, spec)
    return (x / s) @ qw.dequantize().T


def _mse(y, ref) -> float:
    return float((y.double() - ref.double()).pow(2).mean())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_alpha_zero_is_round_to_nearest_exactly(spec):
    x, (w,) = _outlier_inputs(256, 0), _weights([24])
    s, info = awq.awq_search_scales(x, [w], spec, grid=1)          # the grid is {0}
    assert torch.equal(s, torch.ones(K)) and info.alphas == (0.0,)
    assert torch.equal(quantize_weight(w * s, spec).q, quantize_weight(w, spec).q)
    assert info.losses[0] == pytest.approx(_mse(x @ quantize_weight(w, spec).dequantize().T, x @ w.T), rel=1e-6)


@pytest.mark.parametrize("duo_scaling", [False, True])
@pytest.mark.parametrize("spec", SPECS[:3], ids=IDS[:3])
def test_awq_scales_beat_rtn_on_outlier_channels(spec, duo_scaling):
    x, held_out = _outlier_inputs(512, 0), _outlier_inputs(512, 9)
    weights = _weights([32, 16, 16])                                 # q, k, v sharing one input
    s, info = awq.awq_search_scales(x, weights, spec, duo_scaling=duo_scaling)
    assert s.shape == (K,) and torch.isfinite(s).all() and info.alpha > 0
    assert info.loss == min(info.losses) and len(info.losses) == 20
    for rows in (x, held_out):
        ref = torch.cat([rows @ w.T for w in weights], -1)
        rtn = torch.cat([rows @ quantize_weight(w, spec).dequantize().T for w in weights], -1)
        scaled = torch.cat([_awq_output(rows, w, s, spec) for w in weights], -1)
        assert _mse(scaled, ref) < 0.5 * _mse(rtn, ref), (_mse(scaled, ref), _mse(rtn, ref))
    # the salient channels get the largest scales
    assert set(s.topk(3).indices.tolist()) == {5, 37, 70}


def test_scale_search_loss_is_the_concatenated_output_mse_of_every_weight():
    x, weights = _outlier_inputs(256, 1), _weights([12, 20, 8])
    spec = SPECS[1]
    s, info = awq.awq_search_scales(x, weights, spec, grid=4)
    assert info.alphas == (0.0, 0.25, 0.5, 0.75)
    ref = torch.cat([x @ w.T for w in weights], -1)
    assert info.loss == pytest.approx(_mse(torch.cat([_awq_output(x, w, s, spec) for w in weights], -1), ref),
                                      rel=1e-4)
    # every candidate's loss is its own: recompute alpha = 0.5's
    s_half = x.abs().mean(0).pow(0.5)
    s_half = s_half / (s_half.max() * s_half.min()).sqrt()
    out_half = torch.cat([_awq_output(x, w, s_half, spec) for w in weights], -1)
    assert info.losses[2] == pytest.approx(_mse(out_half, ref), rel=1e-4)


def test_custom_forward_is_the_searched_objective():
    x, (w_gate, w_up) = _outlier_inputs(256, 2), _weights([16, 16])
    calls = []

    def gated_mlp(rows, weights):
        calls.append(len(weights))
        gate, up = weights
        return torch.nn.functional.silu(rows @ gate.T) * (rows @ up.T)

    spec = SPECS[0]
    s, info = awq.awq_search_scales(x, [w_gate, w_up], spec, grid=5, forward=gated_mlp)
    assert calls == [2] * 6                                       # reference + 5 candidates
    ref = gated_mlp(x, [w_gate, w_up])
    deployed = [quantize_weight(w * s, spec).dequantize() / s for w in (w_gate, w_up)]
    assert info.loss == pytest.approx(_mse(gated_mlp(x, deployed), ref), rel=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_clip_search_never_worse_per_group_than_no_clipping(spec):
    x = _outlier_inputs(512, 3)
    w = _weights([40])[0]
    w[3, 10] = 1.5                                                # a weight outlier worth clipping
    max_val = awq.awq_search_clip(x, w, spec)
    g = spec.group_size or K
    groups = -(-K // g)
    assert max_val.shape == (40, groups)
    absmax = torch.nn.functional.pad(w.abs(), (0, groups * g - K)).view(40, groups, g).amax(-1)
    assert (max_val <= absmax).all() and (max_val >= 0.5 * absmax - 1e-6).all()

    def group_errors(wq):                                        # [N, G] partial-output MSE
        errs = []
        for j in range(groups):
            sl = slice(j * g, min(K, (j + 1) * g))
            errs.append((x[:, sl] @ (wq[:, sl] - w[:, sl]).T).double().pow(2).mean(0))
        return torch.stack(errs, 1)

    clipped = awq.quantize_with_clip(w, max_val, spec)
    unclipped = awq.quantize_with_clip(w, absmax, spec)
    assert torch.equal(unclipped.q, quantize_weight(w, spec).q)             # no clip == RTN minmax
    assert torch.equal(unclipped.scale, quantize_weight(w, spec).scale)
    e_clip, e_none = group_errors(clipped.dequantize()), group_errors(unclipped.dequantize())
    assert (e_clip <= e_none * (1 + 1e-5) + 1e-12).all()
    assert (max_val < absmax).any() and e_clip.sum() < e_none.sum()
    assert rel_err(x @ clipped.dequantize().T, x @ w.T) < rel_err(x @ unclipped.dequantize().T, x @ w.T)


def test_scales_then_clip_on_the_scaled_problem():
    x, (w,) = _outlier_inputs(512, 4), _weights([24])
    spec = SPECS[0]
    s, _ = awq.awq_search_scales(x, [w], spec)
    max_val = awq.awq_search_clip(x / s, w * s, spec)
    ref = x @ w.T
    both = _awq_output(x, w, s, spec, max_val)
    assert _mse(both, ref) <= _mse(_awq_output(x, w, s, spec), ref) * 1.01
    assert _mse(both, ref) < _mse(x @ quantize_weight(w, spec).dequantize().T, ref)


def test_bad_inputs_are_refused():
    x, (w,) = _outlier_inputs(16, 5), _weights([8])
    with pytest.raises(CalibrationError, match="80 features"):
        awq.awq_search_scales(torch.randn(4, 79), [w], SPECS[0], layer_name="mlp")
    with pytest.raises(ValueError, match=r"\[N, 80\]"):
        awq.awq_search_scales(x, [w, torch.randn(4, 79)], SPECS[0])
    with pytest.raises(CalibrationError, match="NaN"):
        awq.awq_search_scales(torch.full((4, K), float("nan")), [w], SPECS[0])
    with pytest.raises(UnsupportedError, match="per_tensor"):
        awq.awq_search_clip(x, w, WeightSpec("int8", "per_tensor"))
    with pytest.raises(ValueError, match="max_val must have shape"):
        awq.quantize_with_clip(w, torch.ones(8, 2), SPECS[0])
