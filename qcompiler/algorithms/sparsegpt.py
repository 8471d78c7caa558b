"""N:M semi-structured pruning (2:4 by default) with or without quantization: SparseGPT and magnitude.

SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, arXiv:2301.00774) is GPTQ's column sweep with a pruning step: at the first column
of each run of ``m`` input channels it keeps, in every output row, the ``n`` weights of largest OBS
saliency ``w_j^2 / [H^-1]_jj`` (on the error-updated weights; ``[H^-1]_jj`` of the columns not yet reached
is the squared diagonal of the upper Cholesky factor of H^-1, which the reference divides by), sets the others to 0, rounds
the kept ones when a quantization spec is given, and spreads every column's error over the columns not
yet reached (``qcompiler.algorithms.gptq``'s update, same factor, same lazy blocks). This follows the
reference implementation (IST-DASLab/sparsegpt ``sparsegpt.py``: ``SparseGPT.fasterprune`` with
``prunen``/``prunem``), as llm-compressor's ``SparseGPTModifier`` does for N:M.

Where we differ, and why:

- Scales of a quantized sweep are chosen from weights with the pruned ones already zeroed (a range
  spent on values that are pruned is wasted): per-tensor / per-channel scales up front from the
  original weights under the saliency mask of the first column's factor, per-group scales when the
  sweep reaches a group, from its current weights under their current saliency mask. With H = I
  (every saliency is |w|) the result is therefore ``quantize_weight`` of the magnitude-pruned weight,
  bit for bit, the way GPTQ with H = I is round to nearest.
- Ties in a run (equal saliency) prune the lower input channel first (a stable sort), in both methods.
- 0 is exact in every format (symmetric integers and FP8 code it as 0, asymmetric integers as the
  integer zero point), so a pruned weight dequantizes to exactly 0 and the N:M pattern survives.

Output rows are independent given H, as in GPTQ.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from qcompiler.core import numerics
from qcompiler.core.layer_quant import QuantizedWeight, quantize_weight, weight_qdtype
from qcompiler.errors import CalibrationError, UnsupportedError
from qcompiler.recipes import Granularity, Recipe, SparseGPTSpec, WeightSpec
from qcompiler.algorithms.registry import WeightAlgorithm, register_weight_algorithm
from qcompiler.algorithms.gptq import (_column_quantizer, _current_columns, _inverse_hessian_factor, _one_thread,
                                       prepared_problem)

__all__ = ["nm_prune_mask", "magnitude_prune", "is_semi_structured", "SparseGPTInfo", "SparseResult",
           "sparsegpt_prune", "check_prunable"]

log = logging.getLogger(__name__)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in each run of ``m`` consecutive entries of the last dimension
    of ``scores`` [..., K] (K a multiple of m), the ``m - n`` of least score (ties: the earlier one)."""
    k = scores.shape[-1]
    if k % m:
        raise ValueError(f"nm_prune_mask: the last dimension ({k}) must be a multiple of m={m}")
    runs = scores.reshape(*scores.shape[:-1], k // m, m)
    order = torch.argsort(runs, dim=-1, stable=True)[..., :m - n]
    mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(scores.shape)


def magnitude_prune(w: torch.Tensor, n: int = 2, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w with the m - n smallest |w| of every run of m input channels set to 0, the pruned mask)``."""
    mask = nm_prune_mask(w.abs(), n, m)
    return w.masked_fill(mask, 0.0), mask


def is_semi_structured(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every run of ``m`` consecutive input channels of ``w`` [N, K] has at most ``n`` non-zeros."""
    if w.shape[-1] % m:
        return False
    return bool(((w != 0).reshape(*w.shape[:-1], -1, m).sum(-1) <= n).all())


def check_prunable(fqn: str, in_features: int, spec: SparseGPTSpec) -> None:
    """``UnsupportedError`` when a linear's input channels do not split into runs of ``spec.m``."""
    if in_features % spec.m:
        raise UnsupportedError(f"{fqn}: {spec.pattern} sparsity prunes runs of sparsegpt.m={spec.m} input channels, "
                               f"but this linear has K={in_features} (not a multiple of {spec.m}); keep it dense with "
                               "fallback.keep_modules (sparsify: keep_modules=)")


@dataclass(frozen=True)
class SparseGPTInfo:
    """What one SparseGPT run did: ``loss`` is the sweep's objective (``sum err_i^2``, GPTQ's),
    ``dampening`` the fraction of ``mean(diag(H))`` used, ``zeros`` the fraction of weights that are 0."""

    layer_name: str
    n_samples: int
    dampening: float
    loss: float
    dead_columns: int
    zeros: float
    seconds: float


@dataclass
class SparseResult:
    """``weight``: the pruned (and, with a quantization spec, dequantized) float weight [N, K];
    ``qweight``: its quantized form, or None without a spec; ``mask``: True where pruned."""

    weight: torch.Tensor
    qweight: QuantizedWeight | None
    mask: torch.Tensor
    info: SparseGPTInfo


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, quant: WeightSpec | None = None, *, n_samples: int,
                    n: int = 2, m: int = 4, block_size: int = 128, dampening: float = 0.01, max_dampening: float = 1.0,
                    min_samples: int | None = None, layer_name: str = "?") -> SparseResult:
    """Prune ``w`` [N, K] to ``n:m`` against the input Hessian ``hessian`` [K, K], rounding the kept weights
    with ``quant`` in the same sweep when given (see the module docstring).

    Raises:
        ValueError: shapes that do not match, K or ``block_size`` not a multiple of ``m``, or a per-group
            ``quant`` whose group size is not.
        CalibrationError: too few samples, a non-finite Hessian, or no dampening up to ``max_dampening``
            makes H positive definite.
    """
    start = time.perf_counter()
    if w.dim() != 2:
        raise ValueError(f"sparsegpt_prune: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    n_out, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"sparsegpt_prune: {layer_name}: Hessian of shape {tuple(hessian.shape)} does not match "
                         f"w of shape {tuple(w.shape)}; expected ({k}, {k})")
    if not 0 < n < m:
        raise ValueError(f"sparsegpt_prune: need 0 < n < m, got n={n}, m={m}")
    if k % m or block_size % m:
        raise ValueError(f"sparsegpt_prune: {layer_name}: K={k} and block_size={block_size} must be multiples of m={m}")
    grouped = quant is not None and quant.granularity is Granularity.PER_GROUP
    if grouped and quant.group_size % m:
        raise ValueError(f"sparsegpt_prune: group_size={quant.group_size} must be a multiple of m={m}")
    h, w, dead = prepared_problem(w, hessian, n_samples, min_samples, layer_name, "SparseGPT")
    with _one_thread():
        u, used = _inverse_hessian_factor(h, dampening, max_dampening, layer_name)
        weight, qweight, mask, loss = _sweep(w, u, quant, n, m, block_size, torch.diagonal(h).float())
    info = SparseGPTInfo(layer_name, int(n_samples), used, loss, int(dead.sum()),
                         float((weight == 0).float().mean()), time.perf_counter() - start)
    log.debug("sparsegpt %s: %dx%d %d:%d loss %.4g damp %g (%.2fs)", layer_name, n_out, k, n, m, loss, used,
              info.seconds)
    return SparseResult(weight, qweight, mask, info)


