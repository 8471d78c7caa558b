"""Rotated and centered KV caches (``KVCacheSpec.rotate`` / ``center``): the graph pass equals a hand
fake quantization written independently in float64 (raw ranges for the centers, a second pass over the
calibration for the stored values' ranges), the quantized cache gives back at each decode step what the
pass computes, checkpoints keep the transform, and the exporters that cannot express it refuse."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import qcompiler
from qcompiler import recipes
from qcompiler.algorithms.hadamard import random_hadamard
from qcompiler.core import kv_format, numerics
from qcompiler.errors import RecipeError, UnsupportedError
from qcompiler.passes.kv_cache import kv_rotation
from qcompiler.recipes import Granularity, KVCacheSpec, Recipe
from qcompiler.runtime.serialization import WEIGHTS_FILE, load_quantized, save_quantized
from safetensors import safe_open
from test_kv_cache_storage import _decode_equals_graph
from tiny_models import calibration_batches, tiny_model, token_batches

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _recipe(spec: KVCacheSpec) -> Recipe:
    return recipes.get("kv-int8").replace(name="kv-transform-test", kv_cache=spec)


# -- the spec -----------------------------------------------------------------------------------------

def test_spec_fields_round_trip_and_describe():
    spec = KVCacheSpec("fp8_e4m3", "per_token", "per_token", rotate=True, center=True)
    recipe = _recipe(spec)
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert json.loads(recipe.to_json())["data"]["kv_cache"]["rotate"] is True
    assert "rotated per head, centered per channel" in spec.describe()
    assert spec.static and recipe.requires_calibration          # the centers come from calibration
    assert not KVCacheSpec("int8", "per_token", "per_token", rotate=True).static
    with pytest.raises(RecipeError, match="kv_cache.rotate"):
        KVCacheSpec("int8", rotate="yes")
    with pytest.raises(RecipeError, match="kv_cache.center"):
        KVCacheSpec("int8", center=1)


def test_rotation_is_orthogonal_and_the_stored_form_inverts():
    r = kv_rotation(16)
    assert torch.allclose(r.double() @ r.double().T, torch.eye(16, dtype=torch.float64), atol=1e-6)
    assert torch.equal(r, random_hadamard(16, 0).float())
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    c = torch.randn(1, 3, 1, 16)
    back = kv_format.from_stored(kv_format.to_stored(x, r, c), r, c, torch.float64)
    assert _rel(back, x) < 1e-6
    with pytest.raises(UnsupportedError, match=r"kv_cache.rotate=True needs a Hadamard matrix of order head_dim=6"):
        kv_rotation(6)


def test_stored_stats_are_the_range_of_the_stored_values():
    """Centering shifts each stored channel by a constant, so the shifted rotated range is the range of
    ``(x - c) @ R`` exactly (GQA: observed heads repeat the KV heads)."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(1, 2, 40, 8, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2, 3, 1, 1, 9]) + 3
    seen = kv.repeat_interleave(2, dim=1)                       # what the attention reads: 4 heads
    r = kv_rotation(8)
    entry = {"key": (seen.amin(dim=(0, 2)), seen.amax(dim=(0, 2))),
             "key" + kv_format.ROTATED: ((seen @ r).amin(dim=(0, 2)), (seen @ r).amax(dim=(0, 2)))}
    spec = KVCacheSpec("int8", rotate=True, center=True)
    center = kv_format.static_center(entry["key"], 2)
    stored = kv_format.to_stored(kv, r, center)
    lo, hi = kv_format.stored_stats(entry, "key", 2, spec, r)
    assert torch.allclose(lo[::2], stored.amin(dim=(0, 2)), atol=1e-5)
    assert torch.allclose(hi[::2], stored.amax(dim=(0, 2)), atol=1e-5)


# -- the graph pass against a hand fake quantization ------------------------------------------------------

