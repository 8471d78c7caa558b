"""Mixture-of-experts models (tiny Mixtral- and Qwen2-MoE-shaped, random): the router, found from the
graph (a linear whose output reaches a ``topk``), stays in float; experts held in fused 3-D parameters
(transformers 5) are quantized per expert by ``qcompiler.quantize`` for weight-only recipes and recipes with
dynamic per-token activations (their inputs quantized per token too; in float with a warning for recipes with
static activation scales, and under torch.compile); everything else is quantized and the model runs, eagerly,
layer by layer and under torch.compile."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import qcompiler
from qcompiler import recipes
from qcompiler.core.linear_probe import linear_orientation
from qcompiler.recipes import FallbackSpec
from qcompiler.runtime.fused_experts import QuantizedExperts, quantized_experts
from tiny_models import token_batches

_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=48),
}


def _moe_model(arch: str, **kw) -> torch.nn.Module:
    cfg = AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, **_MOE[arch])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, **kw).eval()


def _rel_to_float64(model, float_model, ids) -> float:
    """Against the float model in float64 (its experts' loop: the default grouped GEMM takes no float64)."""
    arch = float_model.config.model_type
    ref = _moe_model(arch, experts_implementation="eager").double()
    assert all(torch.equal(a, b.float()) for a, b in zip(float_model.parameters(), ref.parameters()))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids).logits.double()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("arch", sorted(_MOE))
@pytest.mark.parametrize("preset,bound", [("w8a16", 0.02), ("w4a16-gptq", 0.15), ("w8a8-int8-sq-dynamic", 0.02),
                                          ("w8a8-int8-sq", 0.02)])
def test_routers_stay_in_float_and_fused_experts_are_reported(arch, preset, bound):
    model, batches = _moe_model(arch), token_batches(4, 32, seed=1)
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qcompiler.quantize(model, preset, calibration=batches, progress=False)
    rep = qcompiler.report(model)
    routers = {f: d for f, d in rep.layers.items() if d.op_kind == "router"}
    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in (0, 1)] if arch == "qwen2_moe" else []
    assert sorted(routers) == sorted(["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"] + gates)  # + scalar gates
    assert all(not d.quantize and "'router' is in fallback.keep_op_kinds" in d.reason for d in routers.values())
    assert all(rep.layers[f"model.layers.{i}.self_attn.{p}_proj"].quantize for i in (0, 1) for p in "qkvo")
    experts = {f: d for f, d in rep.tensors.items() if d.kind == "experts"}
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    fused = [w for w in rep.warnings if "fused mixture-of-experts weights" in w]
    if preset == "w8a8-int8-sq":     # static activation scales: none is calibrated for the experts' inputs
        assert all(not d.quantize and "quantizes activations with static scales" in d.reason
                   for d in experts.values())
        assert len(fused) == 1 and "experts.gate_up_proj" in fused[0]
        assert any("fused mixture-of-experts" in str(w.message) for w in caught)
        assert not quantized_experts(model)
    else:
        assert all(d.quantize and d.bytes_q < d.bytes_fp / (1.9 if preset == "w8a16" else 3.5) for d in experts.values())
        assert not fused and not any("fused mixture-of-experts" in str(w.message) for w in caught)
        assert sorted(quantized_experts(model)) == sorted(experts)
        if preset == "w4a16-gptq":     # few tokens per expert here: GPTQ's min_samples sends them to RTN, noted
            assert all(d.note.startswith("per expert, from its routed tokens: ") for d in experts.values())
        dynamic = preset == "w8a8-int8-sq-dynamic"
        assert all(("int8 per-token activations (dynamic)" in d.format) == dynamic for d in experts.values())
        assert all((q.activation is not None) == dynamic for q in quantized_experts(model).values())
    assert _rel_to_float64(model, float_model, batches[0]) < bound


def _densify_experts(model) -> None:
    """Put each quantized fused expert weight of ``model`` back as a float parameter holding its dequantized values."""
    for key, q in quantized_experts(model).items():
        fqn, _, name = key.rpartition(".")
        module = model.get_submodule(fqn)
        del module._buffers[name]
        module.register_parameter(name, torch.nn.Parameter(q.dequantize(), requires_grad=False))


