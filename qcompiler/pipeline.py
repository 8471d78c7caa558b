"""The pass contract, the pass manager, the per-compile context and the compile report."""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import networkx as nx
import torch
from torch.fx import GraphModule

from qcompiler.calibration.statistics import LayerStats
from qcompiler.errors import CalibrationError, PassError, RecipeError, UnsupportedError
from qcompiler.recipes import Recipe

__all__ = ["Analysis", "Pass", "PassResult", "PassContext", "CalibrationData", "Lowering", "PassManager", "LayerDecision", "TensorDecision",
           "CompileReport", "META_KEY"]

log = logging.getLogger(__name__)

#: The one ``node.meta`` key under which qcompiler keeps its annotation of a node.
META_KEY = "qcompiler"


class Analysis(str, enum.Enum):
    """The names of ``PassContext.analyses`` entries. A ``str``: ``analyses["annotate"]`` and
    ``analyses[Analysis.ANNOTATE]`` are the same entry, so passes written with bare strings still work."""

    PARAM_NAMES = "param_names"                  # id(parameter) -> its module paths (set by the API)
    MEMO = "memo"                                # results kept across the graphs of one backend (API)
    ANNOTATE = "annotate"                        # GraphAnnotation: linears, weights, parameter paths
    CALIBRATION = "calibration"                  # fqn -> activation statistics
    NO_CALIBRATION_DATA = "no_calibration_data"  # True when a recipe ran without calibration data
    SMOOTHING = "smoothing"                      # fqn -> SmoothQuant / AWQ input scale folded into the graph
    OUTLIERS = "outliers"                        # fqn -> OutlierInfo
    ROW_SCALING = "row_scaling"                  # fqn -> per-row weight scale folded from a following norm
    WEIGHT_ALGORITHM = "weight_algorithm"        # fqn -> QuantizedWeight an algorithm pass produced
    QUANTIZED_WEIGHTS = "quantized_weights"      # fqn -> QuantizedWeight stored in the graph
    QUANTIZED_TENSORS = "quantized_tensors"      # fqn -> QuantizedWeight of a target beyond linears (embedding)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed, and counters."""

    gm: GraphModule
    modified: bool
    stats: Mapping[str, int | float] = field(default_factory=dict)


@runtime_checkable
class Pass(Protocol):
    """A graph pass: ``run`` reads ``ctx``, rewrites ``gm`` and says what it changed.

    ``requires`` names passes whose results must be in ``ctx`` before this one runs. Optionally,
    ``reads`` names the ``Analysis`` entries the pass cannot run without and ``writes`` those it
    always leaves in ``ctx.analyses``; ``PassManager`` checks both. Passes keep no state between runs.
    """

    name: str
    requires: tuple[str, ...]

    def run(self, gm: GraphModule, ctx: "PassContext") -> PassResult: ...


@dataclass
class LayerDecision:
    """What the pipeline decided for one linear, keyed by its module path (``fqn``)."""

    fqn: str
    op_kind: str
    in_features: int
    out_features: int
    quantize: bool = True
    reason: str = ""
    weight_format: str = ""
    act_format: str = ""
    smoothing: str = ""          # where the SmoothQuant scale went: norm fqn, producer linear, "explicit"
    alpha: float | None = None
    act_scale: float | None = None
    sqnr_db: float | None = None
    outlier_ratio: float | None = None
    weight_bytes_fp: int = 0
    weight_bytes_q: int = 0
    note: str = ""
    kernel: str = ""             # the GEMM kernel chosen for this machine (backends.kernel_choice)
    kernel_contract: str = ""    # its numerics for this layer: exact, fp32, int16-pairs
    kernel_note: str = ""        # why it was chosen


@dataclass
class TensorDecision:
    """What the pipeline decided for a quantized tensor that is not a linear's weight (a
    ``qcompiler.targets`` target: an embedding table, a KV-cache write), keyed by module path."""

    fqn: str
    kind: str                    # the target's name
    quantize: bool = True
    reason: str = ""             # why it stayed in float
    format: str = ""
    bytes_fp: int = 0
    bytes_q: int = 0
    note: str = ""


#: where a model keeps its CompileReport (``model.__dict__``; read by ``qcompiler.report``)
REPORT_ATTR = "_qcompiler_report"


