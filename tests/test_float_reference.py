"""Layers fitted to the float model's own output (``target="float-model"``, ``qcompiler.calibration.float_reference``).

Closed forms: ``float_target_weight`` is the least-squares solution of ``X_q W*^T = X_f W^T`` (float64 lstsq) and
leaves the weight bit for bit where the two streams agree; ``paired_linear_inputs`` sums ``X_q^T X_f`` exactly as
the product of the rows it saw. Layer by layer: the first block (no error upstream) gets GPTQ's codes bit for bit,
later blocks the codes GPTQ gives for ``W*`` computed here from both streams recomputed outside calibration, and
each later linear's error against the float model's output is lower than plain GPTQ's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qcompiler
from qcompiler import recipes
from qcompiler.algorithms import registry as weight_algorithms
from qcompiler.algorithms.gptq import gptq_quantize
from qcompiler.calibration.float_reference import float_target_weight, paired_linear_inputs
from qcompiler.calibration.layerwise import LayerwiseCalibration, find_decoder_blocks
from qcompiler.errors import CalibrationError, RecipeError
from qcompiler.recipes import GPTQSpec, Granularity, QuantDtype, Recipe, SignRoundSpec, WeightSpec
from tiny_models import ARCHS, calibration_batches, linear_inputs, tiny_model

SPEC = WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=16)


def _recipe(target: str, **gptq) -> Recipe:
    return Recipe(name=f"gptq-{target}", weight=SPEC, layerwise=True,
                  weight_algorithm=GPTQSpec(act_order=True, static_groups=True, min_samples=1, target=target, **gptq))


def _rows(seed: int, n: int = 400, k: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(n, k, generator=g, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64) + 0.3)
    return xq, xq + 0.2 * torch.randn(n, k, generator=g, dtype=torch.float64)


def test_float_target_weight_is_the_least_squares_fit_of_the_float_output():
    xq, xf = _rows(0)
    w = torch.randn(7, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = float_target_weight(w, xq.T @ xq, xq.T @ xf, dampening=0.0)
    want = torch.linalg.lstsq(xq, xf @ w.T).solution.T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # on the 2/n scale of GPTQ's Hessian: the same weight
    n = xq.shape[0]
    torch.testing.assert_close(float_target_weight(w, 2 / n * xq.T @ xq, 2 / n * xq.T @ xf, 0.0), want,
                               rtol=1e-10, atol=1e-12)
    # the dampening pulls the correction, not the weight, toward zero
    damped = float_target_weight(w, xq.T @ xq, xq.T @ xf, dampening=0.5)
    assert 0 < float((damped - w).norm()) < float((want - w).norm())
    # alpha takes that fraction of the correction (GPTAQ's scaling)
    quarter = float_target_weight(w, xq.T @ xq, xq.T @ xf, dampening=0.0, alpha=0.25)
    torch.testing.assert_close(quarter - w, 0.25 * (want - w), rtol=1e-9, atol=1e-12)


def test_float_target_weight_keeps_the_weight_where_the_streams_agree_and_dead_inputs():
    xq, xf = _rows(2)
    xq[:, 4] = 0.0                                     # an input no quantized row reached
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(float_target_weight(w, (xq.T @ xq).float(), (xq.T @ xq).float(), 0.01), w)
    got = float_target_weight(w, xq.T @ xq, xq.T @ xf, 0.01)
    assert got.dtype == w.dtype and torch.equal(got[:, 4], w[:, 4])
    assert torch.equal(float_target_weight(w, torch.zeros(12, 12), torch.zeros(12, 12), 0.01), w)
    with pytest.raises(CalibrationError, match="do not match the weight"):
        float_target_weight(w, torch.eye(11), torch.eye(11), 0.01)


def test_pairing_sums_the_cross_products_of_matching_calls():
    lin = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)) for _ in range(3)]
    with paired_linear_inputs(lin, "m") as pairs, torch.no_grad():
        for xf, xq in calls:
            with pairs.recording():
                lin(xf)
            with pairs.pairing():
                lin(xq)
    want0 = sum(xq.T.double() @ xf.double() for xf, xq in calls)
    torch.testing.assert_close(pairs.cross["m.0"], want0, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        hidden = [(torch.relu(lin[0](xq)), torch.relu(lin[0](xf))) for xf, xq in calls]
    torch.testing.assert_close(pairs.cross["m.2"], sum(a.T.double() @ b.double() for a, b in hidden),
                               rtol=1e-5, atol=1e-5)
    assert not pairs.handles            # hooks removed on exit
    with paired_linear_inputs(lin, "m") as pairs, torch.no_grad():
        with pairs.recording():
            pass
        with pytest.raises(CalibrationError, match="more often than on the float model's"), pairs.pairing():
            lin(calls[0][1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layerwise_gptq_fits_each_linear_to_the_float_models_output(arch):
    """Block 0 (nothing upstream quantized): GPTQ's codes bit for bit. Block 1: each linear's codes are GPTQ's
    for ``W*`` from both streams recomputed here (the float model, and the float model with block 0's weights
    replaced by calibration's results), and its output error against the float model is below plain GPTQ's."""
    batches = calibration_batches()
    plain = LayerwiseCalibration(batches, _recipe("quantized-inputs"), progress=False)
    plain.collect(tiny_model(arch))
    fit = LayerwiseCalibration(batches, _recipe("float-model"), progress=False)
    fit.collect(tiny_model(arch))
    model = tiny_model(arch)
    path, blocks = find_decoder_blocks(model)
    first = [f for f in fit.results if f.startswith(f"{path}.0.")]
    second = [f for f in fit.results if f.startswith(f"{path}.1.")]
    assert first and second
    for f in first:
        assert torch.equal(fit.results[f].qweight.q, plain.results[f].qweight.q), f
        assert "float-model target" in fit.results[f].note
    x_float = linear_inputs(model, batches, second)
    transposed = arch == "gpt2"           # Conv1D stores [K, N]
    mods = dict(model.named_modules())
    for f in first:                        # the quantized stream: block 0 as calibration left it
        w = fit.results[f].qweight.dequantize()
        mods[f].weight.data = (w.t() if transposed else w).contiguous()
    x_quant = linear_inputs(model, batches, second)
    ref = tiny_model(arch)
    refs = dict(ref.named_modules())
    better = 0
    for f in second:
        xq, xf = x_quant[f], x_float[f]
        w = refs[f].weight.detach().float()
        w = w.t() if transposed else w
        n = xq.shape[0]
        h, c = 2 / n * xq.T @ xq, 2 / n * xq.T @ xf
        star = float_target_weight(w, h.float(), c.float(), 0.01, f)
        qw, _ = gptq_quantize(star, h.float(), SPEC, n_samples=n, act_order=True, static_groups=True, min_samples=1)
        agree = float((qw.q == fit.results[f].qweight.q).float().mean())
        assert agree >= 0.99, (f, agree)     # float sums in another order may flip a rare code
        target = xf @ w.double().T

        def err(result):
            return float((xq @ result.qweight.dequantize().double().T - target).pow(2).sum())
        better += err(fit.results[f]) < err(plain.results[f])
    assert better == len(second), (better, len(second))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_runs_with_the_float_model_target(arch):
    model = tiny_model(arch)
    qcompiler.quantize(model, _recipe("float-model"), calibration=calibration_batches(), progress=False)
    notes = [d.note for d in qcompiler.report(model).layers.values() if "gptq" in d.note]
    assert notes and all("float-model target" in n for n in notes)


def test_signround_tunes_against_the_float_streams_block_outputs(monkeypatch):
    """With ``target="float-model"`` the tuner's targets are the float model's block outputs (hooks on the
    float model), not the float block's on the quantized inputs."""
    model = tiny_model("llama")
    path, blocks = find_decoder_blocks(model)
    batches = calibration_batches()
    outs: list = []
    hook = blocks[1].register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.inference_mode():
        model(input_ids=torch.cat(batches))
    hook.remove()
    float_out = outs[0].reshape(-1, outs[0].shape[-1])
    found = weight_algorithms.algorithm_of(Recipe(name="sr", weight=SPEC, weight_algorithm=SignRoundSpec(),
                                                  layerwise=True))[0]

    def farthest_row(target: str) -> float:
        """The largest distance from a row the tuner got as block 1's target to the float model's rows."""
        seen = {}

        def spy(run, evaluate, linears, spec, spec_sr):
            block = next(iter(linears)).split(".")[len(path.split("."))]
            seen.setdefault(block, run({}, 0)[1])
            return {fqn: lin.init for fqn, lin in linears.items()}, "spy"

        with monkeypatch.context() as m:
            m.setitem(weight_algorithms._ALGORITHMS, SignRoundSpec, dataclasses.replace(found, tune_block=spy))
            sr = SignRoundSpec(init="rtn", iters=1, batch_size=1, target=target)
            qcompiler.quantize(tiny_model("llama"), Recipe(name="sr", weight=SPEC, weight_algorithm=sr, layerwise=True),
                               calibration=batches, progress=False)
        rows = seen["1"].reshape(-1, float_out.shape[-1]).double()
        return float(((rows[:, None, :] - float_out.double()[None]).norm(dim=-1)).min(1).values.max())

    scale = float(float_out.norm(dim=-1).mean())
    assert farthest_row("float-model") < 1e-5 * scale
    assert farthest_row("quantized-inputs") > 1e-3 * scale     # the float block on quantized inputs: not those rows


def test_the_target_is_validated_and_round_trips():
    with pytest.raises(RecipeError, match="target"):
        GPTQSpec(target="float")
    with pytest.raises(RecipeError, match="target"):
        SignRoundSpec(target="model")
    with pytest.raises(RecipeError, match="layerwise=True"):
        _recipe("float-model").replace(layerwise=False)
    for alpha in (0.0, 1.5, float("nan")):
        with pytest.raises(RecipeError, match="target_alpha"):
            GPTQSpec(target="float-model", target_alpha=alpha)
    with pytest.raises(RecipeError, match="needs gptq.target='float-model'"):
        GPTQSpec(target_alpha=0.25)
    r = _recipe("float-model", target_alpha=0.25)
    assert Recipe.from_json(r.to_json()) == r and weight_algorithms.target_alpha(r) == 0.25
    assert weight_algorithms.target_alpha(recipes.get("w4a16-rtn")) == 1.0
    r = _recipe("float-model")
    assert weight_algorithms.fits_float_model(r) and not weight_algorithms.fits_float_model(_recipe("quantized-inputs"))
    assert not weight_algorithms.fits_float_model(recipes.get("w4a16-rtn"))
