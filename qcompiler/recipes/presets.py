"""The named presets: ``@register_recipe(name)`` registers a zero-argument factory, ``get(name)``
builds the preset, ``names()`` lists them. Each preset's comment says how its choices were made."""

from __future__ import annotations

import dataclasses
from typing import Callable

from qcompiler.errors import RecipeError
from .specs import (GPTAQ_START, GPTQ_START, ActivationSpec, AWQSpec, Calibrator, EndToEndSpec, FallbackSpec, GPTQSpec, Granularity, KVCacheSpec, QuantDtype,
                    Recipe, RotationSpec, SignRoundSpec, SmoothQuantSpec, SparseGPTSpec, WeightSpec)

__all__ = ["RECIPES", "register_recipe", "get", "names"]


RECIPES: dict[str, Callable[[], Recipe]] = {}


def register_recipe(name: str):
    """Register a zero-argument factory returning a ``Recipe`` under ``name``."""

    def deco(factory: Callable[[], Recipe]):
        if name in RECIPES:
            raise RecipeError(f"recipe {name!r} is already registered")
        RECIPES[name] = factory
        return factory

    return deco


def get(name: str) -> Recipe:
    """The preset called ``name``; ``RecipeError`` listing the known names otherwise.

    ``"BASE+KV"`` composes: preset BASE with the KV cache of the KV-cache preset KV (``kv-int8``,
    ``kv-fp8``, ``kv-int4``), named ``BASE+KV``; ``"BASE+rot"`` adds a rotation of the residual stream
    (``RotationSpec()``), ``"BASE+rot-online"`` the rotation plus online Hadamard transforms
    (``RotationSpec(online=True)``); a KV cache and a rotation may follow BASE, once each, in either order."""
    if not isinstance(name, str):
        raise RecipeError(f"a preset name must be a string, got {type(name).__name__}")
    base, *extras = name.split("+")
    if not extras:
        if name not in RECIPES:
            raise RecipeError(f"unknown recipe {name!r}; known: {sorted(RECIPES)} (or BASE+KV, e.g. "
                              "'w4a16-gptq+kv-fp8', and BASE+rot)")
        return RECIPES[name]()
    recipe = get(base)
    changes: dict = {}
    for extra in extras:
        if extra in (ROTATION_SUFFIX, ONLINE_ROTATION_SUFFIX):
            if recipe.rotation is not None or "rotation" in changes:
                raise RecipeError(f"recipe {name!r}: the rotation is given twice")
            changes["rotation"] = RotationSpec(online=extra == ONLINE_ROTATION_SUFFIX)
            continue
        cache = get(extra) if extra in RECIPES else None
        if cache is None or cache.kv_cache is None:
            raise RecipeError(f"recipe {name!r}: what follows '+' must be a KV-cache preset "
                              f"({', '.join(n for n in sorted(RECIPES) if n.startswith('kv-'))}) or "
                              f"'{ROTATION_SUFFIX}' / '{ONLINE_ROTATION_SUFFIX}', not {extra!r}")
        if recipe.kv_cache is not None or "kv_cache" in changes:
            raise RecipeError(f"recipe {name!r}: the KV cache is quantized twice ({base!r} or an earlier '+')")
        changes["kv_cache"] = cache.kv_cache
    return recipe.replace(name=name, **changes)


#: ``BASE+rot``: the preset with a rotation of the residual stream
ROTATION_SUFFIX = "rot"
#: ``BASE+rot-online``: the rotation plus online Hadamard transforms on the stream writers' inputs
ONLINE_ROTATION_SUFFIX = "rot-online"


def resolve(recipe: "Recipe | str") -> Recipe:
    """``recipe`` itself, or the preset it names; ``RecipeError`` for anything else."""
    if isinstance(recipe, str):
        return get(recipe)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be a qcompiler.Recipe or a preset name, got {type(recipe).__name__}")
    return recipe


def names() -> list[str]:
    """Names of the registered presets."""
    return sorted(RECIPES)


