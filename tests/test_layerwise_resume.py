"""Resuming layer-by-layer calibration (``LayerwiseCalibration(checkpoint_dir=...)``): a run stopped in
the middle of the model and run again with the same folder gives bit-identical weights and statistics,
without recomputing the completed blocks; a folder from another run is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcompiler import recipes
from qcompiler.calibration.layerwise import LayerwiseCalibration
from qcompiler.errors import CalibrationError
from tiny_models import tiny_model, token_batches


class _Killed(Exception):
    pass


def _batches(seed: int = 3) -> list[torch.Tensor]:
    return token_batches(8, 32, seed=seed)


def _run(preset: str, folder=None, batches=None, stop_at: str | None = None, seen: list | None = None):
    """Layer-by-layer calibration of the tiny llama; ``stop_at``: raise when that block starts."""
    cal = LayerwiseCalibration(batches or _batches(), recipes.resolve(preset), progress=False, replay_batch=4,
                               checkpoint_dir=folder)
    real = cal._observe

    def observe(block, prefix, *args, **kwargs):
        if seen is not None:
            seen.append(prefix)
        if prefix == stop_at:
            raise _Killed(prefix)
        return real(block, prefix, *args, **kwargs)
    cal._observe = observe
    torch.manual_seed(0)
    model = tiny_model("llama")
    cal.collect(model)
    return cal, model


def _same(a: LayerwiseCalibration, b: LayerwiseCalibration) -> None:
    assert list(a.results) == list(b.results) and a.results
    for f, r in a.results.items():
        s = b.results[f]
        for x, y in ((r.qweight.q, s.qweight.q), (r.qweight.scale, s.qweight.scale), (r.qweight.zero, s.qweight.zero),
                     (r.scale, s.scale)):
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f
        assert (r.qweight.dtype, r.qweight.group_size, r.alpha, r.note) == \
               (s.qweight.dtype, s.qweight.group_size, s.alpha, s.note), f
    assert list(a.stats) == list(b.stats)
    for f, st in a.stats.items():
        o = b.stats[f]
        assert torch.equal(st.absmax, o.absmax) and torch.equal(st.samples, o.samples) and st.tokens == o.tokens, f
        assert (st.absmean is None) == (o.absmean is None) and (st.absmean is None or torch.equal(st.absmean, o.absmean))


# GPTQ fitted to the float model's output: the resumed run rebuilds the float stream through the completed blocks;
# true_sequential: the blocks after the resume calibrated level by level
_FLOAT_MODEL = recipes.get("w4a16-gptq").replace(
    name="w4a16-gptq-float-model",
    weight_algorithm=dataclasses.replace(recipes.get("w4a16-gptq").weight_algorithm_spec, target="float-model",
                                         true_sequential=True))


@pytest.mark.parametrize("preset", ["w4a16-gptq", "w4a16-awq", _FLOAT_MODEL],
                         ids=["gptq", "awq", "gptq-float-model-true-sequential"])
def test_a_stopped_run_resumes_after_its_last_block_with_identical_results(tmp_path, preset):
    whole, _ = _run(preset)
    with pytest.raises(_Killed):
        _run(preset, tmp_path, stop_at="model.layers.1")
    assert sorted(p.name for p in tmp_path.glob("block-*")) == ["block-00000.safetensors"]
    seen: list = []
    resumed, model = _run(preset, tmp_path, seen=seen)
    assert resumed.resumed_blocks == 1 and "model.layers.0" not in seen and "model.layers.1" in seen
    _same(whole, resumed)
    # the model's float weights are back after calibration, for the graph passes
    fresh = tiny_model("llama")
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    # a third run reads every block and computes none
    seen.clear()
    again, _ = _run(preset, tmp_path, seen=seen)
    assert seen == [] and again.resumed_blocks == len(list(tmp_path.glob("block-*")))
    _same(whole, again)


def test_a_folder_from_another_run_is_refused_naming_what_differs(tmp_path):
    with pytest.raises(_Killed):
        _run("w4a16-gptq", tmp_path, stop_at="model.layers.1")
    with pytest.raises(CalibrationError, match=r"written for another run: its recipe differs"):
        _run("w4a16-rtn", tmp_path)
    with pytest.raises(CalibrationError, match=r"its calibration differs"):
        _run("w4a16-gptq", tmp_path, batches=_batches(seed=4))


def test_an_unreadable_block_file_is_named(tmp_path):
    with pytest.raises(_Killed):
        _run("w4a16-gptq", tmp_path, stop_at="model.layers.1")
    block = tmp_path / "block-00000.safetensors"
    block.write_bytes(block.read_bytes()[:100])
    with pytest.raises(CalibrationError, match="block-00000.safetensors is unreadable"):
        _run("w4a16-gptq", tmp_path)
