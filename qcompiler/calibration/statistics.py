"""Calibration: run batches through the float model once and keep per-linear input statistics.

Statistics are keyed by module path, so every graph compiled later (a recompile for a new
shape, the second half of a graph break) reads the same numbers without recalibrating. For
each module that owns a 2-D floating parameter we record, on its first floating input, the
per-channel |x| maximum over all tokens and a seeded sample of rows for searches (SmoothQuant
alpha, static-scale calibrators, SQNR of the quantized layer).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from qcompiler.errors import CalibrationError

__all__ = ["LayerStats", "StatsAccumulator", "CalibrationCache", "validate_batches", "observe_linear_inputs",
           "reduce_accumulators",
           "run_batches", "calibration_rows", "observe_tensors"]

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Input statistics of one linear module: per-channel |x| max, sampled rows, tokens seen,
    per-channel mean |x| (AWQ) and, when asked for (GPTQ), the Hessian ``2/n * sum x^T x``."""

    absmax: torch.Tensor
    samples: torch.Tensor
    tokens: int
    absmean: torch.Tensor | None = None
    hessian: torch.Tensor | None = None


def hessian_from(xtx: torch.Tensor, tokens: int) -> torch.Tensor:
    """GPTQ's Hessian ``2/n X^T X`` (float32, on the CPU) from the float64 sum ``X^T X`` of ``n`` tokens."""
    return (xtx * (2.0 / max(tokens, 1))).float().cpu()