_STATIC_INT8 = ActivationSpec(QuantDtype.INT8, Granularity.PER_TENSOR)
_DYNAMIC_INT8 = ActivationSpec(QuantDtype.INT8, Granularity.PER_TOKEN)


@register_recipe("w8a16")
def _w8a16() -> Recipe:
    # Sensitivity fallback: on SmolLM2 the few linears under 36 dB output SQNR are middle-layer
    # v_proj (33-36 dB; the median linear is at 42 dB), and keeping them in float halves the
    # perplexity increase of plain per-channel RTN (wikitext-2 valid, 16 windows: +0.21% vs +0.40%;
    # AWQ scales for int8 reach +0.29% at 4x the calibration time). Without calibration data the
    # rule is skipped with a warning. Commands: benchmarks/recipe_sweep.py.
    return Recipe(name="w8a16", weight=WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL),
                  fallback=FallbackSpec(min_sqnr_db=36.0))


@register_recipe("w8a8-int8-naive")
def _w8a8_naive() -> Recipe:
    return Recipe(name="w8a8-int8-naive", weight=WeightSpec(), activation=_STATIC_INT8)


@register_recipe("w8a8-int8-sq")
def _w8a8_sq() -> Recipe:
    # Fixed alpha: on SmolLM2 the per-group output-error search picks worse alphas for static
    # per-tensor scales than 0.8 (0.8 also had the lowest held-out wikitext-2 valid perplexity of
    # 0.65 / 0.72 / 0.8). Static scales by the MSE calibrator: one outlier row no longer sets a
    # layer's range (SmolLM2, held-out wikitext-2 valid: +1.34% vs +3.68% minmax, +2.53% percentile). Only layers under
    # 20 dB stay in float (on SmolLM2 a few down_proj, one at 3 dB): each float layer costs
    # prefill speed, and the static preset is the fast one. Commands: benchmarks/recipe_sweep.py.
    return Recipe(name="w8a8-int8-sq", weight=WeightSpec(),
                  activation=ActivationSpec(QuantDtype.INT8, Granularity.PER_TENSOR, calibrator=Calibrator.MSE),
                  smoothquant=SmoothQuantSpec(alpha=0.8),
                  fallback=FallbackSpec(min_sqnr_db=20.0, max_fraction=0.1))


@register_recipe("w8a8-int8-sq-dynamic")
def _w8a8_sq_dynamic() -> Recipe:
    return Recipe(name="w8a8-int8-sq-dynamic", weight=WeightSpec(), activation=_DYNAMIC_INT8,
                  smoothquant=SmoothQuantSpec(alpha=0.5, search=True),
                  fallback=FallbackSpec(min_sqnr_db=40.0, max_fraction=0.1))


@register_recipe("fp8")
def _fp8() -> Recipe:
    # GPTQ compensates the weights' rounding (E4M3 keeps 3 mantissa bits); layer by layer, each
    # block's Hessians come from the outputs of the blocks already quantized before it
    return Recipe(name="fp8", weight=WeightSpec(QuantDtype.FP8_E4M3, Granularity.PER_TENSOR),
                  activation=ActivationSpec(QuantDtype.FP8_E4M3, Granularity.PER_TENSOR),
                  fallback=FallbackSpec(min_sqnr_db=25.0, max_fraction=0.1),
                  weight_algorithm=GPTQSpec(act_order=True), layerwise=True)


@register_recipe("fp8-dynamic")
def _fp8_dynamic() -> Recipe:
    # The format is calibration-free (llm-compressor's FP8_DYNAMIC: per-channel weights by
    # round-to-nearest, per-token activation scales at run time), so GPTQ and the sensitivity
    # fallback are refinements: without calibration data both are skipped with a warning.
    # w4a16-gptq / w8a16-gptq keep GPTQ required: it is what they are named for, and their
    # calibration-free formats are presets of their own (w4a16-rtn, w8a16).
    return Recipe(name="fp8-dynamic", weight=WeightSpec(QuantDtype.FP8_E4M3, Granularity.PER_CHANNEL),
                  activation=ActivationSpec(QuantDtype.FP8_E4M3, Granularity.PER_TOKEN),
                  fallback=FallbackSpec(min_sqnr_db=25.0, max_fraction=0.1),
                  weight_algorithm=GPTQSpec(act_order=True, optional=True), layerwise=True)