class _Hand(TorchFunctionMode):
    """Every attention's key / value fake-quantized by hand in float64: ``(x - c) @ R``, Q/DQ with the
    spec's granularity, back. ``mode``: 'raw' records the raw ranges, 'stored' the ranges of the stored
    values (with the centers of the raw pass), 'apply' fake-quantizes."""

    def __init__(self, spec: KVCacheSpec, kv_heads: int, raw=None, stored=None):
        super().__init__()
        self.spec, self.kv_heads, self.raw, self.stored = spec, kv_heads, raw, stored
        self.mode = "raw" if raw is None else "stored" if stored is None else "apply"
        self.ranges: list = []
        self.calls = 0

    def _kv(self, t: torch.Tensor) -> torch.Tensor:           # observed heads -> KV heads (GQA repeats them)
        rep = t.shape[1] // self.kv_heads
        return t[:, ::rep]

    def _center(self, i: int, role: int) -> torch.Tensor:
        lo, hi = self.raw[i][role]
        return ((lo + hi) / 2)[None, :, None, :] if self.spec.center else torch.zeros(1, dtype=torch.float64)

    def _stored(self, t: torch.Tensor, i: int, role: int) -> torch.Tensor:
        y = self._kv(t).double() - self._center(i, role)
        return y @ random_hadamard(t.shape[-1], 0) if self.spec.rotate else y

    def _fq(self, t: torch.Tensor, i: int, role: int) -> torch.Tensor:
        granularity = (self.spec.key, self.spec.value)[role]
        dtype = self.spec.dtype.value
        y = self._stored(t, i, role)
        if granularity is Granularity.PER_TOKEN:
            amax = y.abs().amax(-1, keepdim=True)
        else:
            lo, hi = self.stored[i][role]
            amax = torch.maximum(lo.abs(), hi.abs())               # [H, D]
            amax = {Granularity.PER_TENSOR: amax.amax(), Granularity.PER_HEAD: amax.amax(-1)[None, :, None, None],
                    Granularity.PER_CHANNEL: amax[None, :, None, :]}[granularity]
        scale = (amax.clamp(min=1e-12) / numerics.QRANGE[dtype][1]).float()
        y = numerics.dequantize(numerics.quantize(y.float(), scale, None, dtype), scale, None, torch.float64)
        if self.spec.rotate:
            y = y @ random_hadamard(t.shape[-1], 0).T
        y = (y + self._center(i, role)).to(t.dtype)
        rep = t.shape[1] // self.kv_heads
        return y.repeat_interleave(rep, dim=1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            args = list(args)
            i, self.calls = self.calls, self.calls + 1
            if self.mode == "apply":
                args[1], args[2] = self._fq(args[1], i, 0), self._fq(args[2], i, 1)
            else:
                pair = []
                for role in (0, 1):
                    y = self._kv(args[1 + role]).double() if self.mode == "raw" else self._stored(args[1 + role], i, role)
                    pair.append((y.amin(dim=(0, 2)), y.amax(dim=(0, 2))))
                self.ranges.append(pair)
        return func(*args, **kwargs)


def _hand_ranges(model, batches, spec, kv_heads, raw=None) -> list:
    out = None
    for b in batches:
        with torch.no_grad(), _Hand(spec, kv_heads, raw) as mode:
            model(b)
        seen = mode.ranges
        out = seen if out is None else [[(torch.minimum(o[0], s[0]), torch.maximum(o[1], s[1]))
                                          for o, s in zip(op, sp)] for op, sp in zip(out, seen)]
    return out


_SPECS = {
    "fp8-tensor-rot-center": KVCacheSpec("fp8_e4m3", "per_tensor", "per_tensor", rotate=True, center=True),
    "int8-head-center": KVCacheSpec("int8", center=True),
    "int8-channel-rot": KVCacheSpec("int8", "per_channel", "per_head", rotate=True),
    "fp8-token-rot-center": KVCacheSpec("fp8_e4m3", "per_token", "per_token", rotate=True, center=True),
    "int4-token-rot": KVCacheSpec("int4", "per_token", "per_token", rotate=True),
}
_HAND_CASES = [("llama", "fp8-tensor-rot-center"), ("llama", "int8-head-center"), ("llama", "int8-channel-rot"),
               ("llama", "fp8-token-rot-center"), ("llama", "int4-token-rot"), ("gpt2", "fp8-tensor-rot-center"),
               ("qwen2", "int8-head-center"), ("opt", "fp8-token-rot-center"), ("gemma", "int8-channel-rot")]


@pytest.mark.parametrize("arch,name", _HAND_CASES, ids=[f"{a}-{n}" for a, n in _HAND_CASES])
def test_compiled_transformed_cache_equals_the_hand_fake_quantization(arch, name):
    spec = _SPECS[name]
    model, x, calib = tiny_model(arch), token_batches(1, 12, seed=3)[0], calibration_batches()
    qb = qcompiler.backend(_recipe(spec), calibration=calib, progress=False)
    with torch.no_grad():
        out = torch.compile(model, backend=qb)(x).logits
        plain = model(x).logits
    kv = [d for d in qb.report.tensors.values() if d.kind == "kv_cache"]
    assert kv and all(d.quantize for d in kv)
    assert all(("rotated per head" in d.note) == spec.rotate and ("centered per channel" in d.note) == spec.center
               for d in kv), [d.note for d in kv]
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    raw = _hand_ranges(model, calib, spec, kv_heads)
    stored = _hand_ranges(model, calib, spec, kv_heads, raw)
    with torch.no_grad(), _Hand(spec, kv_heads, raw, stored):
        ref = model(x).logits
    err = _rel(out, ref)
    assert err < 1e-5 < _rel(plain, ref), err


def test_rotation_and_centering_lower_the_error_of_outlier_channels():
    """Keys with a large constant offset in two channels (what RoPE'd keys of trained models show):
    per-head INT8 loses those channels' neighbours; centering removes the offset, rotation spreads it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 64, 16, generator=g, dtype=torch.float64)
    x[..., 3] += 40
    x[..., 11] -= 25
    entry = {"key": (x.amin(dim=(0, 2)), x.amax(dim=(0, 2)))}
    r = kv_rotation(16)
    xr = x.float() @ r
    entry["key" + kv_format.ROTATED] = (xr.amin(dim=(0, 2)).double(), xr.amax(dim=(0, 2)).double())

    def error(spec):
        rot = r if spec.rotate else None
        center = kv_format.static_center(entry["key"], 2) if spec.center else None
        stats = kv_format.stored_stats(entry, "key", 2, spec, rot)
        scale, _ = kv_format.static_scale(stats, 2, Granularity.PER_HEAD, spec)
        y = kv_format.to_stored(x, rot, center)
        y = numerics.dequantize(numerics.quantize(y, scale, None, "int8"), scale, None, torch.float32)
        return _rel(kv_format.from_stored(y, rot, center, torch.float64), x)

    plain, centered, rotated = (error(KVCacheSpec("int8", **kw)) for kw in ({}, {"center": True}, {"rotate": True}))
    assert centered < plain / 4 and rotated < plain, (plain, centered, rotated)


# -- the quantized cache and checkpoints ----------------------------------------------------------------

@pytest.mark.parametrize("name,window", [("fp8-tensor-rot-center", 0), ("int8-head-center", 3),
                                         ("fp8-token-rot-center", 0), ("int4-token-rot", 2)])
def test_each_decode_step_reads_what_the_graph_pass_computes(name, window):
    """Token by token through ``QuantizedKVCache`` (codes of the stored form) = the compiled forward."""
    spec = dataclasses.replace(_SPECS[name], residual_window=window)
    x = token_batches(1, 11, seed=3)[0]
    cache = _decode_equals_graph("llama", _recipe(spec), x)
    layer = cache.layers[0]
    assert layer.codes["key"].shape[-2] == x.shape[1] - window
    held = {t.data_ptr() for t in layer.tensors()}              # nbytes counts the rotation and the centers
    assert all(t.data_ptr() in held for role in ("key", "value") for t in layer._transform[role] if t is not None)


def test_checkpoint_keeps_the_centers_and_rotated_ranges(tmp_path):
    spec = _SPECS["fp8-tensor-rot-center"]
    model, x, calib = tiny_model("llama"), token_batches(1, 10, seed=3)[0], calibration_batches()
    recipe = _recipe(spec)
    q = qcompiler.quantize(model, recipe, calibration=calib, progress=False)
    save_quantized(q, tmp_path, recipe)
    loaded, loaded_recipe = load_quantized(tmp_path)
    assert loaded_recipe.kv_cache == spec
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
    assert {"kv_cache.0.k_center", "kv_cache.0.key_rotated_min", "kv_cache.0.v_scale"} <= names
    with torch.no_grad():
        a = _steps(q, qcompiler.kv_cache(q), x)
        b = _steps(loaded, qcompiler.kv_cache(loaded), x)
    assert torch.equal(a, b)


def _steps(model, cache, x):
    return torch.cat([model(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(x.shape[1])], 1)


@pytest.mark.parametrize("export", ["onnx", "compressed-tensors"])
def test_exporters_refuse_a_transformed_cache_naming_the_field(export, tmp_path):
    spec = KVCacheSpec("fp8_e4m3", "per_tensor", "per_tensor", center=True)
    recipe = _recipe(spec)
    if export == "onnx":
        from qcompiler.export.kv_qdq import check_kv_exportable
        with pytest.raises(UnsupportedError, match=r"kv_cache.center=True .* export with them False"):
            check_kv_exportable(recipe)
    else:
        from qcompiler.export.compressed_tensors import _kv_scheme
        with pytest.raises(UnsupportedError, match=r"kv_cache.center=True .*kv_cache_scheme cannot express"):
            _kv_scheme(recipe)
