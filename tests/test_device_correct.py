"""Every algorithm, pass and lowering works with the model on a GPU; statistics meet the weights there.

Calibration runs on the model's device and keeps its statistics on the CPU (memory); the weights,
and every constant a pass makes from them, stay on the model's device. Proved without a GPU
through ``device_shadow``: tensors that report ``cuda:0`` (CPU data underneath), where any op that
mixes them with CPU tensors raises CUDA's error. Per algorithm, then per preset for the whole
pipeline (calibration on the model included), for the Triton target's static checks, and for
eager ``qcompiler.quantize``: the same numbers as on the CPU, with the results on the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qcompiler
from device_shadow import graph_on, module_on, on, shadow_devices
from qcompiler import recipes
from qcompiler.algorithms import registry as weight_algorithms
from qcompiler.api import QCompilerBackend
from qcompiler.calibration.statistics import LayerStats
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.passes.fallback import SensitivityFallback
from qcompiler.passes.smoothquant import SmoothQuantFold
from qcompiler.pipeline import PassContext
from tiny_models import calibration_batches, tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_the_shadow_device_moves_models_and_hosts_fake_tensors():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight                                    # tied
    with shadow_devices():
        module_on("cuda", model)
        assert model[1].weight is model[0].weight and model[0].weight.device.type == "cuda"
        assert isinstance(model[0].weight, torch.nn.Parameter)
        assert torch.tensor(0.5, device="cuda").device.type == "cuda"     # built below the dispatcher
        assert torch.arange(3).to("cuda").device.type == "cuda"
        with torch.inference_mode():
            assert model(torch.tensor([[1, 2]], device="cuda")).device.type == "cuda"
        from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
        with FakeTensorMode(allow_non_fake_inputs=True):
            y = model[0].weight[torch.tensor([1])] * 2                    # a shadow tensor seen as fake CUDA
            assert y.device.type == "cuda"
            with pytest.raises(FakeTensorDeviceMismatchError):
                y @ torch.ones(4, 1)


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


# --- the whole pipeline, per preset, with the model on the GPU ---------------------------------------

GPU = "cuda"
LAYERWISE = tuple(n for n in recipes.names() if recipes.get(n).layerwise)
#: presets whose calibration runs autograd (SignRound's block tuning, end-to-end scale tuning): the shadow device, a
#: CPU tensor subclass, aborts the process in backward (checked: ``(x * 2).sum().backward()`` on a shadow tensor)
BACKWARD = tuple(n for n in recipes.names() if type(recipes.get(n).weight_algorithm).__name__ == "SignRoundSpec"
                 or recipes.get(n).end_to_end is not None)


def _no_backward(preset: str) -> None:
    if preset in BACKWARD:
        pytest.skip(f"{preset}: its calibration runs backward, which the shadow device cannot (a real GPU can)")


@pytest.fixture(scope="module")
def captured():
    """A tiny Llama on the CPU, the graph Dynamo captures of it (parameters as inputs), its example inputs."""
    model = tiny_model("llama")
    store = {}

    def capture(gm, example_inputs):
        store["gm"], store["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, dynamic=False)(input_ids=token_batches(1, 16, seed=5)[0])
    torch._dynamo.reset()
    return model, store["gm"], store["inputs"]


def _held(model) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``model`` by name (tied ones under each name)."""
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


def _graph_inputs(inputs, model, new_model, user_input) -> list:
    """``inputs`` of a graph captured from ``model`` as ``new_model`` gives them: its parameters and
    buffers by name, ``user_input(t)`` for the others."""
    names = {id(t): n for n, t in _held(model).items()}
    held = _held(new_model)
    return [held[names[id(t)]] if id(t) in names else user_input(t) for t in inputs]


def _on_gpu(model, inputs):
    """``model`` copied to the GPU and the graph's ``inputs`` as they are there. Use under ``shadow_devices()``."""
    gpu_model = module_on(GPU, copy.deepcopy(model))
    return gpu_model, _graph_inputs(inputs, model, gpu_model, lambda t: on(GPU, t))


def _compile(preset, target, model, gm, inputs, calibration, kernels="reference"):
    """What ``QCompilerBackend`` does to one captured graph: calibrate on ``model``, run every pass."""
    qb = QCompilerBackend(preset, calibration, target, progress=False, kernels=kernels)
    qb._adopt_root(model)
    return qb, qb.run_passes(gm, inputs, qb.passes())


def _outputs(gm, inputs) -> list:
    with torch.no_grad():
        return list(gm(*inputs))