_INT4_G64 = WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=64, symmetric=True)
_FP8_PER_TOKEN = ActivationSpec(QuantDtype.FP8_E4M3, Granularity.PER_TOKEN)


@register_recipe("w4a16-rtn")
def _w4a16_rtn() -> Recipe:
    return Recipe(name="w4a16-rtn", weight=_INT4_G64)


# AWQ's alpha grid and clipping scored on 4096 calibration rows per linear, not the default 1024:
# the discrete choices are less noisy (held-out wikitext-2 valid on SmolLM2, 16 windows: 0.44x RTN's
# increase vs 0.53x; 8192 rows 0.46x, duo scaling 0.48x; commands in benchmarks/recipe_sweep.py)
_AWQ_4K = {"weight_algorithm": AWQSpec(samples=4096), "samples_per_layer": 4096}


@register_recipe("w4a16-awq")
def _w4a16_awq() -> Recipe:
    return Recipe(name="w4a16-awq", weight=_INT4_G64, layerwise=True, **_AWQ_4K)


@register_recipe("w4a16-gptq")
def _w4a16_gptq() -> Recipe:
    # activation order with group scales fixed up front (llm-compressor's default actorder="static"),
    # each group's clipping chosen by Hessian-weighted error (on SmolLM2: +19.9% vs +29.7% with minmax scales)
    return Recipe(name="w4a16-gptq", weight=dataclasses.replace(_INT4_G64, calibrator=Calibrator.MSE),
                  weight_algorithm=GPTQ_START, layerwise=True)


@register_recipe("w4a16-gptaq")
def _w4a16_gptaq() -> Recipe:
    # GPTAQ: w4a16-gptq with each linear fitted to the float model's output (target="float-model") rather
    # than its own quantized inputs, three quarters of the correction toward it, and each block's linears
    # calibrated in dependency order (true_sequential; without it the float-model target diverges, +606%).
    # Chosen on WikiText-2 validation text with online rotations (SmolLM2, g64,
    # benchmarks/rotation_validation.py): +2.62% against +6.53% for w4a16-gptq+rot-online (target_alpha
    # 0.25, GPTAQ's reference code: +3.28%; 0.4: +3.11%; 0.5: +2.87%; 0.65: +3.02%; 0.85: +3.17%; 1.0: +3.75%;
    # true_sequential alone: +6.49%). About twice GPTQ's calibration time (the float stream). Then three rounds
    # of group scales refitted to each linear's Hessian with the codes fixed (scale_refit=3): +3.31% against
    # +3.77% without on 64 validation windows (8 windows: +2.51% against +2.62%; 1, 2, 5 rounds +2.91%,
    # +3.47%, +2.81%).
    return _w4a16_gptq().replace(
        name="w4a16-gptaq",
        weight_algorithm=GPTAQ_START)


@register_recipe("w4a16-gptaq-e2e")
def _w4a16_gptaq_e2e() -> Recipe:
    # w4a16-gptaq, then its group scales tuned end to end against the float model's next-token distribution
    # (codes fixed; qcompiler/calibration/end_to_end.py): one epoch of the calibration sequences, Adam at lr 1e-3
    # on the relative scale changes, bfloat16 steps. Chosen with +rot-online on validation text (SmolLM2, g64, 64
    # windows, benchmarks/end_to_end_validation.py): lr 1e-3 +2.61%, 1e-4 +2.91% against w4a16-gptaq's +3.31%
    # (a first, uncommitted version of the loop: 3e-4 +2.66%, 1e-3 +2.49%; 3e-3 tripled the running KL).
    return _w4a16_gptaq().replace(name="w4a16-gptaq-e2e", end_to_end=EndToEndSpec(epochs=1.0, lr=1e-3))


