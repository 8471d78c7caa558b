"""Public entry points: ``backend`` (for torch.compile), ``quantize`` (eager), ``report``."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch.fx import GraphModule

from . import recipes as _recipes
from .calibration import CalibrationCache
from .layerwise import LayerwiseCalibration
from .errors import CalibrationError, RecipeError
from .pipeline import CompileReport, PassContext, PassManager
from .recipes import Recipe

__all__ = ["QCompilerBackend", "backend", "quantize", "report"]

log = logging.getLogger(__name__)
_REPORT_ATTR = "_qcompiler_report"


def _as_recipe(recipe: Recipe | str) -> Recipe:
    if isinstance(recipe, str):
        return _recipes.get(recipe)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be a qcompiler.Recipe or a preset name, got {type(recipe).__name__}")
    return recipe


def _frame_self() -> torch.nn.Module | None:
    """The module whose forward Dynamo is compiling (the frame's ``self``), if any."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
    except Exception:   # not inside a Dynamo trace, or an internal API change
        return None
    root = getattr(getattr(tx, "output", None), "root_tx", None) or tx
    obj = getattr(root, "f_locals", {}).get("self")
    return obj if isinstance(obj, torch.nn.Module) else None


def _locate_root() -> torch.nn.Module | None:
    """The outermost module around the frame being compiled.

    Dynamo may compile a submodule's frame (after a graph break, the rest of a forward runs
    eagerly and inner frames are compiled on their own); the model is then a ``self`` further
    up the Python stack, one that contains the compiled frame's module.
    """
    root = _frame_self()
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        obj = getattr(obj, "_orig_mod", obj)   # torch.compile's OptimizedModule wrapper
        if isinstance(obj, torch.nn.Module) and obj is not root and (
                root is None or any(m is root for m in obj.modules())):
            root = obj
        frame = frame.f_back
    return root


class QCompilerBackend:
    """A torch.compile backend that quantizes each captured graph with one recipe.

    Calibration runs once, on the first graph that needs it, over the float model; its
    statistics are keyed by module path, so later graphs (new shapes, graph breaks) reuse them.
    """

    def __init__(self, recipe: Recipe | str, calibration: Iterable | None = None, target: str = "reference",
                 passes: Sequence = (), progress: bool = True):
        from qcompiler.backends import get_backend
        self.recipe = _as_recipe(recipe)
        get_backend(target)
        self.target = target
        self.extra_passes = tuple(passes)
        if self.recipe.requires_calibration and calibration is None:
            raise CalibrationError(f"recipe {self.recipe.name!r} needs calibration data: pass calibration=batches "
                                   "(an iterable of token-id tensors or dicts of model inputs)")
        if isinstance(calibration, (CalibrationCache, LayerwiseCalibration)) or calibration is None:
            self.calibration = calibration
        elif self.recipe.layerwise:
            self.calibration = LayerwiseCalibration(calibration, self.recipe, progress=progress)
        else:
            self.calibration = CalibrationCache(calibration, self.recipe.samples_per_layer, progress=progress,
                                                hessian=self.recipe.gptq is not None)
        self.report = CompileReport(recipe=self.recipe.name, target=target)
        self.root: torch.nn.Module | None = None
        self._param_names: dict[int, list[str]] = {}
        self.last_context: PassContext | None = None
        self.graphs: list[GraphModule] = []   # every graph module this backend returned, in order
        self._memo: dict = {}                  # per-layer search results, reused by later graphs

    def _adopt_root(self, root: torch.nn.Module | None) -> None:
        if root is None or self.root is not None:
            return
        self.root = root
        for name, p in root.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(id(p), []).append(name)
        for name, b in root.named_buffers(remove_duplicate=False):
            self._param_names.setdefault(id(b), []).append(name)
        root.__dict__[_REPORT_ATTR] = self.report   # read back by qcompiler.report(model)

    def _stats(self):
        if self.calibration is None and not self.recipe.requires_calibration:
            return None     # only the sensitivity fallback reads statistics: it is skipped
        if self.calibration is None:
            raise CalibrationError(f"recipe {self.recipe.name!r} needs calibration data: pass calibration=batches")
        if self.root is None:
            raise CalibrationError("calibration needs the model: compile a module (torch.compile(model, ...)) "
                                   "or use qcompiler.quantize(model, ...)")
        stats = self.calibration.collect(self.root)
        self.report.calibration_s = self.calibration.seconds
        return stats

    def passes(self) -> list:
        from qcompiler.passes import default_passes
        return default_passes(self.target) + list(self.extra_passes)

    def run_passes(self, gm: GraphModule, example_inputs, passes: list) -> GraphModule:
        if self.root is None:
            self._adopt_root(_locate_root())
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        ctx = PassContext(self.recipe, list(example_inputs), device,
                          analyses={"param_names": self._param_names, "calibration_source": self._stats,
                                    "memo": self._memo,
                                    "layerwise_results": getattr(self.calibration, "results", {})},
                          report=self.report)
        gm = PassManager(passes).run(gm, ctx)
        self.report.layers.update(ctx.layer_plan)
        self.report.graphs += 1
        log.info("graph %d: %d linears, %d quantized", self.report.graphs, len(ctx.layer_plan),
                 sum(d.quantize for d in ctx.layer_plan.values()))
        if not self.report.layers:
            # nothing quantizable so far (a later graph of a graph break may still bring linears)
            msg = f"graph {self.report.graphs} has nothing quantizable (no linear with a parameter weight); it runs in float"
            self.report.warnings.append(msg)
            warnings.warn(msg, stacklevel=2)
        self.last_context = ctx
        self.graphs.append(gm)
        return gm

    def __call__(self, gm: GraphModule, example_inputs):
        from qcompiler.backends import get_backend
        gm = self.run_passes(gm, example_inputs, self.passes())
        finish = getattr(get_backend(self.target), "compile_graph", None)
        return gm if finish is None else finish(gm, example_inputs)


def backend(recipe: Recipe | str, calibration: Iterable | None = None, target: str = "reference",
            passes: Sequence = (), progress: bool = True) -> QCompilerBackend:
    """A ``torch.compile`` backend that quantizes with ``recipe`` (a ``Recipe`` or preset name).

    Args:
        recipe: the recipe or a preset name from ``qcompiler.recipes.names()``.
        calibration: iterable of model inputs (token-id tensors or dicts of kwargs); needed by
            static activations, SmoothQuant, GPTQ and AWQ (``recipe.requires_calibration``); read
            by the sensitivity fallback, which is skipped with a warning without it.
        target: the backend that runs the fused ops: "reference" (torch ops, eager), "inductor"
            (the same ops compiled by TorchInductor, with quantize / epilogue fused) or "triton".
        passes: extra passes appended to the pipeline (ordered by their ``requires``).
        progress: show a progress bar while calibrating.
    """
    return QCompilerBackend(recipe, calibration, target, passes, progress)


def quantize(model: torch.nn.Module, recipe: Recipe | str, calibration: Iterable | None = None,
             example_input: torch.Tensor | dict | None = None, progress: bool = True) -> torch.nn.Module:
    """Quantize ``model`` in place for eager use (no torch.compile needed to run it).

    The graph is captured once to plan (same passes and numerics as ``backend``); then each
    quantized linear module is replaced by a ``QuantizedLinear`` that calls the same fused ops.
    Returns ``model``.
    """
    from .eager import apply_plan
    qb = QCompilerBackend(recipe, calibration, "reference", progress=progress)
    if qb.calibration is not None:
        qb.calibration.check_vocabulary(model)
    qb._adopt_root(model)
    if example_input is None:
        first = qb.calibration.batches[0] if qb.calibration is not None else None
        example_input = first if first is not None else torch.zeros(1, 8, dtype=torch.long)
    kwargs = example_input if isinstance(example_input, dict) else {
        "input_ids": example_input if example_input.dim() == 2 else example_input.unsqueeze(0)}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    contexts: list[PassContext] = []

    def plan_backend(gm, example_inputs):
        from qcompiler.passes import planning_passes, InsertQDQ
        qb.run_passes(gm, example_inputs, planning_passes() + [InsertQDQ()])
        contexts.append(qb.last_context)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=plan_backend, dynamic=False)
    with torch.inference_mode():
        compiled(**kwargs)
    torch._dynamo.reset()
    swapped = apply_plan(model, contexts)
    log.info("quantize: %d linear modules replaced", swapped)
    return model


def report(obj) -> CompileReport:
    """The ``CompileReport`` of a compiled or quantized model (or of a ``QCompilerBackend``)."""
    if isinstance(obj, QCompilerBackend):
        return obj.report
    mod = getattr(obj, "_orig_mod", obj)
    rep = getattr(mod, "__dict__", {}).get(_REPORT_ATTR)
    if rep is None:
        raise ValueError("no qcompiler report on this object: quantize it with qcompiler.quantize, or compile it "
                         "with backend=qcompiler.backend(...) and run it once")
    return rep