def _assert_same_compile(preset, cpu, gpu, outputs, expected, constants=True):
    """``gpu`` (backend, graph) compiled on the GPU as ``cpu`` on the CPU: same plan (and, with
    ``constants``, warnings and constants), the constants and ``outputs`` on the GPU, ``outputs``
    equal to ``expected`` within float rounding."""
    (qc, gc), (qg, gg) = cpu, gpu
    plan = lambda qb: {f: (d.quantize, d.reason, d.act_scale, d.alpha, d.weight_format)   # noqa: E731
                       for f, d in qb.report.layers.items()}
    assert plan(qg) == plan(qc), f"{preset}: the plan differs on the GPU"
    if constants:
        assert qg.report.warnings == qc.report.warnings
    cpu_constants = dict(gc.named_buffers())
    for name, t in gg.named_buffers():
        assert t.device.type == GPU, f"{preset}: constant {name} is on {t.device}, not the weights' device"
        if constants:
            assert torch.equal(t.cpu(), cpu_constants[name]), f"{preset}: constant {name} differs on the GPU"
    for got, want in zip(outputs, expected):
        assert got.device.type == GPU
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)   # linear vs addmm rounding


@pytest.mark.parametrize("preset", recipes.names())
def test_every_preset_compiles_and_runs_with_the_model_on_the_gpu(preset, captured):
    """Calibration on the GPU model, every pass of the reference pipeline, the compiled graph run."""
    _no_backward(preset)
    model, gm, inputs = captured
    cpu = _compile(preset, "reference", model, copy.deepcopy(gm), inputs, calibration_batches())
    expected = _outputs(cpu[1], inputs)
    with shadow_devices():
        gpu_model, gpu_inputs = _on_gpu(model, inputs)
        gpu = _compile(preset, "reference", gpu_model, graph_on(GPU, copy.deepcopy(gm)), gpu_inputs,
                       calibration_batches())
        outputs = _outputs(gpu[1], gpu_inputs)
        results = getattr(gpu[0].calibration, "results", {})
        assert all(r.qweight.q.device.type == GPU for r in results.values())   # layer-by-layer ran there
        _assert_same_compile(preset, cpu, gpu, outputs, expected)


@pytest.mark.parametrize("preset", LAYERWISE + ("w8a8-int8-sq-dynamic",))
def test_statistics_calibrated_on_the_cpu_meet_weights_on_the_gpu(preset, captured):
    """A calibration collected on the CPU (statistics, layer-by-layer weights and AWQ scales), reused
    by a compile whose weights are on the GPU: the passes move what they read to the weights."""
    model, gm, inputs = captured
    cpu = _compile(preset, "reference", model, copy.deepcopy(gm), inputs, calibration_batches())
    expected = _outputs(cpu[1], inputs)
    with shadow_devices():
        _, gpu_inputs = _on_gpu(model, inputs)
        gpu_params = {id(t): g for t, g in zip(inputs, gpu_inputs)}
        qb = QCompilerBackend(preset, cpu[0].calibration, "reference", progress=False, kernels="reference")
        qb._adopt_root(model)     # calibration is done: the CPU model is never run again
        qb._param_names.update({id(gpu_params[i]): names for i, names in list(qb._param_names.items())
                                if i in gpu_params})
        gg = qb.run_passes(graph_on(GPU, copy.deepcopy(gm)), gpu_inputs, qb.passes())
        _assert_same_compile(preset, cpu, (qb, gg), _outputs(gg, gpu_inputs), expected)


@pytest.fixture
def triton_on_a_gpu(monkeypatch):
    """The Triton backend as on a GPU (fp8 included): its table holds every kernel, its checks want CUDA
    tensors. Nothing launches: undo it (``monkeypatch.undo()``) before running a lowered graph."""
    from qcompiler.backends.triton import checks, lowering
    from qcompiler.backends.triton.availability import GPU as GPU_MODE, Availability
    gpu = Availability(GPU_MODE, "a GPU, pretended")
    monkeypatch.setattr(checks, "availability", lambda: gpu)
    monkeypatch.setattr(checks, "fp8_supported", lambda: True)
    monkeypatch.setattr(lowering, "availability", lambda: gpu)
    lowering.lowering_table.cache_clear()
    yield
    lowering.lowering_table.cache_clear()


def _on_cpu(preset: str, captured):
    """The reference pipeline on the CPU graph: (backend, graph), and its outputs."""
    model, gm, inputs = captured
    cpu = _compile(preset, "reference", model, copy.deepcopy(gm), inputs, calibration_batches())
    return cpu, _outputs(cpu[1], inputs)


@pytest.mark.parametrize("preset", ("w8a8-int8-sq", "w8a8-int8-sq-dynamic", "fp8", "w8a16", "w4a16-rtn", "w4a8-awq",
                                    "w4a8-int8-sq-gptq"))
