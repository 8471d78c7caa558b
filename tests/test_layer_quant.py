"""Weight quantization storage, calibrators and static activation scales."""

from __future__ import annotations

import pytest
import torch

from qcompiler import layer_quant
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