@pytest.mark.parametrize("arch", sorted(_MOE))
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_quantized_fused_experts_compute_their_dequantized_weights(arch, implementation):
    """Whichever experts implementation runs (the eager loop takes one expert at a time, the grouped GEMM
    transposes the whole tensor, the batched one indexes it per token), the model computes what the float
    model computes with the dequantized expert weights; each expert's codes are its own round to nearest."""
    from qcompiler.core.layer_quant import quantize_weight
    model, batches = _moe_model(arch), token_batches(4, 32, seed=1)
    float_model = copy.deepcopy(model)
    qcompiler.quantize(model, "w4a16-rtn", calibration=batches, progress=False)
    model.config._experts_implementation = implementation
    q = model.model.layers[1].mlp.experts.down_proj
    assert isinstance(q, QuantizedExperts) and q.shape == float_model.model.layers[1].mlp.experts.down_proj.shape
    w = float_model.model.layers[1].mlp.experts.down_proj.detach()
    spec = recipes.get("w4a16-rtn").weight
    assert all(torch.equal(q.experts[e].q, quantize_weight(w[e], spec).q) for e in range(w.shape[0]))
    assert not torch.equal(q[2], w[2]) and torch.equal(q[2], q.experts[2].dequantize())
    calls = []
    expert = QuantizedExperts._expert_dense     # each expert's dequantization
    QuantizedExperts._expert_dense = lambda self, e: calls.append(e) or expert(self, e)
    try:
        with torch.no_grad():
            got = model(batches[0]).logits
    finally:
        QuantizedExperts._expert_dense = expert
    assert calls
    _densify_experts(model)
    assert not quantized_experts(model)
    with torch.no_grad():
        want = model(batches[0]).logits
    assert float((got - want).norm() / want.norm()) < 1e-6


class _PerTokenExpertInputs(torch.overrides.TorchFunctionMode):
    """The reference for dynamic activations: each ``F.linear`` whose weight is a slice of one of ``weights`` (the
    eager loop's ``weight[e]``) takes its input quantized per token."""

    def __init__(self, weights, spec):
        super().__init__()
        self.storages, self.spec, self.calls = {w.untyped_storage().data_ptr() for w in weights}, spec, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and args[1].untyped_storage().data_ptr() in self.storages:
            from qcompiler.core import numerics
            q, s = numerics.quantize_per_token(args[0], self.spec.dtype.value)
            args = (numerics.dequantize(q, s, None, args[0].dtype), *args[1:])
            self.calls += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", sorted(_MOE))
