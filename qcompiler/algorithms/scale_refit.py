"""Refitting a quantized weight's scales to its Hessian with the integer codes held fixed.

GPTQ chooses each group's scale before its codes (from the weights, with the ``mse`` calibrator's clipping) and
then the codes given the scales; it never revisits a scale once the codes are known. With codes ``c`` (``q - z``)
fixed, the layer's output error ``sum_n (w_n - s_n . c_n) H (w_n - s_n . c_n)^T`` is a quadratic in each output
row's group scales ``s_n`` [G]: the least-squares optimum solves the G x G system

    A_n s_n = b_n,   A_n[g, h] = c_n[g]^T H[g, h] c_n[h],   b_n[g] = c_n[g]^T (H w_n)[g]

(``[g]`` the columns of group g), one small system per output row (what llama.cpp's importance-weighted
quantizers fit with a diagonal H, here with GPTQ's full H so that groups that feed the same outputs are fitted
together). ``refit_scales`` solves them in float64 and keeps, row by row, the new scales only where they are
finite, positive and lower the error; ``GPTQSpec.scale_refit`` alternates it with GPTQ sweeps at the refitted
scales.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompiler.core import numerics
from qcompiler.core.layer_quant import QuantizedWeight

__all__ = ["refit_scales", "row_errors"]


def _codes(qw: QuantizedWeight) -> torch.Tensor:
    """``q - z`` in float64 [N, K]: what each scale multiplies."""
    c = qw.q.double()
    if qw.zero is not None:
        c = c - numerics.expand_blocks(qw.zero.double(), qw.q, qw.group_size)
    return c


def _groups(qw: QuantizedWeight) -> tuple[int, int]:
    """(number of scale columns G, columns per group) of a per-channel or per-group weight."""
    k = qw.q.shape[1]
    if qw.scale.dim() != 2:
        raise ValueError(f"refit_scales: needs per-channel or per-group scales [N, G], got shape {tuple(qw.scale.shape)}")
    g = qw.group_size or k
    return qw.scale.shape[1], g


def row_errors(qw: QuantizedWeight, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each output row's ``(w_n - w_hat_n) H (w_n - w_hat_n)^T`` in float64 [N]."""
    e = w.double() - qw.dequantize(torch.float32).double()
    return ((e @ h.double()) * e).sum(dim=1)


def refit_scales(qw: QuantizedWeight, w: torch.Tensor, h: torch.Tensor) -> tuple[QuantizedWeight, float]:
    """``qw`` with each row's scales re-solved by least squares against ``h`` [K, K] for target ``w`` [N, K]
    (codes and zero-points unchanged), and the fraction of the total error ``sum_n row_errors`` it removed.

    A row keeps its old scales where its system is singular (a group of all-zero codes keeps its scale and
    leaves the system), where a solved scale is not finite or not positive, or where the error would not fall.
    """
    n_groups, g = _groups(qw)
    n, k = qw.q.shape
    c = _codes(qw)
    h = h.double()
    w = w.double()
    old = qw.scale.double()
    # T_j = c[:, group j] @ H[group j, :]  ->  A[:, j, :] and b[:, j]
    a = torch.zeros(n, n_groups, n_groups, dtype=torch.float64, device=c.device)
    b = torch.zeros(n, n_groups, dtype=torch.float64, device=c.device)
    pad = n_groups * g - k
    cp = torch.nn.functional.pad(c, (0, pad)).view(n, n_groups, g)
    for j in range(n_groups):
        lo, hi = j * g, min((j + 1) * g, k)
        t = c[:, lo:hi] @ h[lo:hi]                                  # [N, K]
        a[:, j] = (torch.nn.functional.pad(t, (0, pad)).view(n, n_groups, g) * cp).sum(-1)
        b[:, j] = (t * w).sum(-1)
    empty = a.diagonal(dim1=1, dim2=2) <= 0                         # a group whose codes are all zero
    if empty.any():
        a = a.masked_fill(empty[:, :, None] | empty[:, None, :], 0.0)
        a.diagonal(dim1=1, dim2=2).copy_(torch.where(empty, torch.ones_like(old), a.diagonal(dim1=1, dim2=2)))
        b = torch.where(empty, old, b)
    new, info = torch.linalg.solve_ex(a, b)
    ok = (info == 0) & torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1)
    candidate = dataclasses.replace(qw, scale=torch.where(ok[:, None], new, old).to(qw.scale.dtype))
    before, after = row_errors(qw, w, h), row_errors(candidate, w, h)
    keep = ok & (after < before)
    scale = torch.where(keep[:, None], new, old).to(qw.scale.dtype)
    refitted = dataclasses.replace(qw, scale=scale)
    total = float(before.sum())
    removed = float((before - after)[keep].sum())
    return refitted, (removed / total if total > 0 else 0.0)
