"""Public entry points: ``backend`` (for torch.compile), ``quantize`` (eager), ``report``."""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch.fx import GraphModule

from qcompiler import recipes as _recipes
from qcompiler.calibration.statistics import CalibrationCache, calibration_rows, observe_tensors
from qcompiler.algorithms import registry as weight_algorithms
from qcompiler.algorithms.gptq import too_few_rows_error
from qcompiler.calibration.layerwise import LayerwiseCalibration
from qcompiler.errors import CalibrationError, RecipeError, UnsupportedError
from qcompiler.pipeline import (REPORT_ATTR, Analysis, CalibrationData, CompileReport, Lowering, PassContext,
                                PassManager)
from qcompiler.recipes import Recipe
from qcompiler.core.kv_format import KV_PATHS_ATTR, KV_STATS_ATTR
from qcompiler.targets import registered_targets

__all__ = ["QCompilerBackend", "backend", "quantize", "report", "kv_cache"]

log = logging.getLogger(__name__)
_REPORT_ATTR = REPORT_ATTR


_as_recipe = _recipes.resolve     # kept for callers of the old private name


def _backend_table(target: str):
    from qcompiler.backends import get_backend
    return get_backend(target)


def _kernel_chooser(target: str, kernels):
    from qcompiler.backends.kernel_choice import KernelChooser
    return KernelChooser("inductor" if target == "inductor" else "reference", kernels)


#: the backends as the lower pass reads them (passes do not import backends)
_LOWERING = Lowering(table=_backend_table, chooser=_kernel_chooser)


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


# --- Dynamo's code cache -------------------------------------------------------------------------
# Dynamo keeps compiled code per Python code object, one entry per (guards, backend), and stops
# compiling a code object once it holds ``torch._dynamo.config.recompile_limit`` entries
# (torch/_dynamo/cache_size.py ``exceeds_recompile_limit``); after that the function runs eagerly.
# Every QCompilerBackend is a distinct backend (its graphs hold one model's quantized weights, so
# Dynamo must not share them: BACKEND_MATCH in torch/_dynamo/guards.py), and all models of a class
# share their forward's code object, so a sweep of backends over one class fills that limit.
# qcompiler therefore drops the compiled code of a full code object it compiled, when other
# qcompiler backends' entries are among those filling it, at points where no frame of it is being
# compiled or run: when a backend is created and before each call of a model it compiled.
_COMPILED_CODES: weakref.WeakSet = weakref.WeakSet()   # code objects a QCompilerBackend compiled


def _owner(dynamo_backend) -> QCompilerBackend | None:
    """The QCompilerBackend behind a Dynamo callback or cache entry backend, if it is one."""
    from torch._dynamo.eval_frame import innermost_backend
    fn = innermost_backend(dynamo_backend)
    fn = getattr(fn, "compiler_fn", fn)   # torch.compile wraps backends in a _TorchCompileWrapper
    return fn if isinstance(fn, QCompilerBackend) else None


def _cache_entries(code) -> list:
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        return _debug_get_cache_entry_list(code)
    except (ImportError, RuntimeError, TypeError):   # another torch: no room making, no limit diagnosis
        return []


def _on_stack(code) -> bool:
    """Whether a frame of ``code`` (or of Dynamo's rewrite of it, same name and line) is running."""
    key = (code.co_filename, code.co_firstlineno, code.co_name)
    frame = sys._getframe(1)
    while frame is not None:
        c = frame.f_code
        if c is code or (c.co_filename, c.co_firstlineno, c.co_name) == key:
            return True
        frame = frame.f_back
    return False


