"""Calibration pass: this graph's per-linear input statistics (computed once per model by the API
before the passes run, ``ctx.calibration``) into ``ctx.analyses[Analysis.CALIBRATION]``."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcompiler.calibration.statistics import LayerStats
from qcompiler.errors import CalibrationError
from qcompiler.pipeline import Analysis, PassContext, PassResult

__all__ = ["Calibrate", "smoothed_stats"]


class Calibrate:
    """Take the statistics of this graph's linears from ``ctx.calibration`` (computed before the passes ran)."""

    name = "calibrate"
    requires = ("annotate",)
    reads = ()
    writes = (Analysis.CALIBRATION, Analysis.SMOOTHING)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        ctx.analyses.setdefault(Analysis.SMOOTHING, {})
        if not ctx.recipe.needs_calibration:
            ctx.analyses[Analysis.CALIBRATION] = {}
            return PassResult(gm, False, {"layers_with_stats": 0})
        all_stats = ctx.calibration.stats
        if all_stats is None and ctx.recipe.linears_require_calibration:
            # a quantized model (backend(quantized=True)) may hold float linears the recipe keeps
            from .fallback import rule_reason
            wanting = [f for f in ctx.layer_plan if not rule_reason(ctx, f, statistics=False)]
            if wanting:
                raise CalibrationError(f"recipe {ctx.recipe.name!r} needs calibration data for "
                                       f"{' and '.join(ctx.recipe.calibration_required_by)} of the float linears "
                                       f"{wanting[:4]}{'...' if len(wanting) > 4 else ''}: pass calibration=batches")
        if all_stats is None:        # no calibration data, and the recipe can run without it
            ctx.analyses[Analysis.CALIBRATION] = {}
            ctx.analyses[Analysis.NO_CALIBRATION_DATA] = True
            return PassResult(gm, False, {"layers_with_stats": 0, "no_calibration_data": True})
        stats: dict[str, LayerStats] = {}
        missing = 0
        for fqn, d in ctx.layer_plan.items():
            st = all_stats.get(fqn)
            if st is not None and st.absmax.shape[0] == d.in_features:
                stats[fqn] = st
            else:
                missing += 1
        ctx.analyses[Analysis.CALIBRATION] = stats
        return PassResult(gm, False, {"layers_with_stats": len(stats), "layers_without_stats": missing})


def smoothed_stats(ctx: PassContext, fqn: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(per-channel |x| max, sampled rows) of a linear's input after its SmoothQuant scale."""
    st = ctx.analyses.get(Analysis.CALIBRATION, {}).get(fqn)
    if st is None:
        return None
    s = ctx.analyses.get(Analysis.SMOOTHING, {}).get(fqn)
    if s is None:
        return st.absmax, st.samples
    s = s.to(st.absmax.device)     # the statistics stay where calibration keeps them
    return st.absmax / s, st.samples / s
