"""Calibration: run batches through the float model once and keep per-linear input statistics.

Statistics are keyed by module path, so every graph compiled later (a recompile for a new
shape, the second half of a graph break) reads the same numbers without recalibrating. For
each module that owns a 2-D floating parameter we record, on its first floating input, the
per-channel |x| maximum over all tokens and a seeded sample of rows for searches (SmoothQuant
alpha, static-scale calibrators, SQNR of the quantized layer).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import CalibrationError

__all__ = ["LayerStats", "CalibrationCache", "validate_batches"]

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Input statistics of one linear module: per-channel |x| max, sampled rows, tokens seen."""

    absmax: torch.Tensor
    samples: torch.Tensor
    tokens: int


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


def _first_float(args, kwargs) -> torch.Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


class CalibrationCache:
    """Collects ``LayerStats`` for a model once; later calls return the cached statistics."""

    def __init__(self, batches: Iterable, samples_per_layer: int = 1024, seed: int = 0, progress: bool = True):
        self.batches = validate_batches(batches)
        self.samples_per_layer = samples_per_layer
        self.seed = seed
        self.progress = progress
        self.stats: dict[str, LayerStats] | None = None
        self.seconds = 0.0

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
        self.check_vocabulary(model)
        t0 = time.perf_counter()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        gen = torch.Generator().manual_seed(self.seed)
        per_batch = max(1, math.ceil(self.samples_per_layer / len(self.batches)))
        acc: dict[str, dict] = {}
        handles = []

        def make_hook(path: str, dims: set[int]):
            def hook(module, args, kwargs):
                x = _first_float(args, kwargs)
                if x is None or x.shape[-1] not in dims:
                    return
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                st = acc.setdefault(path, {"absmax": torch.zeros(rows.shape[1], device=rows.device),
                                           "samples": [], "tokens": 0})
                if st["absmax"].shape[0] != rows.shape[1]:
                    return
                torch.maximum(st["absmax"], rows.abs().amax(0), out=st["absmax"])
                idx = torch.randperm(rows.shape[0], generator=gen)[:per_batch].to(rows.device)
                st["samples"].append(rows[idx].cpu())
                st["tokens"] += rows.shape[0]
            return hook

        for path, module in model.named_modules():
            dims = {d for p in module.parameters(recurse=False)
                    if p.dim() == 2 and p.is_floating_point() for d in p.shape}
            if dims:
                handles.append(module.register_forward_pre_hook(make_hook(path, dims), with_kwargs=True))
        try:
            # force_eager: the model's forward may itself be a torch.compile'd function whose
            # compile called us; calibration must run the float model, not recurse into Dynamo.
            with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
                for b in tqdm(self.batches, desc="calibrating", disable=not self.progress, leave=False):
                    if isinstance(b, Mapping):
                        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()})
                    else:
                        ids = b if b.dim() == 2 else b.unsqueeze(0)
                        model(input_ids=ids.to(device))
        finally:
            for h in handles:
                h.remove()
        self.stats = {path: LayerStats(st["absmax"].cpu(), torch.cat(st["samples"])[: self.samples_per_layer],
                                       st["tokens"]) for path, st in acc.items()}
        self.seconds = time.perf_counter() - t0
        log.info("calibration: %d batches, %d modules observed in %.1f s", len(self.batches), len(self.stats),
                 self.seconds)
        return self.stats
