"""The quantized KV cache (``qcompiler.kv_cache`` -> ``QuantizedKVCache``): it stores codes and
scales (INT4 packed), gives back at each decode step what the KV-cache pass computes in the graph,
runs under ``model.generate`` compiled and eager with batched, padded prompts, and its memory is
measured from the tensors it holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

import qcompiler
from qcompiler import recipes
from qcompiler.core import kv_format
from qcompiler.core.packing import unpack_int4
from qcompiler.errors import CalibrationError, RecipeError, UnsupportedError
from qcompiler.recipes import KVCacheSpec
from qcompiler.runtime.kv_cache import QuantizedKVCache
from tiny_models import ARCHS, calibration_batches, tiny_model, token_batches


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _recipe(preset: str, window: int = 0):
    """``preset`` with the given full-precision window (``kv-int4`` ships with 128: longer than these
    tests); per_group blocks shortened to the window."""
    r = recipes.get(preset)
    kv = dataclasses.replace(r.kv_cache, residual_window=window, group_size=min(r.kv_cache.group_size, window))
    return r.replace(name=f"{preset}-w{window}", kv_cache=kv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _graph_logits(model, recipe, x, calib) -> torch.Tensor:
    """The KV-cache pass's logits for the whole sequence (compiled; fake quantization in the graph)."""
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=qcompiler.backend(recipe, calibration=calib, progress=False))(x).logits
    torch._dynamo.reset()
    return out


def _decode_token_by_token(model, cache, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(x.shape[1])], 1)


def _decode_equals_graph(arch: str, recipe, x: torch.Tensor) -> QuantizedKVCache:
    """Assert that ``x`` decoded token by token through ``recipe``'s quantized cache gives the compiled
    forward's logits (and not the float model's); return the cache. In float64: a one-token and a
    whole-sequence matmul differ in the last float32 bit, enough to move a key or value that sits on a
    rounding boundary to the next code (seen: phi3 under transformers 5.25); float64 leaves no such tie."""
    model, calib = tiny_model(arch).double(), calibration_batches()
    cache = qcompiler.kv_cache(model, recipe, calib, progress=False)
    step = _decode_token_by_token(model, cache, x)
    full = _graph_logits(model, recipe, x, calib)
    with torch.no_grad():
        plain = model(x).logits
    assert _rel(step, full) < 1e-5 < _rel(plain, full)
    return cache


_CASES = [(arch, "kv-int8", 0) for arch in ARCHS] + [(arch, "kv-int4", 3) for arch in ARCHS] + \
    [("llama", "kv-fp8", 0), ("llama", "kv-int8", 3), ("qwen2", "kv-int4", 5), ("gpt2", "kv-fp8", 5),
     ("llama", "kv-int8-dynamic", 0), ("gpt2", "kv-int8-dynamic", 3), ("phi3", "kv-int8-rot", 0),
     ("gemma", "kv-int8-rot", 3)]


@pytest.mark.parametrize("arch,preset,window", _CASES, ids=[f"{a}-{p}-w{w}" for a, p, w in _CASES])
def test_each_decode_step_reads_what_the_graph_pass_computes(arch, preset, window):
    """Token by token through the quantized cache (every query is a decode step) = the compiled
    forward with the KV-cache pass over the whole sequence, on every tiny architecture."""
    x = token_batches(1, 11, seed=3)[0]
    cache = _decode_equals_graph(arch, _recipe(preset, window), x)
    layer = cache.layers[0]
    held = layer.codes["key"].shape[-2]
    assert held == x.shape[1] - window and layer.keys.shape[-2] == window
    assert cache.get_seq_length() == x.shape[1]


def test_a_window_on_matmul_attention_gives_the_sdpa_logits_and_the_caches():
    """Attention written out (softmax(q @ k^T) @ v): the window is computed on its scores and value
    product, giving the SDPA model's logits and, token by token, the quantized cache's."""
    x, calib, recipe = token_batches(1, 11, seed=3)[0], calibration_batches(), _recipe("kv-int4", 3)
    outs = {}
    for impl in ("sdpa", "eager"):
        model = tiny_model("llama")
        model.config._attn_implementation = impl
        outs[impl] = _graph_logits(model, recipe, x, calib)
    assert _rel(outs["eager"], outs["sdpa"]) < 1e-5
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    step = _decode_token_by_token(model, qcompiler.kv_cache(model, recipe, calib, progress=False), x)
    assert _rel(step, outs["eager"]) < 1e-5


