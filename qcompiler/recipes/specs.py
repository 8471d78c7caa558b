"""Recipe specs: frozen dataclasses that say what to quantize and how, each validating its own
fields, with a JSON round trip. The named presets are in ``qcompiler.recipes.presets``."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qcompiler.errors import RecipeError

__all__ = [
    "QuantDtype", "Granularity", "Calibrator", "WeightSpec", "ActivationSpec",
    "SmoothQuantSpec", "GPTQSpec", "AWQSpec", "SignRoundSpec", "RotationSpec", "EndToEndSpec", "KVCacheSpec", "FallbackSpec", "Recipe", "OP_KINDS", "ALGORITHM_SPECS",
    "register_algorithm_spec",
]


class QuantDtype(str, enum.Enum):
    INT8 = "int8"
    INT4 = "int4"
    FP8_E4M3 = "fp8_e4m3"


class Granularity(str, enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_TOKEN = "per_token"
    PER_HEAD = "per_head"        # KV cache: one scale per attention head


class Calibrator(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


#: Op kinds that annotation assigns and fallback rules may name.
OP_KINDS = ("linear", "output_head", "router", "embedding", "norm", "matmul", "attention", "experts")


def _choice(owner: str, name: str, value: Any, enum_type: type[enum.Enum], allowed=None):
    allowed = tuple(allowed or enum_type)
    try:
        member = enum_type(value)
    except ValueError:
        member = None
    if member is None or member not in allowed:
        raise RecipeError(f"{owner}.{name}={value!r} is not supported; expected one of "
                          f"{[a.value for a in allowed]}")
    return member


def _number(owner: str, name: str, value: Any, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{owner}.{name}={value!r} must be a number")
    return float(value)


def _bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{owner}.{name}={value!r} must be a bool (true or false)")
    return value


def _sequence(owner: str, name: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise RecipeError(f"{owner}.{name}={value!r} must be a sequence")
    return tuple(value)


def _strings(owner: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)          # one name, not a sequence of characters
    try:
        items = tuple(value)
    except TypeError:
        raise RecipeError(f"{owner}.{name}={value!r} must be a sequence of strings") from None
    if not all(isinstance(v, str) for v in items):
        raise RecipeError(f"{owner}.{name}={value!r} must be a sequence of strings")
    return items


@dataclass(frozen=True)
class WeightSpec:
    """How weights are quantized.

    Args:
        dtype: int8, int4 or fp8_e4m3.
        granularity: per_tensor, per_channel (one scale per output channel) or per_group.
        group_size: input channels per scale, with per_group only.
        symmetric: zero-point 0 when True; integer zero-points otherwise (integer dtypes only).
        calibrator: minmax (scale from each channel's / group's range) or mse (per channel or
            group, the clipping ratio of the range that minimizes the weight's squared error;
            under GPTQ each input column's error is weighted by the Hessian diagonal H_ii).
        reduce_range: int8 only: 7-bit weights, [-64, 63] with scale absmax / 63 (asymmetric:
            [0, 127]), stored in 8 bits all the same (onnxruntime's ``reduce_range``). onnxruntime's
            CPU int8 GEMM without VNNI (AVX2, AVX-512 without VNNI) sums pairs of u8 x s8
            products in int16, which saturates for full-range weights; with 7-bit weights a
            pair is at most 255 * 64 * 2 = 32640, so it is exact on every x86 CPU. TensorRT's
            INT8 GEMM is exact either way; this costs one bit of weight precision.
    """

    dtype: QuantDtype = QuantDtype.INT8
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int | None = None
    symmetric: bool = True
    calibrator: Calibrator = Calibrator.MINMAX
    reduce_range: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", _choice("weight", "dtype", self.dtype, QuantDtype))
        object.__setattr__(self, "granularity", _choice(
            "weight", "granularity", self.granularity, Granularity,
            (Granularity.PER_TENSOR, Granularity.PER_CHANNEL, Granularity.PER_GROUP)))
        if self.granularity is Granularity.PER_GROUP:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
                raise RecipeError(f"weight.group_size={self.group_size!r} must be a positive integer "
                                  "with granularity='per_group'")
        elif self.group_size is not None:
            raise RecipeError(f"weight.group_size={self.group_size!r} is only valid with "
                              f"granularity='per_group', not {self.granularity.value!r}")
        object.__setattr__(self, "calibrator", _choice("weight", "calibrator", self.calibrator, Calibrator,
                                                       (Calibrator.MINMAX, Calibrator.MSE)))
        _bool("weight", "symmetric", self.symmetric)
        if not self.symmetric and self.dtype is QuantDtype.FP8_E4M3:
            raise RecipeError("weight.symmetric=False is not supported for dtype 'fp8_e4m3'; "
                              "expected symmetric=True")
        if _bool("weight", "reduce_range", self.reduce_range) and self.dtype is not QuantDtype.INT8:
            raise RecipeError(f"weight.reduce_range=True is only valid with dtype 'int8', not {self.dtype.value!r}")


@dataclass(frozen=True)
class ActivationSpec:
    """How the inputs of quantized linears are quantized.

    Args:
        dtype: int8 or fp8_e4m3.
        granularity: per_tensor (static scale from calibration) or per_token (dynamic).
        calibrator: how a static scale is chosen: minmax, percentile or mse.
        percentile: the |x| percentile used by the percentile calibrator, in (0, 100].
        symmetric: only symmetric activations are supported.
    """

    dtype: QuantDtype = QuantDtype.INT8
    granularity: Granularity = Granularity.PER_TOKEN
    calibrator: Calibrator = Calibrator.MINMAX
    percentile: float = 99.99
    symmetric: bool = True

    def __post_init__(self):
        object.__setattr__(self, "dtype", _choice(
            "activation", "dtype", self.dtype, QuantDtype, (QuantDtype.INT8, QuantDtype.FP8_E4M3)))
        object.__setattr__(self, "granularity", _choice(
            "activation", "granularity", self.granularity, Granularity,
            (Granularity.PER_TENSOR, Granularity.PER_TOKEN)))
        object.__setattr__(self, "calibrator", _choice("activation", "calibrator", self.calibrator, Calibrator))
        if not (0.0 < _number("activation", "percentile", self.percentile) <= 100.0):
            raise RecipeError(f"activation.percentile={self.percentile!r} must be in (0, 100]")
        if not _bool("activation", "symmetric", self.symmetric):
            raise RecipeError("activation.symmetric=False is not supported; expected symmetric=True")

    @property
    def dynamic(self) -> bool:
        return self.granularity is Granularity.PER_TOKEN


@dataclass(frozen=True)
class SmoothQuantSpec:
    """SmoothQuant: move activation outliers into the weights, s_j = max|X_j|^a / max|W_j|^(1-a).

    Args:
        alpha: migration strength when not searching, in [0, 1].
        search: choose alpha per layer group on calibration data (output error of the
            quantized linears), from ``alpha_grid``.
        alpha_grid: the candidates for the search.
    """

    alpha: float = 0.5
    search: bool = False
    alpha_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))

    def __post_init__(self):
        if not (0.0 <= _number("smoothquant", "alpha", self.alpha) <= 1.0):
            raise RecipeError(f"smoothquant.alpha={self.alpha!r} must be in [0, 1]")
        _bool("smoothquant", "search", self.search)
        grid = tuple(_number("smoothquant", "alpha_grid", a) for a in _sequence("smoothquant", "alpha_grid", self.alpha_grid))
        if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
            raise RecipeError(f"smoothquant.alpha_grid={self.alpha_grid!r} must be a non-empty "
                              "sequence of values in [0, 1]")
        object.__setattr__(self, "alpha_grid", grid)

    def check(self, recipe: "Recipe") -> None:
        """The rules this spec sets on the rest of ``recipe`` (``RecipeError`` when one fails)."""
        if recipe.activation is None:
            raise RecipeError("recipe.smoothquant needs activation quantization; weight-only recipes "
                              "have nothing to smooth (set smoothquant=None)")


def _positive_int(owner: str, name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RecipeError(f"{owner}.{name}={value!r} must be a positive integer")
    return value


#: the ``target`` that fits each layer to the float model's own output (``GPTQSpec``, ``SignRoundSpec``)
FLOAT_MODEL_TARGET = "float-model"
#: what a weight algorithm fits each layer to (``GPTQSpec.target``, ``SignRoundSpec.target``)
FIT_TARGETS = ("quantized-inputs", FLOAT_MODEL_TARGET)


def _target(section: str, value) -> None:
    if value not in FIT_TARGETS:
        raise RecipeError(f"{section}.target={value!r} must be one of {', '.join(map(repr, FIT_TARGETS))}")


def _target_needs_layerwise(section: str, target: str, recipe: "Recipe") -> None:
    if target == FLOAT_MODEL_TARGET and not recipe.layerwise:
        raise RecipeError(f"recipe.{section}.target='float-model' runs the float model's activations beside the "
                          "quantized model's, block by block: it needs recipe.layerwise=True")


@dataclass(frozen=True)
class GPTQSpec:
    """GPTQ (Frantar et al., 2022): quantize columns in order, compensating each one's error
    on the columns not yet quantized through the inverse Hessian of the layer's inputs.

    Args:
        block_size: columns per lazy batch update.
        dampening: fraction of the mean Hessian diagonal added to it (raised automatically,
            and reported, when the Hessian is not positive definite).
        act_order: quantize columns in order of decreasing Hessian diagonal.
        static_groups: group scales from the original weights up front (else each group's scale
            is chosen when GPTQ reaches it, from the error-updated weights).
        min_samples: fewest calibration tokens per linear for a usable Hessian.
        optional: GPTQ refines a format that runs without calibration (weights, and dynamic or
            no activations, quantized by round-to-nearest): without calibration data it is
            skipped, with a warning. Only valid when nothing else in the recipe needs calibration
            (``Recipe.calibration_required_by``).
        target: what each linear is fitted to: ``"quantized-inputs"``, the float linear's output on
            the quantized model's inputs (GPTQ's); or ``"float-model"``, the float model's own output
            (GPTAQ's asymmetric calibration: the layer also corrects the error of the blocks before it;
            ``qcompiler.calibration.float_reference``). ``"float-model"`` needs ``recipe.layerwise``;
            fused experts stay fitted to their quantized inputs. Measured on SmolLM2 W4 validation text
            (``benchmarks/rotation_validation.py``): it diverges without ``true_sequential`` (+606%) and beats
            plain GPTQ with it (+3.75% against +6.53%, online rotations both; +2.62% at ``target_alpha=0.75``, the
            ``w4a16-gptaq`` preset).
        target_alpha: with ``target="float-model"``, the fraction of the correction ``W* - W`` toward the float
            model's output that GPTQ starts from, in (0, 1] (GPTAQ's reference code scales its correction by
            0.25; on SmolLM2 validation text 0.75 is best of 0.25 / 0.4 / 0.5 / 0.65 / 0.75 / 0.85 / 1.0); must stay 1.0 with
            the default target.
        true_sequential: within each decoder block, each linear's statistics come from a pass in which the
            linears it depends on are already quantized (GPTQ's ``--true-sequential``: q/k/v, then ``o_proj``
            on their quantized outputs, then the MLP); else every linear of the block is calibrated on one pass
            of the float block. One more pass of the block per dependency level found (linears that do not
            feed each other share one). Needs ``recipe.layerwise``.
        scale_refit: rounds of refitting each output row's scales to the Hessian by least squares with the codes
            fixed, after the sweep (``qcompiler.algorithms.scale_refit``); each round after the first sweeps
            again at the refitted scales. 0 (default): GPTQ's scales. Needs per-channel or per-group weights.
            ``w4a16-gptaq`` takes 3 (SmolLM2 validation text with online rotations, 64 windows: +3.31% against
            +3.77%).
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    min_samples: int = 128
    optional: bool = False
    target: str = "quantized-inputs"
    target_alpha: float = 1.0
    true_sequential: bool = False
    scale_refit: int = 0

    def __post_init__(self):
        _positive_int("gptq", "block_size", self.block_size)
        if not isinstance(self.scale_refit, int) or isinstance(self.scale_refit, bool) or self.scale_refit < 0:
            raise RecipeError(f"gptq.scale_refit={self.scale_refit!r} must be a non-negative integer")
        _positive_int("gptq", "min_samples", self.min_samples)
        if not 0.0 < _number("gptq", "dampening", self.dampening) < 1.0:
            raise RecipeError(f"gptq.dampening={self.dampening!r} must be in (0, 1)")
        for name in ("act_order", "static_groups", "optional", "true_sequential"):
            _bool("gptq", name, getattr(self, name))
        _target("gptq", self.target)
        if not 0.0 < _number("gptq", "target_alpha", self.target_alpha) <= 1.0:
            raise RecipeError(f"gptq.target_alpha={self.target_alpha!r} must be in (0, 1]")
        if self.target_alpha != 1.0 and self.target != FLOAT_MODEL_TARGET:
            raise RecipeError(f"gptq.target_alpha={self.target_alpha!r} scales the float-model target's correction: "
                              f"it needs gptq.target='float-model' (target is {self.target!r})")

    def check(self, recipe: "Recipe") -> None:
        """The rules this spec sets on the rest of ``recipe`` (``RecipeError`` when one fails)."""
        _target_needs_layerwise("gptq", self.target, recipe)
        if self.scale_refit and recipe.weight.granularity is Granularity.PER_TENSOR:
            raise RecipeError("recipe.gptq.scale_refit refits each output row's scales: it needs per_channel or "
                              "per_group weights, not per_tensor")
        if self.true_sequential and not recipe.layerwise:
            raise RecipeError("recipe.gptq.true_sequential=True calibrates each block's linears in dependency order, "
                              "block by block: it needs recipe.layerwise=True")
        if self.optional:
            others = [u for u in recipe.calibration_required_by if u != "GPTQ"]
            if others:
                raise RecipeError(f"recipe.gptq.optional=True: GPTQ can be optional only when the rest of the recipe "
                                  f"runs without calibration data, but this recipe needs it for {' and '.join(others)}; "
                                  "set gptq.optional=False")