@pytest.mark.parametrize("preset", ["w8a8-int8-sq-dynamic", "fp8-dynamic"])
def test_dynamic_activation_recipes_quantize_the_experts_inputs_per_token(arch, preset):
    """With a dynamic-activation recipe every experts implementation computes what the eager loop computes over
    the dequantized expert weights with each expert's input quantized per token (the reference, independent of
    the wrapper); without that quantization the logits move by far more."""
    model, batches = _moe_model(arch), token_batches(4, 32, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qcompiler.quantize(model, preset, calibration=batches, progress=False)
    held = quantized_experts(model)
    assert len(held) == 4 and all(q.activation == recipes.get(preset).activation for q in held.values())
    got = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.config._experts_implementation = implementation
        with torch.inference_mode():
            got[implementation] = model(batches[0]).logits
    _densify_experts(model)
    model.config._experts_implementation = "eager"
    dense = [p for n, p in model.named_parameters() if ".experts." in n]
    with torch.no_grad():
        weight_only = model(batches[0]).logits
        with _PerTokenExpertInputs(dense, recipes.get(preset).activation) as mode:
            want = model(batches[0]).logits
    assert mode.calls > 0
    for implementation, logits in got.items():
        err = float((logits - want).norm() / want.norm())
        assert err < 1e-5, (implementation, err)
    assert float((weight_only - want).norm() / want.norm()) > 1e-3


def test_fused_experts_follow_the_model_to_another_dtype_and_stay_quantized():
    model = _moe_model("mixtral")
    qcompiler.quantize(model, "w8a16", calibration=token_batches(2, 16, seed=1), progress=False)
    model.to(torch.bfloat16)
    q = model.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(q, QuantizedExperts) and q.dtype == torch.bfloat16 and q[0].dtype == torch.bfloat16
    with torch.no_grad():
        assert model(token_batches(1, 8, seed=2)[0]).logits.isfinite().all()


def test_fused_experts_kept_by_the_fallback_rules_stay_float_with_the_reason():
    recipe = recipes.get("w8a16")
    recipe = recipe.replace(fallback=dataclasses.replace(recipe.fallback, keep_modules=("*.layers.1.mlp.experts.*",)))
    model = _moe_model("qwen2_moe")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        qcompiler.quantize(model, recipe, calibration=token_batches(2, 16, seed=1), progress=False)
    rep = qcompiler.report(model)
    kept = rep.tensors["model.layers.1.mlp.experts.down_proj"]
    assert not kept.quantize and "keep_modules glob '*.layers.1.mlp.experts.*'" in kept.reason
    assert isinstance(model.model.layers[1].mlp.experts.down_proj, torch.nn.Parameter)
    assert rep.tensors["model.layers.0.mlp.experts.down_proj"].quantize
    assert any("fused mixture-of-experts" in w for w in rep.warnings)


def test_under_torch_compile_the_router_is_found_and_kept(arch="mixtral"):
    model, batches = _moe_model(arch), token_batches(4, 32, seed=1)
    float_model = copy.deepcopy(model)
    qb = qcompiler.backend("w8a16", calibration=batches, progress=False)
    compiled = torch.compile(model, backend=qb)
    with torch.no_grad():
        compiled(batches[0])
    assert not qb.report.layers["model.layers.0.mlp.gate"].quantize
    assert qb.report.layers["model.layers.0.mlp.gate"].op_kind == "router"
    assert _rel_to_float64(compiled, float_model, batches[0]) < 0.02
    torch._dynamo.reset()


def test_a_router_asked_to_be_quantized_is_kept_in_eager_mode_with_the_reason():
    """A recipe that leaves ``router`` out of keep_op_kinds quantizes the router's linear in the graph; eager
    mode cannot swap the router module (it returns logits, scores and indices, not a linear's output), so it
    stays in float saying so, and the model still runs."""
    recipe = recipes.get("w8a16").replace(name="w8a16-routers",
                                          fallback=FallbackSpec(keep_op_kinds=("embedding", "norm", "output_head")))
    model, batches = _moe_model("mixtral"), token_batches(4, 32, seed=1)
    float_model = copy.deepcopy(model)
    qcompiler.quantize(model, recipe, calibration=batches, progress=False)
    d = qcompiler.report(model).layers["model.layers.0.mlp.gate"]
    assert not d.quantize and "not a plain linear" in d.reason
    assert _rel_to_float64(model, float_model, batches[0]) < 0.02


def test_linear_probe_tells_a_linear_from_a_module_that_computes_more():
    from transformers.pytorch_utils import Conv1D
    lin = torch.nn.Linear(16, 8)
    assert linear_orientation(lin, 16) == (lin.weight, False)
    conv = Conv1D(8, 16)
    torch.nn.init.normal_(conv.weight)
    assert linear_orientation(conv, 16) == (conv.weight, True)
    half = torch.nn.Linear(16, 8).to(torch.bfloat16)
    assert linear_orientation(half, 16) == (half.weight, False)
    router = _moe_model("mixtral").model.layers[0].mlp.gate
    assert linear_orientation(router, 64) is None           # returns (logits, scores, indices)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    assert linear_orientation(Scaled(16, 8), 16) is None


# --- experts as a ModuleList of linears, one never routed to ---------------------------------------------

class _ListMoE(torch.nn.Module):
    """A top-1 mixture of 4 gated-MLP experts held as ``nn.Linear`` modules; expert 3 is never chosen."""

    def __init__(self, hidden: int, inter: int, n_experts: int = 4):
        super().__init__()
        self.router = torch.nn.Linear(hidden, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.ModuleDict(
            {"gate": torch.nn.Linear(hidden, inter, bias=False), "up": torch.nn.Linear(hidden, inter, bias=False),
             "down": torch.nn.Linear(inter, hidden, bias=False)}) for _ in range(n_experts))
        self.register_buffer("blocked", torch.tensor([False, False, False, True]))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).masked_fill(self.blocked, float("-inf"))
        weight, chosen = torch.softmax(logits, dim=-1).topk(1, dim=-1)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            rows = (chosen[:, 0] == e).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            h = x[rows]
            y = ex["down"](torch.nn.functional.silu(ex["gate"](h)) * ex["up"](h))
            out.index_add_(0, rows, y * weight[rows])
        return out.reshape(shape)


