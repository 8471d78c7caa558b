"""GPTQ: weight quantization with second-order error compensation, as pure functions.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323) quantizes a linear's
weight [N, K] one input column at a time and spreads each column's rounding error over the
columns not yet quantized, so that ``||X W^T - X W_hat^T||^2`` stays small for the
calibration inputs X. It needs only the layer Hessian ``H = 2/n sum_x x^T x`` [K, K].

This follows the reference implementation (IST-DASLab/gptq ``gptq.py``: ``GPTQ.add_batch``,
``GPTQ.fasterquant``), as also used by AutoGPTQ and llm-compressor
(``modifiers/quantization/gptq/gptq_quantize.py``):

- dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero weight column;
- ``dampening * mean(diag(H))`` is added to the diagonal; the upper Cholesky factor U of
  ``H^-1`` (``H^-1 = U^T U``) gives the updates: column i's error
  ``err_i = (w_i - q_i) / U_ii`` is subtracted as ``err_i * U[i, i:]`` from the later
  columns, lazily per block of ``block_size`` columns;
- ``act_order`` processes columns by decreasing ``H_ii``.

Where we differ, and why:

- Scales come from ``layer_quant.quantize_weight`` (ONNX layout, symmetric int4 in
  [-8, 7] with scale absmax/7, asymmetric uint4 with integer zero-points; reduce-range int8 in
  [-64, 63] with scale absmax/63), so with H = I the result is round-to-nearest bit for bit.
- Per-group scales are computed when GPTQ first reaches a group, from the group's *current*
  (error-updated) weights, including updates still pending inside the current block (the
  reference reads the outer matrix there, which misses them when a group starts mid-block).
- With ``act_order`` a group is a set of *original* columns ``[j*g, (j+1)*g)`` (the ONNX
  blocked layout, no ``g_idx``): its scale is fixed when the first of its columns comes up
  in activation order, from the current values of all its columns (none is quantized yet
  at that point). The stored scale at ``[n, j // g]`` is therefore exactly the one used for
  column j, and ``QuantizedWeight.dequantize()`` reproduces GPTQ's values bit for bit.
- A Hessian that is not positive definite is retried with 10x the dampening (up to
  ``max_dampening``); the fraction used is reported in ``GPTQInfo.dampening``.
- Samples are counted in rows (tokens), not sequences; H's scale does not change GPTQ's
  result (the dampening is relative to ``mean(diag(H))``).

Output rows are independent given H, so linears that read the same input (q, k, v) can be
quantized as one weight stacked along N and split afterwards (one factorization of H).
The sweep runs on one intra-op thread (see ``_one_thread``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from qcompiler.core import numerics
from qcompiler.errors import CalibrationError
from qcompiler.core.layer_quant import QuantizedWeight, quantize_weight, weight_qdtype
from qcompiler.recipes import GPTQSpec, Granularity, Recipe, WeightSpec
from qcompiler.algorithms.registry import WeightAlgorithm, register_weight_algorithm

__all__ = ["HessianAccumulator", "GPTQInfo", "gptq_quantize", "default_min_samples", "too_few_rows_error", "prepared_problem"]

log = logging.getLogger(__name__)


def default_min_samples(in_features: int) -> int:
    """Fewest calibration rows GPTQ accepts by default: ``ceil(K / 8)``, at least 1.

    H has rank at most n; with n far below K almost all of its spectrum is the dampening
    term and the error compensation fits the few rows seen rather than the layer.
    """
    return max(1, math.ceil(in_features / 8))


def too_few_rows_error(recipe: Recipe, rows: int, where: str) -> CalibrationError:
    """The error for ``rows`` calibration rows, fewer than ``recipe.gptq.min_samples``: how many GPTQ
    needs, how many it got, and the ways out (with ``gptq.optional``, running without calibration)."""
    msg = (f"{where}: GPTQ needs at least {recipe.gptq.min_samples} calibration rows (tokens) per linear, "
           f"got {rows}; give more calibration data (more or longer sequences) or lower gptq.min_samples")
    if recipe.gptq.optional:
        msg += (f", or run without calibration data (GPTQ is optional in recipe {recipe.name!r}: the weights "
                "are then rounded to nearest, with a warning)")
    return CalibrationError(msg)


class HessianAccumulator:
    """Running ``H = 2/n * sum x^T x`` over calibration rows of a linear's input [*, K].

    Matches the reference ``GPTQ.add_batch`` (``H *= n/(n+m); H += 2/(n+m) x^T x``), with n
    counted in rows. One accumulator serves every linear that reads the same input.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, name: str = "?"):
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features={in_features!r} must be a positive integer")
        self.name = name
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_samples = 0

    @property
    def in_features(self) -> int:
        return self.hessian.shape[0]

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` [..., K] into the running average."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise CalibrationError(f"{self.name}: GPTQ input rows must have {self.in_features} features, "
                                   f"got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(self.hessian.dtype)
        m = x.shape[0]
        if m == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError(f"{self.name}: GPTQ calibration input contains NaN or Inf")
        n = self.n_samples
        self.hessian.mul_(n / (n + m)).addmm_(x.T, x, alpha=2.0 / (n + m))
        self.n_samples = n + m


@dataclass(frozen=True)
class GPTQInfo:
    """What one GPTQ run did.

    Attributes:
        layer_name: the name passed in (for messages and reports).
        n_samples: calibration rows behind H.
        dampening: fraction of ``mean(diag(H))`` added to H's diagonal (after retries).
        loss: GPTQ's objective ``sum_n (w_n - w_hat_n) H_damped (w_n - w_hat_n)^T`` over the
            output rows (``= sum err_i^2``), with H on the accumulator's 2/n scale; with ``scale_refit``, the
            same sum with the undamped H, of the weight returned.
        dead_columns: inputs that were zero on every calibration row (quantized to 0).
        seconds: wall time.
    """

    layer_name: str
    n_samples: int
    dampening: float
    loss: float
    dead_columns: int
    seconds: float


@dataclass
class _GPTQResult:
    qweight: QuantizedWeight
    dequantized: torch.Tensor   # the float values GPTQ used, original column order
    loss: float


def gptq_quantize(w: torch.Tensor, hessian: HessianAccumulator | torch.Tensor, spec: WeightSpec, *,
                  n_samples: int | None = None, block_size: int = 128, dampening: float = 0.01,
                  max_dampening: float = 1.0, act_order: bool = False, static_groups: bool = False,
                  min_samples: int | None = None, layer_name: str = "?", scale_refit: int = 0
                  ) -> tuple[QuantizedWeight, GPTQInfo]:
    """Quantize ``w`` [N, K] with GPTQ against ``hessian`` [K, K].

    Args:
        w: the float weight, output channel first.
        hessian: a ``HessianAccumulator`` or its [K, K] tensor (then pass ``n_samples``).
        spec: dtype (int8 / int4, or fp8), granularity (per_tensor, per_channel, per_group;
            the last group may be partial), symmetric or not, calibrator (minmax / mse, used
            for every scale GPTQ computes).
        n_samples: calibration rows behind a tensor ``hessian``.
        block_size: columns per lazy batch update (the result does not depend on it beyond
            float rounding).
        dampening: fraction of ``mean(diag(H))`` added to the diagonal.
        max_dampening: retries multiply the dampening by 10 up to this bound.
        act_order: quantize columns in decreasing ``H_ii`` order.
        static_groups: per-group scales from the original weight up front instead of from the
            error-updated weight when GPTQ reaches each group.
        min_samples: fewest rows accepted (default ``default_min_samples(K)``).
        layer_name: used in errors and ``GPTQInfo``.
        scale_refit: rounds of refitting the scales to H with the codes fixed (``scale_refit.refit_scales``),
            each after the first followed by a new sweep at the refitted scales (static from then on);
            0: GPTQ's scales as chosen. Per-channel and per-group weights only.

    Returns:
        ``(QuantizedWeight, GPTQInfo)``; ``QuantizedWeight.dequantize()`` equals the values
        GPTQ used exactly.

    Raises:
        CalibrationError: too few samples, a non-finite Hessian, or no dampening up to
            ``max_dampening`` makes H positive definite.
    """
    start = time.perf_counter()
    if isinstance(hessian, HessianAccumulator):
        n_samples, h = hessian.n_samples, hessian.hessian
    elif n_samples is None:
        raise ValueError("gptq_quantize: pass n_samples with a Hessian tensor (or a HessianAccumulator)")
    else:
        h = hessian
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    n_out, k = w.shape
    if tuple(h.shape) != (k, k):
        raise ValueError(f"gptq_quantize: {layer_name}: Hessian of shape {tuple(h.shape)} does not match "
                         f"w of shape {tuple(w.shape)}; expected ({k}, {k})")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"gptq_quantize: block_size={block_size!r} must be a positive integer")
    if not 0.0 <= dampening <= max_dampening:
        raise ValueError(f"gptq_quantize: dampening={dampening!r} must be in [0, max_dampening={max_dampening}]")
    h, w, dead = prepared_problem(w, h, n_samples, min_samples, layer_name, "GPTQ")
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    with _one_thread():
        u, used = _inverse_hessian_factor(h, dampening, max_dampening, layer_name)
        result = _gptq_columns(w, u, spec, perm, block_size, static_groups, torch.diagonal(h).float())
        qweight, loss = result.qweight, result.loss
        if scale_refit:
            qweight, loss = _refit_rounds(qweight, w, h, u, spec, perm, block_size, scale_refit, layer_name)
    info = GPTQInfo(layer_name, int(n_samples), used, loss, int(dead.sum()),
                    time.perf_counter() - start)
    log.debug("gptq %s: %dx%d %s loss %.4g damp %g (%.2fs)", layer_name, n_out, k,
              qweight.describe(), info.loss, used, info.seconds)
    return qweight, info


def _refit_rounds(qweight: QuantizedWeight, w: torch.Tensor, h: torch.Tensor, u: torch.Tensor, spec: WeightSpec,
                  perm: torch.Tensor | None, block_size: int, rounds: int, layer_name: str
                  ) -> tuple[QuantizedWeight, float]:
    """``rounds`` scale refits (``h`` in original column order), a GPTQ sweep at the refitted scales between
    two; the best weight by ``h``'s error, and that error."""
    from qcompiler.algorithms.scale_refit import refit_scales, row_errors
    if spec.granularity is Granularity.PER_TENSOR:
        raise ValueError(f"gptq_quantize: {layer_name}: scale_refit needs per-channel or per-group weights")
    inverse = None if perm is None else torch.argsort(perm)
    hp = h if inverse is None else h[inverse][:, inverse]          # back to w's (original) column order
    best, best_error = qweight, float(row_errors(qweight, w, hp).sum())
    current = qweight
    for r in range(rounds):
        if r:
            zero = None if current.zero is None else current.zero.float()
            current = _gptq_columns(w, u, spec, perm, block_size, True, None, fixed=(current.scale, zero)).qweight
        current, _ = refit_scales(current, w, hp)
        error = float(row_errors(current, w, hp).sum())
        if error < best_error:
            best, best_error = current, error
    return best, best_error


def prepared_problem(w: torch.Tensor, h: torch.Tensor, n_samples: int, min_samples: int | None, layer_name: str,
                     what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks shared by the Hessian sweeps (GPTQ, SparseGPT), then float64 ``H`` and float32 ``W`` copies on ``w``'s
    device with dead inputs (``H_ii == 0``) given ``H_ii = 1`` and a zero weight column: ``(h, w, dead)``."""
    k = w.shape[1]
    min_samples = default_min_samples(k) if min_samples is None else max(1, min_samples)
    if n_samples < min_samples:
        raise CalibrationError(f"{layer_name}: {what} needs at least {min_samples} calibration rows for "
                               f"{k} input features, got {n_samples}")
    if not torch.isfinite(h).all():
        raise CalibrationError(f"{layer_name}: {what} Hessian contains NaN or Inf")
    # The Hessian (accumulated where calibration keeps its statistics) meets the weight on its device.
    h = h.detach().to(device=w.device, dtype=torch.float64).clone()
    w = w.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return h, w, dead


def _inverse_hessian_factor(h: torch.Tensor, dampening: float, max_dampening: float, layer_name: str
                            ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` in float32, and the damp used."""
    mean_diag = float(torch.diagonal(h).mean())
    damp, tried = dampening, []
    while True:
        tried.append(damp)
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        lower, bad = torch.linalg.cholesky_ex(hd)
        if not bad:
            upper, bad = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not bad and torch.isfinite(upper).all():
                if len(tried) > 1:
                    log.warning("gptq %s: Hessian not positive definite with dampening %s; used %g",
                                layer_name, tried[:-1], damp)
                return upper.float(), damp
        damp = damp * 10.0 if damp > 0 else 1e-3
        if damp > max_dampening * (1 + 1e-9):
            raise CalibrationError(f"{layer_name}: GPTQ Hessian is not positive definite with dampening "
                                   f"{tried} x mean(diag(H)) (= {mean_diag:.4g}); give more or different "
                                   f"calibration data or raise max_dampening={max_dampening}")


def _gptq_columns(w: torch.Tensor, u: torch.Tensor, spec: WeightSpec, perm: torch.Tensor | None,
                  block_size: int, static_groups: bool, h_diag: torch.Tensor | None,
                  fixed: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> _GPTQResult:
    """The GPTQ sweep over (permuted) columns with lazy block updates; see the module docstring.

    ``h_diag``: the (permuted) Hessian diagonal, each column's weight in the ``mse`` calibrator's
    clipping search (the expected output error of a column's rounding error is ``H_ii e^2``).
    ``fixed``: (scale, zero) to quantize at instead of choosing them (then ``h_diag`` is unused).

    Works on ``w`` transposed ([K, N], a column is a contiguous row) in ``w``'s float dtype;
    each column is quantized with exactly ``numerics.quantize`` / ``dequantize``'s arithmetic.
    """
    n_out, k = w.shape
    qdtype = weight_qdtype(spec)      # its range: int7 / uint7 for reduce_range weights
    grouped = spec.granularity is Granularity.PER_GROUP
    g = spec.group_size if grouped else None
    lazy = grouped and not static_groups and fixed is None
    if fixed is not None:
        scale, zero = fixed[0].clone(), fixed[1]
        pending: list[torch.Tensor | None] = []
    elif not lazy:
        # per-tensor / per-channel scales (as the reference) or static group scales: from the
        # original weight up front; exactly round-to-nearest's.
        rtn = quantize_weight(w, spec, h_diag if perm is None else h_diag[torch.argsort(perm)])
        scale, zero = rtn.scale.clone(), None if rtn.zero is None else rtn.zero.float()
        pending: list[torch.Tensor | None] = []
    else:
        n_groups = -(-k // g)
        scale = torch.empty(n_out, n_groups, device=w.device)
        zero = None if spec.symmetric else torch.empty(n_out, n_groups, device=w.device)
        position = torch.argsort(perm) if perm is not None else torch.arange(k, device=w.device)   # column -> position
        pending = [position[j * g:(j + 1) * g].sort().values for j in range(n_groups)]
        channel_spec = replace(spec, granularity=Granularity.PER_CHANNEL, group_size=None)
    order = perm.tolist() if perm is not None else range(k)
    group_at = [c // g for c in order] if grouped else None
    wt = (w[:, perm] if perm is not None else w).T.contiguous()          # [K, N]
    # per-row views of the scales as [N] vectors (a 0-d per-tensor scale broadcasts as is)
    scale_t = scale.T.contiguous() if scale.dim() else scale
    zero_t = None if zero is None else (zero.T.contiguous() if zero.dim() else zero)
    quantize_column = _column_quantizer(qdtype)

    q_all = torch.empty(k, n_out, device=w.device)
    deq = torch.empty(k, n_out, device=w.device)
    diag = torch.diagonal(u).tolist()
    loss = 0.0
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped:
                j = group_at[col]
                if lazy and pending[j] is not None:
                    cur = _current_columns(wt, w1, err1, u, i1, i, pending[j])
                    qw = quantize_weight(cur.T, channel_spec, h_diag[pending[j]])
                    scale_t[j] = qw.scale[:, 0]
                    if zero_t is not None:
                        zero_t[j] = qw.zero[:, 0].float()
                    pending[j] = None
                s = scale_t[j]
                z = None if zero_t is None else zero_t[j]
            else:
                s = scale_t if scale_t.dim() == 0 else scale_t[0]
                z = None if zero_t is None else (zero_t if zero_t.dim() == 0 else zero_t[0])
            wc = w1[i]
            qc, dc = quantize_column(wc, s, z)
            q_all[col] = qc
            deq[col] = dc
            e = (wc - dc) / diag[col]
            w1[i:].sub_(u1[i, i:, None] * e)
            err1[i] = e
        loss += float(err1.double().pow(2).sum())
        wt[i2:].sub_(u[i1:i2, i2:].T @ err1)

    if perm is not None:
        inverse = torch.argsort(perm)
        q_all, deq = q_all[inverse], deq[inverse]
    if lazy:
        scale = scale_t.T.contiguous()
        zero = None if zero_t is None else zero_t.T.contiguous()
    if zero is not None:
        zero = zero.to(numerics.STORAGE_DTYPE[qdtype])
    q = q_all.T.contiguous().to(numerics.STORAGE_DTYPE[qdtype])
    qweight = QuantizedWeight(q, scale, zero, numerics.storage_name(qdtype), g, spec.reduce_range)
    return _GPTQResult(qweight, deq.T.contiguous(), loss)


@contextlib.contextmanager
def _one_thread():
    """Run GPTQ on one intra-op thread, then restore the setting.

    The sweep is thousands of ops on vectors of N floats plus a few mid-size GEMMs; on a
    loaded 2-core machine, 2 OpenMP threads made a 576x1536 layer take 3-45 s instead of
    0.6 s (synchronization with a descheduled thread). Not thread-safe across Python threads
    that change the setting concurrently."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _column_quantizer(qdtype: str):
    """``(w_col, scale, zero) -> (q as float, dequantized)`` with ``numerics``' exact arithmetic.

    Integers: ``q = clamp(round(w / s) + z, qmin, qmax)``, ``(q - z) * s`` in float32, the
    operations of ``numerics.quantize`` / ``dequantize`` in their order (held as float until
    the end, where the integer-valued floats convert exactly)."""
    if qdtype == "fp8_e4m3":
        def fp8(wc, s, z):
            q = (wc.float() / s).to(torch.float8_e4m3fn).float()
            return q, q * s
        return fp8
    qmin, qmax = numerics.QRANGE[qdtype]

    def integer(wc, s, z):
        q = torch.round(wc.float() / s)
        if z is None:
            q.clamp_(qmin, qmax)
            return q, q * s
        q = q.add_(z).clamp_(qmin, qmax)
        return q, (q - z) * s
    return integer


def _current_columns(w: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor, u: torch.Tensor,
                     i1: int, i: int, positions: torch.Tensor) -> torch.Tensor:
    """Error-updated values [len(positions), N] of the not yet quantized columns at ``positions``
    (sorted, >= i1 + i) of the transposed weight ``w`` [K, N].

    Columns inside the current block are up to date in ``w1``; later ones still miss the
    pending block update from the block's first ``i`` columns.
    """
    i2 = i1 + w1.shape[0]
    split = int((positions < i2).sum())
    inside, outside = positions[:split], positions[split:]
    parts = [w1[inside - i1]]
    if outside.numel():
        parts.append(w[outside] - u[i1:i1 + i][:, outside].T @ err1[:i])
    return torch.cat(parts, dim=0)


# ---- the weight algorithm of GPTQSpec -------------------------------------------------------

def _quantize_linear(fqn: str, w: torch.Tensor, st, recipe: Recipe, spec: GPTQSpec) -> tuple[QuantizedWeight, str]:
    if st is None or st.hessian is None:
        raise CalibrationError(f"{fqn}: GPTQ needs the Hessian of this linear's inputs; no calibration "
                               "statistics reached it")
    if st.tokens < spec.min_samples:
        # the calibration set has enough rows (counted up front: too_few_rows_error), but fewer reached this
        # linear: a mixture-of-experts expert few tokens were routed to. Its Hessian is too thin for GPTQ.
        from qcompiler.core.layer_quant import quantize_weight
        return quantize_weight(w, recipe.weight), (f"round to nearest: only {st.tokens} calibration rows reached it "
                                                   f"(GPTQ needs gptq.min_samples={spec.min_samples})")
    qw, info = gptq_quantize(w, st.hessian, recipe.weight, n_samples=st.tokens, block_size=spec.block_size,
                             dampening=spec.dampening, act_order=spec.act_order, static_groups=spec.static_groups,
                             min_samples=spec.min_samples, layer_name=fqn, scale_refit=spec.scale_refit)
    note = f"gptq damp {info.dampening:g}"
    if info.dampening > spec.dampening:
        note += f" (raised from {spec.dampening:g}: Hessian not positive definite)"
    if spec.scale_refit:
        note += f", scales refit x{spec.scale_refit}"
    return qw, note


register_weight_algorithm(WeightAlgorithm("gptq", GPTQSpec, _quantize_linear, needs_hessian=True, rows_separable=True))