@pytest.mark.parametrize("preset", ["kv-int8", "kv-fp8"])
def test_prefill_through_the_cache_equals_the_graph_pass(preset):
    """Without a window a prefill reads the codes it stores: the graph's Q/DQ where the cache is written."""
    model, x, calib = tiny_model("mistral"), token_batches(1, 12, seed=3)[0], calibration_batches()
    recipe = _recipe(preset)
    cache = qcompiler.kv_cache(model, recipe, calib, progress=False)
    with torch.no_grad():
        out = model(x, cache=cache, use_cache=True).logits
    assert _rel(out, _graph_logits(model, recipe, x, calib)) < 1e-6


@pytest.mark.parametrize("window", [3, 20])
def test_prefill_with_a_window_reads_its_prompt_in_full_precision(window):
    """With a window (kv-int4) a prefill's attention reads the prompt in full precision (the float
    model's logits), stores the tokens older than the window quantized, and a chunk after it reads
    those codes: then the decode steps read what the token-by-token cache reads."""
    model, x = tiny_model("mistral"), token_batches(1, 24, seed=3)[0]
    recipe = _recipe("kv-int4", window)
    cache = qcompiler.kv_cache(model, recipe, progress=False)
    with torch.no_grad():
        out = model(x[:, :12], cache=cache, use_cache=True).logits
        plain = model(x[:, :12]).logits
        assert _rel(out, plain) < 1e-6
        assert cache.layers[0].codes["key"].shape[-2] == max(0, 12 - window)
        chunk = model(x[:, 12:16], cache=cache, use_cache=True).logits     # reads the stored codes
        full = model(x[:, :16]).logits[:, 12:]
        assert (_rel(chunk, full) > 1e-4) == (window < 12)
        steps = torch.cat([model(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(16, 24)], 1)
    reference = QuantizedKVCache(recipe.kv_cache)          # the same prefix written token by token
    with torch.no_grad():
        _decode_token_by_token(model, reference, x[:, :16])
    held = reference.layers[0].codes["key"]
    assert held.shape[-2] == max(0, 16 - window) and torch.equal(cache.layers[0].codes["key"][:, :, :held.shape[-2]], held)
    assert torch.isfinite(steps).all()


@pytest.mark.parametrize("key", ["per_channel", "per_group"])
def test_the_cache_holds_codes_packed_int4_and_per_token_scales(key):
    model, x = tiny_model("llama"), token_batches(1, 9, seed=3)[0]
    spec = KVCacheSpec("int4", key, "per_token", symmetric=False, residual_window=3,
                       group_size=3 if key == "per_group" else 0)
    cache = qcompiler.kv_cache(model, recipes.get("kv-int4").replace(kv_cache=spec), calibration_batches(),
                               progress=False)
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
    layer = cache.layers[0]
    kv_heads, head_dim = layer.codes["key"].shape[1], layer.head_dim
    assert layer.codes["key"].dtype == torch.uint8 and layer.codes["key"].shape == (1, kv_heads, 6, head_dim // 2)
    blocks = 1 if key == "per_channel" else 2       # static per head and channel, or per block of 3 positions
    assert layer.scales["key"].shape == (1, kv_heads, blocks, head_dim)
    assert layer.scales["value"].shape == (1, kv_heads, 6, 1) and layer.zeros["value"].dtype == torch.uint8
    # the packed nibbles are the values the attention read back
    codes = unpack_int4(layer.codes["value"], head_dim, signed=False)
    read = kv_format.read(layer.codes["value"], layer.scales["value"], layer.zeros["value"], "uint4", head_dim,
                          torch.float32)
    assert torch.equal(read, (codes.float() - layer.zeros["value"].float()) * layer.scales["value"])
    assert int(codes.max()) <= 15 and int(codes.min()) >= 0


# kv-int4 at head_dim 16, blocks of 4: per block and channel a float32 scale and a zero point cost more
# than the 4-bit codes (SmolLM2: benchmarks/results_kv_memory_smollm2.md)
@pytest.mark.parametrize("preset,ratio", [("kv-int8", 0.30), ("kv-fp8", 0.30), ("kv-int4", 0.45),
                                          ("kv-int8-dynamic", 0.33)])
def test_memory_is_measured_from_the_held_tensors(preset, ratio):
    """nbytes() sums the storages the cache holds; against a float32 DynamicCache after the same prompt."""
    model, x = tiny_model("qwen2"), token_batches(2, 40, seed=3)
    x = torch.cat(x)
    cache = qcompiler.kv_cache(model, _recipe(preset, 4 if preset == "kv-int4" else 0), calibration_batches(),
                               progress=False)
    plain = DynamicCache()
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
        model(x, cache=plain, use_cache=True)
    float_bytes = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                      for layer in plain.layers)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors())
    assert cache.nbytes() == held
    assert cache.nbytes() < ratio * float_bytes, (cache.nbytes(), float_bytes)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generate_batched_with_padding(compiled):
    """model.generate with a left-padded batch of two prompts: the quantized cache gives each row
    what that prompt alone gives (padding masked), compiled or not."""
    model, calib = tiny_model("llama"), calibration_batches()
    model.generation_config.pad_token_id = 0
    short, long = token_batches(1, 5, seed=7)[0], token_batches(1, 9, seed=8)[0]
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        alone = model.generate(long, cache=qcompiler.kv_cache(model, "kv-int8", calib, progress=False), **kw)
    qb = qcompiler.backend("kv-int8", calibration=calib, progress=False)
    if compiled:          # generate calls model.forward: compile that
        model.forward = torch.compile(model.forward, backend=qb)
        cache = qcompiler.kv_cache(model)
    else:
        cache = qcompiler.kv_cache(model, "kv-int8", calib, progress=False)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, cache=cache, **kw)
    assert torch.equal(both[1], alone[0])
    if compiled:
        notes = [d.note for d in qb.report.tensors.values() if d.kind == "kv_cache"]
        assert notes and any("read from qcompiler's quantized KV cache" in n for n in notes)


