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
from qcompiler.errors import QCompilerError
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
        self._compute_spread_over_ranks(ctx, stats, layerwise, memo)
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


    @staticmethod
    def _compute_spread_over_ranks(ctx: PassContext, stats: dict, layerwise: dict, memo: dict) -> None:
        """Under torch.distributed: the linears this pass would compute (GPTQ, AWQ clipping) are given to
        ranks by cost (longest first onto the least loaded) and each result sent to every rank, into the
        memo the loop below reads; one process computes them all in the loop."""
        from qcompiler.calibration import distributed as dd
        world = dd.current_world()
        if not world.active:
            return
        ann = ctx.analyses[Analysis.ANNOTATE]
        todo = []
        for fqn, d in ctx.layer_plan.items():
            s = ctx.analyses[Analysis.SMOOTHING].get(fqn)
            lw = layerwise.get(fqn)
            if d.quantize and not (lw is not None and _same_scale(lw.scale, s)) and ("weight_algorithm", fqn) not in memo:
                todo.append((fqn, s))
        if not todo:
            return
        costs = [float(ann.weights[f].w.shape[0]) * float(ann.weights[f].w.shape[1]) ** 2 for f, _ in todo]
        owners = dd.assign_by_cost(costs, world)
        mine = {}
        for (fqn, s), owner in zip(todo, owners):
            if owner == world.rank:
                st = stats.get(fqn)
                try:
                    qw, note = weight_algorithms.quantize_linear(
                        fqn, ann.weights[fqn].w, None if st is None else weight_algorithms.scaled_stats(st, s),
                        ctx.recipe)
                except QCompilerError as e:     # every rank raises it, none waits for a result that never comes
                    mine[fqn] = e
                    break
                mine[fqn] = (qw.to("cpu"), note)
        where = f"the weight algorithm of {len(todo)} linears"
        for part in dd.all_gather_objects(world, mine, "gather of quantized weights", where):
            for fqn, got in part.items():
                if isinstance(got, Exception):
                    raise got
                memo[("weight_algorithm", fqn)] = (got[0].to(ann.weights[fqn].w.device), got[1])


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
