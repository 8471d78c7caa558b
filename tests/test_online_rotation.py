"""Online Hadamard transforms (``qcompiler.rotate(..., online=True)``, recipes ``BASE+rot-online``): the
inputs of the linears writing the residual stream go through ``qcompiler::hadamard_transform`` and their
weights take ``D^T``. The float model computes the same logits (float64), the transform is in the traced
graph on every target (the Triton target lowers it to its kernel), GPTQ / SmoothQuant / eager quantize see
the rotated inputs, an outlier input channel of ``down_proj`` is spread, the ONNX export writes each transform
as two float MatMuls, compressed-tensors writes it as its ``transform_config`` (and the loader applies one);
qcompiler's checkpoint records and restores it."""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler.errors import UnsupportedError
from qcompiler.recipes import Recipe, RotationSpec, WeightSpec, get
from qcompiler.rotation import OnlineHadamard, online_modules, remove_online, rotation_of
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")
ROTATABLE = ("llama", "qwen2", "mistral", "gemma", "phi3")
IDS = token_batches(2, 16, seed=3)[0]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ROTATABLE)
def test_online_rotation_keeps_the_logits_and_hooks_every_writer(arch):
    model = tiny_model(arch).double()
    ref = _logits(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = qcompiler.rotate(model, seed=1, online=True)
    assert result.online and sorted(result.online) == sorted(result.writers) and not result.online_refused
    assert sorted(online_modules(model)) == sorted(n.rsplit(".", 1)[0] for n in result.online)
    assert rel_err(_logits(model), ref) < 1e-5
    # the writers' weights differ from the offline rotation's by D^T on their columns
    offline = tiny_model(arch).double()
    qcompiler.rotate(offline, seed=1)
    params = dict(offline.named_parameters())
    for name in result.online:
        assert not torch.allclose(dict(model.named_parameters())[name], params[name])
        assert not torch.equal(before[name], params[name])
    remove_online(model)        # without the transforms the weights compute something else
    assert not online_modules(model) and rel_err(_logits(model), ref) > 0.01


def test_online_rotation_spreads_an_outlier_input_channel_of_down_proj():
    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, 5] *= 50.0
    col = lambda w: w.abs().amax(0)       # noqa: E731  per input channel
    assert col(down.weight).max() / col(down.weight).median() > 20
    qcompiler.rotate(model, seed=0, online=True)
    w = model.model.layers[0].mlp.down_proj.weight
    assert col(w).max() / col(w).median() < 4


@pytest.mark.parametrize("target", ["reference", "inductor", "triton"])
def test_compiled_model_runs_the_transform_on_every_target(target):
    if target == "triton":
        import triton_interpreter  # noqa: F401
    model = tiny_model("llama")
    ref = _logits(model)
    qcompiler.rotate(model, seed=0, online=True)
    torch._dynamo.reset()
    be = qcompiler.backend("w8a16+rot-online", calibration=calibration_batches(), target=target, progress=False)
    try:
        with torch.no_grad():
            out = torch.compile(model, backend=be, dynamic=False)(input_ids=IDS).logits
    finally:
        torch._dynamo.reset()
    report = qcompiler.report(model)
    assert "online Hadamard on the inputs of 4 writing linears" in str(report)
    assert rel_err(out.double(), ref.double()) < 0.05      # w8a16 error only
    if target == "triton":
        from qcompiler.backends.triton import availability
        if availability().runs_kernels:
            assert "lowered_triton_hadamard_transform=4" in str(report)


SIGNROUND_ONLINE = get("w4a16-signround+rot-online")
SIGNROUND_ONLINE = SIGNROUND_ONLINE.replace(weight_algorithm=type(SIGNROUND_ONLINE.weight_algorithm)(iters=8, batch_size=2))


@pytest.mark.parametrize("preset", ["w4a16-gptq+rot-online", "w8a8-int8-sq-dynamic+rot-online+kv-int8",
                                    SIGNROUND_ONLINE], ids=["gptq", "sq-dynamic-kv", "signround"])
def test_quantize_composes_with_online_rotation(preset):
    """Eager quantize: GPTQ's Hessians and SmoothQuant's statistics are of the transformed inputs, and the
    swapped ``QuantizedLinear`` keeps the transform (its hook)."""
    model, base = tiny_model("llama"), tiny_model("llama")
    qcompiler.quantize(model, preset, calibration=calibration_batches(), progress=False)
    assert rotation_of(model).online and len(online_modules(model)) == 4
    assert all(isinstance(h, OnlineHadamard) for n in online_modules(model)
               for h in model.get_submodule(n)._forward_pre_hooks.values())
    assert type(model.get_submodule(online_modules(model)[0])).__name__ == "QuantizedLinear"
    with torch.inference_mode():
        err = rel_err(model(input_ids=IDS).logits.double(), base(input_ids=IDS).logits.double())
    assert err < 0.15      # measured: 0.10 (gptq), 0.011 (sq-dynamic); 0.93 when the hook is lost


