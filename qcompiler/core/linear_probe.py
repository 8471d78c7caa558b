"""Is a module a plain linear? Checked numerically, not by its class: its ``forward`` must return
``x @ W.T + b`` (``nn.Linear``) or ``x @ W + b`` (GPT-2's Conv1D) for a probe ``x``. A module that holds
one 2-D ``weight`` but computes more (an MoE router returning logits, scores and expert indices) is not.
Is a linear a mixture-of-experts router? Its output reaches a ``topk``, followed op by op at run time
(``find_routers``) where no graph holds it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["linear_orientation", "find_routers", "ROUTER_DEPTH", "ROUTE_STOPS"]


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


#: a router's output reaches its ``topk`` within this many ops, not through any of ``ROUTE_STOPS``
ROUTER_DEPTH = 4
ROUTE_STOPS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "scaled_dot_product_attention"})


def is_scalar_gate(out_shape) -> bool:
    """Whether a linear with output shape ``out_shape`` is a scalar gate: one output channel (Qwen2-MoE's
    ``shared_expert_gate``, whose sigmoid scales the shared expert's output). Like a router it stays in float with
    op kind ``router``: quantizing one row saves nothing, and serving runtimes (vLLM) build it unquantized."""
    return len(out_shape) >= 1 and out_shape[-1] == 1


def find_routers(run: Callable[[], Any], modules: Mapping[str, torch.nn.Module]) -> set[str]:
    """The modules among ``modules`` whose output reaches a ``topk`` within a few ops while ``run()`` runs
    a forward (mixture-of-experts routers), found by following their output tensors through every torch op
    (a ``TorchFunctionMode``), not by names; and those with one output channel (scalar gates, ``is_scalar_gate``)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves
    taint: dict[int, tuple[str, int]] = {}
    alive: list[torch.Tensor] = []      # keep tainted tensors alive: ids must not be reused
    routers: set[str] = set()

    class Follow(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            srcs = [taint[id(t)] for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and id(t) in taint]
            if srcs:
                fqn, depth = min(srcs, key=lambda x: x[1])
                name = getattr(func, "__name__", "")
                if name == "topk":
                    routers.add(fqn)
                elif depth < ROUTER_DEPTH and name not in ROUTE_STOPS:
                    for t in tree_leaves(out):
                        if isinstance(t, torch.Tensor):
                            taint[id(t)] = (fqn, depth + 1)
                            alive.append(t)
            return out

    def mark(fqn):
        def hook(module, args, out):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and is_scalar_gate(t.shape):
                    routers.add(fqn)
                if isinstance(t, torch.Tensor):
                    taint[id(t)] = (fqn, 0)
                    alive.append(t)
        return hook
    hooks = [m.register_forward_hook(mark(f)) for f, m in modules.items()]
    try:
        with torch.inference_mode(), Follow():
            run()
    finally:
        for h in hooks:
            h.remove()
    return routers
