"""Quantization targets beyond linear weights: a registry the ``QuantizeTensors`` pass runs.

A linear's weight is planned per layer (``LayerDecision``) by the passes from calibration to fusion.
Any other tensor the pipeline can store quantized — an embedding table today, a KV-cache write
next — is a ``QuantTarget``: where its spec sits in the recipe, how to find the graph nodes that
read the tensor (from the graph, never from layer names), and how to rewrite one of them. Each
rewrite returns a ``TensorDecision``, which lands in ``PassContext.tensor_plan`` and in the compile
report. A target that needs statistics of the float model (a KV cache's static scales) gives an
``observe`` hook: the API runs its observer over the calibration batches before the passes, and
``apply`` reads the result from ``ctx.calibration.tensors[name]``. Register a target once, at import,
with ``register_target``; the built-in ones live in ``qcompiler/passes/embedding.py`` (embedding
tables) and ``qcompiler/passes/kv_cache.py`` (the attention's KV cache, with an observer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from qcompiler.errors import RecipeError
from qcompiler.pipeline import TensorDecision

__all__ = ["QuantTarget", "TensorObserver", "register_target", "registered_targets", "unregister_target"]


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
        observe: optional ``(model, spec) -> observer``, an observer of the float model during
            calibration (``TensorObserver``). It runs once per compiled model when calibration data is
            given, in its own pass over the batches; its ``result()`` is ``ctx.calibration.tensors[name]``
            (absent without calibration data: ``apply`` then decides, e.g. raises ``CalibrationError``).
    """

    name: str
    spec: Callable[[Any], Any]
    find: Callable[..., list]
    apply: Callable[..., TensorDecision]
    observe: Callable[..., "TensorObserver"] | None = None


@runtime_checkable
class TensorObserver(Protocol):
    """What ``QuantTarget.observe`` returns: a context manager that installs its hooks (module hooks, a
    ``TorchFunctionMode``) on enter and removes them on exit, and the statistics it gathered."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc) -> Any: ...

    def result(self) -> Any: ...

    # Optional: ``merge(results: list) -> result``, the results of several ranks' shards as one (order-
    # independent); with it, calibration under torch.distributed gives each rank a shard of the batches.


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


def unregister_target(name: str) -> None:
    """Remove a registered target (plug-ins' tests); an unknown name is an error."""
    if name not in _TARGETS:
        raise RecipeError(f"no quantization target named {name!r} is registered")
    del _TARGETS[name]
