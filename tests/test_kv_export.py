"""KV-cache quantization (``Recipe.kv_cache``) in the saved checkpoint and in the ONNX export.

Checkpoint: ``save_quantized`` stores each attention's key / value ranges and the scales derived
from them (``kv_cache.{i}.*``); ``load_quantized`` restores the calibration, so
``qcompiler.kv_cache(loaded)`` builds the same quantized cache without calibrating: greedy
generation through it gives the original's logits bit for bit (kv-int8 static per head, kv-int4
static per-channel keys + per-token values, asymmetric; a composed ``w8a16+kv-fp8``; grouped-query
heads observed repeated). Broken KV tensors are one ``CheckpointError``; the CLI writes them.

ONNX: static per-tensor INT8 / FP8 keys and values become one Q/DQ pair each in front of every
attention's batched matmuls, legal for the TensorRT rules, and onnxruntime computes the logits of
qcompiler's reference backend (which quantizes the cache in the compiled graph) to float32
rounding; every other KV format is refused before any work, naming ``recipe.kv_cache`` and why.
"""

from __future__ import annotations

import dataclasses

import json
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

import qcompiler
from qcompiler import recipes
from qcompiler.core import kv_format, numerics
from qcompiler.core.kv_format import KV_STATS_ATTR
from qcompiler.errors import CalibrationError, CheckpointError, UnsupportedError
from qcompiler.recipes import Granularity, KVCacheSpec
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.runtime.serialization import WEIGHTS_FILE, load_quantized, save_quantized, saved_metadata
from numerics_util import rel_err
from test_serialization import _drop, _rewrite
from tiny_models import VOCAB, calibration_batches, tiny_model, token_batches

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("fresh_dynamo")]


def _quantized(arch: str, recipe, attn: str | None = None) -> torch.nn.Module:
    model = tiny_model(arch)
    if attn is not None:
        model.config._attn_implementation = attn
    # exact kernels: "auto" may pick, per model, a faster kernel that sums in float32 in another order
    return qcompiler.quantize(model, recipe, calibration=calibration_batches(), progress=False, kernels="exact")