def _list_moe_model() -> torch.nn.Module:
    from tiny_models import tiny_model
    model = tiny_model("llama")
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = _ListMoE(64, 96)
    return model.eval()


@pytest.mark.parametrize("preset", ["w8a16", "w4a16-gptq", "w8a8-int8-sq"])
def test_an_expert_no_token_reaches_is_reported_and_quantized_from_its_weights(preset):
    model, batches = _list_moe_model(), token_batches(4, 32, seed=1)
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qcompiler.quantize(model, preset, calibration=batches, progress=False)
    rep = qcompiler.report(model)
    # Dynamo runs the data-dependent expert loop outside its graphs: the router is found by following its
    # output to the topk, and kept in float
    for i in (0, 1):
        router = rep.layers[f"model.layers.{i}.mlp.router"]
        assert router.op_kind == "router" and not router.quantize and "'router'" in router.reason
    for i in (0, 1):
        for p in ("gate", "up", "down"):
            reached, blocked = (rep.layers[f"model.layers.{i}.mlp.experts.{e}.{p}"] for e in (0, 3))
            if preset == "w8a8-int8-sq":     # static activation scales: nothing in the graphs to take them from
                assert not reached.quantize and not blocked.quantize
                assert "no calibration token reached it" in blocked.reason
                assert "static activation scales need" in blocked.reason
                continue
            assert reached.quantize and blocked.quantize and blocked.weight_format
            assert reached.note == "ran outside the captured graphs: " + (
                "its layer-by-layer result" if preset == "w4a16-gptq" else "round to nearest from its weights")
            assert blocked.note == ("ran outside the captured graphs, and no calibration token reached it: "
                                    "round to nearest from its weights")
            for e in (0, 3):
                module = model.get_submodule(f"model.layers.{i}.mlp.experts.{e}.{p}")
                assert type(module).__name__ == "QuantizedLinear"
    msg = next(w for w in rep.warnings if "ran outside the captured graphs" in w)
    assert msg.startswith("26 linears") and "6 of them reached by no calibration token" in msg, msg
    assert any("ran outside the captured graphs" in str(w.message) for w in caught)
    # the never-routed expert's quantized linears compute what its float ones do, within the format's rounding
    if preset != "w8a8-int8-sq":
        x = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
        for p in ("gate", "up", "down"):
            q = model.get_submodule(f"model.layers.1.mlp.experts.3.{p}")
            f = float_model.get_submodule(f"model.layers.1.mlp.experts.3.{p}")
            xi = x[:, :f.in_features]
            with torch.no_grad():
                want = xi.double() @ f.weight.double().t()
                got = q(xi).double()
            assert float((got - want).norm() / want.norm()) < (0.15 if preset == "w4a16-gptq" else 0.01), p


def test_layer_by_layer_calibration_keeps_the_router_in_float_as_the_graph_does():
    """The blocks after an MoE block are calibrated on the outputs of its float router (the one the quantized
    model runs), not of a quantized one."""
    from qcompiler.calibration.layerwise import LayerwiseCalibration
    model, batches = _list_moe_model(), token_batches(4, 32, seed=1)
    cal = LayerwiseCalibration(batches, recipes.get("w4a16-gptq"), progress=False)
    cal.collect(model)
    assert "model.layers.0.mlp.experts.0.gate" in cal.results
    assert not [f for f in cal.results if f.endswith("router")]


