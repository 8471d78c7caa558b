"""save_quantized / load_quantized: bit-identical logits after a round trip, the files beside
the weights, refusals, and a smaller file than the float model's."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import qcompiler
from qcompiler import recipes
from qcompiler.eager import QuantizedLinear
from qcompiler.recipes import Recipe
from qcompiler.serialization import WEIGHTS_FILE, load_quantized, save_quantized, saved_metadata
from tiny_models import VOCAB, tiny_model, token_batches

PRESETS = ["w8a8-int8-sq", "fp8-dynamic", "w8a16", "w4a16-gptq", "w4a8-awq"]


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

    loaded, loaded_recipe = load_quantized(out)
    assert loaded_recipe == recipe
    assert not loaded.training
    q_before, q_after = _quantized_layers(model), _quantized_layers(loaded)
    assert q_before and sorted(q_before) == sorted(q_after)
    assert sorted(q_before) == sorted(d.fqn for d in rep.quantized)
    for fqn, m in q_before.items():
        n = q_after[fqn]
        assert (n.weight_dtype, n.group_size, n.act_dtype, n.act_dynamic) == \
            (m.weight_dtype, m.group_size, m.act_dtype, m.act_dynamic)
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
    with pytest.raises(ValueError, match="is not a qcompiler file"):
        load_quantized(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(2, 2)}, str(other / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format 'pt'"):
        load_quantized(other)


def test_load_float_checkpoint_folder_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(str(tmp_path))   # a Hugging Face float checkpoint, same file name
    assert (tmp_path / WEIGHTS_FILE).is_file()
    with pytest.raises(ValueError, match="not a qcompiler file"):
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
