"""Weight algorithms, registered against the recipe spec type that selects them.

A weight algorithm turns one linear's float weight and its calibration statistics into a
``QuantizedWeight``. Each registers a ``WeightAlgorithm`` under its spec type (``GPTQSpec`` in
``qcompiler.algorithms.gptq``, ``AWQSpec`` in ``qcompiler.algorithms.awq``, or a third party's, see
``examples/custom_weight_algorithm.py``), and everything that runs one dispatches through this
module: the graph passes (``passes/weight_algorithm.py``) and layer-by-layer calibration
(``qcompiler.calibration.layerwise``) compute the same numbers, and what an algorithm needs from calibration
(input Hessians, an input-channel scale before quantizing) is declared here, not tested by name.
A recipe without a weight algorithm rounds to nearest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qcompiler.errors import UnsupportedError
from qcompiler.core.layer_quant import QuantizedWeight, quantize_weight
from qcompiler.recipes import register_algorithm_spec

__all__ = ["WeightAlgorithm", "register_weight_algorithm", "registered_algorithms", "algorithm_of",
           "needs_hessian", "block_tuner", "fits_float_model", "start_fits_float_model", "dampening", "rows_separable", "has_input_scale", "input_scale", "quantize_linear", "scaled_stats"]


@dataclass(frozen=True)
class WeightAlgorithm:
    """One weight algorithm.

    Args:
        name: shown in reports and errors.
        spec_type: the recipe spec (a frozen dataclass) that selects and configures it.
        quantize: ``(fqn, w, stats, recipe, spec) -> (QuantizedWeight, note)``: ``w`` is the float32
            [N, K] weight (already multiplied by ``input_scale``'s ``s`` when there is one), ``stats``
            the linear's ``LayerStats`` (inputs divided by ``s``) or None without calibration.
        needs_hessian: calibration accumulates each linear's input Hessian ``X^T X`` for it (a bool, or
            ``spec -> bool`` when the spec decides).
        input_scale: optional ``(stats, weights, recipe, spec, name) -> (alpha, s)``: a per-input-channel
            scale for the linears reading one input (weights become ``W * s``, the input ``x / s``), as AWQ.
        rows_separable: ``quantize`` computes each output row from that row and the statistics alone (GPTQ:
            rows are independent given the Hessian), so slices of rows may be quantized apart (on several
            ranks) and joined, bit for bit, when the weights have a scale per row (per channel / group).
        tune_block: optional ``(run, evaluate, linears, weight_spec, spec) -> ({fqn: QuantizedWeight}, note)``:
            after ``quantize`` gave each linear of a decoder block its first weights, layer-by-layer
            calibration hands it the whole block to tune against the block's float output (SignRound;
            ``qcompiler.algorithms.signround.signround_block`` documents the arguments). Needs
            ``recipe.layerwise``.
    """

    name: str
    spec_type: type
    quantize: Callable[..., tuple[QuantizedWeight, str]]
    needs_hessian: bool | Callable[[Any], bool] = False
    input_scale: Callable[..., tuple[float, torch.Tensor]] | None = None
    tune_block: Callable[..., tuple[dict[str, QuantizedWeight], str]] | None = None
    rows_separable: bool = False


_ALGORITHMS: dict[type, WeightAlgorithm] = {}


def register_weight_algorithm(algorithm: WeightAlgorithm) -> WeightAlgorithm:
    """Register ``algorithm`` for recipes whose weight-algorithm spec is an ``algorithm.spec_type``
    (``Recipe(weight_algorithm=spec)``); one algorithm per spec type."""
    if not (isinstance(algorithm.spec_type, type) and dataclasses.is_dataclass(algorithm.spec_type)):
        raise TypeError(f"weight algorithm {algorithm.name!r}: spec_type must be a dataclass type, "
                        f"got {algorithm.spec_type!r}")
    taken = _ALGORITHMS.get(algorithm.spec_type)
    if taken is not None and taken != algorithm:
        raise ValueError(f"a weight algorithm is already registered for {algorithm.spec_type.__name__}: "
                         f"{taken.name!r}")
    register_algorithm_spec(algorithm.spec_type)      # a valid Recipe.weight_algorithm, found by name in JSON
    _ALGORITHMS[algorithm.spec_type] = algorithm
    return algorithm


def _load_builtins() -> None:
    from qcompiler.algorithms import awq, gptq, signround, sparsegpt  # noqa: F401  (each registers its algorithm on import)


def registered_algorithms() -> dict[type, WeightAlgorithm]:
    """{spec type: algorithm}, the built-in ones included."""
    _load_builtins()
    return dict(_ALGORITHMS)


def algorithm_of(recipe: Any) -> tuple[WeightAlgorithm, Any] | None:
    """``(algorithm, spec)`` the recipe selects, or None (round to nearest)."""
    spec = recipe.weight_algorithm_spec
    if spec is None:
        return None
    algorithm = registered_algorithms().get(type(spec))
    if algorithm is None:
        raise UnsupportedError(f"recipe {recipe.name!r}: no weight algorithm is registered for "
                               f"{type(spec).__name__}; register one with "
                               "qcompiler.algorithms.registry.register_weight_algorithm")
    return algorithm, spec


def needs_hessian(recipe: Any) -> bool:
    """Whether calibration must accumulate input Hessians for the recipe's weight algorithm."""
    found = algorithm_of(recipe)
    if found is None:
        return False
    algorithm, spec = found
    return bool(algorithm.needs_hessian(spec) if callable(algorithm.needs_hessian) else algorithm.needs_hessian)


