"""Quantization-aware training: straight-through and LSQ gradients, convert after zero steps = post-training
quantization bit for bit, training lowers the distillation loss, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompiler
from qcompiler.core import numerics
from qcompiler.errors import UnsupportedError
from qcompiler.qat import FakeQuantLinear, _reduce_to, fake_quantize_ste
from qcompiler.runtime.eager import QuantizedLinear
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _linears(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def _norms(model):
    return [p for n, p in model.named_parameters() if "norm" in n]


def _distil_and_convert(student, teacher, params, lr: float, steps: int, train) -> float:
    """Adam on ``params`` against the teacher's logits (every step reaches each parameter), then ``convert``,
    which must keep what the fake-quant model computed; returns the converted model's loss."""
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        target = teacher(train).logits
    for _ in range(steps):
        loss = qcompiler.distillation_loss(student(train).logits, target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
    with torch.no_grad():
        trained = student(train).logits
    qcompiler.convert(student)
    with torch.no_grad():
        assert rel_err(student(train).logits, trained) < 1e-5
        return float(qcompiler.distillation_loss(student(train).logits, target))


@pytest.mark.parametrize("dtype,scale_shape,block", [("int4", (6, 2), 8), ("uint4", (6, 1), None),
                                                    ("int8", (), None), ("fp8_e4m3", (6, 1), None)])
def test_straight_through_gradient_passes_inside_the_range_and_lsq_reaches_each_scale(dtype, scale_shape, block):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 13 if block else 16, generator=g) * 3).requires_grad_(True)
    qmax = numerics.QRANGE[dtype][1]
    scale = (torch.rand(scale_shape, generator=g) * 0.3 + 0.2) * (4 / qmax if dtype != "fp8_e4m3" else 0.004)
    scale.requires_grad_(True)
    zero = torch.full(scale_shape, 8.0 if dtype == "uint4" else 0.0).to(torch.uint8) if dtype == "uint4" else None
    y = fake_quantize_ste(x, scale, zero, dtype, block)
    expected = numerics.dequantize(numerics.quantize(x.detach(), scale.detach(), zero, dtype, block_size=block),
                                   scale.detach(), zero, block_size=block)
    assert torch.equal(y.detach(), expected)                                  # the forward is Q/DQ exactly
    up = torch.randn(x.shape, generator=g)
    y.backward(up)
    s = numerics.expand_blocks(scale.detach(), x, block)
    v = x.detach() / s + (0.0 if zero is None else numerics.expand_blocks(zero.float(), x, block))
    inside = (v >= numerics.QRANGE[dtype][0]) & (v <= qmax)
    assert 0 < int(inside.sum()) < x.numel()                                  # both cases occur
    assert torch.equal(x.grad, up * inside)
    local = torch.where(inside, (expected - x.detach()) / s, expected / s) * up
    factor = 1.0 / (x.numel() / max(scale.numel(), 1) * qmax) ** 0.5
    flat_index = torch.arange(max(scale.numel(), 1)).reshape(scale_shape) if scale_shape else torch.tensor(0)
    owner = (numerics.expand_blocks(flat_index.float(), x, block).expand_as(x).long() if scale_shape
             else torch.zeros_like(x).long())
    per_entry = torch.zeros(max(scale.numel(), 1)).index_add_(0, owner.flatten(), local.flatten())
    assert rel_err(scale.grad.flatten(), per_entry * factor) < 1e-5


def test_reduce_to_sums_each_scale_s_elements_with_a_partial_last_group():
    full = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)
    out = _reduce_to(full, torch.ones(2, 3), 4)             # groups [0,4) [4,8) [8,10)
    assert out.tolist() == [[6.0, 22.0, 17.0], [46.0, 62.0, 37.0]]
    assert _reduce_to(full, torch.ones(2, 1), None).tolist() == [[45.0], [145.0]]
    assert float(_reduce_to(full, torch.tensor(1.0), None)) == float(full.sum())