# --- quantized fused experts in checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["w4a16-rtn", "w8a16", "fp8-dynamic"])
def test_quantized_fused_experts_save_and_load_bit_for_bit(preset, tmp_path):
    from qcompiler.runtime.serialization import load_quantized, save_quantized
    model, batches = _moe_model("qwen2_moe"), token_batches(4, 32, seed=1)     # GPTQ's 128 rows for fp8-dynamic
    qcompiler.quantize(model, preset, calibration=batches, progress=False)
    save_quantized(model, tmp_path / "q", recipes.get(preset))
    loaded, _ = load_quantized(tmp_path / "q")
    assert sorted(quantized_experts(loaded)) == sorted(quantized_experts(model))
    assert all(t.activation == recipes.get(preset).activation for t in quantized_experts(loaded).values())
    with torch.no_grad():
        assert torch.equal(loaded(batches[0]).logits, model(batches[0]).logits)
    rep = qcompiler.report(loaded)
    d = rep.tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert d.kind == "experts" and d.format.endswith("4 experts") and 0 < d.bytes_q < d.bytes_fp


def test_a_checkpoint_missing_an_experts_tensor_is_refused_by_name(tmp_path):
    import safetensors.torch
    from qcompiler.errors import CheckpointError
    from qcompiler.runtime.serialization import load_quantized, save_quantized
    model = _moe_model("mixtral")
    qcompiler.quantize(model, "w8a16", calibration=token_batches(2, 16, seed=1), progress=False)
    save_quantized(model, tmp_path / "q", recipes.get("w8a16"))
    file = tmp_path / "q" / "model.safetensors"
    with safetensors.safe_open(str(file), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.layers.1.mlp.experts.down_proj.scale"]
    safetensors.torch.save_file(tensors, str(file), metadata=meta)
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model\.layers\.1\.mlp\.experts\.down_proj\.scale'"):
        load_quantized(tmp_path / "q")


def test_onnx_export_refuses_quantized_fused_experts_by_name(tmp_path):
    # compressed-tensors checkpoints write them per expert: tests/test_compressed_tensors_moe.py
    from qcompiler.errors import UnsupportedError
    model, batches = _moe_model("mixtral"), token_batches(2, 16, seed=1)
    qcompiler.quantize(model, "w4a16-rtn", calibration=batches, progress=False)
    with pytest.raises(UnsupportedError, match=r"export_onnx: .*fused mixture-of-experts.*keep_op_kinds"):
        qcompiler.export_onnx(model, "w4a16-rtn", batches[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# --- fused experts calibrated expert by expert (layer by layer, Hessian-based algorithms) -----------------------

def _expert_inputs(float_model, batch, layer: int):
    """Each expert's inputs in ``layer`` of the float model on ``batch``: ``({e: gate_up rows}, {e: down rows})``,
    recomputed here from the experts module's own arguments (tokens and the experts the router chose)."""
    experts = float_model.model.layers[layer].mlp.experts
    seen = {}
    h = experts.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], idx=args[1]))
    try:
        with torch.no_grad():
            float_model(batch)
    finally:
        h.remove()
    x, idx = seen["x"], seen["idx"]
    up_rows, down_rows = {}, {}
    for e in range(experts.gate_up_proj.shape[0]):
        _, tokens = torch.where((idx == e).t())      # the eager loop's order: by top-k slot, then token
        if tokens.numel():
            rows = x[tokens]
            gate, up = torch.nn.functional.linear(rows, experts.gate_up_proj[e]).chunk(2, dim=-1)
            up_rows[e], down_rows[e] = rows, experts.act_fn(gate) * up
    return up_rows, down_rows


def _gptq_reference(w: torch.Tensor, rows: torch.Tensor, recipe):
    """GPTQ of one expert's weight ``w`` run here on its input ``rows`` (the Hessian 2/n X^T X)."""
    from qcompiler.algorithms.gptq import gptq_quantize
    gptq = recipe.weight_algorithm
    xtx = (rows.t() @ rows).double()
    want, _ = gptq_quantize(w.float(), (xtx * (2.0 / rows.shape[0])).float(), recipe.weight, n_samples=rows.shape[0],
                            block_size=gptq.block_size, dampening=gptq.dampening, act_order=gptq.act_order,
                            static_groups=gptq.static_groups, min_samples=gptq.min_samples)
    return want


