"""Backends that run qcompiler's fused quantized ops.

``reference``: pure torch (CPU and GPU); ``inductor``: the same torch code compiled by
TorchInductor (fused quantize / epilogue kernels); ``triton``: fused Triton kernels. Backends register under a name with
``register_backend`` so that ``qcompiler.backend(..., target=name)`` can find them.
"""

from __future__ import annotations

from typing import Callable

from qcompiler.errors import RecipeError

__all__ = ["BACKENDS", "register_backend", "get_backend"]

#: target name -> factory of a lowering table {op overload packet: implementation}.
BACKENDS: dict[str, Callable[[], dict]] = {}


def register_backend(name: str):
    """Register ``factory`` (-> lowering table) as target ``name``; a name already taken is an error
    (a plug-in that shadowed ``reference`` would silently change what every test compares against)."""
    def deco(factory: Callable[[], dict]):
        if name in BACKENDS and BACKENDS[name] is not factory:
            raise RecipeError(f"backend {name!r} is already registered (by {BACKENDS[name].__module__}."
                              f"{BACKENDS[name].__qualname__})")
        BACKENDS[name] = factory
        return factory
    return deco


def get_backend(name: str) -> dict:
    if name not in BACKENDS:
        raise RecipeError(f"unknown target {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]()


from . import reference  # noqa: E402,F401  (registers "reference")
from . import inductor  # noqa: E402,F401  (registers "inductor")


@register_backend("triton")
def _triton_table() -> dict:
    # Lazy: importing qcompiler.backends.triton does not import triton, and the kernels are
    # defined only once the backend is asked for (after TRITON_INTERPRET can be read).
    from .triton import lowering_table
    return lowering_table()
