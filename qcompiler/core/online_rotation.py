"""The online Hadamard transform as a module hook (``qcompiler.rotate(..., online=True)`` puts one on
each linear writing the residual stream), and the check that outputs which cannot carry it refuse a
model holding one. Here, below the runtime and export layers, so that both can refuse."""

from __future__ import annotations

import torch

from qcompiler.core import ops  # noqa: F401  (declares qcompiler::hadamard_transform)
from qcompiler.errors import UnsupportedError

__all__ = ["OnlineHadamard", "online_modules", "refuse_online"]


class OnlineHadamard:
    """Forward pre-hook: the module's first input goes through ``qcompiler::hadamard_transform``."""

    def __init__(self, h_block: torch.Tensor, scale: float):
        self.h_block, self.scale = h_block, scale

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (torch.ops.qcompiler.hadamard_transform(args[0], self.h_block, self.scale), *args[1:])


def online_modules(model: torch.nn.Module) -> list[str]:
    """The modules of ``model`` whose input an online Hadamard pre-hook rotates."""
    return [name for name, m in model.named_modules()
            if any(isinstance(h, OnlineHadamard) for h in m._forward_pre_hooks.values())]


def refuse_online(model: torch.nn.Module, what: str) -> None:
    """``UnsupportedError`` when ``model`` carries online transforms: ``what`` (a checkpoint or an export)
    would hold weights ``W D^T`` without the transform ``D`` that their inputs need."""
    names = online_modules(model)
    if names:
        raise UnsupportedError(f"{what}: {len(names)} linears of this model ({names[0]}, ...) read their input through "
                               "an online Hadamard transform (rotation online=True) that the output cannot carry; "
                               "their weights would compute something else without it. Use a rotation without "
                               "online transforms ('+rot') for this")
