"""Fused mixture-of-experts weights in compressed-tensors checkpoints: ``save_compressed_tensors`` writes each
quantized expert as the per-expert linears of the architecture's own checkpoint layout (found from
transformers' reverse conversion, ``qcompiler.runtime.checkpoint_names``), which transformers (5.25,
compressed-tensors 0.20.1) reads back into its fused parameters and ``load_compressed_tensors`` into
``QuantizedExperts`` with the same codes; what the layout or the loaders cannot hold is refused by name."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM

pytest.importorskip("compressed_tensors")

import qcompiler  # noqa: E402
from qcompiler.errors import CheckpointError, UnsupportedError  # noqa: E402
from qcompiler.runtime.checkpoint_names import ExpertSlice, _slice_of, checkpoint_slices  # noqa: E402
from qcompiler.runtime.fused_experts import quantized_experts  # noqa: E402
from tiny_models import token_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: sizes every group of 64 divides (the checkpoint takes one scheme for experts and linears)
_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=128),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64, intermediate_size=128),
}
#: expert e of layer i in each architecture's published checkpoints: (name, rows of [N, K]) per fused weight
_LAYOUT = {
    "mixtral": lambda i, e: {"gate_up_proj": [(f"model.layers.{i}.block_sparse_moe.experts.{e}.w1", 0, 128),
                                              (f"model.layers.{i}.block_sparse_moe.experts.{e}.w3", 128, 256)],
                             "down_proj": [(f"model.layers.{i}.block_sparse_moe.experts.{e}.w2", 0, 64)]},
    "qwen2_moe": lambda i, e: {"gate_up_proj": [(f"model.layers.{i}.mlp.experts.{e}.gate_proj", 0, 64),
                                                (f"model.layers.{i}.mlp.experts.{e}.up_proj", 64, 128)],
                               "down_proj": [(f"model.layers.{i}.mlp.experts.{e}.down_proj", 0, 64)]},
}


def _model(arch: str, **sizes) -> torch.nn.Module:
    cfg = AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, **{**_MOE[arch], **sizes})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _quantized(arch: str, preset: str) -> torch.nn.Module:
    model = _model(arch)
    qcompiler.quantize(model, preset, calibration=token_batches(4, 32, seed=1), progress=False)
    assert len(quantized_experts(model)) == 4
    return model


@pytest.mark.parametrize("arch", sorted(_MOE))
def test_checkpoint_slices_follow_the_architectures_published_layout(arch):
    model = _model(arch)
    for i in range(2):
        for proj in ("gate_up_proj", "down_proj"):
            p = getattr(model.model.layers[i].mlp.experts, proj)
            got = checkpoint_slices(model, f"model.layers.{i}.mlp.experts.{proj}", tuple(p.shape), False)
            want = [ExpertSlice(name, e, a, b) for e in range(4) for name, a, b in _LAYOUT[arch](i, e)[proj]]
            assert got == want


def test_a_transposed_expert_is_read_by_rows_of_its_out_in_matrix():
    shape = (3, 8, 6)                                   # [E, K, N]: each expert's [N, K] matrix is index[e].t()
    index = torch.arange(3 * 8 * 6, dtype=torch.int32).reshape(shape)
    assert _slice_of("k", "a.2.up.weight", index[2].t()[4:6], shape, True) == ExpertSlice("a.2.up", 2, 4, 6)
    with pytest.raises(UnsupportedError, match=r"'a\.2\.up\.weight' \[6, 4\], not whole rows of one expert"):
        _slice_of("k", "a.2.up.weight", index[2].t()[:, :4], shape, True)          # columns split
    with pytest.raises(UnsupportedError, match="not whole rows of one expert"):
        _slice_of("k", "a.up.weight", torch.cat([index[0].t()[:2], index[1].t()[2:4]]), shape, True)


@pytest.mark.parametrize("arch,preset", [("mixtral", "w4a16-gptq"), ("qwen2_moe", "w4a16-gptq"),
                                         ("mixtral", "fp8-dynamic"), ("qwen2_moe", "w8a16")])
def test_transformers_and_qcompiler_read_back_the_experts(arch, preset, tmp_path):
    model = _quantized(arch, preset)
    ids = token_batches(1, 16, seed=5)[0]
    with torch.no_grad():
        want = model(ids).logits
    path = qcompiler.save_compressed_tensors(model, tmp_path / "ct", preset)
    keys = set(safetensors.torch.load_file(str(path / "model.safetensors")))
    suffixes = (".weight", ".weight_scale") if preset == "fp8-dynamic" else (".weight_packed", ".weight_scale")
    for i in range(2):
        for e in range(4):
            for proj in ("gate_up_proj", "down_proj"):
                assert all(name + s in keys for name, _, _ in _LAYOUT[arch](i, e)[proj] for s in suffixes)
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)   # nothing fused left
    ours = quantized_experts(model)

    theirs = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    for key, t in ours.items():
        fqn, _, name = key.rpartition(".")
        assert torch.equal(getattr(theirs.get_submodule(fqn), name).detach(), t.dequantize())
    if preset != "fp8-dynamic":   # weight-only: the same float model; fp8-dynamic: transformers leaves expert inputs float
        with torch.no_grad():
            assert torch.equal(theirs(ids).logits, want)

    loaded, recipe = qcompiler.load_compressed_tensors(path)
    back = quantized_experts(loaded)
    assert sorted(back) == sorted(ours)
    for key, t in ours.items():
        assert back[key].transposed == t.transposed and back[key].activation == t.activation
        for a, b in zip(t.experts, back[key].experts):
            assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and a.group_size == b.group_size
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_int8_experts_with_dynamic_activations_round_trip_and_warn_about_transformers(tmp_path, caplog):
    model = _quantized("mixtral", "w8a8-int8-sq-dynamic")
    ids = token_batches(1, 16, seed=5)[0]
    with torch.no_grad():
        want = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="qcompiler.export.compressed_tensors"):
        path = qcompiler.save_compressed_tensors(model, tmp_path / "ct", "w8a8-int8-sq-dynamic")
    assert any("int-quantized" in r.message and "transformers (5.25) cannot load such experts" in r.message
               for r in caplog.records)
    with pytest.raises(RuntimeError):     # transformers' experts reader takes packed and FP8 experts only
        AutoModelForCausalLM.from_pretrained(str(path))
    loaded, _ = qcompiler.load_compressed_tensors(path)
    back = quantized_experts(loaded)
    assert all(t.activation is not None and t.activation.dtype.value == "int8" for t in back.values())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_experts_and_linears_in_two_schemes_are_refused(tmp_path):
    model = _model("mixtral", intermediate_size=96)         # group 64 does not divide the experts' down_proj K
    qcompiler.quantize(model, "w4a16-rtn", progress=False)
    with pytest.raises(UnsupportedError, match=r"2 compressed-tensors schemes .*group 32: 8 layers, e\.g\. "
                                               r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w2'"):
        qcompiler.save_compressed_tensors(model, tmp_path / "ct", "w4a16-rtn")
    assert not (tmp_path / "ct").exists()


def test_experts_the_architecture_keeps_fused_are_refused(tmp_path):
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    qcompiler.quantize(model, "w8a16", progress=False)
    assert quantized_experts(model)
    with pytest.raises(UnsupportedError, match=r"save_compressed_tensors: fused experts 'model\.layers\.0\.mlp\.experts"
                                               r"\.(gate_up|down)_proj'.*keep the experts fused.*save_quantized"):
        qcompiler.save_compressed_tensors(model, tmp_path / "ct", "w8a16")
    assert not (tmp_path / "ct").exists()


def test_a_checkpoint_missing_one_experts_tensors_is_refused_by_name(tmp_path):
    model = _quantized("qwen2_moe", "w8a16")
    path = qcompiler.save_compressed_tensors(model, tmp_path / "ct", "w8a16")
    file = path / "model.safetensors"
    with safetensors.safe_open(str(file), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for k in [k for k in tensors if k.startswith("model.layers.1.mlp.experts.2.up_proj.")]:
        del tensors[k]
    safetensors.torch.save_file(tensors, str(file), metadata=meta)
    with pytest.raises(CheckpointError, match=r"expert 2 of 'model\.layers\.1\.mlp\.experts\.gate_up_proj', stored as "
                                              r"'model\.layers\.1\.mlp\.experts\.2\.up_proj': the checkpoint lacks"):
        qcompiler.load_compressed_tensors(path)


def test_tensors_take_the_architectures_published_names(tmp_path):
    """transformers 5 calls Mixtral's ``block_sparse_moe`` ``mlp``; the checkpoint uses the published name (what
    vLLM's Mixtral loads, what ``save_pretrained`` writes) and both loaders read it back."""
    model = _quantized("mixtral", "w4a16-rtn")
    path = qcompiler.save_compressed_tensors(model, tmp_path / "ct", "w4a16-rtn")
    keys = set(safetensors.torch.load_file(str(path / "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    model.save_pretrained(tmp_path / "float-names")      # transformers' own names for the float tensors
    theirs = set(safetensors.torch.load_file(str(tmp_path / "float-names" / "model.safetensors")))
    assert {k for k in keys if k.endswith(("norm.weight", "gate.weight"))} == \
        {k for k in theirs if k.endswith(("norm.weight", "gate.weight"))}


def test_float_experts_are_written_per_expert_and_ignored(tmp_path, caplog):
    """A recipe with static activation scales keeps the experts in float: the checkpoint stores them per expert,
    as ``save_pretrained`` and llm-compressor do, lists those linears in ``ignore`` (vLLM's layout), and
    ``load_compressed_tensors`` gives the same logits; transformers 5.25 cannot load that layout (a warning says
    so)."""
    import json
    model = _model("mixtral")
    qcompiler.quantize(model, "w8a8-int8-sq", calibration=token_batches(4, 32, seed=1), progress=False)
    assert not quantized_experts(model)
    ids = token_batches(1, 16, seed=5)[0]
    with torch.no_grad():
        want = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="qcompiler.export.compressed_tensors"):
        path = qcompiler.save_compressed_tensors(model, tmp_path / "ct", "w8a8-int8-sq")
    assert any("fused experts kept in float are written per expert" in r.message for r in caplog.records)
    keys = set(safetensors.torch.load_file(str(path / "model.safetensors")))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    ignore = json.loads((path / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in ignore
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(str(path))
    loaded, _ = qcompiler.load_compressed_tensors(path)
    with torch.no_grad():
        got = loaded(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj)


def test_config_names_the_architecture_for_a_model_built_from_its_config(tmp_path):
    """vLLM picks its model class by ``architectures``, which ``save_pretrained`` sets: a model built with
    ``from_config`` (none set) gets it too."""
    import json
    model = _quantized("qwen2_moe", "w8a16")
    assert not model.config.architectures
    path = qcompiler.save_compressed_tensors(model, tmp_path / "ct", "w8a16")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    assert not model.config.architectures        # the model's own config is left as it was