def _make_room(codes, keep: QCompilerBackend | None = None) -> None:
    """Reset Dynamo's cache of each code object in ``codes`` that has no room for one more compile
    and holds entries of a QCompilerBackend other than ``keep``; models compiled for it recompile
    on their next call (their backend keeps its calibration, so that is cheap)."""
    if torch.compiler.is_compiling():
        return
    limit = torch._dynamo.config.recompile_limit
    for code in list(codes):
        entries = _cache_entries(code)
        if len(entries) < limit or _on_stack(code):
            continue
        owners = {_owner(e.backend) for e in entries} - {None, keep}
        if not owners:
            continue    # full of other backends' entries, or of ``keep``'s own recompiles: Dynamo's call
        from torch._C._dynamo.eval_frame import reset_code
        from torch._dynamo.convert_frame import compile_lock
        log.info("resetting Dynamo's cache for %s (%s:%d): %d entries reached recompile_limit %d, %d of them "
                 "from other qcompiler backends", code.co_name, code.co_filename, code.co_firstlineno,
                 len(entries), limit, sum(_owner(e.backend) in owners for e in entries))
        with compile_lock:
            reset_code(code)


def _bypass_reason(codes) -> str:
    """Why Dynamo most likely ran ``codes`` without the backend, for the warning."""
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    if stance != "default":
        return f"Dynamo ran it eagerly under torch.compiler.set_stance({stance!r})"
    if torch._dynamo.config.disable:
        return "Dynamo ran it eagerly: torch._dynamo.config.disable is set"
    limit = torch._dynamo.config.recompile_limit
    for code in codes:
        n = len(_cache_entries(code))
        if n >= limit:
            return (f"Dynamo hit torch._dynamo.config.recompile_limit ({limit}): {code.co_name} "
                    f"({code.co_filename}:{code.co_firstlineno}) holds {n} compiled entries")
    return "Dynamo ran it eagerly without calling the backend: a recompile limit or a disabled region"