def test_compiled_decode_through_the_cache_adds_no_second_quantization():
    model, x, calib = tiny_model("qwen2"), token_batches(1, 10, seed=3)[0], calibration_batches()
    qb = qcompiler.backend("kv-int8", calibration=calib, progress=False)
    compiled = torch.compile(model, backend=qb)
    cache = qcompiler.kv_cache(compiled)
    with torch.no_grad():
        pre = compiled(x[:, :7], cache=cache, use_cache=True).logits
        steps = [compiled(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(7, 10)]
    torch._dynamo.reset()
    eager_cache = qcompiler.kv_cache(model, "kv-int8", calib, progress=False)
    with torch.no_grad():
        ref_pre = model(x[:, :7], cache=eager_cache, use_cache=True).logits
        ref_steps = [model(x[:, t:t + 1], cache=eager_cache, use_cache=True).logits for t in range(7, 10)]
    assert _rel(pre, ref_pre) < 1e-6 and _rel(torch.cat(steps, 1), torch.cat(ref_steps, 1)) < 1e-6


def test_beam_reorder_moves_codes_and_per_token_scales():
    model, x = tiny_model("llama"), torch.cat(token_batches(3, 6, seed=3))
    cache = qcompiler.kv_cache(model, _recipe("kv-int4", 2), calibration_batches(), progress=False)
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
    layer = cache.layers[0]
    before = {r: layer._read(r) for r in ("key", "value")}
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    for role, read in before.items():
        assert torch.equal(layer._read(role), read[[2, 0, 1]])


def test_quantize_then_kv_cache_uses_the_recipe_calibration():
    model, x, calib = tiny_model("llama"), token_batches(1, 8, seed=3)[0], calibration_batches()
    qcompiler.quantize(model, "w8a16+kv-int8", calibration=calib, progress=False)
    cache = qcompiler.kv_cache(model)
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
    assert cache.layers[0].codes["key"].dtype == torch.int8
    note = qcompiler.report(model).tensors
    assert any("qcompiler.kv_cache" in d.note for d in note.values() if d.kind == "kv_cache")


def test_bad_input_is_refused_clearly():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="has no kv_cache"):
        qcompiler.kv_cache(model, "w8a16", calibration_batches(), progress=False)
    with pytest.raises(CalibrationError, match="static scales"):
        QuantizedKVCache(KVCacheSpec("int8"))
    with pytest.raises(ValueError, match="carries no KV-cache calibration"):
        qcompiler.kv_cache(tiny_model("llama"))
    with pytest.raises(RecipeError, match="residual_window=-1 must be an integer >= 0"):
        KVCacheSpec("int8", residual_window=-1)
    cache = QuantizedKVCache(KVCacheSpec("int8", "per_token", "per_token"))     # dynamic: no calibration needed
    with torch.no_grad():
        model(token_batches(1, 4, seed=3)[0], cache=cache, use_cache=True)
    with pytest.raises(UnsupportedError, match="cannot be cropped"):
        cache.crop(2)
    few = qcompiler.kv_cache(model, "kv-int8", calibration_batches(), progress=False)
    few.layers = few.layers[:1]
    with pytest.raises(UnsupportedError, match="calibration saw 1 attentions"):
        with torch.no_grad():
            model(token_batches(1, 4, seed=3)[0], cache=few, use_cache=True)


