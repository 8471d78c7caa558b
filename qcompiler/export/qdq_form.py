"""Put an eagerly quantized model (``qcompiler.quantize``) into the Q/DQ form that exports to ONNX.

Each ``QuantizedLinear`` becomes a ``QDQLinear``: ``[x * inv_smooth] -> Q -> DQ`` on the
activation (static per-tensor scale), ``DQ`` of the stored weight, a matmul. SmoothQuant / AWQ
scales that the planner folded into a norm (``LayerDecision.smoothing == "norm:<path>"``) are
applied at the linears' inputs in eager mode; ``fold_norm_smoothing`` folds them back into the
norm's parameters, as the compiled graph has them, when the norm's output is linear in its
parameters (RMSNorm, LayerNorm; checked numerically on a probe). Otherwise (Gemma's ``1 + w``
gain) the scale stays an explicit ``Mul`` in front of the activation quantizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.errors import UnsupportedError
from qcompiler.core.formats import gemm_format
from qcompiler.pipeline import CompileReport

from . import onnx_ops  # noqa: F401  (registers qcompiler_export::weight_dequantize)

__all__ = ["QDQLinear", "FoldResult", "fold_norm_smoothing", "to_qdq_form"]

log = logging.getLogger(__name__)
_ops = torch.ops


class QDQLinear(torch.nn.Module):
    """A quantized linear in Q/DQ form.

    INT8 / FP8 weights are stored transposed, ``w_q`` [K, N] with per-channel scales on axis 1,
    and export as ``x -> Q -> DQ -> MatMul(., DQ(w_q))``: the weight DQ feeds the MatMul
    directly, TensorRT's canonical pattern (and onnxruntime fuses it into an integer GEMM).
    INT4 weights keep ``qcompiler.core.packing``'s bytes, ``w_q`` packed [N, ceil(K / 2)] with
    scales [N, G] blocked along axis 1 (or [N] on axis 0), and export as
    ``DQ(w_q) -> Transpose -> MatMul``. Other buffers: ``w_scale`` in ONNX layout, ``bias``,
    ``act_scale`` (0-d, static activations), ``inv_smooth`` [K] (a SmoothQuant scale that could
    not be folded upstream).
    """

    def __init__(self, ql: QuantizedLinear):
        super().__init__()
        self.fqn, self.in_features, self.out_features = ql.fqn, ql.in_features, ql.out_features
        self.weight_dtype, self.act_dtype = ql.weight_dtype, ql.act_dtype
        if ql.act_dynamic:
            raise UnsupportedError(f"{ql.fqn}: dynamic per-token activation scales cannot be written as TensorRT "
                                   "static Q/DQ; use a recipe with per_tensor (static) activations")
        if ql.w_zero is not None or self.weight_dtype not in ("int8", "int4", "fp8_e4m3"):
            raise UnsupportedError(f"{ql.fqn}: weight format {ql.weight_format!r} is asymmetric or unsigned; "
                                   "TensorRT needs symmetric int8, int4 or fp8_e4m3 weights (zero-point 0)")
        scale = ql.w_scale.float()
        # the format table fusion and the eager runtime read: byte weights export transposed ([K, N]),
        # packed INT4 ones keep the packing's [N, ceil(K / 2)]
        self.transposed = gemm_format(self.weight_dtype, self.act_dtype).weight == "byte"
        w_q = ql.w_q.t().contiguous() if self.transposed else ql.w_q
        if scale.dim() == 0:
            self.axis, self.block_size = 0, 0
        elif ql.group_size:
            if self.transposed:
                raise UnsupportedError(f"{ql.fqn}: per-group {self.weight_dtype} weights; TensorRT blocks INT4 "
                                       "weights only")
            self.axis, self.block_size = 1, int(ql.group_size)
        else:   # per channel: [N, 1] -> [N], on the output-channel axis of the stored layout
            self.axis, self.block_size, scale = (1 if self.transposed else 0), 0, scale.reshape(-1)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", scale.contiguous())
        self.register_buffer("bias", None if ql.bias is None else ql.bias.float())
        self.register_buffer("act_scale", None if ql.act_scale is None else ql.act_scale.float())
        self.register_buffer("inv_smooth", None if ql.inv_smooth is None else ql.inv_smooth.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if self.act_dtype is not None:
            x_q = _ops.qcompiler.quantize(x, self.act_scale, None, self.act_dtype)
            x = _ops.qcompiler.dequantize(x_q, self.act_scale, None, x.dtype)
        w = _ops.qcompiler_export.weight_dequantize(self.w_q, self.w_scale, self.weight_dtype, self.axis,
                                                    self.block_size, self.in_features)
        if not self.transposed:
            return torch.nn.functional.linear(x, w, self.bias)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        act = self.act_dtype or "float"
        return (f"{self.in_features} -> {self.out_features}, weight {self.weight_dtype} "
                f"(axis {self.axis}, block {self.block_size}), activations {act}")


@dataclass(frozen=True)
class FoldResult:
    """Norms whose SmoothQuant scale was folded into their parameters, and those left explicit (with why)."""

    folded: tuple[str, ...]
    explicit: dict[str, str]


def _probe(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, k, generator=g) * 3.0


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max().clamp(min=1.0))))


@torch.no_grad()
def _fold_into_norm(norm: torch.nn.Module, inv: torch.Tensor) -> str | None:
    """Scale ``norm``'s per-channel parameters by ``inv`` if that scales its output by ``inv``; else say why not
    (and leave it unchanged)."""
    params = [p for p in norm.parameters(recurse=False) if p.is_floating_point()]
    if not params or any(p.shape != inv.shape for p in params) or list(norm.children()):
        return f"{type(norm).__name__} does not hold only per-channel parameters of size {inv.numel()}"
    x = _probe(inv.numel())
    saved = [p.detach().clone() for p in params]
    try:
        want = norm(x) * inv
        for p in params:
            p.mul_(inv.to(p.dtype))
        if _close(norm(x), want):
            return None
        why = f"{type(norm).__name__}'s output is not linear in its parameters"
    except Exception as e:   # a module that is not a plain x -> norm(x) function
        why = f"{type(norm).__name__} could not be probed ({type(e).__name__}: {e})"
    for p, old in zip(params, saved):
        p.copy_(old)
    return why


@torch.no_grad()
def _scale_float_linear_input(module: torch.nn.Module, s: torch.Tensor) -> bool:
    """Make float ``module(z)`` compute ``module_before(z * s)`` by scaling its weight's input dimension."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.nn.Parameter) or w.dim() != 2:
        return False
    x = _probe(s.numel(), seed=1)
    want = module(x * s)
    saved = w.detach().clone()
    for dim in (1, 0):                       # [N, K] (nn.Linear) first, then [K, N] (GPT-2 Conv1D)
        if w.shape[dim] != s.numel():
            continue
        w.copy_(saved * (s[None, :] if dim == 1 else s[:, None]).to(w.dtype))
        if _close(module(x), want):
            return True
    w.copy_(saved)
    return False