@register_recipe("w4a16-signround")
def _w4a16_signround() -> Recipe:
    # SignRound (AutoRound's algorithm): rounding offsets and clipping learned per block against the float
    # block output; AutoRound's 200 steps at lr 1/steps, 4 calibration sequences per step
    return Recipe(name="w4a16-signround", weight=_INT4_G64, weight_algorithm=SignRoundSpec(), layerwise=True)


@register_recipe("w4a8-awq")
def _w4a8_awq() -> Recipe:
    return Recipe(name="w4a8-awq", weight=_INT4_G64, activation=_FP8_PER_TOKEN, layerwise=True, **_AWQ_4K)


@register_recipe("w4a8-int8-sq-gptq")
def _w4a8_int8_sq_gptq() -> Recipe:
    # W4A8 with INT8 activations (int8 x int4 tiles, exact int32 sums per tile: GPUs without fp8 too):
    # SmoothQuant (alpha searched per layer group) before GPTQ, int8 per-token dynamic activations. GPTQ
    # runs on whole-model Hessians (SmoothQuant picks its scales from the float model, so not layer by
    # layer). Chosen on validation text: +9.13% (alpha 0.5 fixed +9.87%) against +15.15% for w4a16-gptq's
    # recipe with the same activations and +17.06% for w4a8-awq's (benchmarks/recipe_sweep.py, commands there).
    return _w4a16_gptq().replace(name="w4a8-int8-sq-gptq", activation=_DYNAMIC_INT8, layerwise=False,
                                 smoothquant=SmoothQuantSpec(alpha=0.5, search=True))


@register_recipe("w8a16-gptq")
def _w8a16_gptq() -> Recipe:
    return Recipe(name="w8a16-gptq", weight=WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL),
                  weight_algorithm=GPTQSpec(act_order=True, static_groups=True), layerwise=True)


# ---- 2:4 sparsity ------------------------------------------------------------------------------
# SparseGPT prunes every decoder linear to 2:4 and rounds the kept weights in the same sweep, block by block
# (each block's Hessians from the outputs of the blocks already pruned). No sensitivity fallback: a pruned
# linear's output SQNR is far below any quantization threshold, and a dense linear would not be sparse.
# Float 2:4 (no quantization) is qcompiler.sparsify.

@register_recipe("sparse24-fp8-dynamic")
def _sparse24_fp8_dynamic() -> Recipe:
    # llm-compressor's 2:4 + FP8 scheme: channel-wise FP8 weights, dynamic per-token FP8 activations
    return Recipe(name="sparse24-fp8-dynamic", weight=WeightSpec(QuantDtype.FP8_E4M3, Granularity.PER_CHANNEL),
                  activation=_FP8_PER_TOKEN, weight_algorithm=SparseGPTSpec(), layerwise=True)


@register_recipe("sparse24-w8a8-int8-dynamic")
def _sparse24_int8_dynamic() -> Recipe:
    return Recipe(name="sparse24-w8a8-int8-dynamic", weight=WeightSpec(), activation=_DYNAMIC_INT8,
                  weight_algorithm=SparseGPTSpec(), layerwise=True)


@register_recipe("sparse24-w4a16")
def _sparse24_w4a16() -> Recipe:
    return Recipe(name="sparse24-w4a16", weight=_INT4_G64, weight_algorithm=SparseGPTSpec(), layerwise=True)


# ---- KV cache ---------------------------------------------------------------------------------
# On their own the kv-* presets keep every linear in float (the cache is the only quantized tensor);
# "BASE+kv-..." adds their cache to a weight preset.
_FLOAT_LINEARS = FallbackSpec(keep_op_kinds=("embedding", "norm", "output_head", "router", "linear"))