def _generate(model, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of 5 tokens after a 10-token prompt through ``cache``: (tokens, logits per step)."""
    prompt = token_batches(1, 10, seed=3)[0]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                             max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


# -- the checkpoint ----------------------------------------------------------------------------------

ROUND_TRIPS = [("llama", "kv-int8", None), ("llama", "kv-int8", "eager"), ("llama", "kv-int4", None),
               ("llama", "w8a16+kv-fp8", None)]


@pytest.mark.parametrize("arch,preset,attn", ROUND_TRIPS,
                         ids=[f"{a}-{p}" + (f"-{i}" if i else "") for a, p, i in ROUND_TRIPS])
def test_reloaded_kv_cache_generates_the_same_logits_without_calibration(arch, preset, attn, tmp_path):
    recipe = recipes.get(preset)
    if recipe.kv_cache.residual_window:        # kv-int4's 128-token window would hold these short prompts whole
        recipe = recipe.replace(kv_cache=dataclasses.replace(recipe.kv_cache, residual_window=2,
                                                             group_size=min(recipe.kv_cache.group_size, 2)))
    model = _quantized(arch, recipe, attn)
    spec, stats = model.__dict__[KV_STATS_ATTR]
    save_quantized(model, tmp_path, recipe, report=qcompiler.report(model))
    kv_meta = json.loads(saved_metadata(tmp_path)["kv_cache"])
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    assert kv_meta == {"attentions": model.config.num_hidden_layers, "kv_heads": kv_heads,
                       "dtype": kv_format.storage_name(spec), "key": spec.key.value, "value": spec.value.value}

    loaded, loaded_recipe = load_quantized(tmp_path)          # no calibration from here on
    assert loaded_recipe == recipe
    if attn is not None:             # the attention implementation is not part of config.json
        loaded.config._attn_implementation = attn
    for m in loaded.modules():       # the kernel policy is not saved: the original's
        if isinstance(m, QuantizedLinear):
            m.kernels = "exact"
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)} == \
        {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    loaded_spec, loaded_stats = loaded.__dict__[KV_STATS_ATTR]
    assert loaded_spec == spec and len(loaded_stats) == len(stats)
    assert all(torch.equal(a[r][i], b[r][i]) for a, b in zip(stats, loaded_stats) for r in ("key", "value")
               for i in (0, 1))
    if attn == "eager":              # matmul attention: observed heads repeated, folded onto the KV heads
        assert stats[0]["key"][0].shape[0] == model.config.num_attention_heads > kv_heads

    original_cache, loaded_cache = qcompiler.kv_cache(model), qcompiler.kv_cache(loaded)
    tokens, logits = _generate(model, original_cache)
    loaded_tokens, loaded_logits = _generate(loaded, loaded_cache)
    assert torch.equal(loaded_tokens, tokens) and torch.equal(loaded_logits, logits)
    assert loaded_cache.nbytes() == original_cache.nbytes() > 0
    from transformers import DynamicCache
    assert not torch.equal(_generate(model, DynamicCache())[1], logits)      # the cache is quantized

    # the scales a serving engine reads are those the cache used
    with safetensors.safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.startswith("kv_cache.")}
    for i, layer in enumerate(loaded_cache.layers):
        for role, short in (("key", "k"), ("value", "v")):
            scale, zero = layer._static[role]
            if not spec.is_static(role):          # per token / per group: computed as the cache is written
                assert scale is None and f"kv_cache.{i}.{short}_scale" not in stored
                continue
            assert torch.equal(stored[f"kv_cache.{i}.{short}_scale"].reshape(scale.shape), scale)
            assert (zero is None) == (f"kv_cache.{i}.{short}_zero" not in stored)
            if zero is not None:
                assert torch.equal(stored[f"kv_cache.{i}.{short}_zero"].reshape(zero.shape), zero)


@pytest.fixture(scope="module")
def saved_kv(tmp_path_factory):
    """A tiny Llama quantized with kv-int8 alone (every linear float), saved."""
    torch._dynamo.reset()
    model = _quantized("llama", "kv-int8")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    out = tmp_path_factory.mktemp("kv") / "q"
    save_quantized(model, out, recipes.get("kv-int8"))
    return out


BROKEN_KV = [
    ("no-kv-tensor", lambda d: _rewrite(d, tensors=lambda t: _drop(t, "kv_cache.1.key_min")),
     r"recipe 'kv-int8' has static KV-cache scales \(kv_cache int8: keys per_head, values per_head\) for 2 "
     r"attentions, but the file lacks tensors \['kv_cache.1.key_min'\]"),
    ("no-kv-scale", lambda d: _rewrite(d, tensors=lambda t: _drop(t, "kv_cache.0.v_scale")),
     r"lacks tensors \['kv_cache.0.v_scale'\]"),
    ("no-kv-metadata", lambda d: _rewrite(d, metadata=lambda m: _drop(m, "kv_cache"),
                                          tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("kv_")}),
     r"recipe 'kv-int8' has static KV-cache scales .* but the metadata lacks 'kv_cache' and the file its kv_cache"),
    ("kv-metadata-not-json", lambda d: _rewrite(d, metadata=lambda m: m | {"kv_cache": "{oops"}),
     r"metadata 'kv_cache' must be JSON with 'attentions' and 'kv_heads'"),
    ("kv-scale-edited",
     lambda d: _rewrite(d, tensors=lambda t: t | {"kv_cache.1.k_scale": 2 * t["kv_cache.1.k_scale"]}),
     r"kv_cache.1.k_scale \(shape \[2\]\) is not the scale of the stored key range"),
    ("kv-range-misshapen",
     lambda d: _rewrite(d, tensors=lambda t: t | {"kv_cache.0.key_max": t["kv_cache.0.key_max"][:, :3].contiguous()}),
     r"kv_cache.0.key_min / _max have shapes \[2, 16\] / \[2, 3\]"),
]


@pytest.mark.parametrize("break_it,match", [(b, m) for _, b, m in BROKEN_KV], ids=[i for i, _, _ in BROKEN_KV])
def test_broken_kv_tensors_are_one_checkpoint_error(break_it, match, saved_kv, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved_kv, folder)
    loaded, _ = load_quantized(folder)
    assert len(loaded.__dict__[KV_STATS_ATTR][1]) == 2
    break_it(folder)
    with pytest.raises(CheckpointError, match=match) as info:
        load_quantized(folder)
    assert "\n" not in str(info.value)


def test_save_refuses_a_kv_recipe_without_its_calibration(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"recipe 'kv-int8' has static KV-cache scales .* the model carries no "
                                         r"KV-cache calibration: run qcompiler.quantize"):
        save_quantized(model, tmp_path / "a", recipes.get("kv-int8"))
    quantized = _quantized("llama", "kv-int8")
    with pytest.raises(ValueError, match=r"calibration is for kv_cache \(int8: keys per_head, values per_head\); "
                                         r"recipe 'kv-fp8' has kv_cache \(fp8_e4m3"):
        save_quantized(quantized, tmp_path / "b", recipes.get("kv-fp8"))
    with pytest.raises(ValueError, match=r"recipe 'w8a16' has no kv_cache"):
        save_quantized(quantized, tmp_path / "c", recipes.get("w8a16"))
    assert not any((tmp_path / d / WEIGHTS_FILE).exists() for d in "abc")


@pytest.mark.parametrize("spec", [KVCacheSpec("int8", "per_token", "per_token"),
                                  KVCacheSpec("int4", "per_group", "per_token", symmetric=False, residual_window=3,
                                              group_size=2)], ids=["per_token", "per_group"])
def test_dynamic_kv_recipe_saves_without_calibration(spec, tmp_path):
    """Per-token / per-group keys and values need no calibration: a float model under that kv-only recipe
    saves, and the loaded model builds its cache from the recipe alone."""
    recipe = recipes.get("kv-int8").replace(name="kv-dynamic", kv_cache=spec)
    save_quantized(tiny_model("llama"), tmp_path, recipe)
    loaded, _ = load_quantized(tmp_path)
    assert loaded.__dict__[KV_STATS_ATTR] == (recipe.kv_cache, [])
    cache = qcompiler.kv_cache(loaded)
    _generate(loaded, cache)
    assert cache.nbytes() > 0


def test_cli_quantize_writes_the_kv_calibration(monkeypatch, tmp_path):
    from qcompiler.tools import cli, models

    class CharTokenizer:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

        def save_pretrained(self, path):
            pass

    monkeypatch.setattr(models, "load_model", lambda name, **kw: (tiny_model("llama"), CharTokenizer()))
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", "tiny", "--recipe", "w8a16+kv-int8", "--calib-text", str(text),
                     "--calib-samples", "2", "--calib-seq", "64", "--out", str(out), "-q"]) == 0
    assert json.loads(saved_metadata(out)["kv_cache"])["attentions"] == 2
    loaded, recipe = load_quantized(out)
    assert recipe.name == "w8a16+kv-int8" and len(loaded.__dict__[KV_STATS_ATTR][1]) == 2
    _generate(loaded, qcompiler.kv_cache(loaded))


# -- the ONNX export -----------------------------------------------------------------------------------

onnx_deps = pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None
                                   for m in ("onnx", "onnxruntime", "onnxscript")),
                               reason="onnx, onnxruntime and onnxscript are needed")
KV_INT8_PER_TENSOR = recipes.get("kv-int8").replace(name="kv-int8-per-tensor",
                                                    kv_cache=KVCacheSpec("int8", "per_tensor", "per_tensor"))


def _kv_q_values_match_numerics(path, feeds) -> int:
    """Each key / value QuantizeLinear's output equals ``numerics.quantize`` of its input (onnxruntime)."""
    import ml_dtypes
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from qcompiler.export import onnxruntime_session
    m = onnx.load(str(path))
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[1].endswith(("kv_key_scale",
                                                                                           "kv_value_scale"))]
    for name in dict.fromkeys(x for n in qs for x in (n.input[0], n.output[0])):
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    sess = onnxruntime_session(m.SerializeToString())
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for n in qs:
        fp8 = inits[n.input[2]].dtype == ml_dtypes.float8_e4m3fn
        ours = numerics.quantize(torch.from_numpy(values[n.input[0]]), torch.from_numpy(inits[n.input[1]]), None,
                                 "fp8_e4m3" if fp8 else "int8")
        got = np.asarray(values[n.output[0]])
        np.testing.assert_array_equal(got.view(np.uint8) if fp8 else got,
                                      ours.view(torch.uint8).numpy() if fp8 else ours.numpy())
    return len(qs)