def _snapshot(modules: list[torch.nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(p, p.detach().clone()) for m in modules for p in m.parameters(recurse=False)]


def fold_norm_smoothing(model: torch.nn.Module, report: CompileReport) -> FoldResult:
    """Fold SmoothQuant scales planned into norms (applied at the linears' inputs in eager mode)
    back into the norms; the float linears of the same group take ``W * s`` as in the compiled graph."""
    groups: dict[str, list[str]] = {}
    for fqn, d in report.layers.items():
        if d.smoothing.startswith("norm:"):
            groups.setdefault(d.smoothing[len("norm:"):], []).append(fqn)
    folded, explicit = [], {}
    for norm_path, fqns in groups.items():
        modules = [model.get_submodule(f) for f in fqns]
        quantized = [m for m in modules if isinstance(m, QuantizedLinear)]
        floats = [m for m in modules if not isinstance(m, QuantizedLinear)]
        invs = [q.inv_smooth.float() for q in quantized if q.inv_smooth is not None]
        if not invs:
            continue
        inv = invs[0]
        if len(invs) != len(quantized) or any(not torch.equal(i, inv) for i in invs):
            explicit[norm_path] = "its quantized linears do not share one smoothing scale"
            continue
        norm = model.get_submodule(norm_path)
        saved = _snapshot([norm] + floats)
        why = _fold_into_norm(norm, inv)
        if why is None and not all(_scale_float_linear_input(m, 1.0 / inv) for m in floats):
            why = "a float linear of its group could not take the scale"
            with torch.no_grad():
                for p, old in saved:
                    p.copy_(old)
        if why is not None:
            explicit[norm_path] = why
            log.info("SmoothQuant scale of %s stays an explicit Mul: %s", norm_path, why)
            continue
        for q in quantized:
            q.inv_smooth = None
        folded.append(norm_path)
    return FoldResult(tuple(folded), explicit)


def to_qdq_form(model: torch.nn.Module) -> int:
    """Replace every ``QuantizedLinear`` of ``model`` by a ``QDQLinear``; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QDQLinear(m))
    return len(targets)