@dataclass(frozen=True)
class AWQSpec:
    """AWQ (Lin et al., 2023): per input channel scales s = mean|X|^a (a searched on a grid,
    minimizing the quantized output error of the linears sharing the input), folded into the
    preceding op, then a per-group weight clipping search.

    Args:
        grid: number of alpha values tried in [0, 1).
        duo_scaling: also divide by mean|W|^(1-a) (llm-compressor's variant).
        clip_search: search per output channel and group the clipping range of the weights.
        clip_grid: clipping ratios tried, from 1 down to ``1 - max_shrink``.
        max_shrink: largest fraction of the range the clip search may cut.
        samples: calibration rows per linear used by the searches.
    """

    grid: int = 20
    duo_scaling: bool = False
    clip_search: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    samples: int = 1024

    def __post_init__(self):
        _positive_int("awq", "grid", self.grid)
        _positive_int("awq", "clip_grid", self.clip_grid)
        _positive_int("awq", "samples", self.samples)
        if not 0.0 <= _number("awq", "max_shrink", self.max_shrink) < 1.0:
            raise RecipeError(f"awq.max_shrink={self.max_shrink!r} must be in [0, 1)")
        for name in ("duo_scaling", "clip_search"):
            _bool("awq", name, getattr(self, name))

    def check(self, recipe: "Recipe") -> None:
        """The rules this spec sets on the rest of ``recipe`` (``RecipeError`` when one fails)."""
        if recipe.weight.dtype is QuantDtype.FP8_E4M3:
            raise RecipeError("recipe.awq needs integer weights (int4 or int8), not weight.dtype='fp8_e4m3'")
        if recipe.weight.granularity is Granularity.PER_TENSOR:
            raise RecipeError("recipe.awq needs per_channel or per_group weights, not per_tensor")
        if recipe.smoothquant is not None:
            raise RecipeError("recipe.awq and recipe.smoothquant both rescale input channels; choose one")