EXPORTS = [("llama", "fp8+kv-fp8", False), ("gpt2", KV_INT8_PER_TENSOR, True)]


@onnx_deps
@pytest.mark.parametrize("arch,recipe,prequantized", EXPORTS,
                         ids=[f"{a}-{recipes.resolve(r).name}" + ("-prequantized" if p else "")
                              for a, r, p in EXPORTS])
def test_kv_export_is_legal_and_matches_the_reference_backend(arch, recipe, prequantized, tmp_path):
    import onnx
    from onnx import numpy_helper
    from qcompiler.export import check_tensorrt, export_onnx, onnxruntime_session
    recipe = recipes.resolve(recipe)
    model, calib = tiny_model(arch), calibration_batches()
    example = {"input_ids": calib[0], "attention_mask": torch.ones_like(calib[0])} if arch == "llama" else calib[0]
    if prequantized:    # the calibration the model carries: no calibration at export
        source = qcompiler.quantize(tiny_model(arch), recipe, calibration=calib, progress=False)
        result = export_onnx(source, recipe, example, tmp_path / "m.onnx")
    else:
        result = export_onnx(model, recipe, example, tmp_path / "m.onnx", calibration=calib, progress=False)
    layers = model.config.num_hidden_layers
    paths = tuple(f"{'model' if arch == 'llama' else 'transformer'}.{'layers' if arch == 'llama' else 'h'}.{i}."
                  f"{'self_attn' if arch == 'llama' else 'attn'}" for i in range(layers))
    assert result.kv_cache == paths and "KV cache: keys and values Q/DQ in 2 attention(s)" in result.describe()
    assert any(n.startswith("KV cache: keys and values go through one static per-tensor Q/DQ") for n in result.notes)
    kv = {k: d for k, d in result.report.tensors.items() if d.kind == "kv_cache"}
    assert sorted(kv) == list(paths) and all(d.quantize and d.note.startswith("ONNX: static per-tensor Q/DQ")
                                             for d in kv.values())

    onnx_model = onnx.load(str(result.path))
    onnx.checker.check_model(onnx_model, full_check=True)
    summary = check_tensorrt(onnx_model)
    kv_type = "FP8" if recipe.kv_cache.dtype.value == "fp8_e4m3" else "INT8"
    assert summary.gemms[f"BMM {kv_type}/float"] == 2 * layers          # K^T and V of every attention
    assert summary.activation_pairs == 2 * layers + len(result.report.quantized)

    # the scales: the calibration's, per tensor, as the reference backend's cache takes them
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qcompiler.backend(recipe, calibration=calib, progress=False,
                                                              kernels="exact"))
    reference_cache = qcompiler.kv_cache(compiled)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    for path, layer in zip(paths, reference_cache.layers):
        for role in ("key", "value"):
            lo, hi = layer.stats[role]
            want, _ = kv_format.static_scale((lo, hi), lo.shape[0], Granularity.PER_TENSOR, recipe.kv_cache)
            assert inits[f"model.{path}.kv_{role}_scale"] == pytest.approx(float(want), rel=1e-6)

    x = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(7))
    feeds, kwargs, valid = {"input_ids": x.numpy()}, {}, torch.ones_like(x, dtype=torch.bool)
    if "attention_mask" in result.inputs:
        mask = torch.ones_like(x)
        mask[1, -3:] = 0
        feeds["attention_mask"], kwargs["attention_mask"], valid = mask.numpy(), mask, mask.bool()
    assert _kv_q_values_match_numerics(result.path, feeds) == 2 * layers
    got = torch.from_numpy(onnxruntime_session(result.path).run(None, feeds)[0])
    with torch.no_grad():
        ref = compiled(x, **kwargs).logits
        plain = model(x, **kwargs).logits
    assert rel_err(ref[valid], plain[valid]) > 1e-4                           # quantized, the cache included
    assert rel_err(got[valid], ref[valid]) < 1e-5, rel_err(got[valid], ref[valid])


