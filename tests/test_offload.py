"""Decoder blocks on disk (``qcompiler.calibration.offload``) and one block at a time on an execution
device (``LayerwiseCalibration(execution_device=...)``): the model computes the same, layer-by-layer
calibration gives the same results bit for bit, and it never writes (copies into memory) a page of
the memory-mapped weights; with an execution device only the block being calibrated is there."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

import qcompiler
from device_shadow import shadow_devices
from qcompiler import recipes
from qcompiler.calibration.layerwise import LayerwiseCalibration, find_decoder_blocks
from qcompiler.calibration.offload import offload_blocks
from qcompiler.errors import CalibrationError
from tiny_models import tiny_model, token_batches

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")]


def _mappings(path) -> list[dict]:
    """This process's mappings of ``path``: address range and the smaps counters (kB)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = {"range": (lo, hi)} if len(head) >= 6 and head[5] == str(path) else None
                if cur is not None:
                    out.append(cur)
            elif cur is not None and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                cur[head[0][:-1]] = int(head[1])
    return out


def _mapped_from(t: torch.Tensor, path) -> bool:
    p = t.untyped_storage().data_ptr()
    return any(m["range"][0] <= p < m["range"][1] for m in _mappings(path))


def _copied_kb(path) -> int:
    """kB of the file's private mapping copied into process memory by a write (smaps ``Anonymous``; not
    ``Private_Dirty``, which also counts the page cache of a file just written)."""
    return sum(m.get("Anonymous", 0) for m in _mappings(path))


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_offloaded_blocks_are_memory_mapped_and_the_model_computes_the_same(tmp_path, arch):
    model = tiny_model(arch)
    ids = token_batches(2, 12, seed=4)[0][None]
    before = _logits(model, ids)
    outside = {n: p for n, p in model.named_parameters() if not n.startswith(find_decoder_blocks(model)[0] + ".")}
    done = offload_blocks(model, tmp_path)
    path, blocks = find_decoder_blocks(model)
    assert done.blocks_path == path and len(done.files) == len(blocks)
    assert done.nbytes == sum(t.numel() * t.element_size() for b in blocks
                              for t in list(b.parameters()) + list(b.buffers()))
    for i, block in enumerate(blocks):
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            assert _mapped_from(p, done.files[i]), f"{path}.{i}.{name} is not mapped from its file"
        assert all(isinstance(p, torch.nn.Parameter) for p in block.parameters())
    for n, p in model.named_parameters():      # the rest of the model is untouched
        if n in outside:
            assert p is outside[n]
    assert torch.equal(_logits(model, ids), before)


def test_a_block_weight_shared_outside_the_block_is_refused_by_name(tmp_path):
    model = tiny_model("llama")
    block = model.model.layers[0]
    model.model.extra = torch.nn.Linear(1, 1)
    model.model.extra.weight = block.self_attn.q_proj.weight
    with pytest.raises(CalibrationError, match=r"model\.extra\.weight is the same tensor as a weight of "
                                               r"model\.layers\.0"):
        offload_blocks(model, tmp_path)


def test_sharing_inside_a_block_survives_offloading(tmp_path):
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.v_proj.weight = attn.k_proj.weight            # same shape with GQA: one tensor under two names
    offload_blocks(model, tmp_path)
    assert attn.v_proj.weight is attn.k_proj.weight and isinstance(attn.k_proj.weight, torch.nn.Parameter)


def _same_results(a: LayerwiseCalibration, b: LayerwiseCalibration) -> None:
    assert list(a.results) == list(b.results) and a.results
    for f, r in a.results.items():
        s = b.results[f]
        for x, y in ((r.qweight.q, s.qweight.q), (r.qweight.scale, s.qweight.scale),
                     (r.qweight.zero, s.qweight.zero), (r.scale, s.scale)):
            assert (x is None) == (y is None) and (x is None or (y.device.type == "cpu" and torch.equal(x, y))), f
    assert list(a.stats) == list(b.stats)
    for f, st in a.stats.items():
        o = b.stats[f]
        assert o.absmax.device.type == "cpu" and torch.equal(st.absmax, o.absmax), f
        assert torch.equal(st.samples, o.samples) and st.tokens == o.tokens, f


def _calibrate(model, preset: str, **kw) -> LayerwiseCalibration:
    cal = LayerwiseCalibration(token_batches(8, 24, seed=3), recipes.resolve(preset), progress=False,
                               replay_batch=4, **kw)
    cal.collect(model)
    return cal