def _compiling_code():
    """The code object of the frame Dynamo is compiling (whose cache entry the graph will be)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        return getattr(getattr(tx, "output", None), "root_tx", tx).f_code
    except Exception:   # not inside a Dynamo trace, or an internal API change
        return None


def _compiled_backend(obj) -> QCompilerBackend | None:
    """The QCompilerBackend of ``torch.compile(module, backend=...)`` or of a module whose forward
    was replaced by ``torch.compile(module.forward, backend=...)``."""
    ctx = getattr(obj, "dynamo_ctx", None)          # OptimizedModule
    if ctx is not None:
        return _owner(getattr(ctx, "callback", None))
    fwd = getattr(obj, "__dict__", {}).get("forward")
    if isinstance(fwd, _CountedEntry):
        return fwd.backend
    code = getattr(fwd, "__code__", None)
    cells = dict(zip(code.co_freevars, fwd.__closure__ or ())) if code is not None else {}
    return _owner(cells["callback"].cell_contents) if "callback" in cells else None   # Dynamo's compile_wrapper


def _entry_code(obj):
    """The code object Dynamo compiles first when the compiled ``obj`` is called."""
    fwd = obj._orig_mod.forward if hasattr(obj, "dynamo_ctx") else obj.__dict__.get("forward")
    fwd = getattr(fwd, "_torchdynamo_orig_callable", fwd)
    return getattr(fwd, "__code__", None)


class _CountedEntry:
    """A compiled model's entry point (``OptimizedModule.forward`` or a compiled ``module.forward``),
    wrapped at the backend's first compile.

    It runs in plain Python before Dynamo sees the call, so it is a safe point to make room in
    Dynamo's cache (``_make_room``); after the call it compares the backend's graph-run counter:
    a call during which none of the backend's graphs ran was not quantized, which it records and
    warns about. Cost per call: a cache-size lookup per code object and two integer reads.
    """

    def __init__(self, inner, backend: QCompilerBackend, name: str):
        functools.update_wrapper(self, inner)   # keeps Dynamo's _torchdynamo_orig_callable & co.
        self.inner, self.backend, self.name = inner, backend, name

    def __call__(self, *args, **kwargs):
        qb = self.backend
        _make_room(qb._codes, keep=qb)
        runs = qb.report.graph_runs
        out = self.inner(*args, **kwargs)
        if qb.report.graph_runs == runs:
            qb._ran_without_backend(self.name, _bypass_reason(qb._codes), calls=1)
        return out


class QCompilerBackend:
    """A torch.compile backend that quantizes each captured graph with one recipe.

    Calibration runs once, on the first graph that needs it, over the float model; its
    statistics are keyed by module path, so later graphs (new shapes, graph breaks) reuse them.

    Dynamo's cache: each backend is its own entry in Dynamo's per-function cache, which stops
    compiling at ``torch._dynamo.config.recompile_limit`` entries (the function then runs in
    float). Creating a backend, and each call of a model it compiled, first resets the cache of
    every function a qcompiler backend compiled that is full and holds another qcompiler
    backend's entries (``_make_room``); models on it recompile at their next call, quantized.
    Detection: the returned graphs count their runs (``report.graph_runs``); at its first compile
    the backend wraps the compiled model's entry point (``OptimizedModule.forward`` or a compiled
    ``module.forward``) in a ``_CountedEntry``, which warns and counts ``report.bypassed_calls``
    when a call ran none of them.
    """

    def __init__(self, recipe: Recipe | str, calibration: Iterable | None = None, target: str = "reference",
                 passes: Sequence = (), progress: bool = True, kernels: str | Mapping[str, str] = "auto",
                 quantized: bool = False):
        from qcompiler.backends import get_backend
        from qcompiler.backends.kernel_choice import check_policy
        self.recipe = _recipes.resolve(recipe)
        get_backend(target)
        check_policy(kernels)
        self.target, self.kernels = target, kernels
        self.extra_passes = tuple(passes)
        self.quantized = bool(quantized)
        if self.recipe.requires_calibration and calibration is None and not self.quantized:
            raise CalibrationError(f"recipe {self.recipe.name!r} needs calibration data for "
                                   f"{' and '.join(self.recipe.calibration_required_by)}: pass calibration=batches "
                                   "(an iterable of token-id tensors or dicts of model inputs), or quantized=True for "
                                   "a model whose layers already hold their quantized weights and scales "
                                   "(qcompiler.quantize, load_quantized, load_compressed_tensors)")
        if isinstance(calibration, (CalibrationCache, LayerwiseCalibration)) or calibration is None:
            self.calibration = calibration
        elif self.recipe.layerwise:
            self.calibration = LayerwiseCalibration(calibration, self.recipe, progress=progress)
        else:
            self.calibration = CalibrationCache(calibration, self.recipe.samples_per_layer, progress=progress,
                                                hessian=weight_algorithms.needs_hessian(self.recipe))
        if self.recipe.gptq is not None and self.calibration is not None:
            rows = calibration_rows(self.calibration.batches)   # refuse before calibrating, not per layer
            if rows is not None and rows < self.recipe.gptq.min_samples:
                raise too_few_rows_error(self.recipe, rows, f"recipe {self.recipe.name!r}")
        self.report = CompileReport(recipe=self.recipe.name, target=target)
        self.root: torch.nn.Module | None = None
        self._param_names: dict[int, list[str]] = {}
        self.last_context: PassContext | None = None
        self.graphs: list[GraphModule] = []   # every graph module this backend returned, in order
        self._memo: dict = {}                  # per-layer search results, reused by later graphs
        self._tensor_stats: dict = {}          # quantization-target name -> its observer's result
        self._codes: weakref.WeakSet = weakref.WeakSet()   # code objects Dynamo compiled with this backend
        self._entry_watched = False
        self._experts_warned = False
        _make_room(_COMPILED_CODES)            # room in Dynamo's cache for this backend's first compile

    def _warn_fused_experts(self) -> None:
        """Say (once) that weights of 3 or more dimensions stay in float: fused mixture-of-experts weights
        (transformers 5 keeps a model's experts as one [experts, N, K] parameter) are not quantized in the
        compiled graphs (``qcompiler.quantize`` quantizes them for weight-only recipes)."""
        if self._experts_warned or self.root is None or "linear" in self.recipe.fallback.keep_op_kinds:
            return
        self._experts_warned = True
        fused = [(n, tuple(p.shape)) for n, p in self.root.named_parameters() if p.dim() >= 3 and p.is_floating_point()]
        if fused:
            n_el = sum(math.prod(s) for _, s in fused)
            msg = (f"{len(fused)} weights of 3 or more dimensions ({n_el / 1e6:.2f} M values, e.g. {fused[0][0]} "
                   f"{list(fused[0][1])}: fused mixture-of-experts weights) stay in float: the compiled graphs quantize "
                   "2-D linear weights only (qcompiler.quantize(model, ...) quantizes fused experts for "
                   "weight-only recipes)")
            self.report.warnings.append(msg)
            warnings.warn(msg, stacklevel=3)

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
        if self.calibration is None and (self.quantized or not self.recipe.requires_calibration):
            # only optional readers (GPTQ with gptq.optional, sensitivity fallback): skipped; or a quantized
            # model, whose float linears the calibrate pass refuses when the recipe would quantize them
            return None
        if self.calibration is None:
            raise CalibrationError(f"recipe {self.recipe.name!r} needs calibration data: pass calibration=batches")
        if self.root is None:
            raise CalibrationError("calibration needs the model: compile a module (torch.compile(model, ...)) "
                                   "or use qcompiler.quantize(model, ...)")
        stats = self.calibration.collect(self.root)
        self.report.calibration_s = self.calibration.seconds
        tuned = getattr(self.calibration, "end_to_end", None)
        if tuned is not None:
            self.report.end_to_end = tuned.text()
        return stats

    def _target_stats(self) -> dict:
        """What the observers of the recipe's quantization targets collect (``QuantTarget.observe``),
        once per backend; empty without calibration data or a model to run."""
        if self.calibration is None or self.root is None:
            return {}
        todo = {}
        for target in registered_targets():
            spec = target.spec(self.recipe) if target.observe is not None else None
            if spec is not None and target.name not in self._tensor_stats:
                todo[target.name] = target.observe(self.root, spec)
        if todo:
            t0 = time.perf_counter()
            self._tensor_stats.update(observe_tensors(self.root, self.calibration.batches, todo,
                                                      getattr(self.calibration, "progress", True)))
            self.report.tensor_calibration_s += time.perf_counter() - t0
            if "kv_cache" in todo:       # read back by qcompiler.kv_cache(model)
                self.root.__dict__[KV_STATS_ATTR] = (self.recipe.kv_cache,
                                                      list(self._tensor_stats["kv_cache"].values()))
                self.root.__dict__[KV_PATHS_ATTR] = list(self._tensor_stats["kv_cache"])
        return dict(self._tensor_stats)

    def passes(self) -> list:
        from qcompiler.passes import default_passes
        return default_passes(self.target, self.kernels) + list(self.extra_passes)

    def run_passes(self, gm: GraphModule, example_inputs, passes: list) -> GraphModule:
        from qcompiler.rotation import check_rotated, rotation_of
        if self.root is None:
            self._adopt_root(_locate_root())
        check_rotated(self.root, self.recipe)
        if self.recipe.rotation is not None and not self.report.rotation:
            self.report.rotation = rotation_of(self.root).summary()
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        stats = self._stats() if self.recipe.needs_calibration else None   # before any pass runs
        ctx = PassContext(self.recipe, list(example_inputs), device, lowering=_LOWERING,
                          analyses={Analysis.PARAM_NAMES: self._param_names, Analysis.MEMO: self._memo},
                          report=self.report,
                          calibration=CalibrationData(stats, getattr(self.calibration, "results", {}),
                                                      self._target_stats()))
        gm = PassManager(passes).run(gm, ctx)
        self.report.layers.update(ctx.layer_plan)
        self.report.tensors.update(ctx.tensor_plan)
        self.report.graphs += 1
        log.info("graph %d: %d linears, %d quantized", self.report.graphs, len(ctx.layer_plan),
                 sum(d.quantize for d in ctx.layer_plan.values()))
        self._warn_fused_experts()
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
        code = _compiling_code()
        gm = self.run_passes(gm, example_inputs, self.passes())
        if code is not None:
            self._codes.add(code)
            _COMPILED_CODES.add(code)
        self._watch_entry()
        finish = getattr(get_backend(self.target), "compile_graph", None)
        compiled = gm if finish is None else finish(gm, example_inputs)
        report = self.report
        boxed = getattr(compiled, "_boxed_call", False)
        # The graph holds this model's quantized weights as constants; Dynamo's guards do not check
        # which parameters it is called with, so a backend shared between models (or a model whose
        # weights were replaced) would silently mix them: compare the parameters at each call.
        params = [(i, weakref.ref(t)) for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
        names = self._param_names

        def run(*args):
            inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args   # boxed or not
            for i, ref in params:
                if inputs[i] is not ref():
                    name = names.get(id(ref()), ["?"])[0] if ref() is not None else "?"
                    raise UnsupportedError(
                        f"{self!r} quantized the weights of the model it compiled; it was called with a different "
                        f"parameter in place of {name!r} (a backend shared between models, or weights replaced "
                        "after compiling): create one qcompiler.backend per model, and compile again "
                        "(torch._dynamo.reset()) after replacing weights")
            report.graph_runs += 1
            return compiled(*args)

        if boxed:
            run._boxed_call = True
        return run

    def _watch_entry(self) -> None:
        """At the first compile, wrap the compiled model's entry point in a ``_CountedEntry``."""
        if self._entry_watched:
            return
        self._entry_watched = True
        from torch._dynamo.eval_frame import OptimizedModule
        holder, frame = None, sys._getframe(1)
        while frame is not None and holder is None:
            obj = frame.f_locals.get("self")      # the OptimizedModule being called, further up the stack
            if isinstance(obj, OptimizedModule) and _owner(obj.dynamo_ctx.callback) is self:
                holder, name = obj, type(obj._orig_mod).__name__
            frame = frame.f_back
        if holder is None and self.root is not None and _compiled_backend(self.root) is self:
            holder, name = self.root, type(self.root).__name__     # module.forward = torch.compile(module.forward)
        if holder is not None and not isinstance(holder.forward, _CountedEntry):
            holder.forward = _CountedEntry(holder.forward, self, name)

    def _ran_without_backend(self, name: str, reason: str, calls: int = 0) -> None:
        msg = f"{name} ran without qcompiler's backend ({reason}); outputs are not quantized"
        self.report.bypassed_calls += calls
        if msg not in self.report.warnings:
            self.report.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)

    def __repr__(self) -> str:    # shows in Dynamo's recompile messages
        return f"qcompiler.backend({self.recipe.name!r}, target={self.target!r})"


