"""Fold SmoothQuant / AWQ input scales into the norm that feeds the scaled linears.

The planner records a scale it folds into a norm as ``LayerDecision.smoothing == "norm:<path>"``;
the compiled graph holds the scaled norm gain, and ``qcompiler.quantize`` folds the same scale into
the norm module (``fold_norm_smoothing``), so that the eager model, its ``save_quantized`` /
compressed-tensors / ONNX exports and what serving engines load from them compute one function.
Where the scale cannot go into the norm it stays at the linears' inputs (``QuantizedLinear.inv_smooth``)
and the reason is returned.

A norm absorbs ``inv`` when its output is linear in its per-channel parameters, checked on a probe
input in float32: ``gain`` (RMSNorm, LayerNorm: every parameter times ``inv``) or ``1 + gain``
(Gemma's RMSNorm: ``(1 + w) * inv - 1``, the bias times ``inv``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from qcompiler.pipeline import CompileReport
from qcompiler.runtime.eager import QuantizedLinear

__all__ = ["FoldResult", "fold_norm_smoothing", "folded_norm_params", "FOLD_TOLERANCE"]

log = logging.getLogger(__name__)
FOLD_TOLERANCE = 1e-5     # relative error of a folded norm's output on the probe (float32)


@dataclass(frozen=True)
class FoldResult:
    """Norms whose SmoothQuant / AWQ scale lives in their parameters, and those left explicit (with why)."""

    folded: tuple[str, ...] = ()
    explicit: dict[str, str] = field(default_factory=dict)


def _probe(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, k, generator=g) * 3.0


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


_FORMS = {"gain": lambda k, p, inv: p * inv,
          "1 + gain": lambda k, p, inv: (1.0 + p) * inv - 1.0 if k == "weight" else p * inv}


@torch.no_grad()
def folded_norm_params(norm: torch.nn.Module, inv: torch.Tensor) -> dict[str, torch.Tensor] | str:
    """``norm``'s own parameters (in their dtypes) such that its output is multiplied by ``inv``, or
    why no form of folding reproduces that; ``norm`` is left unchanged."""
    own = {k: p.detach() for k, p in norm.named_parameters(recurse=False)}
    if not own or any(p.shape != inv.shape for p in own.values()) or list(norm.children()):
        return (f"{type(norm).__name__} (parameters { {k: tuple(p.shape) for k, p in own.items()} }) holds no "
                f"per-channel gain of size {inv.numel()} alone")
    inv = inv.float()
    try:
        trial = copy.deepcopy(norm).float()
        x = _probe(inv.numel()).to(inv.device)
        want = trial(x).float() * inv
        for fold in _FORMS.values():
            folded = {k: fold(k, p.float(), inv) for k, p in own.items()}
            for k, v in folded.items():
                getattr(trial, k).copy_(v)
            if _rel(trial(x).float(), want) <= FOLD_TOLERANCE:
                return {k: v.to(own[k].dtype) for k, v in folded.items()}
    except Exception as e:   # noqa: BLE001 — a module that is not a plain x -> norm(x) function
        return f"{type(norm).__name__} could not be probed ({type(e).__name__}: {e})"
    return f"{type(norm).__name__}'s output is not linear in its parameters (forms tried: {', '.join(_FORMS)})"


@torch.no_grad()
def _scale_float_linear_input(module: torch.nn.Module, s: torch.Tensor) -> bool:
    """Make float ``module(z)`` compute ``module_before(z * s)`` by scaling its weight's input dimension."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.nn.Parameter) or w.dim() != 2:
        return False
    x = _probe(s.numel(), seed=1).to(w.device, w.dtype)
    want = module(x * s.to(w.dtype))
    saved = w.detach().clone()
    for dim in (1, 0):                       # [N, K] (nn.Linear) first, then [K, N] (GPT-2 Conv1D)
        if w.shape[dim] != s.numel():
            continue
        w.copy_(saved * (s[None, :] if dim == 1 else s[:, None]).to(w.dtype))
        if _rel(module(x).float(), want.float()) <= (FOLD_TOLERANCE if w.dtype == torch.float32 else 1e-2):
            return True
    w.copy_(saved)
    return False


def _tied(model: torch.nn.Module, modules: list[torch.nn.Module]) -> bool:
    """One of ``modules``' weights is also another module's parameter (tied embeddings)."""
    mine = {id(m.weight) for m in modules if isinstance(getattr(m, "weight", None), torch.Tensor)}
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return any(owners.get(i, 0) > 1 for i in mine)


def fold_norm_smoothing(model: torch.nn.Module, report: CompileReport,
                        keep: Mapping[str, str] | None = None) -> FoldResult:
    """Fold the scales the planner put into norms (``smoothing == "norm:<path>"``, applied at the
    quantized linears' inputs as ``inv_smooth``) into those norms' parameters; float linears of the
    same group take ``W * s`` on their input dimension, as in the compiled graph. ``keep``: norm paths
    not to fold, with the reason (e.g. a norm module the graph calls at more than one place). A norm
    whose linears already hold no ``inv_smooth`` counts as folded."""
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
            if quantized:
                folded.append(norm_path)
            continue
        inv = invs[0]
        why = (keep or {}).get(norm_path)
        if why is None and (len(invs) != len(quantized) or any(not torch.equal(i, inv) for i in invs)):
            why = "its quantized linears do not share one smoothing scale"
        if why is None and floats and _tied(model, floats):
            why = "a float linear of its group shares its weight with another module (tied) and cannot take the scale"
        try:
            norm = model.get_submodule(norm_path)
        except AttributeError:
            norm, why = None, why or f"no module {norm_path!r} in the model"
        params = folded_norm_params(norm, inv) if why is None else why
        if isinstance(params, str):
            why = params
        else:
            saved = [(p, p.detach().clone()) for m in floats for p in m.parameters(recurse=False)]
            if not all(_scale_float_linear_input(m, 1.0 / inv) for m in floats):
                why = "a float linear of its group could not take the scale"
                with torch.no_grad():
                    for p, old in saved:
                        p.copy_(old)
            else:
                with torch.no_grad():
                    for k, v in params.items():
                        getattr(norm, k).copy_(v)
        if why is not None:
            explicit[norm_path] = why
            log.info("SmoothQuant / AWQ scale of %s stays at its linears' inputs: %s", norm_path, why)
            continue
        for q in quantized:
            q.inv_smooth = None
        folded.append(norm_path)
    return FoldResult(tuple(folded), explicit)
