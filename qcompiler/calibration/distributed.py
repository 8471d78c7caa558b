"""Data-parallel calibration on torch.distributed: shard the batches, reduce the statistics, share the work.

Inside an initialised default process group (``torchrun --nproc-per-node N -m qcompiler quantize ...``, or a
user's own ``torch.distributed.init_process_group``), calibration runs on every rank:

- each rank runs a contiguous shard of the calibration batches, in whole replay groups (the runs of batches
  layer-by-layer calibration concatenates into one block call), so every block call computes on the same
  tensors at any number of ranks;
- per linear, the statistics are reduced before anything reads them: |x| maxima with MAX, |x| sums and
  ``X^T X`` (accumulated in float64) with SUM, token counts with SUM, and the sampled rows gathered in
  global batch order (rows are drawn by a generator keyed on the global call index, not on the shard);
- layer by layer, the weight algorithm's work of a block (GPTQ / AWQ / RTN per group of linears sharing an
  input) is assigned to ranks by estimated cost and each result broadcast from its owner; the group's
  ``X^T X`` (one for the group: its linears read the same input) is summed onto its owner only.

With float64 sums of float32 terms, the reduced statistics and therefore the quantized weights are the
same at 1, 2 or 4 ranks (tests/test_distributed_calibration.py checks it bit for bit). Every collective
runs under the process group's timeout; a rank that died or hangs makes the others stop with a
``DistributedCalibrationError`` naming this rank and the layer being reduced, never a partial result.
Without a process group (or with one rank) nothing here communicates.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from qcompiler.errors import CalibrationError

__all__ = ["World", "current_world", "DistributedCalibrationError", "shard_range", "shard_batches",
           "assign_by_cost", "init_from_environment", "collective"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedCalibrationError(CalibrationError):
    """A collective failed or timed out: a peer rank died, hung or diverged."""


@dataclass(frozen=True)
class World:
    """This process's place in the default process group (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes files (checkpoints, tables): rank 0."""
        return self.rank == 0


def current_world() -> World:
    """The default process group's rank and size, or ``World()`` when none is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_environment(timeout_s: float = 1800.0) -> World:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): gloo on CPU,
    NCCL when CUDA is available; collectives time out after ``timeout_s``. Returns ``current_world()``."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        log.info("joined a %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return current_world()


def shard_range(n_units: int, world: World) -> range:
    """The contiguous, balanced share ``[n*r/size, n*(r+1)/size)`` of ``n_units`` for this rank."""
    return range(n_units * world.rank // world.size, n_units * (world.rank + 1) // world.size)


def shard_batches(batches: Sequence[T], world: World, unit: int = 1) -> tuple[list[T], int]:
    """This rank's contiguous shard of ``batches`` in whole units of ``unit`` batches, and the global index
    of its first batch. Ranks beyond the number of units get an empty shard."""
    unit = max(1, unit)
    units = shard_range((len(batches) + unit - 1) // unit, world)
    start, stop = units.start * unit, min(units.stop * unit, len(batches))
    return list(batches[start:stop]), start


def assign_by_cost(costs: Sequence[float], world: World) -> list[int]:
    """Owner rank of each item: longest first onto the least loaded rank (ties: lower index, lower rank),
    the same on every rank."""
    load = [0.0] * world.size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world.size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


@dataclass
class CollectiveTime:
    """Wall time this process spent in collectives (waiting for slower ranks included), and their count."""

    seconds: float = 0.0
    calls: int = 0


#: accumulated by ``collective``; benchmarks read and reset it
COLLECTIVE_TIME = CollectiveTime()


def collective(world: World, what: str, where: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run one collective; a failure (a peer closed its connection, the timeout passed) becomes a
    ``DistributedCalibrationError`` naming this rank and ``where`` (the layer)."""
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as e:       # DistBackendError / DistNetworkError are RuntimeErrors
        raise DistributedCalibrationError(
            f"rank {world.rank} of {world.size}: {what} at {where} failed ({' '.join(str(e).split())[:300]}); "
            "another rank died, hung past the process group's timeout or ran a different model or recipe. "
            "Nothing was written.") from e
    finally:
        COLLECTIVE_TIME.seconds += time.perf_counter() - t0
        COLLECTIVE_TIME.calls += 1


def all_gather_objects(world: World, obj: Any, what: str, where: str) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled); ``[obj]`` without a process group."""
    if not world.active:
        return [obj]
    out: list[Any] = [None] * world.size
    collective(world, what, where, torch.distributed.all_gather_object, out, obj)
    return out


def broadcast_object(world: World, obj: Any, src: int, what: str, where: str) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not world.active:
        return obj
    box = [obj if world.rank == src else None]
    collective(world, what, where, torch.distributed.broadcast_object_list, box, src=src)
    return box[0]


def reduce_(world: World, tensor: torch.Tensor, dst: int, what: str, where: str) -> torch.Tensor:
    """In-place sum of a CPU or CUDA tensor onto rank ``dst`` (the other ranks' copies are left undefined)."""
    if world.active:
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        t = tensor.to(device)
        collective(world, what, where, torch.distributed.reduce, t, dst=dst, op=torch.distributed.ReduceOp.SUM)
        if t is not tensor and world.rank == dst:
            tensor.copy_(t)
    return tensor


def all_reduce_(world: World, tensor: torch.Tensor, op: str, what: str, where: str) -> torch.Tensor:
    """In-place all-reduce (``op`` "sum" or "max") of a CPU or CUDA tensor."""
    if world.active:
        red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        t = tensor.to(device)
        collective(world, what, where, torch.distributed.all_reduce, t, op=red)
        if t is not tensor:
            tensor.copy_(t)
    return tensor