def test_triton_lowers_every_gemm_of_a_model_on_the_gpu(preset, captured, triton_on_a_gpu, monkeypatch):
    """The triton pipeline on the GPU model: every fused GEMM (and norm + quantize) passes the Triton
    checks on the traced values and constants, none keeps its reference kernel for their devices."""
    model, gm, inputs = captured
    cpu, expected = _on_cpu(preset, captured)
    with shadow_devices():
        gpu_model, gpu_inputs = _on_gpu(model, inputs)
        qb, gg = _compile(preset, "triton", gpu_model, graph_on(GPU, copy.deepcopy(gm)), gpu_inputs,
                          calibration_batches())
        assert not [w for w in qb.report.warnings if "reference kernel" in w], qb.report.warnings
        lowered = next(p["stats"] for p in qb.report.passes if p["name"] == "lower")
        gemms = sum(d.quantize for d in qb.report.layers.values())
        assert sum(n for k, n in lowered.items() if k.startswith("lowered_triton_") and k.endswith("_gemm")) == gemms
        monkeypatch.undo()       # run it: each Triton op, on no GPU, runs its reference kernel
        outputs = _outputs(gg, gpu_inputs)
        _assert_same_compile(preset, cpu, (qb, gg), outputs, expected, constants=False)


@pytest.mark.parametrize("preset", ("w8a8-int8-sq", "fp8-dynamic", "w4a16-awq"))
def test_inductor_target_and_kernel_choice_with_the_model_on_the_gpu(preset, captured, monkeypatch):
    """The inductor pass list (lowered, not compiled: that needs the GPU) with kernels chosen for the GPU."""
    from qcompiler.backends import kernel_choice
    monkeypatch.setenv("QCOMPILER_KERNEL_CACHE", "0")          # no GPU timings in this machine's cache
    monkeypatch.setattr(kernel_choice, "_PROBES", {})
    monkeypatch.setattr(kernel_choice, "_TIMINGS", {})
    model, gm, inputs = captured
    cpu, expected = _on_cpu(preset, captured)
    with shadow_devices():
        gpu_model, gpu_inputs = _on_gpu(model, inputs)
        qb, gg = _compile(preset, "inductor", gpu_model, graph_on(GPU, copy.deepcopy(gm)), gpu_inputs,
                          calibration_batches(), kernels="auto")
        assert all(d.kernel for d in qb.report.layers.values() if d.quantize)
        _assert_same_compile(preset, cpu, (qb, gg), _outputs(gg, gpu_inputs), expected, constants=False)


def test_triton_checks_take_a_static_gemm_as_the_passes_build_it_on_the_gpu(triton_on_a_gpu):
    """Fake CUDA arguments of a static int8 / fp8 GEMM, the activation scale made as insert_qdq makes
    it (a 0-d tensor on the weight's device): accepted."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
    from qcompiler.backends.triton.checks import CHECKS
    with FakeTensorMode():
        w_scale = torch.rand(32, 1, device=GPU)
        act_scale = torch.tensor(0.02, dtype=torch.float32, device=w_scale.device)
        for op, dtype in (("int8_gemm", torch.int8), ("fp8_gemm", torch.float8_e4m3fn)):
            a_q = torch.empty(2, 8, 64, device=GPU).to(dtype)
            w_q = torch.empty(32, 64, device=GPU).to(dtype)
            assert CHECKS[op](a_q, act_scale, w_q, w_scale, torch.zeros(32, device=GPU), torch.float32) is None
        with pytest.raises(FakeTensorDeviceMismatchError):     # the fake mode itself refuses mixing
            torch.empty(4, 64, device=GPU) @ torch.empty(64, 4)


@pytest.mark.parametrize("preset", ("w8a8-int8-sq", "w8a8-int8-sq-dynamic", "fp8", "w4a16-awq", "w8a16"))
def test_quantize_eager_with_the_model_on_the_gpu(preset, captured, monkeypatch):
    """``qcompiler.quantize`` on a GPU model: its graph capture replayed (Dynamo cannot trace shadow
    tensors), the rest as is: calibration, planning, swapped modules whose buffers are on the GPU."""
    model, gm, inputs = captured
    ids = token_batches(1, 16, seed=5)[0]

    def replay(module, backend, dynamic=None):
        """``torch.compile(module, backend)`` giving ``backend`` the captured graph of ``module``."""
        def call(input_ids):
            graph = copy.deepcopy(gm) if input_ids.device.type == "cpu" else graph_on(GPU, copy.deepcopy(gm))
            return backend(graph, _graph_inputs(inputs, model, module, lambda t: input_ids))
        return call

    monkeypatch.setattr(torch, "compile", replay)
    cpu_model = qcompiler.quantize(copy.deepcopy(model), preset, calibration_batches(), example_input=ids,
                                   progress=False, kernels="reference")
    with torch.no_grad():
        expected = cpu_model(input_ids=ids).logits
    with shadow_devices():
        gpu_model = module_on(GPU, copy.deepcopy(model))
        qcompiler.quantize(gpu_model, preset, calibration_batches(), example_input=ids, progress=False,
                           kernels="reference")
        swapped = [m for m in gpu_model.modules() if isinstance(m, QuantizedLinear)]
        assert len(swapped) == sum(isinstance(m, QuantizedLinear) for m in cpu_model.modules()) > 0
        for m in swapped:
            assert all(b.device.type == GPU for b in m.buffers()), f"{preset}: {m.fqn} has a buffer off the GPU"
        with torch.no_grad():
            got = gpu_model(input_ids=ids.to(GPU)).logits
        assert got.device.type == GPU
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
