"""Fused mixture-of-experts weights in calibration: which ones a recipe quantizes, and each expert's inputs
(the tokens its router sent to it) for per-expert statistics. ``qcompiler.runtime.fused_experts`` holds the
quantized form."""

from __future__ import annotations

from typing import Iterator

import torch

from qcompiler.calibration import distributed as dd
from qcompiler.calibration.statistics import LayerStats, StatsAccumulator
from qcompiler.core.layer_quant import QuantizedWeight

__all__ = ["LAYOUT_ATTR", "UNREACHED_EXPERT_NOTE", "fused_expert_weights", "float_reason", "expert_key",
           "block_fused_experts", "record_expert_inputs", "quantize_experts", "experts_note"]

#: the attribute transformers' experts interface sets on an experts module: its weights are [E, K, N] when True
LAYOUT_ATTR = "is_transposed"
#: how the note of an expert no calibration token reached starts (the algorithm's own note follows)
UNREACHED_EXPERT_NOTE = "no calibration token reached it"


def fused_expert_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.Tensor]]:
    """``(module fqn, module, parameter name, parameter)`` for every float parameter of 3 or more dimensions
    (fused mixture-of-experts weights, or any other); ``quantize_fused_experts`` says which it can take."""
    for fqn, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 3 and p.is_floating_point():
                yield fqn, module, name, p


def expert_key(key: str, e: int) -> str:
    """The name of expert ``e`` of the fused weight ``key`` in statistics and results: ``key[e]``."""
    return f"{key}[{e}]"


def float_reason(module: torch.nn.Module, key: str, p: torch.Tensor, recipe) -> str:
    """Why the fused weight ``p`` (``module``'s, path ``key``) stays in float under ``recipe``; "" when it is
    quantized."""
    reason = recipe.fallback.keeps("experts", key) or recipe.fallback.keeps("linear", key)
    if not reason and p.dim() != 3:
        reason = f"a {p.dim()}-D weight {list(p.shape)}: fused experts are [experts, N, K]"
    if not reason and not isinstance(getattr(module, LAYOUT_ATTR, None), bool):
        reason = (f"its module ({type(module).__name__}) does not say its layout (no boolean "
                  f"{LAYOUT_ATTR!r}, set by transformers' experts interface)")
    if not reason and recipe.activation is not None and not recipe.activation.dynamic:
        reason = (f"recipe {recipe.name!r} quantizes activations with static scales, which calibration does not "
                  "choose for fused experts (their inputs are quantized per token only), so they stay in float for it")
    return reason


def block_fused_experts(block: torch.nn.Module, prefix: str, recipe) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """``{key: (module, parameter name, transposed)}``: the fused expert weights of ``block`` (module path
    ``prefix``) that ``quantize_fused_experts`` quantizes with ``recipe`` (``float_reason`` empty)."""
    if recipe.weight is None:
        return {}
    return {key: (module, name, getattr(module, LAYOUT_ATTR))
            for fqn, module, name, p in fused_expert_weights(block)
            for key in [".".join(part for part in (prefix, fqn, name) if part)]
            if not float_reason(module, key, p, recipe)}


