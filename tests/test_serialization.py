"""save_quantized / load_quantized: bit-identical logits after a round trip, the files beside
the weights, refusals, and a smaller file than the float model's."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import qcompiler
from qcompiler import recipes
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.errors import CheckpointError
from qcompiler.recipes import Recipe
from qcompiler.runtime.serialization import WEIGHTS_FILE, load_quantized, save_quantized, saved_metadata
from tiny_models import VOCAB, tiny_model, token_batches

PRESETS = ["w8a8-int8-sq", "fp8-dynamic", "w8a16", "w4a16-gptq", "w4a8-awq", "w4a8-int8-sq-gptq"]


def _quantized_layers(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_is_bit_identical(arch, preset, tmp_path):
    model = tiny_model(arch)
    recipe = recipes.get(preset)
    calib = token_batches(4, 32) if recipe.needs_calibration else None
    qcompiler.quantize(model, recipe, calibration=calib, progress=False)
    rep = qcompiler.report(model)
    x = token_batches(2, 12, seed=7)
    with torch.inference_mode():
        ref = [model(input_ids=ids).logits for ids in x]

    out = tmp_path / f"{arch}-{preset}"
    weights = save_quantized(model, out, recipe, report=rep, source=f"tiny-{arch}")
    assert weights == out / WEIGHTS_FILE and weights.is_file()
    assert Recipe.from_json((out / "recipe.json").read_text()) == recipe
    saved_rep = json.loads((out / "report.json").read_text())
    assert saved_rep["recipe"] == preset
    assert set(saved_rep["layers"]) == set(rep.layers)
    assert (out / "config.json").is_file()
    meta = saved_metadata(out)
    assert meta["format"] == "qcompiler-1" and meta["source"] == f"tiny-{arch}"
    assert Recipe.from_json(meta["recipe"]) == recipe
    assert "kv_cache" not in meta                       # no KV cache in the recipe: no KV tensors (test_kv_export)

    loaded, loaded_recipe = load_quantized(out)
    assert loaded_recipe == recipe
    assert not loaded.training
    q_before, q_after = _quantized_layers(model), _quantized_layers(loaded)
    assert q_before and sorted(q_before) == sorted(q_after)
    assert sorted(q_before) == sorted(d.fqn for d in rep.quantized)
    loaded_rep = qcompiler.report(loaded)               # what the checkpoint holds, kept layers included
    assert sorted(d.fqn for d in loaded_rep.quantized) == sorted(q_before)
    assert sorted(d.fqn for d in loaded_rep.fallbacks) == sorted(d.fqn for d in rep.fallbacks)
    for fqn, m in q_before.items():
        n = q_after[fqn]
        assert (n.weight_dtype, n.group_size, n.act_dtype, n.act_dynamic, n.weight_format) == \
            (m.weight_dtype, m.group_size, m.act_dtype, m.act_dynamic, m.weight_format)
        assert n.w_q.dtype == m.w_q.dtype and torch.equal(n.w_q, m.w_q)
    with torch.inference_mode():
        for ids, r in zip(x, ref):
            got = loaded(input_ids=ids).logits
            assert torch.equal(got, r)
    assert torch.isfinite(ref[0]).all()


def test_load_from_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_quantized(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "does-not-exist")


def test_load_non_qcompiler_safetensors(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(2, 2)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="is not a qcompiler file"):
        load_quantized(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(2, 2)}, str(other / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="format 'pt'"):
        load_quantized(other)


def test_load_float_checkpoint_folder_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(str(tmp_path))   # a Hugging Face float checkpoint, same file name
    assert (tmp_path / WEIGHTS_FILE).is_file()
    with pytest.raises(CheckpointError, match="not a qcompiler file"):
        load_quantized(tmp_path)


# -- broken checkpoints: one CheckpointError naming the file and the key or layer ---------------------
W8 = Recipe(name="w8", weight=recipes.WeightSpec())   # no calibration, no warnings


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 (linears with biases) saved by save_quantized."""
    model = tiny_model("gpt2")
    qcompiler.quantize(model, W8, progress=False)
    out = tmp_path_factory.mktemp("saved") / "q"
    save_quantized(model, out, W8, report=qcompiler.report(model))
    return out