def _blocked_router(model, expert: int) -> list:
    """Forward hooks on every router so that ``expert`` is never chosen (its slots go to expert 0)."""
    def hook(module, args, out):
        logits, scores, index = out
        return logits, scores, torch.where(index == expert, torch.zeros_like(index), index)
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


@pytest.mark.parametrize("arch", sorted(_MOE))
def test_gptq_runs_per_expert_on_the_tokens_routed_to_it(arch):
    """Layer by layer, each expert of a fused weight gets GPTQ from its own Hessian: the codes equal GPTQ run
    here on the inputs recomputed from the float model for the tokens its router sent to it (block 0, where
    the calibration inputs are the float model's); an expert no token reaches is rounded to nearest from its
    weights, and the report says which."""
    from qcompiler.core.layer_quant import quantize_weight
    model, batches = _moe_model(arch, experts_implementation="eager"), token_batches(8, 64, seed=1)
    float_model = copy.deepcopy(model)
    for m in (model, float_model):
        _blocked_router(m, 3)
    recipe = recipes.get("w4a16-gptq")
    gptq = recipe.weight_algorithm
    qcompiler.quantize(model, recipe, calibration=batches, progress=False)
    up_rows, down_rows = _expert_inputs(float_model, torch.cat(batches), 0)
    assert sorted(up_rows) == [0, 1, 2]
    for name, rows_by_expert in (("gate_up_proj", up_rows), ("down_proj", down_rows)):
        q = getattr(model.model.layers[0].mlp.experts, name)
        w = getattr(float_model.model.layers[0].mlp.experts, name).detach()
        assert isinstance(q, QuantizedExperts)
        for e in range(4):
            if e not in rows_by_expert:
                assert torch.equal(q.experts[e].q, quantize_weight(w[e], recipe.weight).q)
                continue
            rows = rows_by_expert[e].float()
            assert rows.shape[0] >= gptq.min_samples
            want = _gptq_reference(w[e], rows, recipe)
            assert torch.equal(q.experts[e].q, want.q), f"{name} expert {e}"
            assert not torch.equal(want.q, quantize_weight(w[e], recipe.weight).q)   # GPTQ is not RTN here
    note = qcompiler.report(model).tensors["model.layers.1.mlp.experts.down_proj"].note
    assert note.startswith("per expert, from its routed tokens: gptq damp")
    assert note.endswith("; experts [3] reached by no calibration token, from their weights alone: round to nearest: "
                         "only 0 calibration rows reached it (GPTQ needs gptq.min_samples=128)"), note


def test_one_pass_calibration_runs_gptq_per_expert_on_the_float_models_routed_tokens():
    """Without layer-by-layer calibration (one pass of the float model, as ``w4a8-int8-sq-gptq`` calibrates), the
    same pass records each expert's routed tokens: every expert gets GPTQ from the float model's inputs, in every
    block (block 1 here: its inputs are the float model's, not the quantized blocks')."""
    model, batches = _moe_model("mixtral", experts_implementation="eager"), token_batches(8, 64, seed=1)
    float_model = copy.deepcopy(model)
    recipe = recipes.get("w4a16-gptq").replace(layerwise=False)
    qcompiler.quantize(model, recipe, calibration=batches, progress=False)
    up_rows, down_rows = _expert_inputs(float_model, torch.cat(batches), 1)
    for name, rows_by_expert in (("gate_up_proj", up_rows), ("down_proj", down_rows)):
        q = getattr(model.model.layers[1].mlp.experts, name)
        w = getattr(float_model.model.layers[1].mlp.experts, name).detach()
        assert isinstance(q, QuantizedExperts) and sorted(rows_by_expert) == [0, 1, 2, 3]
        for e, rows in rows_by_expert.items():
            rows = rows.float()
            want = _gptq_reference(w[e], rows, recipe)
            assert torch.equal(q.experts[e].q, want.q), f"{name} expert {e}"
        note = qcompiler.report(model).tensors[f"model.layers.1.mlp.experts.{name}"].note
        assert note == "per expert, from its routed tokens: gptq damp 0.01"