class record_expert_inputs(torch.overrides.TorchFunctionMode):
    """Context manager: while it is active, each expert's inputs to the fused weights ``experts``
    (``block_fused_experts``) accumulate in ``StatsAccumulator``s keyed ``expert_key(key, e)`` (|x| and, with
    ``hessian``, ``X^T X``; no sampled rows). The experts modules run transformers' eager loop meanwhile
    (``config._experts_implementation = "eager"``, put back on exit): it takes one expert's weight
    (``weight[e]``) and applies it with ``F.linear`` (or a matmul for transposed weights), which this mode
    sees. Yields the accumulators."""

    def __init__(self, experts: dict[str, tuple[torch.nn.Module, str, bool]], hessian: bool = True):
        super().__init__()
        self.experts, self.hessian = experts, hessian
        self.acc: dict = {}
        self._params: dict[int, tuple[str, bool]] = {}
        self._slices: dict[int, tuple[str, int, torch.Tensor]] = {}
        self._configs: list = []

    def __enter__(self):
        if not self.experts:     # nothing to watch: no mode, so no Python call on every torch function
            return self.acc
        for key, (module, name, transposed) in self.experts.items():
            self._params[id(getattr(module, name))] = (key, transposed)
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "_experts_implementation", "eager") != "eager":
                self._configs.append((config, config._experts_implementation))
                config._experts_implementation = "eager"
        super().__enter__()
        return self.acc

    def __exit__(self, *exc):
        if not self.experts:
            return
        super().__exit__(*exc)
        for config, value in reversed(self._configs):
            config._experts_implementation = value
        self._configs.clear()
        self._slices.clear()

    def _add(self, key: str, e: int, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        name = expert_key(key, e)
        st = self.acc.get(name)
        if st is None:
            st = self.acc[name] = StatsAccumulator(rows.shape[1], rows.device, self.hessian)
        st.add(rows, torch.empty(0, dtype=torch.long))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and id(args[0]) in self._params:
            index = args[1]
            if isinstance(index, torch.Tensor) and index.numel() == 1:
                index = int(index)
            if isinstance(index, int):
                self._slices[id(out)] = (*self._params[id(args[0])], index % args[0].shape[0], out)
        elif func is torch.nn.functional.linear and len(args) > 1 and id(args[1]) in self._slices:
            key, transposed, e, _ = self._slices[id(args[1])]
            if not transposed:
                self._add(key, e, args[0])
        elif func in (torch.matmul, torch.Tensor.__matmul__, torch.mm) and len(args) > 1 \
                and id(args[1]) in self._slices:
            key, transposed, e, _ = self._slices[id(args[1])]
            if transposed:
                self._add(key, e, args[0])
        return out




def quantize_experts(experts: dict[str, tuple[torch.nn.Module, str, bool]], stats: dict, recipe, linear_fn,
                     world, where: str) -> tuple[dict[str, tuple[QuantizedWeight, str]], int]:
    """``({expert_key: (quantized weight, note)}, experts computed on this rank)`` for every expert of ``experts``
    (``block_fused_experts``), each by ``linear_fn`` (the weight algorithm, as for a linear) from its own
    statistics (``stats``: ``expert_key`` -> ``LayerStats``, the same on every rank); an expert no calibration
    token reached gets statistics of zero tokens, so the algorithm's own rule for too few rows decides (GPTQ
    rounds it to nearest, SparseGPT prunes it by magnitude), and its note starts ``UNREACHED_EXPERT_NOTE``. Under a process group
    (``world``) each expert is computed on one rank, assigned by cost, and the results broadcast."""
    units, costs = [], []
    for key, (module, name, transposed) in experts.items():
        p = getattr(module, name)
        n, k = (p.shape[2], p.shape[1]) if transposed else (p.shape[1], p.shape[2])
        for e in range(p.shape[0]):
            st = stats.get(expert_key(key, e))
            units.append((key, e))
            # GPTQ's cost: a K x K factorization and a sweep over N x K weights (rounding alone: N x K)
            costs.append(float(k) ** 3 + float(n) * k * k if st is not None and st.tokens else float(n) * k)
    owners = dd.assign_by_cost(costs, world)
    own = {}
    for (key, e), owner in zip(units, owners):
        if owner != world.rank:
            continue
        module, name, transposed = experts[key]
        p = getattr(module, name)
        w = (p[e].t() if transposed else p[e]).detach().float()
        st = stats.get(expert_key(key, e))
        if st is None or st.tokens == 0:
            qw, note = linear_fn(expert_key(key, e), w, _no_tokens(w.shape[1]), recipe)
            own[expert_key(key, e)] = (qw, f"{UNREACHED_EXPERT_NOTE}: {note}")
        else:
            own[expert_key(key, e)] = linear_fn(expert_key(key, e), w, st, recipe)
    done = dict(own)
    if world.active and units:
        for r in range(world.size):
            done.update(dd.broadcast_object(world, own if r == world.rank else None, r,
                                            "broadcast of quantized experts", where))
    return done, len(own)


def experts_note(notes: dict[str, str], key: str, count: int) -> str:
    """One report note for the fused expert weight ``key`` calibrated expert by expert (``notes``: each
    ``expert_key``'s note)."""
    unreached = [e for e in range(count) if notes[expert_key(key, e)].startswith(UNREACHED_EXPERT_NOTE)]
    reached = sorted({notes[expert_key(key, e)] for e in range(count) if e not in unreached})
    note = f"per expert, from its routed tokens: {'; '.join(reached) or '-'}"
    if unreached:
        how = sorted({notes[expert_key(key, e)].removeprefix(UNREACHED_EXPERT_NOTE + ": ") for e in unreached})
        note += f"; experts {unreached} reached by no calibration token, from their weights alone: {'; '.join(how)}"
    return note


def _no_tokens(k: int) -> LayerStats:
    """The statistics of an input no calibration token reached (``k`` channels)."""
    return LayerStats(torch.zeros(k), torch.zeros(0, k), 0, torch.zeros(k), torch.zeros(k, k))