@onnx_deps
@pytest.mark.parametrize("kv,match", [
    (KVCacheSpec("int8"), r"recipe.kv_cache \(int8: keys per_head, values per_head\) has per_head key and per_head "
                          r"value scales; TensorRT activation Q/DQ .* 'activation-per-tensor'\): export with "
                          r"kv_cache.key='per_tensor' and kv_cache.value='per_tensor'"),
    (KVCacheSpec("int4", "per_channel", "per_token", symmetric=False),
     r"has INT4 keys / values; TensorRT's INT4 is for weights only"),
    (KVCacheSpec("int8", "per_tensor", "per_token"), r"has per_token value scales; per_token / per_group scales are computed as the cache is written"),
    (KVCacheSpec("fp8_e4m3", "per_channel", "per_tensor"), r"has per_channel key scales; .* export with kv_cache.key='per_tensor' \(e.g."),
    (KVCacheSpec("int8", "per_tensor", "per_tensor", symmetric=False),
     r"is asymmetric; TensorRT needs zero-points 0 \(rule 'zero-point'\)"),
    (KVCacheSpec("fp8_e4m3", "per_tensor", "per_tensor", residual_window=16),
     r"keeps the last 16 tokens in full precision"),
])
def test_unexportable_kv_cache_is_refused_before_any_work(kv, match, tmp_path):
    from qcompiler.export import export_onnx
    for base in ("kv-fp8", "fp8"):                       # alone, and composed with an exportable preset
        recipe = recipes.get(base).replace(name=f"{base}-x", kv_cache=kv)
        with pytest.raises(UnsupportedError, match=match) as info:
            export_onnx(torch.nn.Module(), recipe, torch.zeros(1, 4, dtype=torch.long), tmp_path / "x.onnx")
        assert f"recipe '{base}-x'" in str(info.value) and "export with" in str(info.value)
    assert not (tmp_path / "x.onnx").exists()