_PER_GROUP = {"int4-keys": KVCacheSpec("int4", "per_group", "per_token", symmetric=False, residual_window=4,
                                        group_size=3),
              "int8-both": KVCacheSpec("int8", "per_group", "per_group", residual_window=3, group_size=3)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("name", list(_PER_GROUP))
def test_per_group_cache_decode_reads_what_the_graph_pass_computes(arch, name):
    """per_group scales (per head and channel, per block of 3 positions, from the block's range): token
    by token through the cache, each block's scales fixed when its first token leaves the window = the
    compiled forward's Q/DQ of the whole sequence in blocks, plain MHA, GQA and GPT-2's fused c_attn."""
    spec, x = _PER_GROUP[name], token_batches(1, 17, seed=3)[0]
    cache = _decode_equals_graph(arch, recipes.get("kv-int8").replace(name=f"kv-{name}", kv_cache=spec), x)
    layer = cache.layers[0]
    stored = x.shape[1] - spec.residual_window
    assert layer.codes["key"].shape[-2] == stored
    assert layer.scales["key"].shape[-2:] == (-(-stored // spec.group_size), layer.head_dim)


def test_per_group_codes_are_the_blocks_of_the_prefill_keys():
    """Closed form: after one prefill, the keys the cache reads back from its codes are the float keys'
    per-block Q/DQ (``kv_format.quantize_dequantize_blocks``), and each block's scale is its own range's."""
    spec = _PER_GROUP["int4-keys"]
    model, x = tiny_model("llama"), token_batches(1, 13, seed=3)[0]
    cache, plain = QuantizedKVCache(spec), DynamicCache()
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
        model(x, cache=plain, use_cache=True)
    keys, layer = plain.layers[0].keys, cache.layers[0]
    stored = 13 - spec.residual_window                               # 9 positions: blocks [0, 3) [3, 6) [6, 9)
    expected = kv_format.quantize_dequantize_blocks(keys, 3, "int4", False)[:, :, :stored]
    assert torch.equal(layer._read("key"), expected)
    lo, hi = keys[:, :, 3:6].amin(2), keys[:, :, 3:6].amax(2)
    scale = (hi.clamp(min=0) - lo.clamp(max=0)) / 15
    assert torch.allclose(layer.scales["key"][:, :, 1], scale.clamp(min=torch.finfo(torch.float32).tiny), rtol=1e-6)
    assert layer.zeros["key"].dtype == torch.uint8 and layer.codes["key"].shape[-1] == layer.head_dim // 2


_TRITON_SPECS = {"per-group": KVCacheSpec("int4", "per_group", "per_group", symmetric=False, residual_window=2,
                                          group_size=2),
                 "int4-token-rot": KVCacheSpec("int4", "per_token", "per_token", residual_window=2, rotate=True),
                 "fp8-rot-center": KVCacheSpec("fp8_e4m3", "per_tensor", "per_tensor", rotate=True, center=True)}


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int8-dynamic", "kv-int4", "kv-int8-rot", *_TRITON_SPECS])
def test_triton_target_decodes_with_the_fused_kernel_on_the_codes(preset):
    """Target "triton": each decode step's attention is one qcompiler::triton_kv_decode_attention
    (the kernel reads the codes; interpreter on CPU) and gives the eager cache's logits. A rotated /
    centered cache: the kernel reads the stored form, with the query rotated, the window in the stored
    form and the output taken back (``kv_format.attention_output``)."""
    spec = _TRITON_SPECS.get(preset)
    preset = _recipe(preset, 2) if spec is None else recipes.get("kv-int8").replace(name=preset, kv_cache=spec)
    pytest.importorskip("triton")
    model, x, calib = tiny_model("qwen2"), torch.cat(token_batches(2, 10, seed=3)), calibration_batches()
    qb = qcompiler.backend(preset, calibration=calib, progress=False, target="triton")
    compiled = torch.compile(model, backend=qb)
    cache = qcompiler.kv_cache(compiled)
    with torch.no_grad():
        pre = compiled(x[:, :7], cache=cache, use_cache=True).logits
        steps = torch.cat([compiled(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(7, 10)], 1)
    torch._dynamo.reset()
    eager = qcompiler.kv_cache(model, preset, calib, progress=False)
    with torch.no_grad():
        ref_pre = model(x[:, :7], cache=eager, use_cache=True).logits
        ref_steps = torch.cat([model(x[:, t:t + 1], cache=eager, use_cache=True).logits for t in range(7, 10)], 1)
    fused = [n for g in qb.graphs for n in g.graph.nodes
             if n.target is torch.ops.qcompiler.triton_kv_decode_attention.default]
    outputs = [n for g in qb.graphs for n in g.graph.nodes if n.target is kv_format.attention_output]
    assert len(fused) >= model.config.num_hidden_layers
    assert len(outputs) == (len(fused) if preset.kv_cache.rotate or preset.kv_cache.center else 0)
    assert not qb.report.runtime_fallbacks
    assert _rel(pre, ref_pre) < 1e-6 and _rel(steps, ref_steps) < 1e-5