@register_recipe("kv-int8")
def _kv_int8() -> Recipe:
    # one static scale per KV head for keys and for values (calibrated absmax)
    return Recipe(name="kv-int8", fallback=_FLOAT_LINEARS, kv_cache=KVCacheSpec(QuantDtype.INT8))


@register_recipe("kv-int8-rot")
def _kv_int8_rot() -> Recipe:
    # kv-int8 with each head's keys and values centered (calibrated per-channel mid-range) and rotated
    # (randomized Hadamard) before quantizing: static per-head scales still, no full-precision window.
    # Chosen on WikiText-2 validation text (benchmarks/kv_window_validation.py, SmolLM2, context 1,024,
    # 2026-12-04): per-head INT8 +0.51%, rotated +0.22%, centered +0.18%, both +0.06%. No vLLM / TensorRT
    # form (neither writes the transform).
    return Recipe(name="kv-int8-rot", fallback=_FLOAT_LINEARS,
                  kv_cache=KVCacheSpec(QuantDtype.INT8, rotate=True, center=True))


@register_recipe("kv-int8-dynamic")
def _kv_int8_dynamic() -> Recipe:
    # one scale per token and KV head for keys and for values, computed as each token is written (KIVI's
    # values, transformers' QuantizedCache granularity at 8 bits); no calibration. Chosen on WikiText-2
    # validation text (benchmarks/kv_window_validation.py, SmolLM2, context 1,024): static per-head +0.47%,
    # per-head keys with per-token values +0.27%, per token +0.05%, static per-channel keys with per-token
    # values +0.01% (not taken: a static key range calibrated on short text drifts at long context, as
    # kv-int4's did). No vLLM / TensorRT form (their INT8 caches take static scales: kv-int8).
    return Recipe(name="kv-int8-dynamic", fallback=_FLOAT_LINEARS,
                  kv_cache=KVCacheSpec(QuantDtype.INT8, Granularity.PER_TOKEN, Granularity.PER_TOKEN))


@register_recipe("kv-fp8")
def _kv_fp8() -> Recipe:
    # vLLM's FP8 cache: one static scale for keys and one for values per layer (k_scale / v_scale)
    return Recipe(name="kv-fp8", fallback=_FLOAT_LINEARS,
                  kv_cache=KVCacheSpec(QuantDtype.FP8_E4M3, Granularity.PER_TENSOR, Granularity.PER_TENSOR))


@register_recipe("kv-fp8-r128")
def _kv_fp8_r128() -> Recipe:
    # kv-fp8 with the last 128 positions in full precision (KIVI's / transformers' residual length);
    # chosen on WikiText-2 validation text (benchmarks/kv_window_validation.py; SmolLM2: +0.45% -> +0.13%). No vLLM / TensorRT form.
    return Recipe(name="kv-fp8-r128", fallback=_FLOAT_LINEARS,
                  kv_cache=KVCacheSpec(QuantDtype.FP8_E4M3, Granularity.PER_TENSOR, Granularity.PER_TENSOR,
                                       residual_window=128))


@register_recipe("kv-int4")
def _kv_int4() -> Recipe:
    # KIVI's layout: keys per channel (their outliers sit in fixed channels) with one scale per block
    # of 64 positions from the block's own range, values per token, asymmetric; the last 128 positions
    # in full precision (KIVI's residual). Chosen on WikiText-2 validation text
    # (benchmarks/kv_window_validation.py, SmolLM2): the window +5.24% -> +0.85% at context 1,024; at
    # 4,096 static per-channel keys +3.29% (their calibrated range misses RoPE's slow channels' later
    # turns), blocks of 128 / 64 / 32 positions +1.12% / +0.87% / +0.86%: 64, half the scales of 32.
    # Needs no calibration.
    return Recipe(name="kv-int4", fallback=_FLOAT_LINEARS,
                  kv_cache=KVCacheSpec(QuantDtype.INT4, Granularity.PER_GROUP, Granularity.PER_TOKEN, symmetric=False,
                                       residual_window=128, group_size=64))
