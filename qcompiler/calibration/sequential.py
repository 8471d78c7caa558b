"""The dependency levels of a decoder block's linears, for ``GPTQSpec.true_sequential``.

A group of linears (those reading one input, e.g. q/k/v) must be calibrated after every group whose weights
change that input (``o_proj`` after q/k/v, the MLP after ``o_proj``). Which groups feed which is found from the
block itself, not from its layer names: on one replayed call, each group's weights are zeroed in turn and the
groups whose inputs change depend on it. A group's level is one more than the deepest group it depends on;
groups of one level do not feed each other, so they share one calibration pass, and the result is the same as
calibrating the groups one at a time in call order (a group's input depends only on the groups it reads from).
"""

from __future__ import annotations

import torch

from qcompiler.calibration.statistics import _first_float

__all__ = ["dependency_levels", "called_once", "stop_when_called"]


def _module(block: torch.nn.Module, prefix: str, fqn: str) -> torch.nn.Module:
    """The module of ``block`` at full path ``fqn`` (``prefix`` is the block's own path)."""
    return block.get_submodule(fqn[len(prefix) + 1:]) if fqn != prefix else block


def _group_inputs(block: torch.nn.Module, prefix: str, groups: list[list[tuple[str, torch.Tensor]]],
                  args: tuple, kwargs: dict, overrides: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each group's input (its first linear's, first call) when the block runs ``(args, kwargs)`` with
    ``overrides`` in place of those parameters; groups not called are absent."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for j, group in enumerate(groups):
        module = _module(block, prefix, group[0][0])

        def hook(module, a, k, j=j):
            x = _first_float(a, k)
            if x is not None and j not in seen:
                seen[j] = x.detach().clone()
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            torch.func.functional_call(block, overrides, args, kwargs, strict=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _param_path(block: torch.nn.Module, prefix: str, fqn: str, param: torch.Tensor) -> str:
    name = next(n for n, p in _module(block, prefix, fqn).named_parameters(recurse=False) if p is param)
    return f"{fqn[len(prefix) + 1:]}.{name}" if fqn != prefix else name


def dependency_levels(block: torch.nn.Module, prefix: str, groups: list[list[tuple[str, torch.Tensor]]],
                      args: tuple, kwargs: dict) -> list[list[int]]:
    """Indices into ``groups`` (lists of ``(fqn, weight)`` under ``block``, whose paths start with ``prefix``),
    by level: group ``k`` is one level after the deepest earlier group ``j`` whose zeroed weights change ``k``'s
    input on the call ``block(*args, **kwargs)``. A group that call does not reach (an expert no token of it was
    routed to) is put one level after every group it reached before it (it may depend on any)."""
    reference = _group_inputs(block, prefix, groups, args, kwargs, {})
    feeds: dict[int, set[int]] = {}    # group j -> the later groups whose input changes with j's weights
    for j in range(len(groups) - 1):
        if j not in reference:
            continue
        zeroed = {_param_path(block, prefix, f, p): torch.zeros_like(p) for f, p in groups[j]}
        changed = _group_inputs(block, prefix, groups, args, kwargs, zeroed)
        feeds[j] = {k for k in range(j + 1, len(groups))
                    if k in reference and (k not in changed or not torch.equal(changed[k], reference[k]))}
    level: list[int] = []
    for k in range(len(groups)):
        sources = [j for j in range(k) if j in reference and (k not in reference or k in feeds[j])]
        level.append(1 + max((level[j] for j in sources), default=-1))
    out: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
    for k, lv in enumerate(level):
        out[lv].append(k)
    return out


def called_once(block: torch.nn.Module, prefix: str, fqns: list[str], args: tuple, kwargs: dict) -> set[str]:
    """Those of ``fqns`` (modules under ``block``) that ``block(*args, **kwargs)`` calls exactly once: a pass
    that needs only their inputs may stop once each of them has run."""
    counts = dict.fromkeys(fqns, 0)
    handles = []
    for fqn in fqns:
        handles.append(_module(block, prefix, fqn).register_forward_pre_hook(
            lambda m, a, fqn=fqn: counts.__setitem__(fqn, counts[fqn] + 1)))
    try:
        with torch.inference_mode():
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {f for f, n in counts.items() if n == 1}


class stop_when_called:
    """Context manager: forward hooks on the modules ``fqns`` of ``block`` that raise ``exc`` once each of them
    has run in the current pass (``reset()`` starts a pass). For passes that need only those modules' inputs."""

    def __init__(self, block: torch.nn.Module, prefix: str, fqns: set[str], exc: type[Exception]):
        self.block, self.prefix, self.fqns, self.exc = block, prefix, set(fqns), exc
        self.seen: set[str] = set()
        self.handles: list = []

    def _hook(self, fqn: str):
        def hook(module, args, out):
            self.seen.add(fqn)
            if self.seen >= self.fqns:
                raise self.exc
        return hook

    def reset(self) -> None:
        self.seen = set()

    def __enter__(self) -> "stop_when_called":
        for fqn in self.fqns:
            self.handles.append(_module(self.block, self.prefix, fqn).register_forward_hook(self._hook(fqn)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
