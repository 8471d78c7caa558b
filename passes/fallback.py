"""Per-layer fallback: which linears stay in high precision, each with its reason.

``FallbackRules`` applies the recipe's rules (op kinds, module-path globs) and the checks a
layer must pass (calibration statistics where the recipe needs them, group-size fit).
``SensitivityFallback`` measures each remaining linear's quantized-output SQNR on calibration
rows (after smoothing) and keeps the worst below ``min_sqnr_db`` in float, up to
``max_fraction`` of the quantizable linears; it also fixes static activation scales.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch.fx import GraphModule

from qcompiler.core import layer_quant, numerics
from qcompiler.pipeline import Analysis, PassContext, PassResult
from qcompiler.recipes import Granularity

from .calibrate import smoothed_stats

__all__ = ["FallbackRules", "SensitivityFallback", "rule_reason"]

log = logging.getLogger(__name__)


def rule_reason(ctx: PassContext, fqn: str, statistics: bool = True) -> str:
    """Why a rule keeps ``fqn`` in high precision ("" if none does); ``statistics=False`` leaves out
    the rule on missing calibration statistics."""
    reason = ctx.recipe.fallback.keeps(ctx.layer_plan[fqn].op_kind, fqn)
    if reason:
        return reason
    if statistics and ctx.recipe.linears_require_calibration and fqn not in ctx.analyses.get(Analysis.CALIBRATION, {}):
        return "no calibration statistics for this linear's input (module not reached, or its input is not the linear's)"
    return ""


class FallbackRules:
    name = "fallback_rules"
    requires = ("calibrate",)
    reads = ()
    writes = ()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        spec = ctx.recipe.weight
        kept = 0
        for fqn, d in ctx.layer_plan.items():
            reason = rule_reason(ctx, fqn)
            if reason:
                d.quantize, d.reason = False, reason
                kept += 1
                log.info("keeping %s in high precision: %s", fqn, reason)
                continue
            if spec.granularity is Granularity.PER_GROUP and d.in_features % spec.group_size:
                groups = math.ceil(d.in_features / spec.group_size)
                d.note = (f"K={d.in_features} not a multiple of group {spec.group_size}: {groups} groups, "
                          f"the last zero-padded from {d.in_features - (groups - 1) * spec.group_size} columns")
        return PassResult(gm, False, {"kept_by_rules": kept})


class SensitivityFallback:
    name = "sensitivity_fallback"
    requires = ("fallback_rules", "smoothquant_fold")
    writes = ()
    reads = (Analysis.ANNOTATE,)
    after = ("awq_fold",)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        recipe = ctx.recipe
        weights = ctx.analyses[Analysis.ANNOTATE].weights
        act = recipe.activation
        measured: dict[str, float] = {}
        if recipe.fallback.min_sqnr_db is not None and ctx.analyses.get(Analysis.NO_CALIBRATION_DATA):
            msg = (f"recipe {recipe.name!r}: no calibration data, so the sensitivity fallback "
                   f"(fallback.min_sqnr_db={recipe.fallback.min_sqnr_db:g}) measured no layer; pass "
                   "calibration=batches to apply it")
            if msg not in ctx.report.warnings:
                ctx.report.warnings.append(msg)
                warnings.warn(msg, stacklevel=2)
        for fqn, d in ctx.layer_plan.items():
            if not d.quantize:
                continue
            qw = layer_quant.quantize_weight(weights[fqn].w, recipe.weight)
            d.weight_format = qw.describe()
            d.weight_bytes_q = qw.nbytes()
            if act is not None:
                d.act_format = f"{act.dtype.value} " + ("per-token dynamic" if act.dynamic else
                                                         f"per-tensor static ({act.calibrator.value})")
            st = smoothed_stats(ctx, fqn)
            if st is None:
                if recipe.fallback.min_sqnr_db is not None and not ctx.analyses.get(Analysis.NO_CALIBRATION_DATA):
                    d.note = (d.note + "; " if d.note else "") + \
                        "SQNR not measured: no calibration statistics for this linear's input"
                continue
            memo = ctx.analyses.setdefault(Analysis.MEMO, {})
            key = ("sensitivity", fqn)
            if key not in memo:
                memo[key] = self._measure(st, weights[fqn].w, qw, recipe)
            d.act_scale, d.sqnr_db = memo[key]
            measured[fqn] = d.sqnr_db
        return self._apply_threshold(ctx, measured, gm)

    @staticmethod
    def _measure(st, w, qw, recipe) -> tuple[float | None, float]:
        """(static activation scale or None, output SQNR in dB) on the calibration rows."""
        absmax, samples = (t.to(w.device) for t in st)   # calibration keeps them on the CPU
        act, scale = recipe.activation, None
        if act is not None and not act.dynamic:
            scale = layer_quant.static_act_scale(absmax, samples, act)
        y_ref = torch.nn.functional.linear(samples.float(), w.float())
        y_q = layer_quant.simulate_linear(samples, w.float(), None, recipe, scale, qw)
        return (None if scale is None else float(scale)), numerics.sqnr_db(y_q, y_ref)

    @staticmethod
    def _apply_threshold(ctx: PassContext, measured: dict[str, float], gm: GraphModule) -> PassResult:
        recipe = ctx.recipe
        threshold = recipe.fallback.min_sqnr_db
        fell = 0
        if threshold is not None:
            quantizable = sum(d.quantize for d in ctx.layer_plan.values())
            cap = math.floor(recipe.fallback.max_fraction * quantizable)
            below = sorted((s, f) for f, s in measured.items() if s < threshold)
            for i, (s, fqn) in enumerate(below):
                d = ctx.layer_plan[fqn]
                if i < cap:
                    d.quantize = False
                    d.reason = f"output SQNR {s:.1f} dB < fallback.min_sqnr_db {threshold:g} dB on calibration data"
                    fell += 1
                    log.warning("keeping %s in high precision: %s", fqn, d.reason)
                else:
                    d.note = (d.note + "; " if d.note else "") + \
                        f"SQNR {s:.1f} dB below {threshold:g} dB but the fallback cap ({cap}) is reached"
        return PassResult(gm, False, {"measured": len(measured), "kept_by_sensitivity": fell})