def backend(recipe: Recipe | str, calibration: Iterable | None = None, target: str = "reference",
            passes: Sequence = (), progress: bool = True, kernels: str | Mapping[str, str] = "auto",
            quantized: bool = False) -> QCompilerBackend:
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
        kernels: how each quantized GEMM's kernel is chosen on this machine (``qcompiler.backends.
            kernel_choice``): "auto" (the fastest whose numerics are exact, float32 sums, or
            int16-pair saturation on CPUs without VNNI, measured at build), "exact" (nothing
            weaker than the op's reference kernel), "reference" (the reference kernels), or a
            kernel name / ``{op: kernel name}``. The report names each layer's kernel and why.
        quantized: the model's layers already hold their quantized weights and scales (a model from
            ``qcompiler.quantize``, ``load_quantized`` or ``load_compressed_tensors``, compiled with the
            recipe they return): no calibration is asked for; the backend lowers their ops to ``target``,
            and a float linear the recipe would still quantize with calibration data raises
            ``CalibrationError`` naming it.

    Creating a backend may reset Dynamo's compiled code of functions other qcompiler backends
    compiled, when that code has reached ``torch._dynamo.config.recompile_limit`` (see
    ``QCompilerBackend``): their models recompile, still quantized, at their next call. A model
    call that runs without this backend warns and counts in ``qcompiler.report(model)``.
    """
    return QCompilerBackend(recipe, calibration, target, passes, progress, kernels, quantized)


def quantize(model: torch.nn.Module, recipe: Recipe | str, calibration: Iterable | None = None,
             example_input: torch.Tensor | dict | None = None, progress: bool = True,
             kernels: str | Mapping[str, str] = "auto") -> torch.nn.Module:
    """Quantize ``model`` in place for eager use (no torch.compile needed to run it).

    The graph is captured once to plan (same passes and numerics as ``backend``); then each
    quantized linear module is replaced by a ``QuantizedLinear`` that calls the same fused ops,
    each on the kernel chosen for this machine under ``kernels`` (as in ``backend``), chosen at its
    first call per row-count bucket. SmoothQuant / AWQ scales the plan folds into norms are written
    into those norm modules' parameters, as the compiled graph and the exported checkpoints hold
    them. Returns ``model``.
    """
    _quantize_planned(model, recipe, calibration, example_input, progress, kernels)
    return model


def _quantize_planned(model: torch.nn.Module, recipe: Recipe | str, calibration: Iterable | None = None,
                      example_input: torch.Tensor | dict | None = None, progress: bool = True,
                      kernels: str | Mapping[str, str] = "auto") -> list[PassContext]:
    """``quantize``, returning the planning contexts (the float weights each linear was quantized from,
    after smoothing: ``prepare_qat`` starts its latent weights there)."""
    from qcompiler.runtime.eager import apply_plan, quantize_unreached
    from qcompiler.runtime.fused_experts import quantize_fused_experts
    from qcompiler.rotation import apply_recipe_rotation
    qb = QCompilerBackend(recipe, calibration, "reference", progress=progress, kernels=kernels)
    qb._experts_warned = True      # quantize_fused_experts reports the fused experts itself
    if qb.calibration is not None:
        qb.calibration.check_vocabulary(model)
    if isinstance(qb.calibration, CalibrationCache):
        qb.calibration.experts_recipe = qb.recipe    # its pass calibrates the fused experts too (Hessian algorithms)
    rotated = apply_recipe_rotation(model, qb.recipe)
    qb._adopt_root(model)
    if rotated is not None:
        qb.report.rotation = rotated.summary()
        log.info("quantize: %s", qb.report.rotation)
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
    swapped = apply_plan(model, contexts, kernels, qb.report)
    swapped += quantize_unreached(model, qb.recipe, qb.report, kwargs, qb.calibration, kernels)
    log.info("quantize: %d linear modules replaced", swapped)
    experts = quantize_fused_experts(model, qb.recipe, qb.report, getattr(qb.calibration, "expert_results", None))
    if experts:
        log.info("quantize: %d fused expert weights quantized", experts)
    _fold_smoothing_into_norms(model, contexts, qb.report)
    return contexts


def _fold_smoothing_into_norms(model: torch.nn.Module, contexts: list[PassContext], report: CompileReport) -> None:
    """Put the SmoothQuant / AWQ scales the plan folds into norms into those norm modules, as the
    compiled graph has them (the eager model then computes what its checkpoints hold); a norm module
    the graphs call at more than one place keeps its scale at its linears' inputs."""
    from collections import Counter
    from qcompiler.runtime.norm_fold import fold_norm_smoothing
    calls = Counter(fqn for ctx in contexts if Analysis.ANNOTATE in ctx.analyses
                    for fqn in ctx.analyses[Analysis.ANNOTATE].norms.values())
    keep = {f: f"the graph calls this norm module at {n} places" for f, n in calls.items() if n > 1}
    folds = fold_norm_smoothing(model, report, keep)
    for norm, why in folds.explicit.items():
        for d in report.layers.values():
            if d.smoothing == f"norm:{norm}" and d.quantize:
                d.smoothing = "explicit"
                note = f"input scale applied explicitly: {why}"
                d.note = f"{d.note}; {note}" if d.note else note
    if folds.folded:
        log.info("quantize: SmoothQuant / AWQ scales folded into %d norm(s)", len(folds.folded))