@dataclass
class CompileReport:
    """What was quantized, what fell back and why, per pass statistics and weight bytes."""

    recipe: str = ""
    target: str = "reference"
    layers: dict[str, LayerDecision] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    graphs: int = 0
    graph_runs: int = 0          # times the compiled graphs ran (torch.compile backend only)
    bypassed_calls: int = 0      # calls of the compiled model during which none of them ran: not quantized
    calibration_s: float = 0.0
    tensor_calibration_s: float = 0.0   # the quantization targets' observers (KV-cache scales), their own pass
    warnings: list[str] = field(default_factory=list)
    kernel_choices: list[str] = field(default_factory=list)   # "op -> kernel [contract]: why", one per distinct choice
    runtime_fallbacks: dict[str, int] = field(default_factory=dict)   # "op ran ... : reason" -> calls
    tensors: dict[str, TensorDecision] = field(default_factory=dict)  # quantization targets beyond linears
    rotation: str = ""           # what the recipe's rotation changed in the model (RotationResult.summary)
    end_to_end: str = ""         # what the end-to-end scale tuning did (EndToEndSummary.text)

    def note_runtime_fallback(self, what: str) -> None:
        """Count a call in which a lowered kernel refused its arguments and another kernel ran."""
        if what not in self.runtime_fallbacks:
            self.warnings.append(what)
        self.runtime_fallbacks[what] = self.runtime_fallbacks.get(what, 0) + 1

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers.values() if d.quantize]

    @property
    def fallbacks(self) -> list[LayerDecision]:
        return [d for d in self.layers.values() if not d.quantize]

    def weight_bytes(self) -> tuple[int, int]:
        """Bytes of linear weights before and after (fallback layers count at full size)."""
        before = sum(d.weight_bytes_fp for d in self.layers.values())
        after = sum(d.weight_bytes_q if d.quantize else d.weight_bytes_fp for d in self.layers.values())
        return before, after

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "target": self.target, "graphs": self.graphs,
                "graph_runs": self.graph_runs, "bypassed_calls": self.bypassed_calls,
                "calibration_s": self.calibration_s, "tensor_calibration_s": self.tensor_calibration_s,
                "rotation": self.rotation, "end_to_end": self.end_to_end, "warnings": list(self.warnings),
                "passes": list(self.passes), "kernel_choices": list(self.kernel_choices),
                "runtime_fallbacks": dict(self.runtime_fallbacks),
                "layers": {k: asdict(v) for k, v in self.layers.items()},
                "tensors": {k: asdict(v) for k, v in self.tensors.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self, max_rows: int = 400) -> str:
        before, after = self.weight_bytes()
        q, fb = self.quantized, self.fallbacks
        lines = [f"qcompiler report: recipe {self.recipe!r}, target {self.target!r}, {self.graphs} graph(s)",
                 f"  linears: {len(q)} quantized, {len(fb)} kept in high precision",
                 f"  linear weight bytes: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB"
                 + (f" ({before / after:.2f}x smaller)" if after else "")]
        if self.graph_runs or self.bypassed_calls:
            lines.append(f"  graph runs: {self.graph_runs}; calls that ran without the backend "
                         f"(not quantized): {self.bypassed_calls}")
        if self.rotation:
            lines.append(f"  {self.rotation}")
        if self.calibration_s:
            lines.append(f"  calibration: {self.calibration_s:.1f} s")
        if self.end_to_end:
            lines.append(f"  {self.end_to_end}")
        if self.tensor_calibration_s:
            lines.append(f"  calibration of other tensors (KV-cache scales): {self.tensor_calibration_s:.1f} s")
        for w in self.warnings:
            calls = self.runtime_fallbacks.get(w)
            lines.append(f"  warning: {w}" + (f" ({calls} call{'s' * (calls != 1)})" if calls else ""))
        if fb:
            lines.append("  kept in high precision:")
            lines += [f"    {d.fqn:<48} {d.reason}" for d in fb]
        if q:
            lines.append("  quantized:")
            hdr = (f"    {'module':<48} {'weight':<22} {'activation':<22} {'smoothing':<14} {'alpha':>5} "
                   f"{'sqnr dB':>8}  {'kernel [numerics]':<28}")
            lines.append(hdr)
            for d in q[:max_rows]:
                alpha = f"{d.alpha:.2f}" if d.alpha is not None else "-"
                sq = f"{d.sqnr_db:.1f}" if d.sqnr_db is not None else "-"
                kernel = f"{d.kernel} [{d.kernel_contract}]" if d.kernel else "-"
                lines.append(f"    {d.fqn:<48} {d.weight_format:<22} {d.act_format or 'none':<22} "
                             f"{(d.smoothing or '-')[:14]:<14} {alpha:>5} {sq:>8}  {kernel:<28}"
                             + (f"  ({d.note})" if d.note else ""))
        if self.tensors:
            lines.append("  other tensors:")
            for d in self.tensors.values():
                what = (f"{d.format}, {d.bytes_fp / 1e6:.2f} MB -> {d.bytes_q / 1e6:.2f} MB" if d.quantize
                        else f"kept in float: {d.reason}")
                lines.append(f"    {d.fqn:<48} {d.kind:<10} {what}" + (f"  ({d.note})" if d.note else ""))
        if self.kernel_choices:
            lines.append("  kernels (chosen for this machine):")
            lines += [f"    {c}" for c in self.kernel_choices]
        if self.passes:
            lines.append("  passes:")
            for p in self.passes:
                stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items())
                lines.append(f"    {p['name']:<20} {p['wall_s'] * 1e3:8.1f} ms  {stats}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class PassContext:
    """Everything a pass may read or fill, handed to every pass of one compile.

    ``calibration`` is what calibration gave this compile, computed before any pass runs;
    ``analyses`` holds results passes provide to later ones, keyed by ``Analysis`` names
    (``Analysis.ANNOTATE``, ``CALIBRATION``, ``OUTLIERS``, ...); ``layer_plan`` the per-linear decisions,
    ``tensor_plan`` those for the other quantized tensors (``qcompiler.targets``); ``lowering`` what
    the ``lower`` pass needs from the backends, handed in by the API (passes do not import backends).
    """

    recipe: Recipe
    example_inputs: Sequence[Any] = ()
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    analyses: dict[str, Any] = field(default_factory=dict)
    layer_plan: dict[str, LayerDecision] = field(default_factory=dict)
    tensor_plan: dict[str, TensorDecision] = field(default_factory=dict)
    report: CompileReport = field(default_factory=CompileReport)
    calibration: "CalibrationData" = field(default_factory=lambda: CalibrationData())
    lowering: "Lowering | None" = None


@dataclass(frozen=True)
class Lowering:
    """The backends as the ``lower`` pass sees them, wired by the API: ``table(target)`` is the target's op
    table (``qcompiler.backends.get_backend``: op packet -> replacement), ``chooser(target, kernels)`` a
    GEMM kernel chooser under the ``kernels`` policy (``qcompiler.backends.kernel_choice.KernelChooser``)."""

    table: Callable[[str], Mapping]
    chooser: Callable[[str, Any], Any]


def target_declares(ctx: "PassContext", target: str | None, capability: str) -> bool:
    """Whether ``target``'s op table declares ``capability`` (e.g. ``fuses_norm_quantize``: the target has
    that fused kernel); True for ``target=None`` (a pass asked to run whatever the target)."""
    if target is None:
        return True
    return ctx.lowering is not None and bool(getattr(ctx.lowering.table(target), capability, False))


@dataclass(frozen=True)
class CalibrationData:
    """Calibration's results for one compile, computed by the API before the pass manager runs.

    ``stats``: module path -> ``LayerStats`` of the linear's input (all the model's linears), None when
    the recipe reads none or runs without calibration data; ``layerwise``: module path -> the
    layer-by-layer weight-algorithm result (``qcompiler.calibration.layerwise.LayerResult``), empty without it;
    ``tensors``: quantization-target name -> what that target's observer collected
    (``qcompiler.targets.QuantTarget.observe``), for the targets the recipe sets and calibration data was given.
    """

    stats: Mapping[str, LayerStats] | None = None
    layerwise: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, Any] = field(default_factory=dict)