@onnx_deps
def test_kv_export_refuses_attentions_it_cannot_match(tmp_path):
    """Attentions counted by the export's probe must be those calibration saw; and a model that is not a
    transformers model (no attention interface) is refused: the KV quantization is never dropped."""
    from qcompiler.export import export_onnx
    model = _quantized("llama", KV_INT8_PER_TENSOR)
    spec, stats = model.__dict__[KV_STATS_ATTR]
    model.__dict__[KV_STATS_ATTR] = (spec, stats + stats[:1])
    with pytest.raises(UnsupportedError, match=r"calibration observed 3 attention calls per forward; through "
                                               r"transformers' attention interface the model runs 2"):
        export_onnx(model, KV_INT8_PER_TENSOR, token_batches(1, 8)[0], tmp_path / "x.onnx")

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out.transpose(1, 2).reshape(x.shape)

    calib = [{"x": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    bare = qcompiler.quantize(Attention(), KV_INT8_PER_TENSOR, calibration=calib, example_input=calib[0],
                              progress=False)
    with pytest.raises(UnsupportedError, match=r"recipe.kv_cache export needs a transformers model .* export with "
                                               r"kv_cache=None"):
        export_onnx(bare, KV_INT8_PER_TENSOR, calib[0], tmp_path / "x.onnx")
    with pytest.raises(CalibrationError, match="needs calibration data"):
        export_onnx(tiny_model("gpt2"), KV_INT8_PER_TENSOR, token_batches(1, 8)[0], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
