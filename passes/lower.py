"""Lowering: map qcompiler's fused ops onto a backend's kernels.

A backend's table maps an op packet (``torch.ops.qcompiler.int8_gemm``) to a replacement
callable with the same signature; the pass gets the table and a kernel chooser from ``ctx.lowering``
(``qcompiler.pipeline.Lowering``, wired by the API), not by importing the backends. Fused GEMMs the
table does not take run the kernel that the chooser picks for this machine under the ``kernels`` policy
(probed numerics, a cached micro-benchmark); the report names each layer's kernel, the contract it
keeps and why it was chosen. Other ops keep their reference kernels.

Per-op fallback: a replacement may expose ``unsupported(*args, **kwargs) -> str | None``
(the Triton backend's ``TritonKernel`` does). It is asked with the node's arguments as traced
values (fake tensors from Dynamo, propagated through the nodes earlier passes added; real
tensors for constants); an op it refuses keeps its reference kernel, and the report gets a
warning naming the op, the layer and the reason (stats ``fallback_<op>``). A replacement that
exposes ``bind(report) -> (target, kwargs)`` is not itself the node's target: the node gets
``target`` (the Triton backend's ``qcompiler::triton_<op>`` OpOverload, so the graph stays
traceable) and the extra keyword arguments (its ``report_id``), which make arguments it refuses
at run time land in the compile report too (``report.runtime_fallbacks``). A table may carry
``notice`` (e.g. "no GPU and no interpreter"), copied once into the report's warnings.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from qcompiler.core.formats import ActivationSource, op_format
from qcompiler.core.ops import GEMM_OPS
from qcompiler.pipeline import META_KEY, Analysis, PassContext, PassResult

from .smoothquant import add_constant

__all__ = ["Lower"]

log = logging.getLogger(__name__)


class Lower:
    name = "lower"
    requires = ("fuse",)
    reads = ()
    writes = ()

    def __init__(self, target: str = "reference", kernels="auto"):
        # qcompiler.backend checks the target and the policy when it is created
        self.target, self.kernels = target, kernels

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if ctx.lowering is None:
            raise RuntimeError("lower: the context has no backends (ctx.lowering); qcompiler.backend and "
                            "qcompiler.quantize set it")
        table = ctx.lowering.table(self.target)
        notice = getattr(table, "notice", "")
        if notice and notice not in ctx.report.warnings:
            ctx.report.warnings.append(notice)
        counts: dict[str, int] = {}
        values: dict[Node, object] | None = None
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in table:
                continue
            impl = table[node.target]
            op_name = getattr(node.target, "__name__", str(node.target)).split(".")[-1]
            check = getattr(impl, "unsupported", None)
            if check is not None:
                if values is None:
                    values = _traced_values(gm, ctx)
                reason = _static_reason(check, node, gm, values)
                if reason:
                    fqn = _layer_of(node)
                    msg = f"{self.target}: {op_name}{f' in {fqn}' if fqn else ''} runs the reference kernel: {reason}"
                    if msg not in ctx.report.warnings:
                        ctx.report.warnings.append(msg)
                    log.warning(msg)
                    key = f"fallback_{op_name}"
                    counts[key] = counts.get(key, 0) + 1
                    continue
            node.meta[_OP_KEY] = op_name
            bind = getattr(impl, "bind", None)   # an op of its own that records its run-time fallbacks here
            if bind is not None:
                node.target, extra = bind(ctx.report)
                node.kwargs = {**node.kwargs, **extra}
            else:
                node.target = impl
            key = f"lowered_{getattr(impl, '__name__', 'op')}"
            counts[key] = counts.get(key, 0) + 1
        gemms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in GEMM_OPS]
        if gemms:
            if values is None:
                values = _traced_values(gm, ctx)
            self._choose_kernels(gm, ctx, gemms, values, counts)
        ctx.report.target = self.target
        return PassResult(gm, any(k.startswith(("lowered_", "kernel_")) for k in counts), counts)

    def _choose_kernels(self, gm: GraphModule, ctx: PassContext, gemms: list[Node], values: dict, counts: dict) -> None:
        """Point each fused GEMM at the kernel chosen for it; record the choice per layer."""
        chooser = ctx.lowering.chooser(self.target, self.kernels)
        replaced: set[str] = set()
        annotation = ctx.analyses.get(Analysis.ANNOTATE)
        params = annotation.values if annotation is not None else {}
        for node in gemms:
            op = node.target.__name__.split(".")[-1]
            args = [_resolve(a, gm, values, params) for a in node.args]
            kernel_w = args[op_format(op).weight_arg]
            device = kernel_w.device if isinstance(kernel_w, torch.Tensor) else ctx.device
            source = _activation_source(node)
            choice = chooser.choose(op, args, device, source[0] if source else None)
            kernel, fqn = choice.kernel, _layer_of(node)
            if kernel.prepare is not None:
                w_node = node.args[kernel.weight_arg]
                prepared = add_constant(gm, f"{fqn or op}_{kernel.name}_weight",
                                        kernel.prepare(args[kernel.weight_arg], args), node)
                node.args = node.args[:kernel.weight_arg] + (prepared,) + node.args[kernel.weight_arg + 1:]
                if w_node.op == "get_attr":
                    replaced.add(w_node.target)
            folded = kernel.from_float is not None and source is not None
            if folded:      # the float activation in place of the quantized one; the quantize op goes dead
                node.args = (source[1],) + tuple(node.args[1:])
            run = kernel.from_float if folded else kernel.run
            if folded:
                counts["kernel_quantize_folded"] = counts.get("kernel_quantize_folded", 0) + 1
            if not (kernel.reference and chooser.target == "reference") and run is not node.target:
                node.target = run
                key = f"lowered_{run.__name__}"
                counts[key] = counts.get(key, 0) + 1
            key = f"kernel_{op}_{kernel.name}"
            counts[key] = counts.get(key, 0) + 1
            decision = ctx.layer_plan.get(fqn)
            if decision is not None:
                decision.kernel, decision.kernel_contract = kernel.name, choice.contract.value
                decision.kernel_note = choice.reason + (_FOLDED if folded else "")
            line = f"{op} -> {kernel.name} [{choice.contract.value}]: {choice.reason}{_FOLDED if folded else ''}"
            if line not in ctx.report.kernel_choices:
                ctx.report.kernel_choices.append(line)
        saturating = [d.fqn for d in ctx.layer_plan.values() if d.kernel_contract == "int16-pairs"]
        if saturating:
            msg = (f"{len(saturating)} int8 GEMMs run on a kernel that sums products in saturating int16 pairs on this "
                   "CPU (no VNNI), the fastest here; it moves perplexity (see each layer's kernel note): "
                   "kernels='exact' keeps exact int32 sums (slower here), WeightSpec(reduce_range=True) "
                   "(7-bit weights) makes this kernel exact")
            if msg not in ctx.report.warnings:
                ctx.report.warnings.append(msg)
                log.warning(msg)
        if chooser.timed:
            counts["kernel_benchmarks"] = chooser.timed
            counts["kernel_benchmark_ms"] = round(1e3 * chooser.seconds, 1)
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in replaced - used:   # the plain weight the prepared one replaced
            delattr(gm, name)


#: node meta key: the qcompiler op a node ran before the backend's table replaced its target
_OP_KEY = "qcompiler_op"
_FOLDED = "; the activation's quantize op is folded into the kernel (same values, no fp8 tensor)"


def _op_of(node: object) -> str:
    """The qcompiler op ``node`` runs (or ran before lowering), '' for anything else."""
    if not isinstance(node, Node) or node.op != "call_function":
        return ""
    if _OP_KEY in node.meta:
        return node.meta[_OP_KEY]
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        qualified = target._qualified_op_name
    elif isinstance(target, torch._ops.OpOverload):
        qualified = target.name()
    else:
        return ""
    namespace, _, name = qualified.partition("::")
    return name.split(".")[0] if namespace == "qcompiler" else ""


def _activation_source(node: Node) -> tuple[ActivationSource, Node] | None:
    """How the quantized activation of a GEMM node is made, and its float input: a static ``quantize``
    with the GEMM's own activation scale, or the values of a ``quantize_per_token`` whose scale the GEMM
    takes. None for anything else (the kernels are then timed, and run, on the quantized activation)."""
    a_q, a_scale = node.args[0], node.args[1]
    if _op_of(a_q) == "quantize":
        x, scale, zero, dtype = a_q.args[:4]
        block = a_q.args[4] if len(a_q.args) > 4 else a_q.kwargs.get("block_size", 0)
        if scale is not a_scale or zero is not None or block:
            return None
        return ActivationSource("static", dtype), x
    if isinstance(a_q, Node) and a_q.target is operator.getitem and a_q.args[1] == 0 \
            and _op_of(a_q.args[0]) == "quantize_per_token":
        source = a_q.args[0]
        if not (isinstance(a_scale, Node) and a_scale.target is operator.getitem and a_scale.args == (source, 1)):
            return None
        return ActivationSource("per_token", source.args[1]), source.args[0]
    return None


def _layer_of(node: Node) -> str:
    info = node.meta.get(META_KEY)
    return getattr(info, "fqn", "") if info is not None else ""


def _traced_values(gm: GraphModule, ctx: PassContext) -> dict[Node, object]:
    """Fake values of every node, propagated from the compile's example inputs.

    Dynamo's ``example_value`` covers the nodes it traced; nodes added by earlier passes have
    none, so the whole graph is propagated once under a fresh fake mode (its ``meta["val"]``
    entries are taken out again). If that fails, nodes with an ``example_value`` keep it and
    the rest stay unknown (their ops are then checked at run time only).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    values: dict[Node, object] = {}
    saved = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        if len(placeholders) == len(ctx.example_inputs):
            FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*ctx.example_inputs)
            values = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    except Exception as e:   # a graph the fake mode cannot run
        log.debug("lower: fake propagation failed (%s); using Dynamo's example values", e)
        values = {}
    finally:
        for n in gm.graph.nodes:
            n.meta.pop("val", None)
            if n in saved:
                n.meta["val"] = saved[n]
    for n in gm.graph.nodes:
        if n not in values and "example_value" in n.meta:
            values[n] = n.meta["example_value"]
    return values


def _resolve(a, gm: GraphModule, values: dict[Node, object], params: dict[str, torch.Tensor] | None = None):
    """A node argument as a value: constants and parameters real (a model whose modules already hold
    quantized weights, e.g. a loaded checkpoint, passes them as Dynamo's lifted parameters), traced
    nodes fake, unknown nodes None."""
    if not isinstance(a, Node):
        return a
    if a.op == "get_attr":
        return getattr(gm, a.target)
    if a.op == "placeholder" and params and a.name in params:
        return params[a.name]
    return values.get(a)


def _static_reason(check, node: Node, gm: GraphModule, values: dict[Node, object]) -> str | None:
    """``check`` on the node's arguments as traced values; None when some value is unknown."""
    missing = []

    def value(a):
        if not isinstance(a, Node):
            return a
        if a.op == "get_attr":
            return getattr(gm, a.target)
        if a in values:
            return values[a]
        missing.append(a.name)
        return None

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    if missing:
        log.debug("lower: no traced value for %s; %s is checked at run time only", missing, node.name)
        return None
    try:
        return check(*args, **kwargs)
    except Exception as e:   # a check that cannot read a fake value: decide at run time
        log.debug("lower: static check of %s failed (%s); checked at run time only", node.name, e)
        return None
