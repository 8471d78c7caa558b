"""KV-cache quantization (``Recipe.kv_cache``): the spec, the presets and their composition, the
keys / values found from the graph on every tiny architecture, and the numerics of the Q/DQ
written into the cache against a hand-made fake quantization of the float model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import qcompiler
from qcompiler import recipes
from qcompiler.core import numerics
from qcompiler.errors import RecipeError, UnsupportedError
from qcompiler.recipes import Granularity, KVCacheSpec, QuantDtype, Recipe
from tiny_models import ARCHS, calibration_batches, tiny_model, token_batches

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# -- the spec and the presets -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="int2"), "kv_cache.dtype='int2' is not supported"),
    (dict(key="per_group"), r"kv_cache.key='per_group' needs kv_cache.group_size > 0"),
    (dict(value="per_group", group_size=8, residual_window=4),
     r"kv_cache.value='per_group' .* kv_cache.group_size=8 must be <= kv_cache.residual_window=4"),
    (dict(group_size=8, residual_window=8), r"kv_cache.group_size=8 is set, but neither kv_cache.key nor"),
    (dict(key="per_group", group_size=-1), r"kv_cache.group_size=-1 must be an integer >= 0"),
    (dict(value="per_row"), "kv_cache.value='per_row' is not supported"),
    (dict(dtype="fp8_e4m3", symmetric=False), "kv_cache.symmetric=False is not supported for dtype 'fp8_e4m3'"),
    (dict(symmetric="false"), "kv_cache.symmetric='false' must be a bool"),
])
def test_kv_cache_spec_names_the_bad_field(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        KVCacheSpec(**kwargs)


def test_kv_presets_compose_with_weight_presets_and_round_trip_json():
    r = recipes.get("w4a16-gptq+kv-fp8")
    assert r.name == "w4a16-gptq+kv-fp8" and r.kv_cache == recipes.get("kv-fp8").kv_cache
    assert r.weight == recipes.get("w4a16-gptq").weight and r.gptq == recipes.get("w4a16-gptq").gptq
    assert Recipe.from_json(r.to_json()) == r and '"kv_cache"' in r.to_json()
    assert "static KV-cache scales" in r.calibration_required_by
    # per-token keys and values need no calibration of their own
    dynamic = recipes.get("w8a16").replace(kv_cache=KVCacheSpec("int8", "per_token", "per_token"))
    assert not dynamic.requires_calibration
    int4 = recipes.get("kv-int4").kv_cache
    assert int4.dtype is QuantDtype.INT4 and int4.key is Granularity.PER_GROUP and not int4.symmetric
    assert 0 < int4.group_size <= int4.residual_window and not recipes.get("kv-int4").requires_calibration
    assert "linear" in recipes.get("kv-int8").fallback.keep_op_kinds     # on its own: weights stay float
    with pytest.raises(RecipeError, match="must be a KV-cache preset"):
        recipes.get("w8a16+w4a16-rtn")
    with pytest.raises(RecipeError, match="KV cache is quantized twice"):
        recipes.get("kv-int8+kv-fp8")
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        recipes.get("nope+kv-int8")


# -- found from the graph -----------------------------------------------------------------------

def _kv_decisions(report) -> dict:
    return {k: d for k, d in report.tensors.items() if d.kind == "kv_cache"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_attention_cache_is_found_and_quantized(arch):
    model, x = tiny_model(arch), token_batches(1, 12, seed=3)[0]
    qb = qcompiler.backend("kv-int8", calibration=calibration_batches(), progress=False)
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend=qb)(x).logits
    kv = _kv_decisions(qb.report)
    assert len(kv) == model.config.num_hidden_layers and all(d.quantize for d in kv.values()), kv
    assert all("keys static per head" in d.note and "values static per head" in d.note for d in kv.values())
    assert not qb.report.quantized                              # kv-int8 alone keeps every linear in float
    assert qb.report.tensor_calibration_s > 0 and "KV-cache scales" in qb.report.summary()
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05, err                                   # quantized, and close to float


# -- numerics against a hand-made fake quantization ------------------------------------------------

class _HandKV(TorchFunctionMode):
    """The float model with the key / value of every attention call fake-quantized by hand: static
    scales per head (folded from the attention's repeated heads onto the KV heads), or per token."""

    def __init__(self, spec: KVCacheSpec, absmax: dict | None = None, kv_heads: int = 0):
        super().__init__()
        self.spec, self.absmax, self.kv_heads, self.calls, self.observe = spec, absmax, kv_heads, 0, absmax is None
        self.seen: list = []

    def _fq(self, t: torch.Tensor, granularity, i: int, role: int) -> torch.Tensor:
        dtype = self.spec.dtype.value
        if granularity is Granularity.PER_TOKEN:
            q, s = numerics.quantize_per_token(t, dtype)
            return numerics.dequantize(q, s, None, t.dtype)
        amax = self.absmax[i][role]                                   # [attention heads]
        rep = amax.numel() // self.kv_heads
        per_kv = amax.reshape(self.kv_heads, rep).amax(1)
        scale = (per_kv.clamp(min=1e-12) / numerics.QRANGE[dtype][1]).repeat_interleave(rep).reshape(1, -1, 1, 1)
        return numerics.dequantize(numerics.quantize(t, scale, None, dtype), scale, None, t.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            args = list(args)
            if self.observe:
                self.seen.append(tuple(a.detach().abs().amax(dim=(0, 2, 3)) for a in args[1:3]))
            else:
                args[1] = self._fq(args[1], self.spec.key, self.calls, 0)
                args[2] = self._fq(args[2], self.spec.value, self.calls, 1)
                self.calls += 1
        return func(*args, **kwargs)


def _hand_absmax(model, batches) -> list:
    """Per attention call, (key, value) absmax per attention head over the calibration batches."""
    out = None
    for b in batches:
        with torch.no_grad(), _HandKV(KVCacheSpec()) as mode:
            model(b)
        out = mode.seen if out is None else [tuple(torch.maximum(a, b) for a, b in zip(o, s))
                                             for o, s in zip(out, mode.seen)]
    return out


_HAND_CASES = [(arch, KVCacheSpec("int8")) for arch in ARCHS] + \
    [(arch, KVCacheSpec("int4", "per_token", "per_token")) for arch in ARCHS] + \
    [("llama", KVCacheSpec("fp8_e4m3")), ("gpt2", KVCacheSpec("fp8_e4m3")),
     ("llama", KVCacheSpec("int8", "per_head", "per_token")), ("opt", KVCacheSpec("int8", "per_head", "per_token"))]


@pytest.mark.parametrize("arch,spec", _HAND_CASES,
                         ids=[f"{a}-{s.dtype.value}-{s.key.value}-{s.value.value}" for a, s in _HAND_CASES])
def test_compiled_cache_quantization_equals_the_hand_fake_quantization(arch, spec):
    model, x = tiny_model(arch), token_batches(1, 12, seed=3)[0]
    calib = calibration_batches()
    recipe = recipes.get("kv-int8").replace(name="kv-test", kv_cache=spec)
    qb = qcompiler.backend(recipe, calibration=calib, progress=False)
    with torch.no_grad():
        out = torch.compile(model, backend=qb)(x).logits
        plain = model(x).logits
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    with torch.no_grad(), _HandKV(spec, _hand_absmax(model, calib), kv_heads):
        ref = model(x).logits
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5 < ((plain - ref).norm() / ref.norm()).item(), err


@pytest.mark.parametrize("key,note", [("per_channel", "keys static per head and channel"),
                                      ("per_group", "keys per head and channel for each block of 4 positions")])
def test_asymmetric_int4_keys_use_zero_points(key, note):
    """kv-int4's layout (blocks of its keys' positions, here 4 in a 4-token window below a 12-token
    sequence) and static per-channel keys."""
    model, x = tiny_model("llama"), token_batches(1, 12, seed=3)[0]
    int4 = recipes.get("kv-int4")
    int4 = int4.replace(kv_cache=dataclasses.replace(int4.kv_cache, key=key, residual_window=4,
                                                     group_size=4 if key == "per_group" else 0))
    qb = qcompiler.backend(int4, calibration=calibration_batches(), progress=False)
    with torch.no_grad():
        out = torch.compile(model, backend=qb)(x).logits
        ref = model(x).logits
    kv = _kv_decisions(qb.report)
    assert all(note in d.note and "values per token" in d.note for d in kv.values())
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.2, err


def test_incremental_decode_reads_the_quantized_cache_like_the_full_forward():
    """Prefill then one-token decode steps through the cache give the logits of the full-sequence
    forward (static scales: each token's stored value does not depend on when it was written)."""
    model, x = tiny_model("llama"), token_batches(1, 12, seed=3)[0]
    qb = qcompiler.backend("kv-int8", calibration=calibration_batches(), progress=False)
    compiled = torch.compile(model, backend=qb)
    with torch.no_grad():
        full = compiled(x).logits
        step = compiled(x[:, :9], use_cache=True)
        logits, cache = [step.logits], step.cache
        for t in range(9, 12):
            step = compiled(x[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(step.logits)
            cache = step.cache
    inc = torch.cat(logits, dim=1)
    err = ((inc - full).norm() / full.norm()).item()
    assert err < 1e-5, err
    assert any("in the cache" in d.note for d in _kv_decisions(qb.report).values())


def test_kv_cache_composes_with_a_weight_preset():
    model, x = tiny_model("qwen2"), token_batches(1, 12, seed=3)[0]
    qb = qcompiler.backend("w8a8-int8-sq-dynamic+kv-int8", calibration=calibration_batches(), progress=False)
    with torch.no_grad():
        torch.compile(model, backend=qb)(x)
    assert qb.report.quantized and len(_kv_decisions(qb.report)) == model.config.num_hidden_layers


# -- bad input --------------------------------------------------------------------------------------

def test_a_model_without_attention_is_refused_naming_the_field():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    recipe = recipes.get("kv-int8").replace(kv_cache=KVCacheSpec("int8", "per_token", "per_token"))   # no calibration
    qb = qcompiler.backend(recipe, progress=False)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        torch.compile(model, backend=qb)(torch.randn(4, 16))
    assert isinstance(info.value.inner_exception, UnsupportedError)
    assert "recipe.kv_cache is set, but this graph has no attention" in str(info.value.inner_exception)


def test_matmul_softmax_attention_is_found_like_sdpa():
    """The same model with its attention written out (``softmax(q @ k^T) @ v``): the same caches
    found, the same static scales observed, the same quantized logits."""
    x = token_batches(1, 12, seed=3)[0]
    outs, reports = {}, {}
    for impl in ("sdpa", "eager"):
        torch._dynamo.reset()
        model = tiny_model("llama")
        model.config._attn_implementation = impl
        qb = qcompiler.backend("kv-int8", calibration=calibration_batches(), progress=False)
        with torch.no_grad():
            outs[impl] = torch.compile(model, backend=qb)(x).logits
        reports[impl] = _kv_decisions(qb.report)
    assert sorted(reports["eager"]) == sorted(reports["sdpa"]) and len(reports["eager"]) == 2
    assert [d.note for d in reports["eager"].values()] == [d.note for d in reports["sdpa"].values()]
    err = ((outs["eager"] - outs["sdpa"]).norm() / outs["sdpa"].norm()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("window", [0, 3])
def test_soft_capped_attention_is_found(window):
    """Gemma 2 caps its attention scores (``tanh(s / cap) * cap``), which SDPA cannot express: its
    matmul attention's keys and values are found through the capping (with a residual window too:
    the scores are chosen per position before the capping)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8)
    model, x = AutoModelForCausalLM.from_config(cfg).eval(), token_batches(1, 12, seed=3)[0]
    recipe = recipes.get("kv-int8")
    recipe = recipe.replace(kv_cache=dataclasses.replace(recipe.kv_cache, residual_window=window))
    qb = qcompiler.backend(recipe, calibration=calibration_batches(), progress=False)
    with torch.no_grad():
        out = torch.compile(model, backend=qb)(x).logits
        ref = model(x).logits
    kv = _kv_decisions(qb.report)
    assert len(kv) == 2 and all(d.quantize for d in kv.values())
    assert all(("last 3 positions in full precision" in d.note) == bool(window) for d in kv.values())
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05, err


def test_int4_cache_with_an_odd_head_dim_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=128, n_embd=28, n_layer=1, n_head=4, n_positions=64)   # head dim 7
    model = AutoModelForCausalLM.from_config(cfg).eval()
    recipe = recipes.get("kv-int8").replace(kv_cache=KVCacheSpec("int4", "per_token", "per_token"))
    qb = qcompiler.backend(recipe, progress=False)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        torch.compile(model, backend=qb)(token_batches(1, 8)[0])
    assert isinstance(info.value.inner_exception, UnsupportedError)
    assert "kv_cache.dtype='int4' packs two values per byte along the head dimension, which is odd (7)" \
        in str(info.value.inner_exception)
