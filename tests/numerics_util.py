"""Error measures and tolerances shared by the tests (float64)."""

from __future__ import annotations

import torch

#: Relative-error tolerances of float kernels against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref||_2 / ||ref||_2 in float64."""
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm())


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (x.double() - ref).pow(2).sum()))


def gemm_ref64(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias):
    """float64 ``(a * sa) @ (w * sw).T + bias`` plus the same with absolute values (the scale
    of rounding errors). ``a`` [..., K], ``sa`` 0-d or [..., 1], ``w`` [N, K], ``sw`` 0-d or [N, 1]."""
    a, w = a.double(), w.double()
    sw_row = sw.double().reshape(-1) if sw.dim() else sw.double()
    out = (a @ w.T) * sa.double() * sw_row
    mag = (a.abs() @ w.abs().T) * sa.double().abs() * sw_row.abs()
    if bias is not None:
        out, mag = out + bias.double(), mag + bias.double().abs()
    return out, mag