class PassManager:
    """Orders passes by their ``requires``, runs them, lints and recompiles after each.

    The given order is kept where ``requires`` allows; a missing requirement or a cycle is
    an error at construction. A pass may also name passes it must follow when they are present
    (``after``), without requiring them. A failing pass raises ``PassError`` naming it and the passes
    before it; nothing runs after a failure.
    """

    def __init__(self, passes: Sequence[Pass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique, got {names}")
        graph = nx.DiGraph()
        graph.add_nodes_from(range(len(passes)))
        for i, p in enumerate(passes):
            for req in p.requires:
                if req not in names:
                    raise ValueError(f"pass {p.name!r} requires {req!r}, which is not in the pipeline {names}")
                graph.add_edge(names.index(req), i)
            for prior in getattr(p, "after", ()):   # soft order: only when that pass is present
                if prior in names:
                    graph.add_edge(names.index(prior), i)
        try:
            order = list(nx.lexicographical_topological_sort(graph))
        except nx.NetworkXUnfeasible:
            raise ValueError(f"pass requirements form a cycle: {names}") from None
        self.passes = [passes[i] for i in order]

    def check_analyses(self, available: Iterable[str]) -> None:
        """Raise ``ValueError`` where a pass reads an analysis that neither the context (``available``)
        nor an earlier pass writes."""
        have = {str(a) for a in available}
        for p in self.passes:
            missing = [str(a) for a in getattr(p, "reads", ()) if str(a) not in have]
            if missing:
                raise ValueError(f"pass {p.name!r} reads analyses {missing} that neither the context nor an earlier "
                                 f"pass writes (available before it: {sorted(have)})")
            have |= {str(a) for a in getattr(p, "writes", ())}

    def run(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        self.check_analyses(ctx.analyses)
        done: list[str] = []
        for p in self.passes:
            log.debug("pass %s: start", p.name)
            t0 = time.perf_counter()
            try:
                result = p.run(gm, ctx)
                gm = result.gm
                if result.modified:
                    gm.graph.lint()
                    gm.recompile()
                unwritten = [str(a) for a in getattr(p, "writes", ()) if str(a) not in ctx.analyses]
                if unwritten:
                    raise RuntimeError(f"declares it writes analyses {unwritten} but left them out of ctx.analyses")
            except (PassError, RecipeError, CalibrationError, UnsupportedError):
                raise   # user-input errors surface as themselves
            except Exception as e:
                raise PassError(p.name, tuple(done), e) from e
            wall = time.perf_counter() - t0
            ctx.report.passes.append({"name": p.name, "modified": result.modified,
                                      "stats": dict(result.stats), "wall_s": wall})
            log.info("pass %s: %s in %.3f s, %s", p.name, "modified" if result.modified else "unchanged",
                     wall, dict(result.stats))
            done.append(p.name)
        return gm
