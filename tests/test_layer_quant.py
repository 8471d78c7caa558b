"""Weight quantization storage, calibrators and static activation scales."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcompiler.core import layer_quant
from qcompiler.errors import RecipeError
from qcompiler.recipes import ActivationSpec, WeightSpec
from numerics_util import rel_err

SPECS = [WeightSpec(), WeightSpec("int8", "per_tensor"), WeightSpec("int4", "per_group", 32),
         WeightSpec("int4", "per_group", 24, symmetric=False), WeightSpec("int8", symmetric=False),
         WeightSpec("fp8_e4m3", "per_channel")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.dtype.value}-{s.granularity.value}-{s.group_size}-{s.symmetric}")
def test_mse_calibrator_never_increases_weight_error(spec):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 100, generator=g)
    w[3, 7] = 25.0   # an outlier that minmax must cover
    minmax = layer_quant.quantize_weight(w, spec)
    mse = layer_quant.quantize_weight(w, WeightSpec(spec.dtype, spec.granularity, spec.group_size, spec.symmetric, "mse"))
    assert rel_err(mse.dequantize(), w) <= rel_err(minmax.dequantize(), w) + 1e-7
    assert mse.q.shape == w.shape and mse.scale.shape == minmax.scale.shape


def test_weight_percentile_calibrator_is_refused():
    with pytest.raises(RecipeError, match="weight.calibrator"):
        WeightSpec(calibrator="percentile")


def test_int4_bytes_are_half_a_byte_per_weight_plus_scales():
    qw = layer_quant.quantize_weight(torch.randn(64, 128), WeightSpec("int4", "per_group", 128))
    assert qw.nbytes() == 64 * 128 // 2 + 64 * 4
    assert qw.describe() == "int4 group 128"


def test_static_scale_calibrators_order():
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(512, 64, generator=g)
    samples[0, 0] = 80.0
    absmax = samples.abs().amax(0)
    s_minmax = layer_quant.static_act_scale(absmax, samples, ActivationSpec("int8", "per_tensor", "minmax"))
    s_pct = layer_quant.static_act_scale(absmax, samples, ActivationSpec("int8", "per_tensor", "percentile", 99.9))
    s_mse = layer_quant.static_act_scale(absmax, samples, ActivationSpec("int8", "per_tensor", "mse"))
    assert float(s_minmax) == pytest.approx(80.0 / 127)
    assert s_pct < s_minmax and s_mse < s_minmax


# -- reduce-range (7-bit) INT8 weights -------------------------------------------------------------

SEVEN_BIT = [WeightSpec(reduce_range=True), WeightSpec("int8", "per_tensor", reduce_range=True),
             WeightSpec(calibrator="mse", reduce_range=True), WeightSpec("int8", "per_group", 32, reduce_range=True),
             WeightSpec(symmetric=False, reduce_range=True)]


@pytest.mark.parametrize("spec", SEVEN_BIT, ids=lambda s: f"{s.granularity.value}-{s.calibrator.value}-{s.symmetric}")
def test_reduce_range_weights_take_7_bits_and_are_stored_as_8(spec):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 100, generator=g)
    w[5, 3] = -9.0                                    # an outlier on the negative side
    qw = layer_quant.quantize_weight(w, spec)
    full = layer_quant.quantize_weight(w, dataclasses.replace(spec, reduce_range=False))
    lo, hi = (-64, 63) if spec.symmetric else (0, 127)
    assert qw.dtype == full.dtype and qw.q.dtype == full.q.dtype      # int8 / uint8 storage either way
    assert lo <= int(qw.q.min()) and int(qw.q.max()) <= hi
    assert int(full.q.min()) < lo or int(full.q.max()) > hi           # the full range is used without it
    assert qw.describe() == full.describe() + " (7-bit)"
    # one bit less: about twice the rounding error of the full-range weights
    assert 1.5 * rel_err(full.dequantize(), w) < rel_err(qw.dequantize(), w) < 3.0 * rel_err(full.dequantize(), w)
    if spec == WeightSpec(reduce_range=True):
        assert torch.equal(qw.scale, w.abs().amax(1, keepdim=True) / 63)


def test_reduce_range_gptq_and_awq_weights_stay_in_7_bits():
    from qcompiler.algorithms import awq, gptq
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(32, 64, generator=g), torch.randn(512, 64, generator=g)
    spec = WeightSpec(reduce_range=True)
    h = 2 * x.T @ x / x.shape[0]
    qw, _ = gptq.gptq_quantize(w, h, spec, n_samples=x.shape[0])
    assert qw.dtype == "int8" and qw.reduce_range and -64 <= int(qw.q.min()) and int(qw.q.max()) <= 63
    grouped, _ = gptq.gptq_quantize(w, h, WeightSpec("int8", "per_group", 16, reduce_range=True), n_samples=x.shape[0])
    assert -64 <= int(grouped.q.min()) and int(grouped.q.max()) <= 63 and grouped.reduce_range
    clipped = awq.quantize_with_clip(w, 0.8 * w.abs().amax(1, keepdim=True), spec)
    assert clipped.dtype == "int8" and clipped.reduce_range and -64 <= int(clipped.q.min()) and int(clipped.q.max()) <= 63
    assert torch.equal(awq.quantize_with_clip(w, w.abs().amax(1, keepdim=True), spec).q,
                       layer_quant.quantize_weight(w, spec).q)                        # no clip == RTN minmax
