"""Quantization targets beyond linear weights: a registry the ``QuantizeTensors`` pass runs.

A linear's weight is planned per layer (``LayerDecision``) by the passes from calibration to fusion.
Any other tensor the pipeline can store quantized — an embedding table today, a KV-cache write
next — is a ``QuantTarget``: where its spec sits in the recipe, how to find the graph nodes that
read the tensor (from the graph, never from layer names), and how to rewrite one of them. Each
rewrite returns a ``TensorDecision``, which lands in ``PassContext.tensor_plan`` and in the compile
report. Register a target once, at import, with ``register_target``; the built-in one lives in
``qcompiler/passes/embedding.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qcompiler.errors import RecipeError
from qcompiler.pipeline import TensorDecision

__all__ = ["QuantTarget", "register_target", "registered_targets"]


@dataclass(frozen=True)
class QuantTarget:
    """One kind of quantized tensor.

    Args:
        name: shown in reports (``TensorDecision.kind``) and unique among targets.
        spec: ``recipe -> spec``, None when the recipe leaves this kind of tensor in float.
        find: ``(gm, annotation) -> [(module path, node)]``: the nodes that read such a tensor;
            ``annotation`` is the ``passes.annotate.GraphAnnotation`` of the graph.
        apply: ``(gm, node, module path, spec, ctx) -> TensorDecision``: rewrite the node (or keep it,
            saying why in the decision).
    """

    name: str
    spec: Callable[[Any], Any]
    find: Callable[..., list]
    apply: Callable[..., TensorDecision]


_TARGETS: dict[str, QuantTarget] = {}


def register_target(target: QuantTarget) -> QuantTarget:
    """Add ``target`` to the targets every compile runs; a second target of the same name is an error."""
    if target.name in _TARGETS:
        raise RecipeError(f"a quantization target named {target.name!r} is already registered")
    _TARGETS[target.name] = target
    return target


def registered_targets() -> tuple[QuantTarget, ...]:
    """The registered targets, in registration order."""
    return tuple(_TARGETS.values())
