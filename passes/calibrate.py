"""Calibration pass: fetch per-linear input statistics (computed once per model, cached by
module path) into ``ctx.analyses[Analysis.CALIBRATION]``."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcompiler.calibration import LayerStats
from qcompiler.errors import CalibrationError
from qcompiler.pipeline import Analysis, PassContext, PassResult

__all__ = ["Calibrate", "smoothed_stats"]


class Calibrate:
    """Read statistics from ``ctx.analyses[Analysis.CALIBRATION_SOURCE]`` (a zero-argument callable
    returning ``{module path: LayerStats}``) for the linears of this graph."""

    name = "calibrate"
    requires = ("annotate",)
    reads = ()
    writes = (Analysis.CALIBRATION, Analysis.SMOOTHING)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        ctx.analyses.setdefault(Analysis.SMOOTHING, {})
        if not ctx.recipe.needs_calibration:
            ctx.analyses[Analysis.CALIBRATION] = {}
            return PassResult(gm, False, {"layers_with_stats": 0})
        source = ctx.analyses.get(Analysis.CALIBRATION_SOURCE)
        if source is None:
            raise CalibrationError(f"recipe {ctx.recipe.name!r} needs calibration data: pass calibration=batches")
        all_stats: dict[str, LayerStats] | None = source()
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
    return st.absmax / s, st.samples / s
