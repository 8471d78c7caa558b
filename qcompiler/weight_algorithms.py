"""Per-layer weight algorithms behind the recipe's ``gptq`` / ``awq`` fields, shared by the graph
passes (``passes/awq.py``, ``passes/weight_algorithm.py``) and layer-by-layer calibration
(``qcompiler.layerwise``), so both compute the same numbers.

- ``awq_group_scale``: AWQ's per-input-channel scale for the linears that share one input.
- ``quantize_linear``: one linear's ``QuantizedWeight`` by GPTQ (Hessian of its inputs), AWQ
  clipping search, or round-to-nearest, given the input statistics after any smoothing scale.
"""

from __future__ import annotations

import torch

from .calibration import LayerStats
from .errors import CalibrationError
from .layer_quant import QuantizedWeight, quantize_weight
from .recipes import Recipe

__all__ = ["awq_group_scale", "quantize_linear", "scaled_stats"]


def scaled_stats(st: LayerStats, s: torch.Tensor | None) -> LayerStats:
    """Statistics of ``x / s`` from those of ``x`` (Hessian ``H / (s s^T)``)."""
    if s is None:
        return st
    s = s.float().to(st.absmax.device)     # statistics stay where calibration keeps them
    return LayerStats(st.absmax / s, st.samples / s, st.tokens,
                      None if st.absmean is None else st.absmean / s,
                      None if st.hessian is None else st.hessian / (s[:, None] * s[None, :]))


def awq_group_scale(st: LayerStats, weights: list[torch.Tensor], recipe: Recipe, name: str = "?"
                    ) -> tuple[float, torch.Tensor]:
    """(alpha, s): AWQ's scale for linears reading one input; weights become ``W * s``, input ``x / s``."""
    from . import awq as _awq
    spec = recipe.awq
    x = st.samples[: spec.samples].float()
    s, info = _awq.awq_search_scales(x, [w.float() for w in weights], recipe.weight, grid=spec.grid,
                                     duo_scaling=spec.duo_scaling, layer_name=name)
    return info.alpha, s


def quantize_linear(fqn: str, w: torch.Tensor, st: LayerStats | None, recipe: Recipe) -> tuple[QuantizedWeight, str]:
    """One linear's quantized weight and a short note (algorithm, dampening, clipping)."""
    w = w.float()
    if recipe.gptq is not None:
        from . import gptq as _gptq
        if st is None or st.hessian is None:
            raise CalibrationError(f"{fqn}: GPTQ needs the Hessian of this linear's inputs; no calibration "
                                   "statistics reached it")
        g = recipe.gptq
        if st.tokens < g.min_samples:
            raise _gptq.too_few_rows_error(recipe, st.tokens, fqn)
        qw, info = _gptq.gptq_quantize(w, st.hessian, recipe.weight, n_samples=st.tokens, block_size=g.block_size,
                                       dampening=g.dampening, act_order=g.act_order, static_groups=g.static_groups,
                                       min_samples=g.min_samples, layer_name=fqn)
        note = f"gptq damp {info.dampening:g}"
        if info.dampening > g.dampening:
            note += f" (raised from {g.dampening:g}: Hessian not positive definite)"
        return qw, note
    if recipe.awq is not None and recipe.awq.clip_search and st is not None:
        from . import awq as _awq
        spec = recipe.awq
        x = st.samples[: spec.samples].float()
        max_val = _awq.awq_search_clip(x, w, recipe.weight, grid=spec.clip_grid, max_shrink=spec.max_shrink,
                                       layer_name=fqn)
        return _awq.quantize_with_clip(w, max_val, recipe.weight), "awq scales + clip search"
    return quantize_weight(w, recipe.weight), "rtn"