def _head_dim(model) -> int | None:
    """The attention heads' size from a Hugging Face config (``head_dim``, else hidden / heads), or None."""
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None):
        head_dim = getattr(config, "hidden_size", 0) // config.num_attention_heads
    return head_dim if isinstance(head_dim, int) and head_dim > 0 else None


def kv_cache(model: torch.nn.Module, recipe: Recipe | str | None = None, calibration: Iterable | None = None,
             progress: bool = True):
    """A ``QuantizedKVCache`` for ``model`` under its recipe's ``kv_cache`` spec: pass it to
    ``model.generate(..., cache=cache)`` (or a forward) and the keys and values are
    stored quantized (``cache.nbytes()`` measures them).

    ``model``: a model compiled with ``torch.compile(model, backend=qcompiler.backend(recipe, ...))``
    (its backend's calibration gives the static scales; the cache may be built before the first
    call), a model quantized with ``qcompiler.quantize``, a ``QCompilerBackend``, or a float model
    with ``recipe`` (and ``calibration`` when the spec has static scales). Static scales come from
    the float model's key / value ranges over the calibration batches, per attention in the order
    the model runs them (the cache's layer order).
    """
    import qcompiler.passes  # noqa: F401  (registers the KV-cache target and its observer)
    from qcompiler.runtime.kv_cache import QuantizedKVCache
    qb = model if isinstance(model, QCompilerBackend) else _compiled_backend(model)
    if recipe is not None:
        qb = QCompilerBackend(recipe, calibration, progress=progress)
        qb._adopt_root(getattr(model, "_orig_mod", model))
    if qb is None:
        saved = getattr(getattr(model, "_orig_mod", model), "__dict__", {}).get(KV_STATS_ATTR)
        if saved is None:
            raise ValueError("qcompiler.kv_cache: this model carries no KV-cache calibration: pass the model compiled "
                             "with a qcompiler backend, one quantized with qcompiler.quantize under a recipe with "
                             "kv_cache, or recipe= (and calibration=)")
        spec, stats = saved
        return QuantizedKVCache(spec, stats if spec.static else None, _head_dim(model))
    spec = qb.recipe.kv_cache
    if spec is None:
        raise RecipeError(f"qcompiler.kv_cache: recipe {qb.recipe.name!r} has no kv_cache (e.g. 'kv-int8', or "
                          "'BASE+kv-int8')")
    if not spec.static:
        return QuantizedKVCache(spec, head_dim=_head_dim(qb.root if qb.root is not None else model))
    if qb.root is None:
        root = getattr(model, "_orig_mod", model)
        if not isinstance(root, torch.nn.Module):
            raise ValueError("qcompiler.kv_cache: this backend has not seen its model yet: pass the compiled model")
        qb._adopt_root(root)
    stats = qb._target_stats().get("kv_cache")
    if stats is None:
        raise CalibrationError(f"recipe {qb.recipe.name!r} has static KV-cache scales: its backend needs "
                               "calibration data (calibration=batches)")
    return QuantizedKVCache(spec, list(stats.values()))


