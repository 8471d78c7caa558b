"""The online Hadamard transform as a module hook (``qcompiler.rotate(..., online=True)`` puts one on
each linear writing the residual stream), and the check that outputs which cannot carry it refuse a
model holding one. Here, below the runtime and export layers, so that both can refuse."""

from __future__ import annotations

import torch

from qcompiler.core import ops  # noqa: F401  (declares qcompiler::hadamard_transform)
from qcompiler.errors import UnsupportedError

__all__ = ["OnlineHadamard", "DenseHadamard", "online_modules", "refuse_online", "to_dense_hooks"]


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
            if any(isinstance(h, (OnlineHadamard, DenseHadamard)) for h in m._forward_pre_hooks.values())]


def refuse_online(model: torch.nn.Module, what: str) -> None:
    """``UnsupportedError`` when ``model`` carries online transforms: ``what`` (a checkpoint or an export)
    would hold weights ``W D^T`` without the transform ``D`` that their inputs need."""
    names = online_modules(model)
    if names:
        raise UnsupportedError(f"{what}: {len(names)} linears of this model ({names[0]}, ...) read their input through "
                               "an online Hadamard transform (rotation online=True) that the output cannot carry; "
                               "their weights would compute something else without it. Use a rotation without "
                               "online transforms ('+rot') for this")
