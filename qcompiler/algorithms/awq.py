"""AWQ: activation-aware weight scaling and clipping searches, as pure functions.

AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", MLSys 2024, arXiv:2306.00978) protects the weights that
meet large activations: input channel j of every linear reading the same activation is
multiplied by ``s_j`` before quantization and the activation divided by ``s_j`` (folded into
the preceding norm or linear), so ``x W^T = (x / s) (W s)^T`` in float while the quantized
``(x / s) Q(W s)^T`` loses less on the salient channels.

Following mit-han-lab/llm-awq (``awq/quantize/auto_scale.py``: ``_search_module_scale``;
``awq/quantize/auto_clip.py``: ``auto_clip_layer``) and llm-compressor's ``AWQModifier``
(``modifiers/awq/base.py``: ``_compute_best_scale``, ``duo_scaling``):

- ``awq_search_scales``: ``s = x_mean^a`` (``x_mean`` = mean |x| per input channel; with
  duo scaling ``x_mean^a / w_mean^(1-a)``, ``w_mean`` = mean over output rows of |w|
  normalized by its group's max), clamped at 1e-4 and divided by ``sqrt(max(s) min(s))``;
  ``a`` on ``{0, 1/grid, ..., (grid-1)/grid}``; the ``a`` of least output MSE wins
  (ties keep the smaller ``a``, so without duo scaling the result is never worse than
  round-to-nearest on the rows searched: ``a = 0`` gives ``s = 1``).
- ``awq_search_clip``: per output channel and group, the clipping threshold
  ``absmax * (1 - i/grid)``, ``i < max_shrink * grid``, of least MSE of the group's partial
  output ``x_g w_g^T`` on sampled tokens. Run it on the scaled problem
  (``awq_search_clip(x / s, w * s, ...)``), as llm-awq does after applying the scales.

The quantizer is ours throughout (``layer_quant.quantize_weight``: ONNX layout, symmetric
int4 in [-8, 7] with scale absmax/7, or uint4 with integer zero-points), so the searched
error is the error of the weights that are stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qcompiler.core import numerics
from qcompiler.errors import CalibrationError, UnsupportedError
from qcompiler.algorithms.gptq import _one_thread
from qcompiler.core.layer_quant import QuantizedWeight, quantize_weight, weight_qdtype
from qcompiler.recipes import AWQSpec, Granularity, WeightSpec
from qcompiler.algorithms.registry import WeightAlgorithm, register_weight_algorithm

__all__ = ["AWQScaleInfo", "awq_search_scales", "awq_search_clip", "quantize_with_clip"]

log = logging.getLogger(__name__)

#: ``forward(x, weights) -> output``: the output whose error the scale search minimizes.
Forward = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class AWQScaleInfo:
    """The scale search's trace: each grid ``alpha`` and its output MSE; the chosen one."""

    alpha: float
    loss: float
    alphas: tuple[float, ...]
    losses: tuple[float, ...]
    duo_scaling: bool


def _rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] != k:
        raise CalibrationError(f"{what}: input rows must have {k} features, got shape {tuple(x.shape)}")
    x = x.detach().reshape(-1, k).float()
    if x.shape[0] == 0:
        raise CalibrationError(f"{what}: no calibration rows")
    if not torch.isfinite(x).all():
        raise CalibrationError(f"{what}: calibration rows contain NaN or Inf")
    return x