#: GPTQ as ``SignRoundSpec(init="gptq")`` runs it: ``w4a16-gptq``'s settings
GPTQ_START = GPTQSpec(act_order=True, static_groups=True)
#: GPTQ as ``SignRoundSpec(init="gptaq")`` runs it: ``w4a16-gptaq``'s settings
GPTAQ_START = GPTQSpec(act_order=True, static_groups=True, target=FLOAT_MODEL_TARGET, target_alpha=0.75,
                       true_sequential=True, scale_refit=3)
#: the starts ``SignRoundSpec.init`` names
SIGNROUND_STARTS = ("rtn", "gptq", "gptaq")


@dataclass(frozen=True)
class SignRoundSpec:
    """SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent", the algorithm
    of Intel's AutoRound): per decoder block, learn each weight's rounding offset ``v`` in
    [-0.5, 0.5] and each scale's clipping factors in [min_clip, 1] by signed gradient descent on
    the squared error between the block's output with quantized weights and its float output, on
    the calibration inputs. Starts from ``init``'s codes (``v = 0``, clipping factors 1).

    Args:
        init: where the rounding starts: ``"rtn"`` (round to nearest with the weight spec's
            clipping, AutoRound's start), ``"gptq"`` (GPTQ's codes and scales, activation order with
            static groups as ``w4a16-gptq``) or ``"gptaq"`` (GPTQ fitted to the float model's output with each
            block's linears in dependency order, as the ``w4a16-gptaq`` preset; needs ``target="float-model"``).
            The block tuning then refines the start against the block's output (``start`` is the GPTQ spec).
        iters: optimizer steps per block.
        lr: step size of the signed updates, decayed linearly to zero (default ``1 / iters``:
            the offsets can cross their whole range once).
        batch_size: calibration sequences per step.
        tune_clipping: also learn the clipping factors (else only the rounding).
        min_clip: smallest clipping factor.
        seed: mini-batch order.
        target: the block output the tuning fits: ``"quantized-inputs"``, the float block's on the
            quantized model's inputs; or ``"float-model"``, the float model's own (AutoRound's default:
            the block also corrects the error of the blocks before it). The start (``init``) is the same
            either way: ``"gptq"``'s start stays fitted to the quantized inputs (``GPTQSpec.target``'s
            ``"float-model"`` without ``true_sequential`` made SmolLM2 diverge, ``benchmarks/rotation_validation.py``);
            ``"gptaq"``'s is fitted to the float model's.
        compute_dtype: the dtype the block's forward and backward run in during the tuning steps:
            ``"float32"``, or ``"bfloat16"`` (autocast, as AutoRound's default ``amp``; CPUs with AMX or
            AVX-512 BF16 and GPUs run it several times faster). The offsets, clipping factors, loss and the
            keep-the-start check stay float32.
    """

    init: str = "rtn"
    iters: int = 200
    lr: float | None = None
    batch_size: int = 4
    tune_clipping: bool = True
    min_clip: float = 0.5
    seed: int = 0
    target: str = "quantized-inputs"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"signround.compute_dtype={self.compute_dtype!r} must be 'float32' or 'bfloat16'")
        if self.init not in SIGNROUND_STARTS:
            raise RecipeError(f"signround.init={self.init!r} must be one of {', '.join(map(repr, SIGNROUND_STARTS))}")
        if self.init == "gptaq" and self.target != FLOAT_MODEL_TARGET:
            raise RecipeError(f"signround.init='gptaq' fits GPTQ's start to the float model's output, which layer-by-layer "
                              f"calibration computes for target='float-model': set signround.target='float-model' "
                              f"(target is {self.target!r})")
        _positive_int("signround", "iters", self.iters)
        _positive_int("signround", "batch_size", self.batch_size)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RecipeError(f"signround.seed={self.seed!r} must be an integer >= 0")
        if self.lr is not None and not _number("signround", "lr", self.lr) > 0.0:
            raise RecipeError(f"signround.lr={self.lr!r} must be > 0 (or null: 1 / iters)")
        if not 0.0 < _number("signround", "min_clip", self.min_clip) <= 1.0:
            raise RecipeError(f"signround.min_clip={self.min_clip!r} must be in (0, 1]")
        _bool("signround", "tune_clipping", self.tune_clipping)
        _target("signround", self.target)

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters

    @property
    def start(self) -> GPTQSpec | None:
        """The GPTQ run that gives the tuning its first codes (None: round to nearest)."""
        return {"gptq": GPTQ_START, "gptaq": GPTAQ_START}.get(self.init)

    def check(self, recipe: "Recipe") -> None:
        """The rules this spec sets on the rest of ``recipe`` (``RecipeError`` when one fails)."""
        _target_needs_layerwise("signround", self.target, recipe)
        if recipe.weight.dtype is QuantDtype.FP8_E4M3:
            raise RecipeError("recipe.signround learns integer rounding: weight.dtype must be int4 or int8, "
                              "not 'fp8_e4m3'")
        if recipe.weight.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise RecipeError(f"recipe.signround needs per_channel or per_group weights, not "
                              f"{recipe.weight.granularity.value}")
        if not recipe.layerwise:
            raise RecipeError("recipe.signround tunes each decoder block against its float output: it needs "
                              "recipe.layerwise=True")
        if recipe.activation is not None:
            raise RecipeError("recipe.signround is weight-only here (W4A16 / W8A16): the activation "
                              "fake-quantization has no gradient to learn through; set recipe.activation=None")


