"""Outlier analysis: which input channels of each linear carry activation outliers, and how
extreme they are (max / median of the per-channel |x| maxima)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from qcompiler.pipeline import Analysis, PassContext, PassResult

__all__ = ["OutlierInfo", "OutlierAnalysis", "OUTLIER_MAGNITUDE"]

#: |x| above which a channel counts as an outlier (LLM.int8()'s threshold).
OUTLIER_MAGNITUDE = 6.0


@dataclass(frozen=True)
class OutlierInfo:
    max_abs: float
    median_abs: float
    ratio: float                    # max / median of per-channel |x| maxima
    outlier_channels: tuple[int, ...]


class OutlierAnalysis:
    name = "outliers"
    requires = ("calibrate",)
    reads = (Analysis.CALIBRATION,)
    writes = (Analysis.OUTLIERS,)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        infos: dict[str, OutlierInfo] = {}
        for fqn, st in ctx.analyses[Analysis.CALIBRATION].items():
            a = st.absmax.float()
            med = float(a.median().clamp(min=1e-12))
            chans = tuple(int(i) for i in (a > OUTLIER_MAGNITUDE).nonzero().flatten()[:64])
            infos[fqn] = OutlierInfo(float(a.max()), med, float(a.max()) / med, chans)
            ctx.layer_plan[fqn].outlier_ratio = infos[fqn].ratio
        ctx.analyses[Analysis.OUTLIERS] = infos
        worst = max((i.ratio for i in infos.values()), default=0.0)
        return PassResult(gm, False, {"layers": len(infos),
                                      "layers_with_outlier_channels": sum(bool(i.outlier_channels) for i in infos.values()),
                                      "worst_max_over_median": round(worst, 1)})
