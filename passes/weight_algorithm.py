"""Weight algorithms in the graph: AWQ scale folding and GPTQ / AWQ-clipped weights.

``AWQFold`` is SmoothQuant's folding with AWQ's scale (searched per group of linears sharing
one input on calibration rows, or taken from layer-by-layer calibration); ``WeightAlgorithm``
quantizes each planned linear's weight by GPTQ or AWQ clipping (``qcompiler.algorithms.registry``)
into ``ctx.analyses[Analysis.WEIGHT_ALGORITHM]``, which ``insert_qdq`` stores as is.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch.fx import GraphModule

from qcompiler.algorithms import registry as weight_algorithms
from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.pipeline import Analysis, PassContext, PassResult

from .smoothquant import SmoothQuantFold

__all__ = ["AWQFold", "WeightAlgorithm"]


class AWQFold(SmoothQuantFold):
    name = "awq_fold"
    requires = ("smoothquant_fold",)

    def enabled(self, ctx: PassContext) -> bool:
        return weight_algorithms.has_input_scale(ctx.recipe)

    def group_scale(self, ctx, fqns, ws, st):
        layerwise = ctx.calibration.layerwise
        found = [layerwise.get(f) for f in fqns]
        if all(r is not None and r.scale is not None for r in found) and \
                all(torch.equal(r.scale, found[0].scale) for r in found):
            return found[0].alpha, found[0].scale.to(ws[0].device)   # meets the weights
        memo = ctx.analyses.setdefault(Analysis.MEMO, {})
        key = ("awq_scale", tuple(fqns))
        if key not in memo:
            memo[key] = weight_algorithms.input_scale(st, ws, ctx.recipe, ",".join(fqns))
        return memo[key]


class WeightAlgorithm:
    name = "weight_algorithm"
    requires = ("sensitivity_fallback",)
    reads = (Analysis.ANNOTATE, Analysis.SMOOTHING)
    writes = (Analysis.WEIGHT_ALGORITHM,)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        recipe = ctx.recipe
        out: dict[str, QuantizedWeight] = ctx.analyses.setdefault(Analysis.WEIGHT_ALGORITHM, {})
        if recipe.weight_algorithm_spec is None:
            return PassResult(gm, False, {})
        if ctx.analyses.get(Analysis.NO_CALIBRATION_DATA):
            # only optional GPTQ gets here without data (Recipe.requires_calibration): insert_qdq rounds to nearest
            msg = (f"recipe {recipe.name!r}: no calibration data, so GPTQ (gptq.optional=True) was skipped and the "
                   "weights are rounded to nearest; pass calibration=batches to run it")
            if msg not in ctx.report.warnings:
                ctx.report.warnings.append(msg)
                warnings.warn(msg, stacklevel=2)
            return PassResult(gm, False, {"skipped_no_calibration": 1})
        ann = ctx.analyses[Analysis.ANNOTATE]
        stats = ctx.analyses.get(Analysis.CALIBRATION, {})
        layerwise = ctx.calibration.layerwise
        memo = ctx.analyses.setdefault(Analysis.MEMO, {})
        counts = {"from_layerwise": 0, "computed": 0}
        for fqn, d in ctx.layer_plan.items():
            if not d.quantize:
                continue
            s = ctx.analyses[Analysis.SMOOTHING].get(fqn)
            lw = layerwise.get(fqn)
            if lw is not None and _same_scale(lw.scale, s):
                # calibration may have run elsewhere (the CPU): the weight goes where the graph's weight is
                qw = _rows_scaled(lw.qweight.to(ann.weights[fqn].w.device),
                                  ctx.analyses.get(Analysis.ROW_SCALING, {}).get(fqn))
                note = lw.note + " (layer-by-layer)"
                counts["from_layerwise"] += 1
            else:
                key = ("weight_algorithm", fqn)
                if key not in memo:
                    st = stats.get(fqn)
                    memo[key] = weight_algorithms.quantize_linear(
                        fqn, ann.weights[fqn].w, None if st is None else weight_algorithms.scaled_stats(st, s), recipe)
                qw, note = memo[key]
                counts["computed"] += 1
            out[fqn] = qw
            d.weight_format = qw.describe()
            d.weight_bytes_q = qw.nbytes()
            d.note = f"{d.note}; {note}" if d.note else note
        return PassResult(gm, False, counts)


def _same_scale(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.float(), b.float().to(a.device))


def _rows_scaled(qw: QuantizedWeight, r: torch.Tensor | None) -> QuantizedWeight:
    """The weight with output row n multiplied by ``r[n]`` (a scale folded into this producer after
    quantization): per-row and per-group scales absorb it, the integers do not change."""
    if r is None:
        return qw
    if qw.scale.dim() == 0:
        raise ValueError("a per-tensor weight scale cannot absorb per-row scaling")
    return dataclasses.replace(qw, scale=qw.scale * r.float()[:, None])