@dataclass(frozen=True)
class SparseGPTSpec:
    """N:M semi-structured sparsity (2:4 by default: at most ``n`` non-zeros in each run of ``m``
    consecutive input channels of a weight row), pruned and quantized in one sweep.

    ``method="sparsegpt"`` (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot", ICML 2023): columns left to right, each run of ``m`` columns' mask chosen by the
    OBS saliency ``w^2 / [H^-1]_ii`` on the error-updated weights, every column's pruning and rounding
    error spread over the later columns through the inverse Hessian (GPTQ's update). ``"magnitude"``:
    the ``m - n`` smallest ``|w|`` of each run pruned, the rest rounded to nearest (no calibration).

    Args:
        method: ``"sparsegpt"`` or ``"magnitude"``.
        n: non-zeros kept per run.
        m: run length along the input channels; must divide ``block_size`` and every pruned linear's K.
        block_size: columns per lazy batch update (a multiple of ``m``).
        dampening: fraction of the mean Hessian diagonal added to it (raised, and reported, when the
            Hessian is not positive definite).
        min_samples: fewest calibration tokens per linear for a usable Hessian.
    """

    method: str = "sparsegpt"
    n: int = 2
    m: int = 4
    block_size: int = 128
    dampening: float = 0.01
    min_samples: int = 128

    def __post_init__(self):
        if self.method not in ("sparsegpt", "magnitude"):
            raise RecipeError(f"sparsegpt.method={self.method!r} must be 'sparsegpt' or 'magnitude'")
        _positive_int("sparsegpt", "n", self.n)
        _positive_int("sparsegpt", "m", self.m)
        if self.n >= self.m:
            raise RecipeError(f"sparsegpt.n={self.n} must be smaller than sparsegpt.m={self.m} (n non-zeros kept "
                              "in each run of m input channels)")
        _positive_int("sparsegpt", "block_size", self.block_size)
        if self.block_size % self.m:
            raise RecipeError(f"sparsegpt.block_size={self.block_size} must be a multiple of sparsegpt.m={self.m}")
        _positive_int("sparsegpt", "min_samples", self.min_samples)
        if not 0.0 < _number("sparsegpt", "dampening", self.dampening) < 1.0:
            raise RecipeError(f"sparsegpt.dampening={self.dampening!r} must be in (0, 1)")

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def needs_calibration(self) -> bool:
        """SparseGPT needs Hessians; magnitude pruning needs no data (unless the recipe is layer by layer)."""
        return self.method == "sparsegpt"

    def check(self, recipe: "Recipe") -> None:
        """The rules this spec sets on the rest of ``recipe`` (``RecipeError`` when one fails)."""
        w = recipe.weight
        if w.granularity is Granularity.PER_GROUP and w.group_size % self.m:
            raise RecipeError(f"recipe.sparsegpt: weight.group_size={w.group_size} must be a multiple of "
                              f"sparsegpt.m={self.m} (a run of pruned channels may not straddle two scales)")