def _copy(saved, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(saved, out)
    return out


def _rewrite(folder, tensors=lambda t: t, metadata=lambda m: m):
    """Write the folder's weights again with ``tensors`` / ``metadata`` changed."""
    weights = folder / WEIGHTS_FILE
    with safetensors.safe_open(str(weights), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    safetensors.torch.save_file(tensors(t), str(weights), metadata=metadata(m))


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _layers(m: dict, change) -> dict:
    layers = json.loads(m["layers"])
    change(layers)
    return m | {"layers": json.dumps(layers)}


QPROJ = "transformer.h.0.attn.c_attn"

BROKEN = [
    ("text-file", lambda d: (d / WEIGHTS_FILE).write_text("not a safetensors file at all"),
     r"model.safetensors is not a readable safetensors file: .*header"),
    ("empty-file", lambda d: (d / WEIGHTS_FILE).write_bytes(b""), "is not a readable safetensors file"),
    ("truncated", lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100]),
     "is not a readable safetensors file"),
    ("no-metadata", lambda d: _rewrite(d, metadata=lambda m: None), r"is not a qcompiler file \(format None"),
    ("no-layers-key", lambda d: _rewrite(d, metadata=lambda m: _drop(m, "layers")), r"metadata lacks \['layers'\]"),
    ("no-recipe-key", lambda d: _rewrite(d, metadata=lambda m: _drop(m, "recipe")), r"metadata lacks \['recipe'\]"),
    ("layers-not-json", lambda d: _rewrite(d, metadata=lambda m: m | {"layers": "{oops"}),
     "metadata 'layers' is not JSON"),
    ("recipe-invalid", lambda d: _rewrite(d, metadata=lambda m: m | {"recipe": '{"type": "Recipe"}'}),
     "metadata 'recipe' is not a valid recipe"),
    ("layer-spec-lacks-key", lambda d: _rewrite(d, metadata=lambda m: _layers(m, lambda ls: ls[QPROJ].pop("in_features"))),
     rf"metadata of layer '{QPROJ}' lacks \['in_features'\]"),
    ("layer-lacks-scale", lambda d: _rewrite(d, tensors=lambda t: _drop(t, f"{QPROJ}.w_scale")),
     rf"layer '{QPROJ}' lacks tensors \['{QPROJ}.w_scale'\]"),
    ("layer-lacks-weight", lambda d: _rewrite(d, tensors=lambda t: _drop(t, f"{QPROJ}.w_q")),
     rf"layer '{QPROJ}' lacks tensors \['{QPROJ}.w_q'\]"),
    ("layer-lacks-bias", lambda d: _rewrite(d, tensors=lambda t: _drop(t, f"{QPROJ}.bias")),
     rf"layer '{QPROJ}' lacks tensors \['{QPROJ}.bias'\]"),
    ("layer-weight-wrong-shape", lambda d: _rewrite(d, tensors=lambda t: t | {f"{QPROJ}.w_q": t[f"{QPROJ}.w_q"][:5]}),
     rf"layer '{QPROJ}' weight has shape \(5, 64\)"),
    ("layer-not-in-model", lambda d: _rewrite(d, metadata=lambda m: _layers(
        m, lambda ls: ls.update({"transformer.h.9.mlp.c_fc": ls[QPROJ]}))),
     "layer 'transformer.h.9.mlp.c_fc' is not a module of the model"),
    ("float-tensor-missing", lambda d: _rewrite(d, tensors=lambda t: _drop(t, "transformer.wpe.weight")),
     r"does not match the model rebuilt from .*config.json: missing \['transformer.wpe.weight'"),
    ("float-tensor-wrong-shape", lambda d: _rewrite(d, tensors=lambda t: t | {"transformer.wpe.weight": torch.zeros(3, 64)}),
     r"does not match the model rebuilt from .*config.json: .*transformer.wpe.weight"),
    ("no-config", lambda d: (d / "config.json").unlink(), r"config.json not found"),
    ("config-not-json", lambda d: (d / "config.json").write_text("{"), r"config.json is not a usable model config"),
]


@pytest.mark.parametrize("break_it,match", [(b, m) for _, b, m in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_broken_checkpoint_is_one_checkpoint_error(break_it, match, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    load_quantized(folder)            # the copy loads before it is broken
    break_it(folder)
    with pytest.raises(CheckpointError, match=match) as info:
        load_quantized(folder)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_saved_metadata_of_a_corrupt_file(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    assert saved_metadata(folder)["format"] == "qcompiler-1"
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE} is not a readable safetensors file"):
        saved_metadata(folder)


def test_asymmetric_layer_without_zero_points(tmp_path):
    recipe = Recipe(name="w8-asym", weight=recipes.WeightSpec(symmetric=False))
    model = tiny_model("llama")
    qcompiler.quantize(model, recipe, progress=False)
    save_quantized(model, tmp_path, recipe)
    load_quantized(tmp_path)
    fqn = "model.layers.1.mlp.down_proj"
    _rewrite(tmp_path, tensors=lambda t: _drop(t, f"{fqn}.w_zero"))
    with pytest.raises(CheckpointError, match=rf"layer '{fqn}' lacks tensors \['{fqn}.w_zero'\]"):
        load_quantized(tmp_path)


def test_save_unquantized_model_refused(tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        save_quantized(model, out, recipes.get("w8a16"))
    assert not (out / WEIGHTS_FILE).exists() and not (out / "recipe.json").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_saved_file_smaller_than_float(tmp_path):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    float_path = tmp_path / "float.safetensors"
    safetensors.torch.save_model(copy.deepcopy(model), str(float_path))
    qcompiler.quantize(model, "w8a16", progress=False)
    assert len(_quantized_layers(model)) == 14
    weights = save_quantized(model, tmp_path / "q", recipes.get("w8a16"), report=qcompiler.report(model))
    fp_size, q_size = float_path.stat().st_size, weights.stat().st_size
    # decoder linear weights go from 4 to ~1 byte per element; the embedding and lm_head stay float32
    assert q_size < fp_size
    assert fp_size - q_size > 0.7 * 3 * linear
    assert q_size < 0.4 * fp_size


def test_round_trip_keeps_7bit_weights(tmp_path):
    import dataclasses
    recipe = recipes.get("w8a16").replace(name="w8a16-7bit",
                                          weight=dataclasses.replace(recipes.get("w8a16").weight, reduce_range=True))
    model = tiny_model("llama")
    qcompiler.quantize(model, recipe, progress=False)
    save_quantized(model, tmp_path, recipe)
    loaded, _ = load_quantized(tmp_path)
    layers = _quantized_layers(loaded)
    assert layers and all(m.weight_format.endswith("(7-bit)") for m in layers.values())
    assert all(int(m.w_q.abs().max()) <= 64 for m in layers.values())