def test_recipe_names_json_and_mismatches():
    r = get("w4a16-gptq+kv-int8+rot-online")
    assert r.rotation == RotationSpec(seed=0, online=True) and r.kv_cache is not None
    assert Recipe.from_json(r.to_json()) == r
    assert get("w8a16+rot").rotation == RotationSpec()
    with pytest.raises(Exception, match="rotation is given twice"):
        get("w8a16+rot+rot-online")
    with pytest.raises(Exception, match="rotation.online"):
        RotationSpec(online="yes")
    model = tiny_model("llama")
    qcompiler.rotate(model, seed=0)           # offline only: a recipe asking for online transforms refuses it
    with pytest.raises(UnsupportedError, match="online=True"):
        qcompiler.quantize(model, "w8a16+rot-online", progress=False)


def test_qcompiler_checkpoint_keeps_the_online_transforms(tmp_path):
    from qcompiler.runtime.serialization import load_quantized, save_quantized
    recipe = get("w4a16-rtn+rot-online")
    model = tiny_model("llama")
    qcompiler.quantize(model, recipe, calibration=calibration_batches(), progress=False)
    with torch.inference_mode():
        ref = model(input_ids=IDS).logits
    save_quantized(model, tmp_path / "q", recipe)
    loaded, _ = load_quantized(tmp_path / "q")
    assert sorted(online_modules(loaded)) == sorted(online_modules(model))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=IDS).logits, ref)


def _quantized_online(recipe: str = "w4a16-rtn+rot-online"):
    model = tiny_model("llama")
    qcompiler.quantize(model, recipe, calibration=calibration_batches(), progress=False)
    with torch.inference_mode():
        return model, model(input_ids=IDS).logits


def _compressed_tensors_native(folder):
    """The folder as compressed-tensors' own user runs it: transformers loads the quantized model (and drops
    the transform matrices), ``apply_transform_config`` hooks the transforms on, and their stored matrices
    are loaded into them (the tied ones share one tensor)."""
    import json
    import safetensors.torch
    import transformers
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = json.loads((folder / "config.json").read_text())["quantization_config"]["transform_config"]
    apply_transform_config(model, TransformConfig.model_validate(config))
    matrices = {k: v for k, v in safetensors.torch.load_file(folder / "model.safetensors").items() if "_input." in k}
    assert not model.load_state_dict(matrices, strict=False).unexpected_keys
    return model


def test_compressed_tensors_carries_the_online_transforms(tmp_path):
    """The transforms go into ``transform_config`` (Sylvester's as ``hadamard``, H_12 x H_8 as
    ``random-hadamard`` with its matrix); qcompiler's loader gives the saved model's logits bit for bit,
    compressed-tensors' own transforms within float32 rounding; transformers alone drops them."""
    import json
    import transformers
    from qcompiler.runtime.compressed_tensors_load import load_compressed_tensors
    model, ref = _quantized_online()
    folder = tmp_path / "ct"
    qcompiler.save_compressed_tensors(model, folder, "w4a16-rtn+rot-online")
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert {n: (g["type"], sorted(g["apply"][0]["targets"])) for n, g in groups.items()} == {
        "online_sylvester": ("hadamard", [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]),
        "online_hadamard": ("random-hadamard", [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)])}
    loaded, _ = load_compressed_tensors(folder)
    assert sorted(online_modules(loaded)) == sorted(online_modules(model))
    assert all(isinstance(h, OnlineHadamard) for n in online_modules(loaded)
               for h in loaded.get_submodule(n)._forward_pre_hooks.values())
    assert str(qcompiler.report(loaded)).count("its input through an online transform") == 4
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=IDS).logits, ref)
        assert rel_err(_compressed_tensors_native(folder)(input_ids=IDS).logits, ref) < 1e-5    # measured 2.4e-7
        plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        dropped = rel_err(plain(input_ids=IDS).logits, ref)
        print(f"transformers without the transforms: {dropped:.2f} relative error")     # measured 0.89
        assert dropped > 0.1