@dataclass(frozen=True)
class RotationSpec:
    """Rotate the residual stream before quantizing (QuaRot / SpinQuant's offline rotation,
    ``qcompiler.rotate``): a randomized Hadamard ``Q`` folded into the embeddings, the linears that
    write and read the stream and the norms' gains; the float model computes the same function.

    Args:
        seed: the random signs of ``Q`` (``qcompiler.algorithms.hadamard.random_hadamard``).
        online: also rotate the inputs of the linears that write the stream (``o_proj``, ``down_proj``:
            their inputs come through an attention or a gated product, where no rotation folds) by an
            online Hadamard transform ``D`` (``qcompiler::hadamard_transform``, QuaRot's online rotation),
            its transpose folded into their weights' columns: their weights and inputs lose their outlier
            channels too, at the cost of one transform per call.
        per_head: also rotate each attention's values by a randomized Hadamard of the head size, folded offline
            into the value projection's rows and the output linear's columns (SpinQuant's R2; found from the graph,
            ``passes/value_heads.py``): the value rows' (and, for a KV cache, the values') outliers spread within
            each head. No transform at run time.
    """

    seed: int = 0
    online: bool = False
    per_head: bool = False

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RecipeError(f"rotation.seed={self.seed!r} must be an integer >= 0")
        if not isinstance(self.online, bool):
            raise RecipeError(f"rotation.online={self.online!r} must be a bool")
        if not isinstance(self.per_head, bool):
            raise RecipeError(f"rotation.per_head={self.per_head!r} must be a bool")


@dataclass(frozen=True)
class EndToEndSpec:
    """After layer-by-layer calibration, tune the quantized linears' scales end to end, their codes and zero
    points fixed (``qcompiler.calibration.end_to_end``; EfficientQAT's E2E-QP with the float model as teacher):
    Adam on each scale's relative change against the KL divergence of the whole quantized model's next-token
    distribution from the float model's, over the calibration sequences. Kept only when it lowers the KL on a
    probe of those sequences. Weight-only recipes with ``layerwise=True``.

    Args:
        epochs: passes over the calibration sequences (one optimizer step per sequence batch); may be
            fractional (0.5: half of them, in a seeded order).
        lr: Adam's learning rate on the relative scale changes ``d`` (``s = s0 (1 + d)``), cosine-decayed
            to zero.
        compute_dtype: the quantized model's forward and backward during the steps: ``"bfloat16"`` (autocast;
            CPUs with AMX or AVX-512 BF16 and GPUs run it several times faster) or ``"float32"``. The teacher,
            the scales, the loss and the probe stay float32.
        probe: calibration batches (spread over the set) whose mean KL decides whether the tuned scales are kept.
        seed: the order of the sequences.
    """

    epochs: float = 1.0
    lr: float = 1e-3
    compute_dtype: str = "bfloat16"
    probe: int = 8
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < _number("end_to_end", "epochs", self.epochs) <= 100.0:
            raise RecipeError(f"end_to_end.epochs={self.epochs!r} must be in (0, 100]")
        if not 0.0 < _number("end_to_end", "lr", self.lr) < 1.0:
            raise RecipeError(f"end_to_end.lr={self.lr!r} must be in (0, 1)")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"end_to_end.compute_dtype={self.compute_dtype!r} must be 'float32' or 'bfloat16'")
        _positive_int("end_to_end", "probe", self.probe)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RecipeError(f"end_to_end.seed={self.seed!r} must be an integer >= 0")

    def check(self, recipe: "Recipe") -> None:
        if not recipe.layerwise:
            raise RecipeError("recipe.end_to_end tunes the scales layer-by-layer calibration chose: it needs "
                              "recipe.layerwise=True (and a weight algorithm)")
        if recipe.activation is not None:
            raise RecipeError("recipe.end_to_end is weight-only here (W4A16 / W8A16): the tuning does not model "
                              "quantized activations; set recipe.activation=None or end_to_end=None")


@dataclass(frozen=True)
class KVCacheSpec:
    """How the attention's key / value cache is quantized: the keys and values each attention writes
    are quantized where they enter the cache (after RoPE), so every later read sees what a cache
    holding this format gives back.

    Args:
        dtype: int8, fp8_e4m3 or int4.
        key: the keys' scale granularity: per_tensor, per_head (one scale per KV head),
            per_channel (per head and channel: keys have outlier channels) — static scales from
            calibration — per_token (per token and head, computed as each token is written), or
            per_group (per head and channel, one scale per block of ``group_size`` consecutive
            positions, computed from the block's own range when its first token leaves the residual
            window: KIVI's keys; it follows the keys as RoPE turns them, which a static per-channel
            range calibrated on shorter text does not).
        value: the values' granularity, the same choices (per_token is KIVI's choice for values).
        symmetric: zero-point 0 when True; integer zero-points otherwise (int8 / int4 only).
        residual_window: the most recent tokens kept in full precision (KIVI's residual): a query
            reads the keys and values of its last ``residual_window`` positions (itself included)
            unquantized, older ones quantized; 0 quantizes every cached token.
        group_size: positions per block of the per_group scales (blocks start at position 0);
            at most ``residual_window``, so a block is complete before any of its tokens is quantized.
        rotate: multiply each head's keys and values by one orthogonal matrix (a randomized Hadamard
            of order head_dim, seed 0) before quantizing them, and by its transpose on read: attention
            scores and outputs are unchanged in exact arithmetic, while a channel outlier is spread
            over the head (QuaRot's / ModelOpt's rotated KV). Scales come from the rotated values.
        center: subtract each head and channel's calibrated mid-range ``(min + max) / 2`` (before the
            rotation, when both are set) before quantizing, and add it back on read, so the codes
            spend their range on the deviation from a channel's constant offset (an affine KV cache);
            needs calibration whatever the scales' granularity.
    """

    dtype: QuantDtype = QuantDtype.INT8
    key: Granularity = Granularity.PER_HEAD
    value: Granularity = Granularity.PER_HEAD
    symmetric: bool = True
    residual_window: int = 0
    group_size: int = 0
    rotate: bool = False
    center: bool = False

    #: the granularities a KV cache supports (per_group has no meaning for a cache)
    GRANULARITIES: ClassVar[tuple[Granularity, ...]] = (Granularity.PER_TENSOR, Granularity.PER_HEAD,
                                                         Granularity.PER_CHANNEL, Granularity.PER_TOKEN,
                                                         Granularity.PER_GROUP)
    #: the granularities whose scales are computed as the cache is written (no calibration)
    DYNAMIC: ClassVar[tuple[Granularity, ...]] = (Granularity.PER_TOKEN, Granularity.PER_GROUP)

    def __post_init__(self):
        object.__setattr__(self, "dtype", _choice("kv_cache", "dtype", self.dtype, QuantDtype))
        for name in ("key", "value"):
            object.__setattr__(self, name, _choice("kv_cache", name, getattr(self, name), Granularity,
                                                   self.GRANULARITIES))
        _bool("kv_cache", "symmetric", self.symmetric)
        _bool("kv_cache", "rotate", self.rotate)
        _bool("kv_cache", "center", self.center)
        if isinstance(self.residual_window, bool) or not isinstance(self.residual_window, int) \
                or self.residual_window < 0:
            raise RecipeError(f"kv_cache.residual_window={self.residual_window!r} must be an integer >= 0 (tokens)")
        if not self.symmetric and self.dtype is QuantDtype.FP8_E4M3:
            raise RecipeError("kv_cache.symmetric=False is not supported for dtype 'fp8_e4m3'; "
                              "expected symmetric=True")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise RecipeError(f"kv_cache.group_size={self.group_size!r} must be an integer >= 0 (positions)")
        grouped = [r for r in ("key", "value") if getattr(self, r) is Granularity.PER_GROUP]
        if grouped and not self.group_size:
            raise RecipeError(f"kv_cache.{grouped[0]}='per_group' needs kv_cache.group_size > 0 (positions per block)")
        if self.group_size and not grouped:
            raise RecipeError(f"kv_cache.group_size={self.group_size} is set, but neither kv_cache.key nor "
                              "kv_cache.value is 'per_group'; set group_size=0")
        if grouped and self.group_size > self.residual_window:
            raise RecipeError(f"kv_cache.{grouped[0]}='per_group' takes each block's scales from the whole block, "
                              f"so its first token may leave the full-precision window only once the block is "
                              f"complete: kv_cache.group_size={self.group_size} must be <= "
                              f"kv_cache.residual_window={self.residual_window}")

    def is_static(self, role: str) -> bool:
        """Whether the ``role`` ('key' or 'value') scales come from calibration."""
        return getattr(self, role) not in self.DYNAMIC

    @property
    def static(self) -> bool:
        """Whether the cache needs calibration: a scale from it (every granularity but per_token /
        per_group) or the ``center`` offsets."""
        return self.center or self.is_static("key") or self.is_static("value")

    def describe(self) -> str:
        sym = "" if self.symmetric else " asymmetric"
        window = f", last {self.residual_window} tokens in full precision" if self.residual_window else ""
        transform = ", ".join(w for w, on in (("rotated per head", self.rotate), ("centered per channel", self.center))
                              if on)

        def what(g: Granularity) -> str:
            return f"per_group ({self.group_size} positions)" if g is Granularity.PER_GROUP else g.value
        return (f"{self.dtype.value}{sym}{' ' + transform if transform else ''}: keys {what(self.key)}, "
                f"values {what(self.value)}{window}")