@pytest.mark.parametrize("preset,learn", [("w4a16-rtn", False), ("w4a16-gptq", False), ("w8a8-int8-naive", True),
                                          ("fp8-dynamic", False), ("w8a16", True), ("sparse24-fp8-dynamic", False),
                                          ("w8a8-int8-sq", True), ("w8a8-int8-sq-dynamic", False),
                                          ("w4a16-awq", False), ("w4a8-awq", False)])
def test_convert_after_zero_steps_is_post_training_quantization_bit_for_bit(preset, learn):
    model, batches = tiny_model("llama"), calibration_batches()
    ptq = qcompiler.quantize(copy.deepcopy(model), preset, batches, progress=False)
    qcompiler.prepare_qat(model, preset, batches, learn_scales=learn, progress=False)
    fakes = _linears(model, FakeQuantLinear)
    assert len(fakes) == len(_linears(ptq, QuantizedLinear)) > 0
    assert all(isinstance(f.w_scale, torch.nn.Parameter) == learn for f in fakes)
    for f, q in zip(fakes, _linears(ptq, QuantizedLinear)):     # SmoothQuant / AWQ scales left at the input
        assert (f.inv_smooth is None) == (q.inv_smooth is None) and (q.inv_smooth is None or
                                                                     torch.equal(f.inv_smooth, q.inv_smooth))
    for a, b in zip(_norms(model), _norms(ptq)):                  # ... and those folded into the norms
        assert torch.equal(a, b)
    ids = token_batches(1, 16, seed=7)[0]
    with torch.no_grad():
        ref = ptq(ids).logits
        prepared = model(ids).logits
    assert rel_err(prepared, ref) < 1e-5            # the fake-quant forward computes what the kernels compute
    qcompiler.convert(model)
    assert not _linears(model, FakeQuantLinear)
    for a, b in zip(_linears(model, QuantizedLinear), _linears(ptq, QuantizedLinear)):
        assert a.fqn == b.fqn and torch.equal(a.w_q, b.w_q) and torch.equal(a.w_scale, b.w_scale)
        for name in ("w_zero", "act_scale", "bias"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), (a.fqn, name)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_training_lowers_the_distillation_loss_and_convert_keeps_what_was_learned():
    teacher, batches = tiny_model("llama"), calibration_batches()
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    ptq = qcompiler.quantize(copy.deepcopy(teacher), "w4a16-rtn", batches, progress=False)
    qcompiler.prepare_qat(student, "w4a16-rtn", batches, progress=False)
    params = [m.weight for m in _linears(student, FakeQuantLinear)]
    student.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    train = torch.cat(token_batches(4, 32, seed=5))
    with torch.no_grad():
        before = float(qcompiler.distillation_loss(ptq(train).logits, teacher(train).logits))
    after = _distil_and_convert(student, teacher, params, 1e-4, 30, train)
    assert after < 0.5 * before, (before, after)        # 0.16x here
    changed = sum(int((a.w_q != b.w_q).sum()) for a, b in zip(_linears(student, QuantizedLinear),
                                                               _linears(ptq, QuantizedLinear)))
    assert changed > 0


@pytest.mark.parametrize("preset,learn,init,lr", [("w8a8-int8-sq", True, "auto", 1e-5),
                                                  ("w4a16-awq", False, "float", 1e-4)])
def test_recipes_with_smoothquant_or_awq_scales_train_and_convert_keeps_what_was_learned(preset, learn, init, lr):
    teacher, batches = tiny_model("llama"), calibration_batches()
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    qcompiler.prepare_qat(student, preset, batches, learn_scales=learn, init=init, progress=False)
    params = [p for m in _linears(student, FakeQuantLinear) for p in m.parameters()]
    train = torch.cat(token_batches(4, 32, seed=5))
    with torch.no_grad():
        before = float(qcompiler.distillation_loss(student(train).logits, teacher(train).logits))
    after = _distil_and_convert(student, teacher, params, lr, 15, train)
    assert after < 0.8 * before, (before, after)      # about 0.5x / 0.25x here