def _sweep(w: torch.Tensor, u: torch.Tensor, quant: WeightSpec | None, n: int, m: int, block_size: int,
           h_diag: torch.Tensor):
    """The column sweep on ``w`` transposed ([K, N], a column is a contiguous row)."""
    n_out, k = w.shape
    diag = torch.diagonal(u)
    saliency_scale = diag.pow(2)          # the reference's  w^2 / diag(U)^2
    wt = w.T.contiguous()
    grouped = quant is not None and quant.granularity is Granularity.PER_GROUP
    g = quant.group_size if grouped else None
    if quant is not None:
        qdtype = weight_qdtype(quant)
        quantize_column = _column_quantizer(qdtype)
        if grouped:
            n_groups = -(-k // g)
            scale_t = torch.empty(n_groups, n_out, device=w.device)
            zero_t = None if quant.symmetric else torch.empty(n_groups, n_out, device=w.device)
            channel_spec = replace(quant, granularity=Granularity.PER_CHANNEL, group_size=None)
        else:
            preview = nm_prune_mask(w.pow(2) / saliency_scale.float(), n, m)
            rtn = quantize_weight(w.masked_fill(preview, 0.0), quant, h_diag)
            scale_t = rtn.scale if rtn.scale.dim() == 0 else rtn.scale[:, 0]
            zero_t = None if rtn.zero is None else (rtn.zero.float() if rtn.zero.dim() == 0 else rtn.zero[:, 0].float())
    q_all = torch.empty(k, n_out, dtype=w.dtype, device=w.device)
    deq = torch.empty(k, n_out, dtype=w.dtype, device=w.device)
    mask_t = torch.zeros(k, n_out, dtype=torch.bool, device=w.device)
    diag_list = diag.tolist()
    loss = 0.0
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and col % g == 0:
                positions = torch.arange(col, min(col + g, k), device=w.device)
                cur = _current_columns(wt, w1, err1, u, i1, i, positions).T          # [N, g]
                cur = cur.masked_fill(nm_prune_mask(cur.pow(2) / saliency_scale[positions].float(), n, m), 0.0)
                qw = quantize_weight(cur, channel_spec, h_diag[positions])
                scale_t[col // g] = qw.scale[:, 0]
                if zero_t is not None:
                    zero_t[col // g] = qw.zero[:, 0].float()
            if i % m == 0:
                scores = w1[i:i + m].pow(2) / saliency_scale[col:col + m, None].float()     # [m, N]
                mask_t[col:col + m] = nm_prune_mask(scores.T, n, m).T
            wc = w1[i]
            target = wc.masked_fill(mask_t[col], 0.0)
            if quant is None:
                qc = dc = target
            elif grouped:
                qc, dc = quantize_column(target, scale_t[col // g], None if zero_t is None else zero_t[col // g])
            else:
                qc, dc = quantize_column(target, scale_t, zero_t)
            q_all[col] = qc
            deq[col] = dc
            e = (wc - dc) / diag_list[col]
            w1[i:].sub_(u1[i, i:, None] * e)
            err1[i] = e
        loss += float(err1.double().pow(2).sum())
        wt[i2:].sub_(u[i1:i2, i2:].T @ err1)
    weight, mask = deq.T.contiguous(), mask_t.T.contiguous()
    if quant is None:
        return weight, None, mask, loss
    if grouped:
        scale = scale_t.T.contiguous()
        zero = None if zero_t is None else zero_t.T.contiguous()
    else:
        scale = scale_t if scale_t.dim() == 0 else scale_t[:, None].contiguous()
        zero = None if zero_t is None else (zero_t if zero_t.dim() == 0 else zero_t[:, None].contiguous())
    if zero is not None:
        zero = zero.to(numerics.STORAGE_DTYPE[qdtype])
    q = q_all.T.contiguous().to(numerics.STORAGE_DTYPE[qdtype])
    qweight = QuantizedWeight(q, scale, zero, numerics.storage_name(qdtype), g, quant.reduce_range)
    return weight, qweight, mask, loss


# ---- the weight algorithm of SparseGPTSpec ------------------------------------------------------

def prune_linear(fqn: str, w: torch.Tensor, st, spec: SparseGPTSpec, quant: WeightSpec | None
                 ) -> tuple[torch.Tensor, QuantizedWeight | None, str]:
    """One linear pruned by ``spec`` (and quantized with ``quant`` when given): ``(weight, qweight, note)``."""
    check_prunable(fqn, w.shape[1], spec)
    if spec.method == "sparsegpt":
        if st is None or st.hessian is None:
            raise CalibrationError(f"{fqn}: SparseGPT needs the Hessian of this linear's inputs; no calibration "
                                   "statistics reached it")
        if st.tokens >= spec.min_samples:
            r = sparsegpt_prune(w, st.hessian, quant, n_samples=st.tokens, n=spec.n, m=spec.m,
                                block_size=spec.block_size, dampening=spec.dampening, min_samples=spec.min_samples,
                                layer_name=fqn)
            note = f"sparsegpt {spec.pattern} damp {r.info.dampening:g}"
            if r.info.dampening > spec.dampening:
                note += f" (raised from {spec.dampening:g}: Hessian not positive definite)"
            return r.weight, r.qweight, note
        # a mixture-of-experts expert few tokens were routed to: its Hessian is too thin for the OBS update
        prefix = (f"magnitude {spec.pattern}: only {st.tokens} calibration rows reached it "
                  f"(SparseGPT needs sparsegpt.min_samples={spec.min_samples})")
    else:
        prefix = f"magnitude {spec.pattern}"
    pruned, _ = magnitude_prune(w.float(), spec.n, spec.m)
    if quant is None:
        return pruned, None, prefix
    qw = quantize_weight(pruned, quant)
    return qw.dequantize(), qw, prefix


def _quantize_linear(fqn: str, w: torch.Tensor, st, recipe: Recipe, spec: SparseGPTSpec
                     ) -> tuple[QuantizedWeight, str]:
    _, qw, note = prune_linear(fqn, w, st, spec, recipe.weight)
    return qw, note


register_weight_algorithm(WeightAlgorithm("sparsegpt", SparseGPTSpec, _quantize_linear,
                                          needs_hessian=lambda spec: spec.method == "sparsegpt"))