@dataclass(frozen=True)
class FallbackSpec:
    """Which linears stay in high precision.

    Args:
        keep_op_kinds: op kinds never quantized (see ``OP_KINDS``); ``output_head`` is the
            linear that produces the graph's output (the LM head), ``router`` a mixture-of-experts
            router (a linear whose output reaches a ``topk``), both found from the graph; ``experts``
            fused mixture-of-experts weights (``qcompiler.runtime.fused_experts``). Embedding
            tables stay in float unless ``Recipe.embedding`` is set, which quantizes them whatever
            this says (``keep_modules`` still keeps one).
        keep_modules: ``fnmatch`` globs on module paths kept in high precision.
        min_sqnr_db: a linear whose quantized output SQNR on calibration data is below this
            stays high precision (worst first), up to ``max_fraction`` of the quantizable linears.
        max_fraction: cap on the share of linears the sensitivity rule may keep in float.
    """

    keep_op_kinds: tuple[str, ...] = ("embedding", "norm", "output_head", "router")
    keep_modules: tuple[str, ...] = ()
    min_sqnr_db: float | None = None
    max_fraction: float = 0.1

    def __post_init__(self):
        kinds = _strings("fallback", "keep_op_kinds", self.keep_op_kinds)
        bad = [k for k in kinds if k not in OP_KINDS]
        if bad:
            raise RecipeError(f"fallback.keep_op_kinds has {bad!r}; expected a subset of {list(OP_KINDS)}")
        object.__setattr__(self, "keep_op_kinds", kinds)
        object.__setattr__(self, "keep_modules", _strings("fallback", "keep_modules", self.keep_modules))
        _number("fallback", "min_sqnr_db", self.min_sqnr_db, optional=True)
        if not 0.0 <= _number("fallback", "max_fraction", self.max_fraction) <= 1.0:
            raise RecipeError(f"fallback.max_fraction={self.max_fraction!r} must be in [0, 1]")

    def keeps(self, op_kind: str, fqn: str) -> str:
        """Why the op-kind and module-path rules keep ``fqn`` in high precision ("" if they do not)."""
        if op_kind in self.keep_op_kinds:
            return f"op kind {op_kind!r} is in fallback.keep_op_kinds"
        glob = next((g for g in self.keep_modules if fnmatch.fnmatchcase(fqn, g)), None)
        return f"module path matches fallback.keep_modules glob {glob!r}" if glob is not None else ""