def test_a_sparse_recipe_keeps_its_two_of_four_pattern_through_training():
    from qcompiler.algorithms.sparsegpt import is_semi_structured
    teacher, batches = tiny_model("llama"), calibration_batches()
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    qcompiler.prepare_qat(student, "sparse24-w8a8-int8-dynamic", batches, progress=False)
    params = [m.weight for m in _linears(student, FakeQuantLinear)]
    opt = torch.optim.Adam(params, lr=1e-3)
    train = torch.cat(token_batches(2, 32, seed=5))
    for _ in range(3):
        with torch.no_grad():
            target = teacher(train).logits
        loss = qcompiler.distillation_loss(student(train).logits, target)
        opt.zero_grad()
        loss.backward()
        for m in _linears(student, FakeQuantLinear):
            assert not m.weight.grad[m.pruned].any()          # pruned weights get no gradient
            assert int(m.pruned.sum()) == m.weight.numel() // 2     # two of each four, no more
        opt.step()
    qcompiler.convert(student)
    for m in _linears(student, QuantizedLinear):
        w = m.w_q.float() * m.w_scale
        assert is_semi_structured(w), m.fqn


def test_distillation_loss_is_the_kl_divergence_to_the_teacher():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert float(qcompiler.distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert float(qcompiler.distillation_loss(s, t)) == pytest.approx(float(kl.mean()), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    assert float(qcompiler.distillation_loss(s, t, mask=mask)) == pytest.approx(
        float((kl * mask).sum() / 3), rel=1e-5)
    pt, qt = (t / 2).double().softmax(-1), (s / 2).double().softmax(-1)
    assert float(qcompiler.distillation_loss(s, t, temperature=2.0)) == pytest.approx(
        4 * float((pt * (pt.log() - qt.log())).sum(-1).mean()), rel=1e-5)


def test_bad_input_is_refused_clearly():
    batches = calibration_batches()
    with pytest.raises(UnsupportedError, match="convert: the model has no FakeQuantLinear; call qcompiler.prepare_qat"):
        qcompiler.convert(tiny_model("llama"))
    with torch.no_grad(), pytest.raises(UnsupportedError, match="gradients are disabled"):
        qcompiler.prepare_qat(tiny_model("llama"), "w4a16-rtn", batches, progress=False)
    with pytest.raises(UnsupportedError, match="no parameter of the model requires grad"):
        qcompiler.prepare_qat(tiny_model("llama").requires_grad_(False), "w4a16-rtn", batches, progress=False)
    with pytest.raises(UnsupportedError, match="a quantized KV cache"):
        qcompiler.prepare_qat(tiny_model("llama"), "w8a8-int8-sq+kv-int8", batches, progress=False)
    with pytest.raises(ValueError, match="init='best'"):
        qcompiler.prepare_qat(tiny_model("llama"), "w4a16-rtn", batches, init="best", progress=False)
    model = qcompiler.prepare_qat(tiny_model("llama"), "w4a16-rtn", batches, progress=False)
    with pytest.raises(UnsupportedError, match="already prepared"):
        qcompiler.prepare_qat(model, "w4a16-rtn", batches, progress=False)


def test_the_qat_example_trains_converts_and_reloads(monkeypatch, capsys):
    import importlib.util
    from pathlib import Path
    from qcompiler.tools import models
    monkeypatch.setattr(models, "shared_dir", lambda: None)          # the tiny random Llama: fast, no data
    path = Path(__file__).resolve().parents[1] / "examples" / "qat.py"
    spec = importlib.util.spec_from_file_location("qat_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(steps=3)
    assert "saved and reloaded: same logits" in capsys.readouterr().out
