"""Input transforms as module hooks: the online Hadamard transform (``qcompiler.rotate(..., online=True)`` puts
one on each linear writing the residual stream), its plain-matmul form for exports, and a checkpoint's stored
transform matrix (compressed-tensors' ``transform_config``). Here, below the runtime and export layers, so that
both can read them."""

from __future__ import annotations

import torch

from qcompiler.core import ops  # noqa: F401  (declares qcompiler::hadamard_transform)

__all__ = ["OnlineHadamard", "DenseHadamard", "MatrixTransform", "INPUT_TRANSFORMS", "online_modules", "to_dense_hooks",
           "input_transform"]


class OnlineHadamard:
    """Forward pre-hook: the module's first input goes through ``qcompiler::hadamard_transform``."""

    def __init__(self, h_block: torch.Tensor, scale: float):
        self.h_block, self.scale = h_block, scale

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (torch.ops.qcompiler.hadamard_transform(args[0], self.h_block, self.scale), *args[1:])


class DenseHadamard:
    """Forward pre-hook computing ``OnlineHadamard``'s transform with plain ops, for exports:
    ``scale * h_block @ (x.unflatten(-1, (m, p)) @ H_p)`` (``H_p`` Sylvester's, symmetric), two matmuls
    with constant matrices in float32 (one when ``m == 1``) — an ONNX ``MatMul`` each, for any runtime."""

    def __init__(self, h_block: torch.Tensor, in_features: int, scale: float):
        m = h_block.shape[0]
        p = in_features // m
        if m * p != in_features or p & (p - 1):
            raise ValueError(f"DenseHadamard: {in_features} inputs are not {m} times a power of two")
        self.h_block, self.h_p, self.scale = h_block.float(), sylvester(p), scale

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        m, p = self.h_block.shape[0], self.h_p.shape[0]
        y = torch.matmul(x.float().unflatten(-1, (m, p)), self.h_p)
        if m > 1:
            y = torch.matmul(self.h_block, y)
        return ((y * self.scale).flatten(-2).to(x.dtype), *args[1:])


class MatrixTransform:
    """Forward pre-hook: the module's first input times ``stored * scale`` in blocks of ``stored``'s size,
    ``x.unflatten(-1, (-1, k)) @ (stored * scale)`` in float32: a compressed-tensors online input transform
    (``transform_config``, location ``input``) as compressed-tensors and vLLM apply it, ``stored`` the
    checkpoint's matrix and ``scale = 1 / sqrt(k)``."""

    def __init__(self, stored: torch.Tensor, scale: float):
        if stored.dim() != 2 or stored.shape[0] != stored.shape[1]:
            raise ValueError(f"MatrixTransform: the matrix is {list(stored.shape)}; expected a square one")
        self.stored, self.scale = stored.float(), scale
        self.matrix = self.stored * scale

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        k = self.matrix.shape[0]
        y = torch.matmul(x.float().unflatten(-1, (-1, k)), self.matrix.to(x.device)).flatten(-2)
        return (y.to(x.dtype), *args[1:])


#: the pre-hooks that transform a linear's input (``online_modules`` finds them)
INPUT_TRANSFORMS = (OnlineHadamard, DenseHadamard, MatrixTransform)


def input_transform(hook, in_features: int) -> tuple[torch.Tensor, float]:
    """``(stored, scale)`` of an input-transform hook on a linear of ``in_features`` inputs: the input becomes
    ``x.unflatten(-1, (-1, k)) @ (stored * scale)``, ``stored`` [k, k] float32 (compressed-tensors' convention,
    ``xh = x V``); for the Hadamard hooks ``k = in_features``, ``stored = (h_block kron H_p)^T`` (+-1)."""
    if isinstance(hook, MatrixTransform):
        return hook.stored, hook.scale
    if isinstance(hook, (OnlineHadamard, DenseHadamard)):
        block = hook.h_block.float().cpu()
        p = in_features // block.shape[0]
        return torch.kron(block, sylvester(p)).T.contiguous(), float(hook.scale)
    raise TypeError(f"input_transform: {type(hook).__name__} is not an input transform")


def sylvester(p: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``p`` (a power of two), float32, in the natural order that the
    fast Walsh-Hadamard butterflies of ``qcompiler::hadamard_transform`` apply."""
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def to_dense_hooks(model: torch.nn.Module) -> int:
    """Replace each ``OnlineHadamard`` pre-hook of ``model`` by its ``DenseHadamard`` (same transform, plain
    matmuls) in place, for an exporter that cannot carry ``qcompiler::hadamard_transform``; returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        hooks = module._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, OnlineHadamard):
                k = getattr(module, "in_features", None) or module.weight.shape[-1]
                hooks[key] = DenseHadamard(hook.h_block, int(k), hook.scale)
                swapped += 1
    return swapped


def online_modules(model: torch.nn.Module) -> list[str]:
    """The modules of ``model`` whose input an online Hadamard pre-hook rotates (either form)."""
    return [name for name, m in model.named_modules()
            if any(isinstance(h, INPUT_TRANSFORMS) for h in m._forward_pre_hooks.values())]
