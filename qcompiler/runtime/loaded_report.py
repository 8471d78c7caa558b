"""The ``CompileReport`` of a model rebuilt from a checkpoint (``load_quantized``,
``load_compressed_tensors``): what the checkpoint holds quantized, what it keeps in float, so that
``qcompiler.report(model)`` and ``export_onnx(model, recipe, ...)`` work on it as on a model from
``qcompiler.quantize``."""

from __future__ import annotations

import torch

from qcompiler.pipeline import REPORT_ATTR, CompileReport, LayerDecision, TensorDecision
from qcompiler.recipes import Recipe
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.runtime.fused_experts import quantized_experts

__all__ = ["attach_loaded_report"]


def attach_loaded_report(model: torch.nn.Module, recipe: Recipe, origin: str) -> CompileReport:
    """Describe ``model``'s linears (``QuantizedLinear`` quantized, ``nn.Linear`` kept in float) in a
    report on ``model`` (read by ``qcompiler.report``); ``origin`` names the checkpoint."""
    from qcompiler.core.online_rotation import online_modules
    report = CompileReport(recipe=recipe.name, target="reference")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    transformed = set(online_modules(model))
    for fqn, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            d = LayerDecision(fqn, "linear", m.in_features, m.out_features, weight_format=m.weight_format,
                              act_format=_act_format(m), note=f"loaded from {origin}"
                              + ("; its input through an online transform" if fqn in transformed else ""),
                              smoothing="explicit" if m.inv_smooth is not None else "",
                              act_scale=None if m.act_scale is None else float(m.act_scale),
                              weight_bytes_fp=m.in_features * m.out_features * 4,
                              weight_bytes_q=sum(t.numel() * t.element_size()
                                                 for t in (m.w_q, m.w_scale, m.w_zero) if t is not None))
        elif isinstance(m, torch.nn.Linear):
            w = m.weight
            d = LayerDecision(fqn, "output_head" if m is head else "linear", m.in_features, m.out_features,
                              quantize=False, reason=f"kept in float by the checkpoint ({origin})"
                              + ("; its input through an online transform" if fqn in transformed else ""),
                              weight_bytes_fp=w.numel() * w.element_size())
        else:
            continue
        report.layers[fqn] = d
    for key, t in quantized_experts(model).items():
        report.tensors[key] = TensorDecision(key, "experts", format=t.describe(),
                                             bytes_fp=t.numel() * t.element_size(), bytes_q=t.nbytes_quantized(),
                                             note=f"loaded from {origin}")
    model.__dict__[REPORT_ATTR] = report
    return report


def _act_format(m: QuantizedLinear) -> str:
    if m.act_dtype is None:
        return ""
    return f"{m.act_dtype} {'per-token dynamic' if m.act_dynamic else 'per-tensor static'}"