def test_a_checkpoints_transform_matrices_are_applied_as_stored(tmp_path):
    """Matrices that are not qcompiler's (random signs, blocks of 32 by ``head_dim``, ``inverse``) are applied
    as compressed-tensors applies them, and written again as they were read."""
    import json
    import safetensors.torch
    from qcompiler.core.online_rotation import MatrixTransform, sylvester
    from qcompiler.runtime.compressed_tensors_load import load_compressed_tensors
    from qcompiler.runtime.serialization import save_quantized
    model, _ = _quantized_online()
    folder = tmp_path / "ct"
    qcompiler.save_compressed_tensors(model, folder, "w4a16-rtn+rot-online")
    config = json.loads((folder / "config.json").read_text())
    groups = config["quantization_config"]["transform_config"]["config_groups"]
    groups["online_sylvester"] |= {"type": "random-hadamard", "head_dim": 32}
    groups["online_sylvester"]["apply"][0]["inverse"] = True
    (folder / "config.json").write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    signs = torch.randint(0, 2, (96,), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    down = "model.layers.0.mlp.down_proj.online_hadamard_input.weight"
    tensors[down] = signs[:, None] * tensors[down]
    o_proj = "model.layers.0.self_attn.o_proj.online_sylvester_input.weight"
    tensors[o_proj] = signs[:32, None] * sylvester(32)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded, recipe = load_compressed_tensors(folder)
    hooks = [h for n in online_modules(loaded) for h in loaded.get_submodule(n)._forward_pre_hooks.values()]
    assert len(hooks) == 4 and all(isinstance(h, MatrixTransform) for h in hooks)
    with torch.inference_mode():
        out = loaded(input_ids=IDS).logits
        assert rel_err(out, _compressed_tensors_native(folder)(input_ids=IDS).logits) < 1e-5
        qcompiler.save_compressed_tensors(loaded, tmp_path / "again", recipe)
        again, _ = load_compressed_tensors(tmp_path / "again")
        assert torch.equal(again(input_ids=IDS).logits, out)
    with pytest.raises(UnsupportedError, match="compressed-tensors transform matrix"):
        save_quantized(loaded, tmp_path / "q", recipe)


@pytest.mark.parametrize("m,p", [(1, 16), (12, 8), (20, 4), (1, 1)])
def test_the_dense_form_is_the_transform(m, p):
    from qcompiler.core.online_rotation import DenseHadamard
    from qcompiler.core.reference_kernels import hadamard_transform_ref
    from qcompiler.algorithms.hadamard import hadamard
    h = hadamard(m) if m > 1 else torch.ones(1, 1)
    x = torch.randn(3, 5, m * p, dtype=torch.float64, generator=torch.Generator().manual_seed(m + p))
    scale = (m * p) ** -0.5
    (dense,) = DenseHadamard(h, m * p, scale)(None, (x.float(),))
    assert rel_err(dense.double(), hadamard_transform_ref(x, h.double(), scale)) < 1e-6


def _spec_steps_token_by_token(x, h_block, scale):
    """The documented steps of ``qcompiler::hadamard_transform`` for one token at a time: butterflies at strides
    1, 2, 4, ... on each of the m slices, then slice i = sum over j = 0 .. m-1 of h_block[i, j] * slice j."""
    m = h_block.shape[0]
    rows = x.reshape(-1, x.shape[-1]).float()
    out = []
    for row in rows:
        y = [row[j * (row.numel() // m):(j + 1) * (row.numel() // m)].clone() for j in range(m)]
        for s in y:
            h = 1
            while h < s.numel():
                for start in range(0, s.numel(), 2 * h):
                    a, b = s[start:start + h].clone(), s[start + h:start + 2 * h].clone()
                    s[start:start + h], s[start + h:start + 2 * h] = a + b, a - b
                h *= 2
        slices = []
        for i in range(m):
            acc = torch.zeros_like(y[0])
            for j in range(m):
                acc = acc + h_block[i, j] * y[j]
            slices.append(acc * scale)
        out.append(torch.cat(slices))
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("chunk_tokens", [None, 2], ids=["one-chunk", "chunks-of-2"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("n,shape", [(576, (2, 3)), (1536, (2,)), (96, (4, 5)), (16, (3,))])
def test_the_reference_kernel_adds_in_the_documented_order(n, shape, contiguous, chunk_tokens, monkeypatch):
    """The reference kernel's layout (token chunks, tokens innermost) changes no addition: it equals the documented
    steps run token by token bit for bit (the Triton kernel is held to the same steps), from a contiguous or a
    strided input (left as it was), and returns a contiguous tensor as its fake kernel says."""
    from qcompiler.algorithms.hadamard import online_hadamard
    from qcompiler.core import reference_kernels
    from qcompiler.core.reference_kernels import hadamard_transform_ref
    if chunk_tokens:     # several token chunks, the last one short
        monkeypatch.setattr(reference_kernels, "_HADAMARD_CACHE_FLOATS", chunk_tokens * n)
    h_block, _, scale = online_hadamard(n)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(n)).movedim(0, -1)
    x = x.contiguous() if contiguous else x
    before = x.clone()
    out = hadamard_transform_ref(x, h_block, scale)
    assert out.is_contiguous() and out.shape == x.shape and torch.equal(x, before)
    assert torch.equal(out, _spec_steps_token_by_token(x, h_block, scale))


def test_the_reference_kernel_multiplies_then_adds_for_any_block():
    """A block with entries other than +-1 (no exact products): each product is rounded, then added, as the
    documented steps say."""
    from qcompiler.core.reference_kernels import hadamard_transform_ref
    g = torch.Generator().manual_seed(3)
    h_block, x = torch.randn(3, 3, generator=g), torch.randn(5, 24, generator=g)
    assert torch.equal(hadamard_transform_ref(x, h_block, 0.3), _spec_steps_token_by_token(x, h_block, 0.3))


@pytest.mark.parametrize("m,p", [(1, 16), (12, 8), (20, 4)])
def test_the_transform_backpropagates_its_transpose(m, p):
    """Gradients flow through ``qcompiler::hadamard_transform`` (SignRound's block tuning and QAT train through
    online transforms): the input's gradient is the dense matrix's transpose times the output's (float64 ref)."""
    from qcompiler.algorithms.hadamard import hadamard
    from qcompiler.core.ops import hadamard_transform
    h = hadamard(m) if m > 1 else torch.ones(1, 1)
    n, scale = m * p, (m * p) ** -0.5
    gen = torch.Generator().manual_seed(m * 31 + p)
    x = torch.randn(4, n, generator=gen, requires_grad=True)
    g = torch.randn(4, n, generator=gen)
    hadamard_transform(x, h, scale).backward(g)
    dense = hadamard_transform(torch.eye(n), h, scale).double().t()      # column j = transform of e_j
    want = g.double() @ dense                                             # dx = D^T dy, rows as vectors
    assert rel_err(x.grad.double(), want) < 1e-6
    assert m == 1 or not torch.equal(h, h.t())                            # the transpose matters (Paley blocks)


# 7-bit weights: onnxruntime's CPU int8 GEMM is exact with them on every x86 CPU (tests/test_export_onnx.py)
W8A8_7BIT_ONLINE = get("w8a8-int8-sq+rot-online").replace(name="w8a8-int8-sq-7bit+rot-online",
                                                          weight=WeightSpec(reduce_range=True))


@pytest.mark.parametrize("preset", ["w4a16-rtn+rot-online", W8A8_7BIT_ONLINE], ids=["w4a16", "w8a8-7bit"])
def test_the_onnx_export_writes_the_transforms_as_matmuls(tmp_path, preset):
    import copy
    import onnx
    import onnx.numpy_helper
    from qcompiler.core.online_rotation import to_dense_hooks
    from qcompiler.export import check_tensorrt, export_onnx, onnxruntime_session
    model, calib = tiny_model("llama"), calibration_batches()
    reference = qcompiler.quantize(copy.deepcopy(model), preset, calibration=calib, progress=False)
    result = export_onnx(model, preset, IDS, tmp_path / "m.onnx", calibration=calib, progress=False)
    assert not online_modules(model)                          # the export rotated a copy
    graph = onnx.load(str(result.path)).graph
    hadamards = {i.name for i in graph.initializer if len(i.dims) == 2 and i.dims[0] == i.dims[1]
                 and bool((onnx.numpy_helper.to_array(i).__abs__() == 1).all())}
    transforms = [n for n in graph.node if n.op_type == "MatMul" and any(i in hadamards for i in n.input)]
    hooks = [h for name in online_modules(reference)
             for h in reference.get_submodule(name)._forward_pre_hooks.values() if isinstance(h, OnlineHadamard)]
    assert len(hooks) == 4 and len(transforms) == sum(1 + (h.h_block.shape[0] > 1) for h in hooks)
    check_tensorrt(onnx.load(str(result.path)))
    got = torch.from_numpy(onnxruntime_session(result.path).run(None, {"input_ids": IDS.numpy()})[0])
    # the dense form rounds differently from the butterflies (1e-7): with static INT8 activations a value
    # on a rounding boundary may flip, so the exact comparison is against the model with the dense hooks
    to_dense_hooks(reference)
    err = rel_err(got, _logits(reference))
    assert err < 1e-4, err


@pytest.mark.parametrize("preset, warns", [("w8a8-int8-sq+rot-online", True),
                                           ("w8a8-int8-sq-dynamic+rot-online", False),
                                           ("w8a8-int8-sq+rot", False)])
def test_static_activations_with_online_transforms_warn(preset, warns, caplog):
    from qcompiler.rotation import apply_recipe_rotation
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="qcompiler.rotation"):
        apply_recipe_rotation(model, qcompiler.recipes.get(preset))
    assert ("cannot hold" in caplog.text) == warns
