"""Every calibrated algorithm works with the weights on a GPU and the statistics on the CPU.

Calibration keeps its statistics on the CPU (memory); the weights stay on the model's device.
Proved without a GPU through ``device_shadow``: the weights are tensors that report ``cuda:0``
(CPU data underneath) and any op that mixes them with CPU tensors raises CUDA's error. Each
algorithm must give the same numbers as on the CPU, with its results on the weight's device.
"""

from __future__ import annotations

import pytest
import torch

from device_shadow import shadow_devices, on
from qcompiler import recipes, weight_algorithms
from qcompiler.calibration import LayerStats
from qcompiler.passes.fallback import SensitivityFallback
from qcompiler.passes.smoothquant import SmoothQuantFold
from qcompiler.pipeline import PassContext


def test_the_shadow_device_catches_mixing_and_keeps_values():
    w = torch.randn(4, 8)
    with shadow_devices():
        wd = on("cuda", w)
        assert wd.device == torch.device("cuda", 0) and (wd * 2).device.type == "cuda"
        with pytest.raises(RuntimeError, match="same device"):
            wd @ torch.randn(8, 2)
        assert (wd + torch.tensor(1.0)).device.type == "cuda"             # 0-d CPU scalars are allowed
        assert torch.zeros(3, device=wd.device).device.type == "cuda"
        back = (wd[:, 1:] * 3).T.contiguous().cpu()
        assert type(back) is torch.Tensor and torch.equal(back, (w[:, 1:] * 3).T)
        assert wd.sum().item() == pytest.approx(w.sum().item())


def _stats(k: int = 128, rows: int = 512) -> LayerStats:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g) * (1 + 5 * (torch.rand(k, generator=g) > 0.95))
    return LayerStats(x.abs().amax(0), x[:256].clone(), rows, x.abs().mean(0), (x.T @ x) * (2.0 / rows))


def _run(recipe, w, st):
    """Every per-layer algorithm of ``recipe`` on weight ``w``: [(name, tensor or float)]."""
    out = []
    if recipe.smoothquant is not None:
        alpha, s = SmoothQuantFold().group_scale(PassContext(recipe=recipe), ["l"], [w], st)
        out.append(("smoothquant scale", s))
    if recipe.awq is not None:
        alpha, s = weight_algorithms.input_scale(st, [w], recipe, "l")
        w, st = w * s, weight_algorithms.scaled_stats(st, s)
        out.append(("awq scale", s))
    qw, _ = weight_algorithms.quantize_linear("l", w, st, recipe)
    out += [("weight", qw.storage()), ("weight scale", qw.scale)]
    act_scale, sqnr = SensitivityFallback._measure((st.absmax, st.samples), w, qw, recipe)
    out += [("sensitivity sqnr", sqnr)] + ([("activation scale", act_scale)] if act_scale is not None else [])
    return out


@pytest.mark.parametrize("preset", recipes.names())
def test_algorithms_run_with_weights_on_the_gpu(preset):
    recipe = recipes.get(preset)
    st = _stats()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    expected = _run(recipe, w, st)
    with shadow_devices():
        got = _run(recipe, on("cuda", w), st)
        got = [(name, v.cpu() if isinstance(v, torch.Tensor) else v, getattr(v, "device", None)) for name, v in got]
    for (name, e), (_, g, device) in zip(expected, got):
        if isinstance(e, torch.Tensor):
            assert device.type == "cuda", f"{preset}: {name} left the weight's device"
            assert torch.equal(g, e), f"{preset}: {name} differs on the GPU path"
        else:
            assert g == e, f"{preset}: {name} {g} != {e}"
    assert st.absmax.device.type == "cpu" and st.samples.device.type == "cpu"   # statistics stay on the CPU
