"""Is a module a plain linear? Checked numerically, not by its class: its ``forward`` must return
``x @ W.T + b`` (``nn.Linear``) or ``x @ W + b`` (GPT-2's Conv1D) for a probe ``x``. A module that holds
one 2-D ``weight`` but computes more (an MoE router returning logits, scores and expert indices) is not."""

from __future__ import annotations

import torch

__all__ = ["linear_orientation"]


def linear_orientation(module: torch.nn.Module, k: int) -> tuple[torch.nn.Parameter, bool] | None:
    """The module's weight and whether it is stored [K, N], if the module computes a linear of ``k``
    input channels; None otherwise. Its ``forward`` is probed without its hooks (an online rotation's
    pre-hook changes the input, and the statistics were taken after it)."""
    params = dict(module.named_parameters(recurse=False))
    w, b = params.get("weight"), params.get("bias")
    if w is None or w.dim() != 2 or list(module.children()) or set(params) - {"weight", "bias"}:
        return None
    probe = torch.randn(3, k, generator=torch.Generator().manual_seed(0)).to(w)
    with torch.no_grad():
        try:
            y = module.forward(probe)
        except (RuntimeError, ValueError, TypeError, IndexError):
            return None
        if not isinstance(y, torch.Tensor):
            return None
        # compared in float32 with a tolerance of the weight's precision (bf16 sums round differently)
        tol = max(1e-4, 4 * torch.finfo(w.dtype).eps) if w.is_floating_point() else 1e-4
        for transposed in (False, True):
            if w.shape[1 - int(transposed)] != k:
                continue
            ref = probe.float() @ (w.float() if transposed else w.float().t())
            if b is not None:
                ref = ref + b.float()
            if y.shape == ref.shape and torch.allclose(y.float(), ref, rtol=tol,
                                                       atol=tol * max(float(ref.abs().max()), 1e-6)):
                return w, transposed
    return None
