"""A quantization target registered from outside the package calibrates through its own observer.

The target here is a small KV-cache stand-in: the key and value entering each attention
(``scaled_dot_product_attention``, found in the graph) are fake-quantized to INT8 with a static
per-tensor scale, which the target's observer measures on the float model during calibration
(a ``TorchFunctionMode`` that sees every attention call, no module names involved).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import qcompiler
from qcompiler.errors import CalibrationError
from qcompiler.pipeline import TensorDecision
from qcompiler.targets import QuantTarget, TensorObserver, register_target, registered_targets, unregister_target
from tiny_models import calibration_batches, tiny_model, token_batches

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_ops = torch.ops.qcompiler


class KVAbsMax(TorchFunctionMode):
    """|key| and |value| maxima of the i-th attention call of each forward of ``model``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.absmax, self.index, self.handle = model, {}, 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            key = f"attention.{self.index}"
            k, v = args[1], args[2]
            old = self.absmax.get(key, (0.0, 0.0))
            self.absmax[key] = (max(old[0], float(k.abs().max())), max(old[1], float(v.abs().max())))
            self.index += 1
        return func(*args, **kwargs)

    def __enter__(self):
        def restart(*_):
            self.index = 0
        self.handle = self.model.register_forward_pre_hook(restart)
        return super().__enter__()

    def __exit__(self, *exc):
        self.handle.remove()
        return super().__exit__(*exc)

    def result(self) -> dict:
        return dict(self.absmax)


def _find(gm, annotation):
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SDPA]
    return [(f"attention.{i}", n) for i, n in enumerate(nodes)]


def _apply(gm, node, key, spec, ctx) -> TensorDecision:
    stats = ctx.calibration.tensors.get("kv_int8")
    if stats is None:
        raise CalibrationError("kv_int8 needs calibration data (static scales)")
    decision = TensorDecision(key, "kv_int8", format="int8 per-tensor static")
    scales = []
    for arg, amax in zip((node.args[1], node.args[2]), stats[key]):
        scale = torch.tensor(max(amax, 1e-8) / 127.0)
        name = f"{key.replace('.', '_')}_{arg.name}_scale"
        gm.register_buffer(name, scale)
        with gm.graph.inserting_before(node):
            s = gm.graph.get_attr(name)
            dq = gm.graph.call_function(_ops.dequantize, (gm.graph.call_function(_ops.quantize, (arg, s, None, "int8")),
                                                         s, None, torch.float32))
        node.replace_input_with(arg, dq)
        scales.append(f"{float(scale):.3g}")
    decision.note = "scales " + ", ".join(scales)
    return decision


@pytest.fixture
def kv_target():
    target = register_target(QuantTarget("kv_int8", spec=lambda recipe: recipe.name.startswith(("w8a8", "kv-")) or None,
                                         find=_find, apply=_apply, observe=lambda model, spec: KVAbsMax(model)))
    yield target
    unregister_target("kv_int8")
    torch._dynamo.reset()


def _fake_quant_kv_reference(model, x, absmax: dict) -> torch.Tensor:
    """The float model with key / value of the i-th attention fake-quantized by hand."""
    class FakeQuantKV(TorchFunctionMode):
        index = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in _SDPA:
                args = list(args)
                for j, amax in zip((1, 2), absmax[f"attention.{self.index}"]):
                    s = torch.tensor(max(amax, 1e-8) / 127.0)
                    args[j] = (args[j] / s).round().clamp(-128, 127) * s
                self.index += 1
            return func(*args, **kwargs)

    with torch.no_grad(), FakeQuantKV():
        return model(x).logits


def test_a_registered_target_calibrates_and_quantizes_through_its_observer(kv_target):
    assert isinstance(KVAbsMax(torch.nn.Linear(1, 1)), TensorObserver)
    model, x = tiny_model("llama"), token_batches(1, 12, seed=3)[0]
    qb = qcompiler.backend("w8a8-int8-naive", calibration=calibration_batches(), progress=False)
    with torch.no_grad():
        out = torch.compile(model, backend=qb)(x).logits
    report = qb.report
    kv = {k: d for k, d in report.tensors.items() if d.kind == "kv_int8"}
    layers = model.config.num_hidden_layers
    assert sorted(kv) == [f"attention.{i}" for i in range(layers)] and all(d.quantize for d in kv.values())
    absmax = qb._tensor_stats["kv_int8"]
    assert sorted(absmax) == sorted(kv) and all(a > 0 and b > 0 for a, b in absmax.values())
    # the same KV fake quantization applied by hand to the model with its linears quantized eagerly
    # eager modules cannot carry a graph rewrite: the eager report says the target was not applied
    eager = qcompiler.quantize(tiny_model("llama"), "w8a8-int8-naive", calibration=calibration_batches(),
                               progress=False)
    eager_kv = [d for d in qcompiler.report(eager).tensors.values() if d.kind == "kv_int8"]
    assert eager_kv and all(not d.quantize and "eager mode applies only embedding targets" in d.reason
                            for d in eager_kv)
    with torch.no_grad():
        without_kv = eager(x).logits
    ref = _fake_quant_kv_reference(eager, x, absmax)    # the same KV fake quantization, by hand
    err = (out - ref).norm() / ref.norm()
    assert err < 1e-4 < (without_kv - ref).norm() / ref.norm()     # KV quantization happened, as observed
    assert "kv_int8" in report.summary()


def test_a_target_whose_spec_is_off_observes_nothing(kv_target):
    model, x = tiny_model("llama"), token_batches(1, 8)[0]
    qb = qcompiler.backend("fp8-dynamic", calibration=calibration_batches(), progress=False)
    with torch.no_grad():
        torch.compile(model, backend=qb)(x)
    assert qb._tensor_stats == {} and not any(d.kind == "kv_int8" for d in qb.report.tensors.values())


def test_a_target_without_calibration_data_says_so(kv_target):
    model, x = tiny_model("llama"), token_batches(1, 8)[0]
    recipe = qcompiler.recipes.get("w8a16").replace(name="kv-w8a16")    # runs without calibration data
    qb = qcompiler.backend(recipe, progress=False)
    with pytest.raises(Exception, match="kv_int8 needs calibration data"):
        with torch.no_grad():
            torch.compile(model, backend=qb)(x)


def test_registering_a_target_name_twice_is_refused(kv_target):
    from qcompiler.errors import RecipeError
    with pytest.raises(RecipeError, match="already registered"):
        register_target(kv_target)
    assert kv_target in registered_targets()