def report(obj) -> CompileReport:
    """The ``CompileReport`` of a compiled or quantized model (or of a ``QCompilerBackend``).

    For ``torch.compile(model, backend=qcompiler.backend(...))`` (or a compiled ``model.forward``)
    it is the report of that backend. ``report.graph_runs`` counts runs of its quantized graphs and
    ``report.bypassed_calls`` the calls during which none ran (Dynamo ran the model eagerly: e.g.
    at ``torch._dynamo.config.recompile_limit``); those outputs are not quantized, and
    ``report.warnings`` says why. A backend Dynamo never called is reported the same way when
    Dynamo's cache for the model's forward is full; otherwise this raises ``ValueError``.
    """
    if isinstance(obj, QCompilerBackend):
        return obj.report
    qb = _compiled_backend(obj)
    if qb is not None:
        if qb.report.graphs == 0:
            name = type(getattr(obj, "_orig_mod", obj)).__name__
            code = _entry_code(obj)
            if code is None or len(_cache_entries(code)) < torch._dynamo.config.recompile_limit:
                raise ValueError(f"qcompiler's backend has not compiled a graph for this {name}: run it once. If it "
                                 f"has run, its outputs are not quantized ({_bypass_reason(())})")
            qb._ran_without_backend(name, _bypass_reason((code,)))
        return qb.report
    mod = getattr(obj, "_orig_mod", obj)
    rep = getattr(mod, "__dict__", {}).get(_REPORT_ATTR)
    if rep is None:
        raise ValueError("no qcompiler report on this object: quantize it with qcompiler.quantize, or compile it "
                         "with backend=qcompiler.backend(...) and run it once")
    return rep