@pytest.mark.parametrize("preset", ["w4a16-gptq", "w4a16-awq", "w8a8-int8-sq-dynamic"])
def test_calibrating_an_offloaded_model_gives_the_same_results_and_never_writes_its_pages(tmp_path, preset):
    ref = _calibrate(tiny_model("llama"), preset)
    model = tiny_model("llama")
    done = offload_blocks(model, tmp_path)
    digests = [_digest(f) for f in done.files]
    held = {n: p for n, p in model.named_parameters()}
    cal = _calibrate(model, preset)
    _same_results(ref, cal)
    for n, p in model.named_parameters():      # the float weights are back, as the same tensors
        assert p is held[n], n
    for f, d in zip(done.files, digests):
        assert _digest(f) == d
        assert _copied_kb(f) == 0, f"{f.name}: {_copied_kb(f)} kB of mapped weights were written (copied into memory)"


@pytest.mark.parametrize("preset", ["w4a16-gptq", "w4a16-awq"])
def test_sampled_rows_go_to_disk_block_by_block_with_the_same_results(tmp_path, preset):
    """``samples_dir``: each block's sampled input rows are written there and memory-mapped; calibration and the
    statistics (rows included) are the same bit for bit, and the rows are file pages, not process memory."""
    ref = _calibrate(tiny_model("llama"), preset)
    cal = _calibrate(tiny_model("llama"), preset, samples_dir=tmp_path / "rows")
    _same_results(ref, cal)
    files = sorted((tmp_path / "rows").glob("samples-*.safetensors"))
    assert [f.name for f in files] == ["samples-00000.safetensors", "samples-00001.safetensors"]
    block = [f for f in cal.stats if f.startswith("model.layers.")]
    assert block and all(_mapped_from(cal.stats[f].samples, files[int(f.split(".")[2])]) for f in block)
    assert all(_copied_kb(f) == 0 for f in files)
    if preset == "w4a16-gptq":       # a quantize of the model with rows on disk: the same quantized weights
        from qcompiler.runtime.eager import QuantizedLinear
        models = []
        for kw in ({}, {"samples_dir": tmp_path / "rows2"}):
            model = tiny_model("llama")
            calib = LayerwiseCalibration(token_batches(8, 24, seed=3), recipes.resolve(preset), progress=False, **kw)
            qcompiler.quantize(model, preset, calibration=calib, progress=False)
            models.append({f: m.w_q for f, m in model.named_modules() if isinstance(m, QuantizedLinear)})
        assert models[0] and all(torch.equal(models[0][f], models[1][f]) for f in models[0])


def test_signround_block_tuning_runs_on_an_offloaded_model(tmp_path):
    recipe = recipes.resolve("w4a16-signround")
    from dataclasses import replace
    recipe = recipe.replace(weight_algorithm=replace(recipe.weight_algorithm, iters=4, batch_size=2))
    ref = LayerwiseCalibration(token_batches(8, 24, seed=3), recipe, progress=False, replay_batch=4)
    ref.collect(tiny_model("llama"))
    model = tiny_model("llama")
    done = offload_blocks(model, tmp_path)
    cal = LayerwiseCalibration(token_batches(8, 24, seed=3), recipe, progress=False, replay_batch=4)
    cal.collect(model)
    _same_results(ref, cal)
    assert all(_copied_kb(f) == 0 for f in done.files)


@pytest.mark.parametrize("preset", ["w4a16-gptq", "w8a8-int8-sq-dynamic"])
@pytest.mark.parametrize("offloaded", [False, True], ids=["in-memory", "offloaded"])
def test_an_execution_device_holds_one_block_at_a_time_and_results_come_back(tmp_path, preset, offloaded):
    """The model on the CPU, each block moved to the (shadow) GPU for its turn: mixing a CPU tensor into
    the block's computation raises there; the results equal the CPU run's and are on the CPU."""
    ref = _calibrate(tiny_model("llama"), preset)
    model = tiny_model("llama")
    if offloaded:
        offload_blocks(model, tmp_path)
    held = {n: p for n, p in model.named_parameters()}
    path, blocks = find_decoder_blocks(model)
    seen = []
    cal = LayerwiseCalibration(token_batches(8, 24, seed=3), recipes.resolve(preset), progress=False,
                               replay_batch=4, execution_device="cuda")
    real = cal._observe

    def observe(block, prefix, *args, **kwargs):
        seen.append([{p.device.type for p in b.parameters()} for b in blocks])
        return real(block, prefix, *args, **kwargs)
    cal._observe = observe
    with shadow_devices():
        cal.collect(model)
    assert seen == [[{"cuda"} if j == i else {"cpu"} for j in range(len(blocks))] for i in range(len(blocks))]
    _same_results(ref, cal)
    for n, p in model.named_parameters():
        assert p is held[n] and p.device.type == "cpu", n


def test_quantize_on_an_offloaded_model_equals_in_memory(tmp_path):
    ids = token_batches(1, 16, seed=6)[0][None]
    calib = token_batches(8, 24, seed=3)
    ref = tiny_model("llama")
    qcompiler.quantize(ref, "w4a16-gptq", calibration=calib, progress=False)
    model = tiny_model("llama")
    offload_blocks(model, tmp_path)
    qcompiler.quantize(model, "w4a16-gptq", calibration=calib, progress=False)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