def test_one_pass_calibration_of_a_compiled_graph_leaves_the_experts_alone():
    """``qcompiler.backend`` graphs keep fused experts in float: their calibration pass records no expert."""
    from qcompiler.calibration.statistics import CalibrationCache
    model, batches = _moe_model("mixtral"), token_batches(4, 32, seed=1)
    cal = CalibrationCache(batches, hessian=True)
    cal.collect(model)
    assert cal.expert_results == {} and cal.stats


@pytest.mark.parametrize("preset,quantized_inputs", [("fp8-dynamic", True), ("w4a16-gptq", False)])
def test_layer_by_layer_calibration_shows_the_next_blocks_the_experts_inputs_quantized(preset, quantized_inputs,
                                                                                         monkeypatch):
    """Once a block's experts are quantized, the blocks after it are calibrated on what the quantized model
    computes: with dynamic activations, the experts' inputs quantized per token (block 0's experts quantize
    their inputs while block 1 is calibrated); weight-only recipes quantize none."""
    from qcompiler.calibration.layerwise import LayerwiseCalibration
    from qcompiler.core import expert_activations
    seen = []
    quantize_rows = expert_activations.quantize_rows
    monkeypatch.setattr(expert_activations, "quantize_rows", lambda x, spec, dim=-1: seen.append(spec.dtype.value)
                        or quantize_rows(x, spec, dim))
    model, batches = _moe_model("mixtral", experts_implementation="eager"), token_batches(8, 64, seed=1)
    cal = LayerwiseCalibration(batches, recipes.get(preset), progress=False)
    cal.collect(model)
    assert sorted(cal.expert_results) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                          for p in ("down_proj", "gate_up_proj")]
    assert (set(seen) == {"fp8_e4m3"}) if quantized_inputs else not seen
    assert isinstance(model.model.layers[0].mlp.experts.down_proj, torch.nn.Parameter)   # put back afterwards


