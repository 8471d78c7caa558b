"""Recipes: what to quantize and how.

A ``Recipe`` (``specs``) holds one ``WeightSpec`` (every quantized linear's weights), an optional
``ActivationSpec`` (absent: weight-only), optional ``SmoothQuantSpec``, one optional weight algorithm
(``GPTQSpec``, ``AWQSpec``, ``SignRoundSpec``, ``SparseGPTSpec`` or a registered third party's spec in ``weight_algorithm``), an optional
``KVCacheSpec`` (the attention cache), an optional ``RotationSpec`` and a ``FallbackSpec``; each spec validates its own fields and
the recipe round-trips through JSON.
Presets (``presets``) are registered by name with ``@register_recipe`` and fetched with
``get(name)`` (``"w4a16-gptq+kv-fp8"`` adds a KV-cache preset's cache to a weight preset, ``"+rot"`` a rotation);
``names()`` lists them; ``resolve(recipe_or_name)`` gives the ``Recipe`` either way.
"""

from .presets import RECIPES, get, names, register_recipe, resolve
from .specs import (ALGORITHM_SPECS, OP_KINDS, ActivationSpec, AWQSpec, Calibrator, FallbackSpec, GPTQSpec,
                    Granularity, KVCacheSpec, QuantDtype, Recipe, RotationSpec, EndToEndSpec, SignRoundSpec, SmoothQuantSpec, SparseGPTSpec,
                    WeightSpec,
                    register_algorithm_spec)

__all__ = [
    "resolve",
    "QuantDtype", "Granularity", "Calibrator", "WeightSpec", "ActivationSpec",
    "SmoothQuantSpec", "GPTQSpec", "AWQSpec", "SignRoundSpec", "SparseGPTSpec", "RotationSpec", "EndToEndSpec", "KVCacheSpec", "FallbackSpec", "Recipe", "register_recipe", "get", "names", "RECIPES",
    "OP_KINDS", "ALGORITHM_SPECS", "register_algorithm_spec",
]
