"""Eager execution of a quantization plan: ``QuantizedLinear`` modules that call the same
fused ops as the compiled graph, swapped in for the planned linear modules. Each module runs
the GEMM kernel chosen for this machine (``qcompiler.backends.kernel_choice``), once per row-count
bucket and device, and records the choice in the report's layer entry when it has one."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from qcompiler.core.formats import GemmFormat, gemm_format
from qcompiler.core.layer_quant import QuantizedWeight, gather_rows
from qcompiler.core.linear_probe import find_routers, linear_orientation
from qcompiler.pipeline import Analysis, CompileReport, PassContext

__all__ = ["QuantizedLinear", "QuantizedEmbedding", "apply_plan"]

_ops = torch.ops.qcompiler


class QuantizedLinear(torch.nn.Module):
    """``y = op(x * inv_smooth) `` for one of qcompiler's fused GEMMs.

    Buffers: ``w_q`` [N, K] (INT4: packed [N, ceil(K/2)] bytes), ``w_scale``, optional ``w_zero``, ``bias`` [N], ``act_scale``
    (static activations) and ``inv_smooth`` [K] (SmoothQuant scale not folded upstream).
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, act_dtype: str | None,
                 act_dynamic: bool, act_scale: float | None, inv_smooth: torch.Tensor | None, fqn: str = "",
                 kernels: str | Mapping[str, str] = "auto", report: CompileReport | None = None):
        super().__init__()
        self.kernels, self._report = kernels, report
        self._chosen: dict = {}   # (row bucket, device) -> (Choice, prepared weight or None)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.fqn, self.weight_format = fqn, qweight.describe()
        self.weight_dtype, self.group_size = qweight.dtype, qweight.group_size or 0
        self.act_dtype, self.act_dynamic = act_dtype, act_dynamic
        self.register_buffer("w_q", qweight.storage())   # INT4: packed two per byte
        self.register_buffer("w_scale", qweight.scale)
        self.register_buffer("w_zero", qweight.zero)
        self.register_buffer("bias", bias)
        # on the weight's device, as every constant of the layer (a CPU scale would keep the GEMM off GPU kernels)
        self.register_buffer("act_scale", None if act_scale is None else
                             torch.tensor(act_scale, dtype=torch.float32, device=qweight.scale.device))
        self.register_buffer("inv_smooth", inv_smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        fmt = gemm_format(self.weight_dtype, self.act_dtype)
        if fmt.activation is None:          # float activations; the bias in their dtype
            a, a_s, bias = x, None, None if self.bias is None else self.bias.to(out_dtype)
        elif self.act_dynamic:
            (a, a_s), bias = _ops.quantize_per_token(x, self.act_dtype), self.bias
        else:
            a, a_s, bias = _ops.quantize(x, self.act_scale, None, self.act_dtype), self.act_scale, self.bias
        if fmt.activation is not None and self.w_zero is not None:
            # no fused GEMM takes weight zero points with quantized activations: Q/DQ and a float linear,
            # as the compiled graph leaves such a linear unfused
            w = _ops.dequantize(self.w_q, self.w_scale, self.w_zero, out_dtype)
            return F.linear(_ops.dequantize(a, a_s, None, out_dtype), w, None if bias is None else bias.to(out_dtype))
        return self._gemm(fmt, fmt.arguments(a, a_s, self.w_q, self.w_scale, self.w_zero, bias, self.group_size,
                                             self.in_features, out_dtype))

    def __getstate__(self):
        # the chosen kernels hold prepacked weights (oneDNN's opaque tensors, which neither copy nor
        # pickle): a copy chooses again at its first call
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_chosen": {}}

    def _gemm(self, fmt: GemmFormat, args: tuple) -> torch.Tensor:
        """Run ``fmt``'s op on the kernel chosen for this row count and device (the op itself while traced)."""
        op = fmt.op
        if torch.compiler.is_compiling():
            return fmt.packet(*args)
        from qcompiler.backends.kernel_choice import KernelChooser, _bucket
        x = args[0]
        key = (_bucket(x.numel() // max(x.shape[-1], 1)), x.device)
        if key not in self._chosen:
            choice = KernelChooser("reference", self.kernels).choose(op, list(args), args[fmt.weight_arg].device)
            kernel = choice.kernel
            prepared = kernel.prepare(args[kernel.weight_arg], list(args)) if kernel.prepare else None
            self._chosen[key] = (choice, prepared)
            decision = self._report.layers.get(self.fqn) if self._report is not None else None
            if decision is not None:
                decision.kernel, decision.kernel_contract, decision.kernel_note = \
                    kernel.name, choice.contract.value, choice.reason
                line = f"{op} -> {kernel.name} [{choice.contract.value}]: {choice.reason}"
                if line not in self._report.kernel_choices:
                    self._report.kernel_choices.append(line)
        choice, prepared = self._chosen[key]
        kernel = choice.kernel
        if prepared is not None:
            args = args[:kernel.weight_arg] + (prepared,) + args[kernel.weight_arg + 1:]
        return kernel.run(*args)

    def extra_repr(self) -> str:
        act = "none" if self.act_dtype is None else f"{self.act_dtype} {'dynamic' if self.act_dynamic else 'static'}"
        return f"{self.in_features} -> {self.out_features}, weight {self.weight_format}, activations {act}"


class QuantizedEmbedding(torch.nn.Module):
    """An embedding whose table is stored quantized (``Recipe.embedding``); a call dequantizes only the
    rows it gathers (``layer_quant.gather_rows``), the same values as the compiled graph's."""

    def __init__(self, qw: QuantizedWeight, out_dtype: torch.dtype, fqn: str = ""):
        super().__init__()
        self.fqn, self.weight_dtype, self.group_size = fqn, qw.dtype, qw.group_size or 0
        self.num_embeddings, self.embedding_dim = qw.shape
        self.out_dtype = out_dtype
        self.register_buffer("w_q", qw.storage())
        self.register_buffer("w_scale", qw.scale)
        self.register_buffer("w_zero", qw.zero)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_storage(self.w_q, self.w_scale, self.w_zero, self.weight_dtype,
                                            self.group_size or None, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return gather_rows(ids, self.w_q, self.w_scale, self.w_zero, self.weight_dtype, self.group_size,
                           self.embedding_dim, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.quantized_weight().describe()}"


def _swap_embeddings(model: torch.nn.Module, ctx: PassContext) -> int:
    swapped = 0
    tables = ctx.analyses.get(Analysis.QUANTIZED_TENSORS, {})
    for fqn, d in ctx.tensor_plan.items():
        if not d.quantize:
            continue
        if d.kind == "kv_cache":
            d.quantize, d.reason = False, ("eager modules leave attention as it is: the keys and values are stored "
                                           "quantized when the model runs with cache=qcompiler.kv_cache(model) "
                                           "(this calibration's scales); a DynamicCache keeps them in float")
            continue
        if d.kind != "embedding":       # a graph rewrite (a registered target) eager modules cannot carry
            d.quantize, d.reason = False, f"eager mode applies only embedding targets, not {d.kind!r} (use torch.compile)"
            continue
        module = model.get_submodule(fqn)
        if type(module) is not torch.nn.Embedding:
            d.quantize, d.reason = False, (f"eager mode swaps only torch.nn.Embedding modules, not "
                                           f"{type(module).__name__} (use torch.compile)")
            continue
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedEmbedding(tables[fqn], module.weight.dtype, fqn))
        swapped += 1
    return swapped


def _is_plain_linear(module: torch.nn.Module, weight: torch.Tensor, in_features: int) -> bool:
    """``module`` computes a linear with ``weight`` and nothing else (``QuantizedLinear`` can stand in)."""
    found = linear_orientation(module, in_features)
    return found is not None and found[0] is weight


def _carry_hooks(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """The hooks on ``old`` (e.g. ``qcompiler.rotate``'s online transforms, which the plan was traced
    with) go on ``new``."""
    for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(new, attr).update(getattr(old, attr))


def apply_plan(model: torch.nn.Module, contexts: list[PassContext], kernels: str | Mapping[str, str] = "auto",
               report: CompileReport | None = None) -> int:
    """Swap planned linears for ``QuantizedLinear`` (and planned embeddings for ``QuantizedEmbedding``);
    write changed float weights back. Returns swaps.

    ``kernels``: the kernel policy of ``qcompiler.backend``; ``report``: where the modules record
    the kernels they run."""
    swapped = 0
    for ctx in contexts:
        swapped += _swap_embeddings(model, ctx)
        ann = ctx.analyses[Analysis.ANNOTATE]
        act = ctx.recipe.activation
        qweights: dict[str, QuantizedWeight] = ctx.analyses[Analysis.QUANTIZED_WEIGHTS]
        for fqn, d in ctx.layer_plan.items():
            lw = ann.weights[fqn]
            module = model.get_submodule(fqn)
            weight = ann.values[ann.linear_weight[ann.linears[fqn][0]]]
            s = ctx.analyses[Analysis.SMOOTHING].get(fqn)
            # Folds into a producer linear live in that linear's weights; norm folds and explicit
            # scales are applied at this module's input in eager mode.
            inv = (1.0 / s).float() if s is not None and not d.smoothing.startswith("linear:") else None
            if d.quantize and not _is_plain_linear(module, weight, d.in_features):
                # keep it in float (falls through: its float weights may still need the smoothing)
                d.quantize, d.reason = False, "module is not a plain linear; eager mode cannot swap it (use torch.compile)"
            if not d.quantize:
                if lw.modified:
                    new_w = lw.w * inv[None, :] if inv is not None else lw.w   # undo the input-side scale
                    new_w = (new_w.t() if lw.transposed else new_w).to(weight.dtype)
                    with torch.no_grad():
                        module.weight.copy_(new_w)
                        if lw.bias is not None:
                            module.bias.copy_(lw.bias)
                continue
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = QuantizedLinear(qweights[fqn], None if lw.bias is None else lw.bias.detach().clone(),
                                  None if act is None else act.dtype.value, bool(act and act.dynamic),
                                  d.act_scale, inv, fqn, kernels, report)
            _carry_hooks(module, new)
            setattr(parent, child, new)
            swapped += 1
    return swapped



def quantize_unreached(model: torch.nn.Module, recipe, report: CompileReport, example: Mapping,
                       calibration=None, kernels: str | Mapping[str, str] = "auto") -> int:
    """The linears of the decoder blocks that no captured graph holds: a mixture-of-experts block whose
    data-dependent expert loop Dynamo ran outside its graphs, an expert no token was routed to. Never
    skipped silently: each gets a report entry and one warning counts them. A router among them (its
    output reaches a ``topk``, seen by following ``example``'s forward) is an op of kind ``router``;
    the others are quantized from what calibration left (a layer-by-layer result), else by round to
    nearest from their weights when the recipe's activations need no calibrated scale (weight-only or
    dynamic), else kept in float. Returns the modules swapped."""
    from qcompiler.calibration.layerwise import find_decoder_blocks
    from qcompiler.core import layer_quant
    from qcompiler.errors import CalibrationError
    from qcompiler.pipeline import LayerDecision
    fb, act = recipe.fallback, recipe.activation
    if recipe.weight is None or "linear" in fb.keep_op_kinds:
        return 0
    try:
        blocks_path, _ = find_decoder_blocks(model)
    except CalibrationError:
        return 0
    found: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    for fqn, module in model.named_modules():
        if not fqn.startswith(blocks_path + ".") or fqn in report.layers or isinstance(module, QuantizedLinear):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() == 2:
            o = linear_orientation(module, w.shape[1]) or linear_orientation(module, w.shape[0])
            if o is not None:
                found[fqn] = (module, (w.t() if o[1] else w).detach().float())
    if not found:
        return 0
    routers = find_routers(lambda: model(**example), {f: m for f, (m, _) in found.items()})
    results = getattr(calibration, "results", None) or {}
    stats = getattr(calibration, "stats", None) or {}
    swapped, kept = 0, 0
    for fqn, (module, weight) in found.items():
        n, k = weight.shape
        d = LayerDecision(fqn, "router" if fqn in routers else "linear", k, n,
                          weight_bytes_fp=module.weight.numel() * module.weight.element_size())
        report.layers[fqn] = d
        done = results.get(fqn)
        where = ("outside the captured graphs" if fqn in stats else
                 "outside the captured graphs, and no calibration token reached it")
        reason = fb.keeps(d.op_kind, fqn) or (
            f"it ran {where}: static activation scales need the graph's calibration"
            if done is None and act is not None and not act.dynamic else "")
        if reason:
            d.quantize, d.reason = False, reason
            kept += 1
            continue
        qw, s = (done.qweight, done.scale) if done is not None else (layer_quant.quantize_weight(weight, recipe.weight), None)
        d.weight_format, d.weight_bytes_q = qw.describe(), qw.nbytes()
        if act is not None:
            d.act_format = f"{act.dtype.value} per-token dynamic"
        d.note = f"ran {where}: " + ("its layer-by-layer result" if done is not None else
                                     "round to nearest from its weights")
        bias = getattr(module, "bias", None)
        new = QuantizedLinear(qw, None if bias is None else bias.detach().clone(),
                              None if act is None else act.dtype.value, bool(act and act.dynamic), None,
                              None if s is None else (1.0 / s).float(), fqn, kernels, report)
        _carry_hooks(module, new)
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped += 1
    unreached = sum(fqn not in stats for fqn in found)
    msg = (f"{len(found)} linears of the decoder blocks ran outside the captured graphs (a data-dependent "
           f"mixture-of-experts loop?){f', {unreached} of them reached by no calibration token' if unreached else ''}: "
           f"{swapped} quantized in eager modules, {kept} kept in float (report: their notes and reasons)")
    report.warnings.append(msg)
    warnings.warn(msg, stacklevel=3)
    return swapped

