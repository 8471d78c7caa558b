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