def block_tuner(recipe: Any) -> tuple[Callable, Any] | None:
    """``(tune_block, spec)`` when the recipe's weight algorithm tunes whole decoder blocks, else None."""
    found = algorithm_of(recipe)
    if found is None or found[0].tune_block is None:
        return None
    return found[0].tune_block, found[1]


def fits_float_model(recipe: Any) -> bool:
    """Whether the recipe's weight algorithm fits each layer to the float model's own output (its spec's
    ``target`` is ``"float-model"``: layer-by-layer calibration runs a float stream beside the quantized one,
    ``qcompiler.calibration.float_reference``) rather than to the float layer on the quantized inputs."""
    found = algorithm_of(recipe)
    from qcompiler.recipes.specs import FLOAT_MODEL_TARGET
    return found is not None and getattr(found[1], "target", None) == FLOAT_MODEL_TARGET


def _fitting_spec(recipe: Any) -> Any:
    """The spec that fits each linear: the weight algorithm's own, or, for a block tuner that starts from
    another algorithm's result (``SignRoundSpec.start``), that start's (None when there is none)."""
    found = algorithm_of(recipe)
    if found is None:
        return None
    return found[1].start if hasattr(found[1], "start") else found[1]


def start_fits_float_model(recipe: Any) -> bool:
    """Whether each linear's first weights are fitted to the float model's output (GPTAQ's correction
    ``W*``, from the cross products of the quantized and float streams' inputs), not only the block tuning."""
    from qcompiler.recipes.specs import FLOAT_MODEL_TARGET
    return getattr(_fitting_spec(recipe), "target", None) == FLOAT_MODEL_TARGET


def true_sequential(recipe: Any) -> bool:
    """Whether layer-by-layer calibration gives each linear of a block the inputs of a block whose linears it
    depends on are already quantized (its fitting spec's ``true_sequential``), rather than one float pass for all."""
    return bool(getattr(_fitting_spec(recipe), "true_sequential", False))


def target_alpha(recipe: Any) -> float:
    """With a float-model target: the fraction of the correction toward the float model's output that the
    recipe's weight algorithm applies (its fitting spec's ``target_alpha``; 1.0 when it has none)."""
    return float(getattr(_fitting_spec(recipe), "target_alpha", 1.0))


def dampening(recipe: Any) -> float:
    """The fraction of the Hessian's mean diagonal the recipe's weight algorithm adds to it (GPTQ's
    ``dampening``, the start's for a block tuner; 0.01 when its spec has none)."""
    return float(getattr(_fitting_spec(recipe), "dampening", 0.01))


def rows_separable(recipe: Any) -> bool:
    """Whether slices of a linear's output rows may be quantized apart and joined bit for bit: weights with a
    scale per row (per channel / group), round to nearest or an algorithm registered ``rows_separable``,
    no input scale (AWQ searches one per group of linears from all rows) and no block tuning."""
    from qcompiler.recipes import Granularity
    if recipe.weight is None or recipe.weight.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
        return False
    found = algorithm_of(recipe)
    if found is None:
        return True
    algorithm = found[0]
    return algorithm.rows_separable and algorithm.input_scale is None and algorithm.tune_block is None


def has_input_scale(recipe: Any) -> bool:
    """Whether the recipe's weight algorithm rescales input channels before quantizing."""
    found = algorithm_of(recipe)
    return found is not None and found[0].input_scale is not None


def input_scale(st: Any, weights: list[torch.Tensor], recipe: Any, name: str = "?"
                ) -> tuple[float | None, torch.Tensor | None]:
    """``(alpha, s)`` for the linears reading one input, or ``(None, None)`` when the recipe's
    algorithm has no input scale."""
    found = algorithm_of(recipe)
    if found is None or found[0].input_scale is None:
        return None, None
    algorithm, spec = found
    return algorithm.input_scale(st, weights, recipe, spec, name)


def scaled_stats(st: Any, s: torch.Tensor | None) -> Any:
    """Statistics of ``x / s`` from those of ``x`` (Hessian ``H / (s s^T)``)."""
    if s is None:
        return st
    s = s.float().to(st.absmax.device)     # statistics stay where calibration keeps them
    return dataclasses.replace(st, absmax=st.absmax / s, samples=st.samples / s,
                               absmean=None if st.absmean is None else st.absmean / s,
                               hessian=None if st.hessian is None else st.hessian / (s[:, None] * s[None, :]))


def quantize_linear(fqn: str, w: torch.Tensor, st: Any, recipe: Any) -> tuple[QuantizedWeight, str]:
    """One linear's quantized weight and a short note (algorithm, dampening, clipping)."""
    w = w.float()
    found = algorithm_of(recipe)
    if found is None:
        return quantize_weight(w, recipe.weight), "rtn"
    algorithm, spec = found
    return algorithm.quantize(fqn, w, st, recipe, spec)