def _strided(x: torch.Tensor, max_rows: int | None) -> torch.Tensor:
    if max_rows is None or x.shape[0] <= max_rows:
        return x
    return x[:: -(-x.shape[0] // max_rows)]


def _weight_mean(weights: Sequence[torch.Tensor], spec: WeightSpec) -> torch.Tensor:
    """Mean over all output rows of |w| / (its group's max |w|), per input channel [K]."""
    w = torch.cat([wi.float() for wi in weights], dim=0).abs()
    n, k = w.shape
    g = spec.group_size if spec.granularity is Granularity.PER_GROUP else k
    groups = -(-k // g)
    wg = torch.nn.functional.pad(w, (0, groups * g - k)).view(n, groups, g)
    wg = wg / (wg.amax(-1, keepdim=True) + 1e-6)
    return wg.reshape(n, groups * g)[:, :k].mean(0)


def _fake_quant_scaled(w: torch.Tensor, s: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """``Q(w * s) / s``: the float weight the scaled, quantized linear applies to ``x``."""
    return quantize_weight(w * s, spec).dequantize() / s


def awq_search_scales(x_samples: torch.Tensor, weights: Sequence[torch.Tensor], spec: WeightSpec, *,
                      grid: int = 20, duo_scaling: bool = False, forward: Forward | None = None,
                      max_rows: int | None = 4096, layer_name: str = "?"
                      ) -> tuple[torch.Tensor, AWQScaleInfo]:
    """Search AWQ's per-input-channel scales for linears that read the same input.

    Args:
        x_samples: calibration rows of the shared input, [..., K].
        weights: the float weights [N_i, K] of the linears reading it (e.g. q, k, v).
        spec: the weight quantization the scales are searched for.
        grid: number of ``alpha`` values, ``alpha = i / grid`` for ``i < grid``.
        duo_scaling: divide by ``w_mean^(1 - alpha)`` too (llm-compressor's duo scaling).
        forward: ``forward(x, weights) -> output`` to compare instead of the concatenated
            linear outputs (e.g. a whole MLP); called with the float weights for the
            reference and with ``Q(w s) / s`` for each candidate.
        max_rows: rows (evenly strided) used for the loss; ``x_mean`` uses all rows. Without
            ``forward`` the loss is computed as ``sum(dW (x^T x) * dW) / (rows * N)`` with
            ``dW = W - Q(W s) / s``: the mean squared output error, at a cost independent of
            the rows after one Gram matrix.
        layer_name: used in errors.

    Returns:
        ``(s [K] float32, AWQScaleInfo)``. Apply as ``w * s[None, :]`` for every weight and
        divide the preceding op's output by ``s``.
    """
    if not weights:
        raise ValueError("awq_search_scales: weights is empty")
    if not isinstance(grid, int) or grid <= 0:
        raise ValueError(f"awq_search_scales: grid={grid!r} must be a positive integer")
    k = weights[0].shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"awq_search_scales: {layer_name}: every weight must be [N, {k}], got "
                             f"{[tuple(wi.shape) for wi in weights]}")
    x = _rows(x_samples, k, f"{layer_name} (AWQ)").to(weights[0].device)   # the samples meet the weights
    x_mean = x.abs().mean(0)
    x = _strided(x, max_rows)
    weights = [w.detach().float() for w in weights]
    w_mean = _weight_mean(weights, spec) if duo_scaling else None

    with torch.no_grad(), _one_thread():   # see gptq._one_thread: mid-size ops, shared cores
        if forward is None:
            # ||x dW^T||^2 = sum(dW (x^T x) * dW): one [K, K] Gram instead of a GEMM over rows per alpha
            gram = x.T @ x
            denominator = x.shape[0] * sum(w.shape[0] for w in weights)
        else:
            reference = forward(x, weights).float()
        alphas = tuple(i / grid for i in range(grid))
        losses: list[float] = []
        best, best_loss, best_scales = 0.0, float("inf"), torch.ones(k, device=x.device)
        for alpha in alphas:
            s = x_mean.pow(alpha)
            if w_mean is not None:
                s = s / (w_mean.pow(1.0 - alpha) + 1e-4)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
            effective = [_fake_quant_scaled(w, s, spec) for w in weights]
            if forward is None:
                loss = sum(float(((w - e) @ gram).mul_(w - e).double().sum()) for w, e in zip(weights, effective))
                loss /= denominator
            else:
                loss = float((forward(x, effective).float() - reference).double().pow(2).mean())
            losses.append(loss)
            if loss < best_loss:
                best, best_loss, best_scales = alpha, loss, s
    log.debug("awq scales %s: alpha %.2f loss %.4g (alpha 0: %.4g)", layer_name, best, best_loss, losses[0])
    return best_scales.float(), AWQScaleInfo(best, best_loss, alphas, tuple(losses), duo_scaling)


def _group_size(spec: WeightSpec, k: int, what: str) -> int:
    if spec.granularity is Granularity.PER_GROUP:
        return spec.group_size
    if spec.granularity is Granularity.PER_CHANNEL:
        return k
    raise UnsupportedError(f"{what}: AWQ clipping needs per_channel or per_group weights, "
                           f"got {spec.granularity.value!r}")


def _clipped_params(w: torch.Tensor, max_val: torch.Tensor, spec: WeightSpec, g: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """Clamp ``w`` to ``+-max_val`` (per [N, G] group) and choose scales for the clamped range."""
    n, k = w.shape
    bound = numerics.expand_blocks(max_val, w, g)
    wc = torch.maximum(torch.minimum(w, bound), -bound)
    qdtype = weight_qdtype(spec)
    if spec.symmetric:
        scale, zero = numerics.choose_scale(max_val, qdtype)
    else:
        groups = max_val.shape[1]
        padded = torch.nn.functional.pad(wc, (0, groups * g - k)).view(n, groups, g)
        scale, zero = numerics.choose_scale(max_val, qdtype, minimum=padded.amin(-1),
                                            maximum=padded.amax(-1), symmetric=False)
    return wc, scale, zero, qdtype


def quantize_with_clip(w: torch.Tensor, max_val: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    """Quantize ``w`` [N, K] clamped to ``+-max_val`` [N, G] (from ``awq_search_clip``).

    Symmetric: ``scale = max_val / qmax``; asymmetric: the scale and zero-point cover the
    clamped group's ``[min, max]``. With ``max_val`` = the groups' max |w| this is exactly
    ``quantize_weight`` with the minmax calibrator (clipping takes the calibrator's place).
    """
    w = w.detach().float()
    g = _group_size(spec, w.shape[1], "quantize_with_clip")
    groups = -(-w.shape[1] // g)
    if tuple(max_val.shape) != (w.shape[0], groups):
        raise ValueError(f"quantize_with_clip: max_val must have shape ({w.shape[0]}, {groups}), "
                         f"got {tuple(max_val.shape)}")
    wc, scale, zero, qdtype = _clipped_params(w, max_val.float(), spec, g)
    block = g if spec.granularity is Granularity.PER_GROUP else None
    q = numerics.quantize(wc, scale, zero, qdtype, block_size=g)
    return QuantizedWeight(q, scale, None if zero is None else zero.to(numerics.STORAGE_DTYPE[qdtype]),
                           numerics.storage_name(qdtype), block, spec.reduce_range)


def awq_search_clip(x_samples: torch.Tensor, w: torch.Tensor, spec: WeightSpec, *, grid: int = 20,
                    max_shrink: float = 0.5, n_sample_tokens: int | None = 4096, layer_name: str = "?"
                    ) -> torch.Tensor:
    """Per output channel and group, the clipping threshold of least partial-output error.

    Args:
        x_samples: calibration rows of the linear's input [..., K] (already divided by the
            AWQ scales when those are applied).
        w: the float weight [N, K] (already multiplied by the AWQ scales).
        spec: per_channel or per_group weight quantization (last group may be partial).
        grid, max_shrink: candidates ``absmax * (1 - i / grid)`` for ``i < max_shrink * grid``.
        n_sample_tokens: rows used, evenly strided as in llm-awq (None: all). The errors come
            from the diagonal [g, g] blocks of ``x^T x``, so rows cost only that product
            (llm-awq forms the elementwise products and keeps 512 tokens).

    Returns:
        ``max_val`` [N, G] float32 (G = 1 per-channel), for ``quantize_with_clip``. Each
        group's error ``mean_t (x_tg w_g^T - x_tg Q(w_g)^T)^2`` is never above that of
        ``max_val = absmax`` (no clipping), which is in the grid.
    """
    if w.dim() != 2:
        raise ValueError(f"awq_search_clip: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not isinstance(grid, int) or grid <= 0 or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"awq_search_clip: grid={grid!r} must be a positive integer and "
                         f"max_shrink={max_shrink!r} in [0, 1)")
    n, k = w.shape
    g = _group_size(spec, k, f"awq_search_clip {layer_name}")
    groups = -(-k // g)
    w = w.detach().float()
    x = _rows(x_samples, k, f"{layer_name} (AWQ clip)").to(w.device)
    x = _strided(x, n_sample_tokens)
    # per group j the partial-output error is mean_t (x_tj dw_j^T)^2 = dw_j G_j dw_j^T / T with
    # G_j = x_j^T x_j: the diagonal blocks of the Gram matrix, [G, g, g]
    x_g = torch.nn.functional.pad(x, (0, groups * g - k)).view(-1, groups, g).transpose(0, 1)  # [G, T, g]
    gram = torch.bmm(x_g.transpose(1, 2), x_g) / x.shape[0]

    def group_errors(wq: torch.Tensor) -> torch.Tensor:                                    # [N, G]
        d = torch.nn.functional.pad(wq - w, (0, groups * g - k)).view(n, groups, g).transpose(0, 1)
        return (torch.bmm(d, gram) * d).sum(-1).T

    with torch.no_grad(), _one_thread():
        absmax = torch.nn.functional.pad(w.abs(), (0, groups * g - k)).view(n, groups, g).amax(-1)
        best = absmax.clone()
        best_err = torch.full_like(absmax, float("inf"))
        for i in range(max(1, int(max_shrink * grid))):
            max_val = absmax * (1.0 - i / grid)
            wc, scale, zero, qdtype = _clipped_params(w, max_val, spec, g)
            wq = numerics.dequantize(numerics.quantize(wc, scale, zero, qdtype, block_size=g), scale, zero,
                                     block_size=g)
            err = group_errors(wq)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, max_val, best)
    return best.float()


# ---- the weight algorithm of AWQSpec --------------------------------------------------------

def _input_scale(st, weights: Sequence[torch.Tensor], recipe, spec: AWQSpec, name: str) -> tuple[float, torch.Tensor]:
    """AWQ's per-input-channel scale for the linears reading one input (``awq_search_scales``)."""
    x = st.samples[: spec.samples].float()
    s, info = awq_search_scales(x, [w.float() for w in weights], recipe.weight, grid=spec.grid,
                                duo_scaling=spec.duo_scaling, layer_name=name)
    return info.alpha, s


def _quantize_linear(fqn: str, w: torch.Tensor, st, recipe, spec: AWQSpec) -> tuple[QuantizedWeight, str]:
    """The scaled weight clipped by ``awq_search_clip`` (round-to-nearest without the clip search or data)."""
    if not spec.clip_search or st is None:
        return quantize_weight(w, recipe.weight), "rtn"
    x = st.samples[: spec.samples].float()
    max_val = awq_search_clip(x, w, recipe.weight, grid=spec.clip_grid, max_shrink=spec.max_shrink, layer_name=fqn)
    return quantize_with_clip(w, max_val, recipe.weight), "awq scales + clip search"


register_weight_algorithm(WeightAlgorithm("awq", AWQSpec, _quantize_linear, input_scale=_input_scale))