class StatsAccumulator:
    """Accumulates ``LayerStats`` for one module from batches of input rows [M, K].

    Sums (|x| per channel, ``X^T X``) are kept in float64: each call adds a float32 term, and float64
    sums of such terms do not depend on their order in practice, so statistics reduced over any number
    of ranks (``reduce``) equal a single process's."""

    def __init__(self, k: int, device, hessian: bool):
        self.absmax = torch.zeros(k, device=device)
        self.abssum = torch.zeros(k, device=device, dtype=torch.float64)
        self.xtx = torch.zeros(k, k, device=device, dtype=torch.float64) if hessian else None
        self.samples: list[torch.Tensor] = []
        self.tokens = 0

    def add(self, rows: torch.Tensor, sample_idx: torch.Tensor, xtx: torch.Tensor | None = None) -> None:
        torch.maximum(self.absmax, rows.abs().amax(0), out=self.absmax)
        self.abssum += rows.abs().sum(0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx += xtx if xtx is not None else rows.t() @ rows      # float32 term, float64 sum
        self.samples.append(rows[sample_idx.to(rows.device)].cpu())
        self.tokens += rows.shape[0]

    def finish(self, max_samples: int) -> LayerStats:
        n = max(self.tokens, 1)
        return LayerStats(self.absmax.cpu(), torch.cat(self.samples)[:max_samples], self.tokens,
                          (self.abssum / n).float().cpu(),
                          None if self.xtx is None else hessian_from(self.xtx, self.tokens))

    def reduce(self, world, where: str, hessian: bool = True) -> None:
        """Combine this accumulator with the same module's on every rank of ``world`` (a
        ``qcompiler.calibration.distributed.World``): max, sums, token counts, and the sampled rows
        in rank order (= global batch order, the shards being contiguous). ``hessian=False`` leaves
        ``X^T X`` this rank's partial sum (for the caller to reduce where it is needed)."""
        from qcompiler.calibration import distributed as dd
        if not world.active:
            return
        dd.all_reduce_(world, self.absmax, "max", "all-reduce of |x| maxima", where)
        dd.all_reduce_(world, self.abssum, "sum", "all-reduce of |x| sums", where)
        if self.xtx is not None and hessian:
            dd.all_reduce_(world, self.xtx, "sum", "all-reduce of the Hessian X^T X", where)
        tokens = torch.tensor([self.tokens], dtype=torch.int64)
        self.tokens = int(dd.all_reduce_(world, tokens, "sum", "all-reduce of token counts", where))
        gathered = dd.all_gather_objects(world, [s.cpu() for s in self.samples], "gather of sampled rows", where)
        self.samples = [s for rank_samples in gathered for s in rank_samples]


def reduce_accumulators(acc: dict[str, "StatsAccumulator"], world, where: str,
                        hessian: bool, reduce_hessians: bool = True) -> dict[str, "StatsAccumulator"]:
    """``StatsAccumulator.reduce`` for every module any rank observed (a rank with no batches, or whose
    batches never reached a module, contributes empty statistics); returns the accumulators in one order
    on every rank (first seen on rank 0, then on rank 1, ...). Without a process group: ``acc``.
    ``reduce_hessians=False``: each ``X^T X`` stays this rank's partial sum."""
    if not world.active:
        return acc
    from qcompiler.calibration import distributed as dd
    shapes = {path: a.absmax.shape[0] for path, a in acc.items()}
    union: dict[str, int] = {}
    for rank_shapes in dd.all_gather_objects(world, shapes, "gather of observed modules", where):
        for path, k in rank_shapes.items():
            if union.setdefault(path, k) != k:
                raise dd.DistributedCalibrationError(f"{where}: module {path} has {k} input channels on one rank and "
                                                     f"{union[path]} on another: the ranks run different models")
    device = next((a.absmax.device for a in acc.values()), torch.device("cpu"))
    out = {}
    for path, k in union.items():
        out[path] = acc.get(path) or StatsAccumulator(k, device, hessian)
        out[path].reduce(world, f"{where}, {path}", hessian=reduce_hessians)
    return out


def validate_batches(batches: Iterable) -> list:
    """Materialize calibration batches, checking each is token ids or a dict of model kwargs."""
    if batches is None:
        raise CalibrationError("this recipe needs calibration data: pass calibration=<iterable of "
                               "token-id tensors or dicts of model inputs>")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    try:
        items = list(batches)
    except TypeError:
        raise CalibrationError(f"calibration must be an iterable of batches, got {type(batches).__name__}") from None
    if not items:
        raise CalibrationError("calibration is empty: give at least one batch")
    for i, b in enumerate(items):
        ids = b.get("input_ids") if isinstance(b, Mapping) else b
        if isinstance(b, Mapping) and ids is None:
            if not any(isinstance(v, torch.Tensor) for v in b.values()):
                raise CalibrationError(f"calibration batch {i} is a dict with no tensor values")
            continue
        if not isinstance(ids, torch.Tensor):
            raise CalibrationError(f"calibration batch {i} must be a tensor of token ids or a dict of model "
                                   f"inputs, got {type(b).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise CalibrationError(f"calibration batch {i}: token ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise CalibrationError(f"calibration batch {i}: token ids must have shape [batch, seq] or [seq], "
                                   f"got {tuple(ids.shape)}")
    return items


def calibration_rows(batches: list) -> int | None:
    """Input rows each decoder linear sees over ``batches``: their tokens (batch x seq, padding
    included, as the statistics count them); None when a batch has no token ids (``inputs_embeds``)."""
    rows = 0
    for b in batches:
        ids = b.get("input_ids") if isinstance(b, Mapping) else b
        if not isinstance(ids, torch.Tensor):
            return None
        rows += ids.numel()
    return rows


def _first_float(args, kwargs) -> torch.Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


class CalibrationCache:
    """Collects ``LayerStats`` for a model once; later calls return the cached statistics."""

    def __init__(self, batches: Iterable, samples_per_layer: int = 1024, seed: int = 0, progress: bool = True,
                 hessian: bool = False):
        self.batches = validate_batches(batches)
        self.hessian = hessian
        self.samples_per_layer = samples_per_layer
        self.seed = seed
        self.progress = progress
        self.stats: dict[str, LayerStats] | None = None
        self.seconds = 0.0
        # the recipe whose fused mixture-of-experts weights the same pass calibrates expert by expert (set by
        # qcompiler.quantize for a Hessian-based weight algorithm; None: linears only); their results:
        # {key: ([QuantizedWeight per expert], note)}, as layer-by-layer calibration gives them
        self.experts_recipe = None
        self.expert_results: dict[str, tuple[list, str]] = {}

    def check_vocabulary(self, model: torch.nn.Module) -> None:
        """Refuse token ids outside the model's input embedding (clear error before any forward)."""
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None)
        if vocab is None:
            return
        for i, b in enumerate(self.batches):
            ids = b.get("input_ids") if isinstance(b, Mapping) else b
            if isinstance(ids, torch.Tensor) and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                raise CalibrationError(f"calibration batch {i}: token ids must be in [0, {vocab}) for this model, "
                                       f"got values in [{int(ids.min())}, {int(ids.max())}]")

    def collect(self, model: torch.nn.Module) -> dict[str, LayerStats]:
        if self.stats is not None:
            return self.stats
        from qcompiler.calibration.distributed import current_world, shard_batches
        self.check_vocabulary(model)
        t0 = time.perf_counter()
        world = current_world()
        local, offset = shard_batches(self.batches, world)   # all of them without a process group
        from qcompiler.calibration.expert_inputs import block_fused_experts, record_expert_inputs
        experts = block_fused_experts(model, "", self.experts_recipe) \
            if self.hessian and self.experts_recipe is not None else {}
        with observe_linear_inputs(model, self.samples_per_layer, len(self.batches), self.seed, self.hessian,
                                   index_offset=offset) as acc, record_expert_inputs(experts) as expert_acc:
            run_batches(model, local, self.progress and world.is_writer)
        acc = reduce_accumulators(acc, world, "calibration", self.hessian)
        self.stats = {path: a.finish(self.samples_per_layer) for path, a in acc.items()}
        if experts:
            self._quantize_experts(experts, reduce_accumulators(expert_acc, world, "calibration (experts)", True),
                                   world)
        self.seconds = time.perf_counter() - t0
        log.info("calibration: %d batches, %d modules observed in %.1f s", len(self.batches), len(self.stats),
                 self.seconds)
        return self.stats

    def _quantize_experts(self, experts: dict, acc: dict, world) -> None:
        """Each fused expert by the recipe's weight algorithm from its routed tokens in the float model (one pass:
        the experts, like the linears, see the float model's inputs), into ``expert_results``."""
        from qcompiler.algorithms import registry as weight_algorithms
        from qcompiler.calibration.expert_inputs import expert_key, experts_note, quantize_experts
        stats = {k: a.finish(0) for k, a in acc.items()}
        done, _ = quantize_experts(experts, stats, self.experts_recipe, weight_algorithms.quantize_linear, world,
                                   "calibration")
        for key, (module, name, _) in experts.items():
            count = getattr(module, name).shape[0]
            self.expert_results[key] = ([done[expert_key(key, e)][0] for e in range(count)],
                                        experts_note({f: r[1] for f, r in done.items()}, key, count))


def run_batches(model: torch.nn.Module, batches: list, progress: bool, desc: str = "calibrating") -> None:
    """Run the float model over ``batches`` (token ids or kwargs dicts), outputs discarded."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # force_eager: the model's forward may itself be a torch.compile'd function whose
    # compile called us; calibration must run the float model, not recurse into Dynamo.
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            if isinstance(b, Mapping):
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()})
            else:
                ids = b if b.dim() == 2 else b.unsqueeze(0)
                model(input_ids=ids.to(device))


def observe_tensors(model: torch.nn.Module, batches: list, observers: Mapping[str, Any],
                    progress: bool = True) -> dict[str, Any]:
    """Run the float model over ``batches`` once with every observer active; ``{name: observer.result()}``.

    An observer is a context manager (its ``__enter__`` installs hooks, ``__exit__`` removes them) with
    a ``result()`` method: how a quantization target beyond linear weights calibrates
    (``qcompiler.targets.QuantTarget.observe``)."""
    if not observers:
        return {}
    from qcompiler.calibration import distributed as dd
    world = dd.current_world()
    # under torch.distributed each rank observes its shard when every observer can merge the ranks' results
    # (``merge(results)``, order-independent); otherwise every rank observes every batch
    sharded = world.active and all(callable(getattr(obs, "merge", None)) for obs in observers.values())
    local = dd.shard_batches(batches, world)[0] if sharded else batches
    with contextlib.ExitStack() as stack:
        for obs in observers.values():
            stack.enter_context(obs)
        run_batches(model, local, progress and world.is_writer, desc="calibrating tensors")
    results = {name: obs.result() for name, obs in observers.items()}
    if sharded:
        gathered = dd.all_gather_objects(world, results, "gather of tensor observers", "the quantization targets")
        results = {name: obs.merge([g[name] for g in gathered]) for name, obs in observers.items()}
    return results


def linear_input_dims(module: torch.nn.Module) -> set[int]:
    """The dimensions of ``module``'s own 2-D float parameters (empty: not a linear-like module to observe)."""
    return {d for p in module.parameters(recurse=False) if p.dim() == 2 and p.is_floating_point() for d in p.shape}


def _sample_seed(seed: int, call: int, path: str) -> int:
    """A generator seed for one module's one call, the same in every process (no Python ``hash``)."""
    return zlib.crc32(f"{seed}:{call}:{path}".encode())


class observe_linear_inputs:
    """Context manager: forward pre-hooks on every module owning a 2-D float parameter (under
    ``root``, paths prefixed by ``prefix``) that accumulate its first float input's statistics.
    Yields ``{module path: StatsAccumulator}``. Inputs shared by several modules (q/k/v after one
    norm) have their ``x^T x`` computed once per call.

    ``n_batches`` calls in all (over every rank) share ``samples_per_layer`` sampled rows; the rows of a
    module's i-th call are drawn by a generator keyed on ``(seed, index_offset + i, module path)``, so a
    rank whose shard starts at global call ``index_offset`` samples the rows a single process would.
    ``only``: the full paths to observe (None: every module)."""

    def __init__(self, root: torch.nn.Module, samples_per_layer: int, n_batches: int, seed: int = 0,
                 hessian: bool = False, prefix: str = "", skip_prefix: str | None = None, index_offset: int = 0,
                 only: Collection[str] | None = None):
        self.root, self.prefix, self.hessian, self.skip_prefix = root, prefix, hessian, skip_prefix
        self.only = None if only is None else set(only)
        self.per_batch = max(1, math.ceil(samples_per_layer / max(n_batches, 1)))
        self.seed, self.index_offset = seed, index_offset
        self.calls: dict[str, int] = {}
        self.acc: dict[str, StatsAccumulator] = {}
        self.handles: list = []
        self._shared: dict = {}

    def _hook(self, path: str, dims: set[int]):
        def hook(module, args, kwargs):
            x = _first_float(args, kwargs)
            if x is None or x.shape[-1] not in dims:
                return
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            st = self.acc.get(path)
            if st is None:
                st = self.acc[path] = StatsAccumulator(rows.shape[1], rows.device, self.hessian)
            if st.absmax.shape[0] != rows.shape[1]:
                return
            xtx = None
            if self.hessian:
                # the same tensor object as the previous hook's input (q/k/v): reuse its x^T x.
                # Holding the tensor keeps its memory from being reused by another input.
                if self._shared.get("x") is not x:
                    self._shared = {"x": x, "xtx": rows.t() @ rows}
                xtx = self._shared["xtx"]
            call = self.calls.get(path, 0)
            self.calls[path] = call + 1
            gen = torch.Generator().manual_seed(_sample_seed(self.seed, self.index_offset + call, path))
            idx = torch.randperm(rows.shape[0], generator=gen)[: self.per_batch]
            st.add(rows, idx, xtx)
        return hook

    def __enter__(self) -> dict[str, StatsAccumulator]:
        for path, module in self.root.named_modules():
            dims = linear_input_dims(module)
            if dims and not (self.skip_prefix and path.startswith(self.skip_prefix)):
                full = f"{self.prefix}.{path}" if self.prefix and path else (self.prefix or path)
                if self.only is not None and full not in self.only:
                    continue
                self.handles.append(module.register_forward_pre_hook(self._hook(full, dims), with_kwargs=True))
        return self.acc

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._shared = {}