@dataclass(frozen=True)
class Recipe:
    """A complete quantization recipe.

    Args:
        name: a label saved with artifacts and shown in reports.
        weight: weight quantization.
        activation: activation quantization; None means weight-only (e.g. W8A16).
        smoothquant: SmoothQuant settings; needs ``activation``.
        fallback: which linears stay high precision.
        samples_per_layer: calibration rows kept per linear input for searches and SQNR.
        layerwise: calibrate one decoder block at a time, each block fed the outputs of the
            already-quantized blocks before it (GPTQ / AWQ; bounded calibration memory).
        weight_algorithm: the weight algorithm, by its spec: ``GPTQSpec`` (int8, int4 or fp8 weights, any
            granularity), ``AWQSpec`` (integer weights; exclusive with ``smoothquant``) or the spec of one
            registered with ``qcompiler.algorithms.registry.register_weight_algorithm`` (a third party's).
            None quantizes the weights by round-to-nearest. One slot, so one weight algorithm per recipe.
        kv_cache: quantize the keys and values the attentions cache (``KVCacheSpec``), found from the
            graph; composes with any weight format. None keeps the cache in float.
        embedding: quantize the token-embedding tables (an ``embedding`` read of a parameter in the
            graph) by round-to-nearest with this spec: one scale per row (``per_channel``), per group of
            ``group_size`` along the row, or per tensor; int8, int4 or fp8_e4m3. Only the rows a call
            gathers are dequantized. None keeps them in float; ``fallback.keep_modules`` globs apply.
        rotation: rotate the residual stream first (``RotationSpec``; ``qcompiler.quantize`` applies it
            to the model's weights before calibrating; a ``torch.compile`` backend needs the model
            rotated beforehand with ``qcompiler.rotate``). None: no rotation.
        end_to_end: after layer-by-layer calibration, tune the quantized weights' scales against the float
            model's next-token distribution (``EndToEndSpec``); weight-only recipes with ``layerwise=True``.
            None: the layer-by-layer scales stay.
    """

    VERSION: ClassVar[int] = 2     # 2: GPTQ / AWQ in weight_algorithm (version 1's "gptq" / "awq" keys still read)

    name: str = "custom"
    weight: WeightSpec = field(default_factory=WeightSpec)
    activation: ActivationSpec | None = None
    smoothquant: SmoothQuantSpec | None = None
    fallback: FallbackSpec = field(default_factory=FallbackSpec)
    samples_per_layer: int = 1024
    layerwise: bool = False
    weight_algorithm: Any = None
    embedding: WeightSpec | None = None
    kv_cache: KVCacheSpec | None = None
    rotation: RotationSpec | None = None
    end_to_end: EndToEndSpec | None = None

    def __post_init__(self):
        spec = self.weight_algorithm
        if spec is not None and type(spec) not in ALGORITHM_SPECS.values():
            raise RecipeError(f"recipe.weight_algorithm is a {type(spec).__name__}, which no weight algorithm is "
                              f"registered for (qcompiler.algorithms.registry.register_weight_algorithm); registered: "
                              f"{sorted(ALGORITHM_SPECS)}")
        for name, typ in (("weight", WeightSpec), ("fallback", FallbackSpec)):
            if not isinstance(getattr(self, name), typ):
                raise RecipeError(f"recipe.{name} must be a {typ.__name__}, got {type(getattr(self, name)).__name__}")
        if self.activation is not None and not isinstance(self.activation, ActivationSpec):
            raise RecipeError(f"recipe.activation must be an ActivationSpec or None, got {type(self.activation).__name__}")
        if self.smoothquant is not None and not isinstance(self.smoothquant, SmoothQuantSpec):
            raise RecipeError("recipe.smoothquant must be a SmoothQuantSpec or None")
        if self.activation is not None:
            if self.weight.dtype is QuantDtype.INT8 and self.activation.dtype is QuantDtype.FP8_E4M3:
                raise RecipeError("weight.dtype='int8' with activation.dtype='fp8_e4m3' is not supported; "
                                  "use weight dtype 'fp8_e4m3'")
            if self.weight.dtype is QuantDtype.FP8_E4M3 and self.activation.dtype is QuantDtype.INT8:
                raise RecipeError("weight.dtype='fp8_e4m3' with activation.dtype='int8' is not supported; "
                                  "use activation dtype 'fp8_e4m3'")
            if self.weight.granularity is Granularity.PER_GROUP and self.weight.dtype is not QuantDtype.INT4:
                raise RecipeError("weight.granularity='per_group' with activation quantization needs "
                                  "weight.dtype='int4'")
        if self.embedding is not None and not isinstance(self.embedding, WeightSpec):
            raise RecipeError(f"recipe.embedding must be a WeightSpec or None, got {type(self.embedding).__name__}")
        if self.kv_cache is not None and not isinstance(self.kv_cache, KVCacheSpec):
            raise RecipeError(f"recipe.kv_cache must be a KVCacheSpec or None, got {type(self.kv_cache).__name__}")
        if self.rotation is not None and not isinstance(self.rotation, RotationSpec):
            raise RecipeError(f"recipe.rotation must be a RotationSpec or None, got {type(self.rotation).__name__}")
        _bool("recipe", "layerwise", self.layerwise)
        if self.end_to_end is not None and not isinstance(self.end_to_end, EndToEndSpec):
            raise RecipeError(f"recipe.end_to_end must be an EndToEndSpec or None, got {type(self.end_to_end).__name__}")
        if self.layerwise and self.weight_algorithm_spec is None:
            raise RecipeError("recipe.layerwise=True needs a weight algorithm (recipe.weight_algorithm: GPTQ, AWQ or "
                              "a registered one; RTN and SmoothQuant do not propagate quantized outputs)")
        if self.layerwise and self.smoothquant is not None:
            raise RecipeError("recipe.layerwise=True with recipe.smoothquant: layer-by-layer calibration quantizes "
                              "each block before the SmoothQuant pass picks its scales, so GPTQ would not see the "
                              "smoothed weights; set layerwise=False (GPTQ then uses whole-model Hessians)")
        if not isinstance(self.samples_per_layer, int) or self.samples_per_layer < 16:
            raise RecipeError(f"recipe.samples_per_layer={self.samples_per_layer!r} must be an integer >= 16")
        if not isinstance(self.name, str):
            raise RecipeError(f"recipe.name={self.name!r} must be a string")
        # each spec's rules on the rest of the recipe live beside it (a registered spec may define one too)
        for spec in (self.smoothquant, self.weight_algorithm, self.end_to_end):
            check = getattr(spec, "check", None)
            if callable(check):
                check(self)

    @property
    def weight_algorithm_spec(self) -> Any:
        """``weight_algorithm``: the spec ``qcompiler.algorithms.registry`` dispatches on, None for
        round-to-nearest."""
        return self.weight_algorithm

    @property
    def gptq(self) -> GPTQSpec | None:
        """``weight_algorithm`` when it is GPTQ, else None (read-only shorthand)."""
        return self.weight_algorithm if isinstance(self.weight_algorithm, GPTQSpec) else None

    @property
    def awq(self) -> AWQSpec | None:
        """``weight_algorithm`` when it is AWQ, else None (read-only shorthand)."""
        return self.weight_algorithm if isinstance(self.weight_algorithm, AWQSpec) else None

    @property
    def calibration_required_by(self) -> tuple[str, ...]:
        """What in the recipe cannot run without calibration data: static activation scales,
        SmoothQuant, AWQ, and GPTQ unless ``gptq.optional``. Empty when the quantized format is
        calibration-free (dynamic or no activation quantization, weights by round-to-nearest)."""
        users = []
        if self.activation is not None and not self.activation.dynamic:
            users.append("static activation scales")
        if self.smoothquant is not None:
            users.append("SmoothQuant")
        if self.kv_cache is not None and self.kv_cache.static:
            users.append("static KV-cache scales")
        if self.awq is not None:
            users.append("AWQ")
        elif self.gptq is not None:
            if not self.gptq.optional:
                users.append("GPTQ")
        elif self.weight_algorithm is not None and getattr(self.weight_algorithm, "needs_calibration", True):
            users.append(type(self.weight_algorithm).__name__)
        return tuple(users)

    @property
    def requires_calibration(self) -> bool:
        """Whether the recipe cannot run without calibration data (``calibration_required_by``)."""
        return bool(self.calibration_required_by)

    @property
    def linears_require_calibration(self) -> bool:
        """Whether the linears' plan cannot run without statistics of their inputs: what
        ``calibration_required_by`` lists but for the KV cache's scales (observed on their own)."""
        return any(u != "static KV-cache scales" for u in self.calibration_required_by)

    @property
    def needs_calibration(self) -> bool:
        """Whether the linears' plan reads statistics of their inputs: ``linears_require_calibration``,
        optional GPTQ (``gptq.optional``) or the sensitivity fallback (``fallback.min_sqnr_db``); the
        last two are skipped with a warning when no calibration data is given."""
        return self.linears_require_calibration or self.gptq is not None or self.fallback.min_sqnr_db is not None

    # -- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = _to_plain(self)
        if self.weight_algorithm is not None:   # the spec, tagged with its type
            data["weight_algorithm"] = {"type": type(self.weight_algorithm).__name__, "data": data["weight_algorithm"]}
        return {"type": type(self).__name__, "version": self.VERSION, "data": data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if not isinstance(d, dict) or set(d) != {"type", "version", "data"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise RecipeError(f"a recipe dict must have exactly the keys 'type', 'version' and 'data', got {got}")
        if d["type"] != cls.__name__:
            raise RecipeError(f"recipe type {d['type']!r} is unknown; expected {cls.__name__!r}")
        data = d["data"]
        if d["version"] == 1 and isinstance(data, dict):     # version 1 kept GPTQ / AWQ in fields of their own
            data = _version1_algorithms(data)
        elif d["version"] != cls.VERSION:
            raise RecipeError(f"recipe version {d['version']!r} does not match this qcompiler's "
                              f"version {cls.VERSION}")
        return _from_plain(cls, data, "recipe")

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kw))

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe JSON does not parse: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def _version1_algorithms(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 recipe's data with its ``gptq`` / ``awq`` objects moved into ``weight_algorithm``."""
    data = dict(data)
    given = [(key, data.pop(key)) for key in ("gptq", "awq") if data.get(key) is not None]
    data.pop("gptq", None), data.pop("awq", None)
    if data.get("weight_algorithm") is not None:
        given.append(("weight_algorithm", data["weight_algorithm"]))
    if len(given) > 1:
        raise RecipeError(f"recipe (version 1) sets {' and '.join(k for k, _ in given)}: one weight algorithm "
                          "per recipe; choose one")
    if given and given[0][0] != "weight_algorithm":
        key, value = given[0]
        data["weight_algorithm"] = {"type": "GPTQSpec" if key == "gptq" else "AWQSpec", "data": value}
    return data


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _from_plain(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where} has unknown keys {unknown}; expected keys from {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        if cls is Recipe and name == "weight_algorithm":
            kwargs[name] = _algorithm_spec(value, f"{where}.{name}")
            continue
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}") from None


def _convert(hint: Any, value: Any, where: str):
    """``value`` read from JSON as the field type ``hint``: nested specs built, lists made tuples,
    and JSON's other types checked (no "false" or 0 for a bool, no 64.0, true or "64" for an int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    expected = _JSON_TYPES.get(hint)
    if expected is not None:
        kinds, label = expected
        if isinstance(value, bool) is not (hint is bool) or not isinstance(value, kinds):
            raise RecipeError(f"{where}={_as_json(value)} must be {label}, got {_json_type(value)}")
    return value


# field type -> (JSON values accepted for it, what the message asks for); true / false only for a bool field
_JSON_TYPES = {bool: (bool, "a bool (true or false)"), int: (int, "an integer"),
               float: ((int, float), "a number"), str: (str, "a string")}


def _json_type(value: Any) -> str:
    names = {bool: "a bool", int: "an integer", float: "a float", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# ---- weight-algorithm specs -------------------------------------------------------------------

#: spec types a weight algorithm is registered for, by class name (``Recipe.weight_algorithm`` JSON);
#: filled by ``qcompiler.algorithms.registry.register_weight_algorithm``
ALGORITHM_SPECS: dict[str, type] = {"GPTQSpec": GPTQSpec, "AWQSpec": AWQSpec, "SignRoundSpec": SignRoundSpec}


def register_algorithm_spec(spec_type: type) -> None:
    """Make ``spec_type`` a valid ``Recipe.weight_algorithm`` that JSON finds by its class name."""
    if not (isinstance(spec_type, type) and dataclasses.is_dataclass(spec_type)
            and spec_type.__dataclass_params__.frozen):
        raise TypeError(f"a weight-algorithm spec must be a frozen dataclass type, got {spec_type!r}")
    taken = ALGORITHM_SPECS.get(spec_type.__name__)
    if taken is not None and taken is not spec_type:
        raise ValueError(f"another weight-algorithm spec is registered as {spec_type.__name__!r} ({taken!r})")
    ALGORITHM_SPECS[spec_type.__name__] = spec_type


def _algorithm_spec(value: Any, where: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"type", "data"}:
        raise RecipeError(f"{where} must be null or an object with the keys 'type' and 'data'")
    spec_type = ALGORITHM_SPECS.get(value["type"])
    if spec_type is None:
        raise RecipeError(f"{where}: unknown weight-algorithm spec {value['type']!r}; registered: "
                          f"{sorted(ALGORITHM_SPECS)} (import the module that registers it before loading)")
    return _from_plain(spec_type, value["data"], where)