def test_sparse_fp8_dynamic_prunes_each_expert_to_2_of_4_and_quantizes_its_inputs():
    """llm-compressor's 2:4 + FP8 scheme on fused experts: SparseGPT per expert from its routed tokens, at most two
    non-zeros in each run of four input channels, FP8 weights and per-token FP8 inputs; an expert no calibration
    token reaches is pruned by magnitude, not left dense."""
    model, batches = _moe_model("mixtral", experts_implementation="eager"), token_batches(8, 64, seed=1)
    _blocked_router(model, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qcompiler.quantize(model, "sparse24-fp8-dynamic", calibration=batches, progress=False)
    rep = qcompiler.report(model)
    held = quantized_experts(model)
    assert len(held) == 4
    for key, q in held.items():
        w = q.dequantize()
        w = w.transpose(-2, -1) if q.transposed else w
        assert int((w.reshape(-1, 4) != 0).sum(-1).max()) == 2 and (w == 0).float().mean() >= 0.5
        assert q.activation == recipes.get("sparse24-fp8-dynamic").activation
        assert "sparsegpt 2:4" in rep.tensors[key].note and "per-token activations" in rep.tensors[key].format
        assert "experts [3] reached by no calibration token, from their weights alone: magnitude 2:4" \
            in rep.tensors[key].note


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_sparsify_prunes_fused_experts_expert_by_expert_in_float(method):
    """``qcompiler.sparsify`` (float) prunes the fused experts too, each expert 2:4 (SparseGPT from its routed
    tokens, an expert no token reaches by magnitude; magnitude from the weights); routers stay dense."""
    from qcompiler.algorithms.sparsegpt import magnitude_prune
    from qcompiler.recipes import SparseGPTSpec
    model, batches = _moe_model("mixtral", experts_implementation="eager"), token_batches(8, 64, seed=1)
    _blocked_router(model, 3)
    before = copy.deepcopy(model)
    rep = qcompiler.sparsify(model, batches, SparseGPTSpec(method=method), progress=False)
    for i in (0, 1):
        mlp, old = model.model.layers[i].mlp, before.model.layers[i].mlp
        assert torch.equal(mlp.gate.weight, old.gate.weight)
        for name in ("gate_up_proj", "down_proj"):
            w, w0 = getattr(mlp.experts, name).detach(), getattr(old.experts, name).detach()
            assert not isinstance(w, QuantizedExperts)
            assert int((w.reshape(-1, 4) != 0).sum(-1).max()) == 2
            note = rep.pruned[f"model.layers.{i}.mlp.experts.{name}"]
            by_magnitude = torch.stack([magnitude_prune(w0[e], 2, 4)[0] for e in range(4)])
            if method == "magnitude":
                assert torch.equal(w, by_magnitude) and note == "magnitude 2:4, expert by expert"
            else:
                assert note.startswith("per expert, from its routed tokens: sparsegpt 2:4") and \
                    "experts [3] reached by no calibration token, from their weights alone: magnitude 2:4" in note
                assert torch.equal(w[3], by_magnitude[3]) and not torch.equal(w[:3], by_magnitude[:3])


def test_per_expert_results_resume_from_block_checkpoints(tmp_path):
    """A rerun that resumes after the saved blocks puts back their per-expert results: same weights."""
    from qcompiler.calibration.layerwise import LayerwiseCalibration
    batches = token_batches(8, 64, seed=1)
    recipe = recipes.get("w4a16-gptq")
    first = LayerwiseCalibration(batches, recipe, progress=False, checkpoint_dir=tmp_path / "ck")
    first.collect(_moe_model("mixtral"))
    again = LayerwiseCalibration(batches, recipe, progress=False, checkpoint_dir=tmp_path / "ck")
    again.collect(_moe_model("mixtral"))
    assert again.resumed_blocks == 2
    assert sorted(again.expert_results) == sorted(first.expert_results) and len(first.expert_results) == 4
    for key, (qws, note) in first.expert_results.items():
        assert again.expert_results[key][1] == note
        assert all(torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
                   for a, b in zip(qws, again.expert_results[key][0]))


def test_qat_says_the_fused_experts_are_not_trained():
    model = _moe_model("mixtral")
    with pytest.warns(UserWarning, match=r"prepare_qat: 4 fused mixture-of-experts weights .* not trained"):
        qcompiler.prepare_qat(model, "w8a16", calibration=token_batches(2, 16, seed=1), progress=False)
    assert len(quantized_experts(model)) == 4


@pytest.mark.parametrize("preset", ["w4a16-rtn", "fp8-dynamic"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_quantized_experts_run_under_inference_mode(arch, preset):
    """Every experts implementation runs the quantized experts under ``torch.inference_mode`` (the views they take,
    a transpose for the grouped GEMM or an expert's select, must match the tensor's inference-ness), giving what
    ``torch.no_grad`` gives; GPT-OSS's are stored transposed."""
    if arch == "gpt_oss":
        cfg = AutoConfig.for_model("gpt_oss", vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                   num_experts_per_tok=2, head_dim=16)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model = _moe_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qcompiler.quantize(model, preset, calibration=token_batches(4, 64, seed=1), progress=False)
    assert quantized_experts(model)
    ids = token_batches(2, 16, seed=5)[0].reshape(2, -1)
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.config._experts_implementation = implementation
        with torch.no_grad():
            want = model(ids).logits
        with torch.inference_mode():
            got = model(ids).logits
        assert torch.equal(got, want), implementation


def test_a_one_output_linear_is_a_scalar_gate_kept_in_float_on_every_path():
    """Qwen2-MoE's ``shared_expert_gate`` (one output channel, a sigmoid scaling the shared expert) is op kind
    ``router`` and stays float: in the graph pass (one-pass recipes) and layer by layer."""
    for preset in ("w8a8-int8-sq-dynamic", "w4a16-gptq"):
        model = _moe_model("qwen2_moe")
        qcompiler.quantize(model, preset, calibration=token_batches(8, 64, seed=1), progress=False)
        for i in (0, 1):
            d = qcompiler.report(model).layers[f"model.layers.{i}.mlp.shared_expert_gate"]
            assert d.op_kind == "router" and not d.quantize, (preset, d)
            assert type(model.model.layers[i].mlp.shared_expert_gate) is torch.nn.Linear
