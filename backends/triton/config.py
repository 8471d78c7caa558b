"""Tile configurations of the GEMM kernels: the autotune space, the defaults, the per-shape cache.

A ``GemmConfig`` is one launch choice: tiles ``BLOCK_M x BLOCK_N x BLOCK_K``, ``GROUP_M``
(programs that share a block of A rows, for L2 reuse), ``SPLIT_K`` (the K loop split over
that many programs whose fp32 partials a second kernel sums: the small-M decode path),
``num_warps`` and ``num_stages`` (software-pipelining depth).

The space searched when autotuning is on (``QCOMPILER_TRITON_AUTOTUNE=1`` in the
environment, read at each first call of a shape, or ``set_autotune(True)``), sized for
Hopper (132 SMs, wgmma tiles of 64 rows):

- prefill (M > 16): BLOCK_M in {64, 128} x BLOCK_N in {128, 256} x BLOCK_K in {32, 64, 128}
  x (num_warps, num_stages) in {(4, 4), (8, 3)};
- weight-only kernels at 16 < M <= 256 (still bound by reading the weight) also try narrow
  tiles, BLOCK_N in {32, 64}, so that the grid covers the SMs without split-K partials;
- decode (M <= 16): BLOCK_M = 16 x BLOCK_N in {64, 128} x BLOCK_K in {32, 64, 128, 256}
  x SPLIT_K in {1, 2, 4, 8}, 4 warps, 4 stages, minus splits that leave a program fewer
  than two K tiles; for the weight-only kernels also the FMA decode kernel (``gemm_decode``,
  ``kernel="fma"``): BLOCK_M = M rounded up to a power of two x BLOCK_N in {16, 32, 64} x BLOCK_K in
  {32, ..., 256} x the same splits, 2 stages, whose product tile keeps within the register bound;

each minus the tiles that break the device's bounds (``fits``): the pipelined operand tiles
within the shared memory one block may hold (``SMEM_PER_BLOCK``: 227 KB on sm_90, 163 KB on
sm_80, 99 KB on sm_89) and the fp32 / int32 accumulator within ``MAX_ACC_REGS`` registers per
thread (half of the 255 a thread may hold, the rest for operands and addresses; a 128 x 256
accumulator needs 8 warps). A kernel's ``valid`` then drops the K tiles its quantization groups
cannot take (``fits_groups``: a K tile divides the group size, so that 32-, 64- and 128-wide
groups all keep candidates).

The defaults (``default_config``): weight-only decode runs the FMA kernel (``fma_decode_config``:
no tensor cores, so no register -> shared round trip of the dequantized tile, and split-K reduced in
the same launch); W4A8 decode takes 16 x 64 tiles (K tile 256) and the
split-K that gives about two programs per SM with at least four K tiles each (W8A8, which has
no split-K, 16 x 32 tiles when 64-wide ones would not fill the SMs); weight-only
kernels at 16 < M <= 256 take BLOCK_M = M rounded up (at most 128) and the widest BLOCK_N in
{32, 64, 128} that still gives one program per SM; 8-bit GEMMs take 128 x 256 x 128 tiles,
16-bit ones 128 x 128 x 64 (64-row tiles up to M = 64).

Each candidate is timed with ``triton.testing.do_bench`` (median); a candidate that fails to
compile or launch is logged as a warning with its error and kept in ``autotune_failures()``
(never silently skipped), and when every candidate fails the shape raises. The best is cached per
(kernel, M bucket, N, K, variant), M rounded up to a power of two (M = 100 and M = 128 share
a choice). With autotuning off (the default, and always
under the interpreter, where timing means nothing) ``default_config`` picks by shape,
deterministically.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Hashable

__all__ = ["GemmConfig", "DECODE_MAX_M", "WEIGHT_ONLY_KINDS", "FMA_DECODE_KINDS", "fma_decode_config", "dot_decode_config", "SMEM_PER_BLOCK", "MAX_ACC_REGS", "OPERAND_BYTES",
           "autotune_enabled", "set_autotune", "prefill_space", "weight_only_space", "decode_space", "fits",
           "fits_groups", "search_space", "default_config", "choose_config", "bencher", "cached_configs",
           "clear_cache", "autotune_failures"]

log = logging.getLogger(__name__)

#: Up to this many rows, GEMMs take the decode path (16-row tiles, split-K).
DECODE_MAX_M = 16
#: Kernels whose 16-bit or 8-bit activations meet a narrower weight (bound by weight reads longer).
WEIGHT_ONLY_KINDS = ("weight_only", "int4", "w4a8")
#: Kernels whose decode (M <= 16) runs on the FMA units by default (``gemm_decode``), tl.dot tiles as candidates.
FMA_DECODE_KINDS = ("weight_only", "int4")
#: Shared memory one thread block may hold, by compute capability (CUDA programming guide,
#: "Technical Specifications per Compute Capability"); sm_90 when no GPU is present.
SMEM_PER_BLOCK = {(9, 0): 227 * 1024, (8, 9): 99 * 1024, (8, 6): 99 * 1024, (8, 0): 163 * 1024}
#: Accumulator registers (fp32 / int32) a thread may hold: half of the 255-register budget.
MAX_ACC_REGS = 128
#: Bytes per element of the two GEMM operands as tiles are loaded, per kernel kind.
OPERAND_BYTES = {"int8": (1, 1), "fp8": (1, 1), "w4a8": (1, 2), "int4": (2, 2), "weight_only": (2, 2)}
_NUM_SMS = 132


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "dot"     # weight-only decode: "fma" runs gemm_decode (FMA units, split-K fused)

    def meta(self) -> dict:
        """Keyword arguments of a kernel launch."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    SPLIT_K=self.split_k, num_warps=self.num_warps, num_stages=self.num_stages)


_AUTOTUNE_OVERRIDE: list[bool] = []   # set_autotune's value, when called
_CACHE: dict[Hashable, GemmConfig] = {}
_FAILURES: list[tuple[str, tuple[int, int, int], GemmConfig, str]] = []


def set_autotune(enabled: bool | None) -> None:
    """Turn autotuning on or off for this process (None: back to the environment variable)."""
    _AUTOTUNE_OVERRIDE.clear()
    if enabled is not None:
        _AUTOTUNE_OVERRIDE.append(bool(enabled))


def autotune_enabled() -> bool:
    if _AUTOTUNE_OVERRIDE:
        return _AUTOTUNE_OVERRIDE[0]
    return os.environ.get("QCOMPILER_TRITON_AUTOTUNE", "0").lower() in ("1", "true", "on", "yes")


def _smem_limit(capability: tuple[int, int] | None) -> int:
    if capability is None:
        capability = _device_capability()
    return SMEM_PER_BLOCK.get(tuple(capability), min(SMEM_PER_BLOCK.values()))


def _device_capability() -> tuple[int, int]:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_capability()
    except Exception:   # no CUDA build / driver: size for Hopper
        pass
    return (9, 0)


def fits(cfg: GemmConfig, a_bytes: float, b_bytes: float, capability: tuple[int, int] | None = None) -> bool:
    """Whether a tile keeps within the shared memory of one block and the accumulator register bound
    (the FMA decode kernel: its ``BLOCK_M x BLOCK_N x BLOCK_K`` product within the same bound)."""
    if cfg.kernel == "fma":
        return cfg.block_m * cfg.block_n * cfg.block_k // (32 * cfg.num_warps) <= MAX_ACC_REGS
    smem = cfg.num_stages * (cfg.block_m * cfg.block_k * a_bytes + cfg.block_n * cfg.block_k * b_bytes)
    acc_regs = cfg.block_m * cfg.block_n // (32 * cfg.num_warps)
    return smem <= _smem_limit(capability) and acc_regs <= MAX_ACC_REGS


def fits_groups(cfg: GemmConfig, group_size: int) -> bool:
    """Whether per-group scales load once per K tile: the tile divides the group (or groups are
    not a multiple of 16, or absent, and the kernel gathers scales per column)."""
    return group_size <= 0 or group_size % 16 != 0 or group_size % cfg.block_k == 0


def prefill_space(a_bytes: float = 2, b_bytes: float = 2,
                  capability: tuple[int, int] | None = None) -> list[GemmConfig]:
    """Candidates for M > 16 (see the module docstring); ``*_bytes``: bytes per operand element."""
    out = []
    for bm in (64, 128):
        for bn in (128, 256):
            for bk in (32, 64, 128):
                for warps, stages in ((4, 4), (8, 3)):
                    cfg = GemmConfig(bm, bn, bk, 8, 1, warps, stages)
                    if fits(cfg, a_bytes, b_bytes, capability):
                        out.append(cfg)
    return out


def weight_only_space(m: int, a_bytes: float = 2, b_bytes: float = 2,
                      capability: tuple[int, int] | None = None) -> list[GemmConfig]:
    """Extra candidates for weight-only kernels at 16 < M <= 256: narrow N tiles."""
    bm = min(128, max(32, 1 << math.ceil(math.log2(m))))
    space = [GemmConfig(bm, bn, bk, 8, 1, 4, stages) for bn in (32, 64) for bk in (32, 64, 128) for stages in (3, 4)]
    return [c for c in space if fits(c, a_bytes, b_bytes, capability)]


def decode_space(k: int, a_bytes: float = 2, b_bytes: float = 2,
                 capability: tuple[int, int] | None = None, m: int = DECODE_MAX_M, fma: bool = False) -> list[GemmConfig]:
    """Candidates for M <= 16 (see the module docstring); ``fma``: also the FMA decode kernel's tiles."""
    out = []
    if fma:
        bm = _pow2_at_least(m)
        for bn in (16, 32, 64):
            for bk in (32, 64, 128, 256):
                for split in (1, 2, 4, 8):
                    if split > 1 and k < 2 * split * bk:
                        continue
                    cfg = GemmConfig(bm, bn, bk, 1, split, 4, 2, kernel="fma")
                    if fits(cfg, a_bytes, b_bytes, capability):
                        out.append(cfg)
    for bn in (64, 128):
        for bk in (32, 64, 128, 256):
            for split in (1, 2, 4, 8):
                if split > 1 and k < 2 * split * bk:
                    continue
                cfg = GemmConfig(16, bn, bk, 1, split, 4, 4)
                if fits(cfg, a_bytes, b_bytes, capability):
                    out.append(cfg)
    return out


def search_space(m: int, k: int, *, kind: str, capability: tuple[int, int] | None = None) -> list[GemmConfig]:
    """The autotune candidates of one shape class (before a kernel's own ``valid``)."""
    a_bytes, b_bytes = OPERAND_BYTES.get(kind, (2, 2))
    if m <= DECODE_MAX_M:
        return decode_space(k, a_bytes, b_bytes, capability, m, fma=kind in FMA_DECODE_KINDS)
    space = prefill_space(a_bytes, b_bytes, capability)
    if kind in WEIGHT_ONLY_KINDS and m <= 256:
        space = weight_only_space(m, a_bytes, b_bytes, capability) + space
    return space


def _pow2_at_most(x: int) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1, x)))))


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def fma_decode_config(m: int, n: int, k: int) -> GemmConfig:
    """The FMA decode kernel's default tile: all rows (BLOCK_M = M rounded up to a power of two), a
    ``BLOCK_M x BLOCK_N x BLOCK_K`` product of 8192 (64 registers a thread at 4 warps), and the split-K
    that gives about two programs per SM with at least four K tiles each."""
    bm = _pow2_at_least(m)
    bn = 32 if bm <= 4 else 16
    bk = max(16, min(256, 8192 // (bm * bn)))
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    split = min(_pow2_at_most(max(1, 2 * _NUM_SMS // tiles)), _pow2_at_most(max(1, k // (4 * bk))), 8)
    return GemmConfig(bm, bn, bk, 1, split, 4, 2, kernel="fma")


def dot_decode_config(m: int, n: int, k: int, kind: str) -> GemmConfig:
    """The ``tl.dot`` decode tile of a weight-only kind (W4A8's default; the others' alternative to the
    FMA kernel): 16 x 64 tiles, K tile 256 for INT4 weights (128 for 8-bit), and the split-K that gives
    about two programs per SM with at least four K tiles each."""
    bn, bk = 64, (256 if kind in ("int4", "w4a8") else 128)
    tiles = math.ceil(n / bn)
    split = min(_pow2_at_most(max(1, 2 * _NUM_SMS // tiles)), _pow2_at_most(max(1, k // (4 * bk))), 8)
    return GemmConfig(16, bn, bk, 1, split, 4, 4)


def default_config(m: int, n: int, k: int, *, kind: str, interpreter: bool = False) -> GemmConfig:
    """The deterministic choice when not autotuning.

    ``kind``: ``"int8"`` / ``"fp8"`` (8-bit operands: wider K tiles), ``"weight_only"``,
    ``"int4"`` or ``"w4a8"``. Under the interpreter the tiles are as large as the shape allows
    (its cost is per program and per loop step, not per element), without split-K.
    """
    eight_bit = kind in ("int8", "fp8")
    if interpreter:
        bm = 16 if m <= 16 else 64
        bn = 64 if n <= 64 else 128
        bk = 64 if k <= 64 else 128
        return GemmConfig(bm, bn, bk, 8, 1, 4, 1)
    if m <= DECODE_MAX_M:
        if kind in FMA_DECODE_KINDS:
            return fma_decode_config(m, n, k)
        if kind not in WEIGHT_ONLY_KINDS:   # the W8A8 kernel has no split-K: narrower tiles instead
            return GemmConfig(16, 32 if math.ceil(n / 64) < _NUM_SMS else 64, 128, 1, 1, 4, 4)
        return dot_decode_config(m, n, k, kind)
    if kind in WEIGHT_ONLY_KINDS and m <= 256:
        bm = min(128, max(32, 1 << math.ceil(math.log2(m))))
        bn = 128
        while bn > 32 and math.ceil(m / bm) * math.ceil(n / bn) < _NUM_SMS:
            bn //= 2
        return GemmConfig(bm, bn, 128 if kind in ("int4", "w4a8") else 64, 8, 1, 4, 4)
    if m <= 64:
        return GemmConfig(64, 128, 128 if eight_bit else 64, 8, 1, 4, 4)
    return GemmConfig(128, 256 if eight_bit else 128, 128 if eight_bit else 64, 8, 1, 8, 3)


def _m_bucket(m: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, m))))


def choose_config(m: int, n: int, k: int, *, kind: str, variant: Hashable, interpreter: bool,
                  bench: Callable[[GemmConfig], float] | None = None,
                  valid: Callable[[GemmConfig], bool] = lambda cfg: True) -> GemmConfig:
    """The config for this shape: cached, autotuned with ``bench`` when enabled, else the default.

    ``bench(cfg)`` runs the kernel with ``cfg`` and returns milliseconds; ``valid`` drops
    candidates a kernel cannot take (e.g. a K tile that straddles quantization groups).
    """
    key = (kind, variant, _m_bucket(m), n, k)
    if key in _CACHE:
        return _CACHE[key]
    default = default_config(m, n, k, kind=kind, interpreter=interpreter)
    if not valid(default):
        default = _first_valid(default, valid)
    if interpreter or bench is None or not autotune_enabled():
        _CACHE[key] = default
        return default
    space = [c for c in search_space(m, k, kind=kind) if valid(c)]
    if not space:
        raise ValueError(f"autotune {kind} M={m} N={n} K={k}: no candidate tile fits this shape")
    best, best_ms, failed = default, float("inf"), 0
    for cfg in space:
        try:
            ms = bench(cfg)
        except Exception as e:   # e.g. out of shared memory / registers for this tile: reported
            failed += 1
            _FAILURES.append((kind, (m, n, k), cfg, f"{type(e).__name__}: {e}"))
            log.warning("autotune %s M=%d N=%d K=%d: %s failed: %s: %s", kind, m, n, k, cfg, type(e).__name__, e)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if failed == len(space):
        raise RuntimeError(f"autotune {kind} M={m} N={n} K={k}: all {failed} candidates failed "
                           f"(see autotune_failures()); the last: {_FAILURES[-1][3]}")
    log.info("autotune %s M=%d N=%d K=%d: %s (%.4f ms; %d of %d candidates failed)", kind, m, n, k, best,
             best_ms, failed, len(space))
    _CACHE[key] = best
    return best


def bencher(launch: Callable[[GemmConfig], None]) -> Callable[[GemmConfig], float]:
    """``bench`` for ``choose_config``: the median milliseconds of ``launch(cfg)`` (GPU only)."""
    def bench(cfg: GemmConfig) -> float:
        import triton.testing
        return triton.testing.do_bench(lambda: launch(cfg), return_mode="median")
    return bench


def _first_valid(cfg: GemmConfig, valid: Callable[[GemmConfig], bool]) -> GemmConfig:
    """Drop split-K, else shrink the K tile, until ``valid`` accepts the config."""
    if cfg.split_k > 1 and valid(replace(cfg, split_k=1)):
        return replace(cfg, split_k=1)
    bk = cfg.block_k
    while bk > 16:
        bk //= 2
        cand = replace(cfg, block_k=bk)
        if valid(cand):
            return cand
    cand = replace(cfg, block_k=16, split_k=1)
    if valid(cand):
        return cand
    raise ValueError(f"no tile configuration fits this shape (started from {cfg})")


def cached_configs() -> dict:
    """A copy of the per-shape cache: {(kind, variant, M bucket, N, K): GemmConfig}."""
    return dict(_CACHE)


def autotune_failures() -> list[tuple[str, tuple[int, int, int], GemmConfig, str]]:
    """Every candidate that failed to compile or run while autotuning: (kind, (M, N, K), config, error)."""
    return list(_FAILURES)


def clear_cache() -> None:
    _CACHE.clear()
    _FAILURES.clear()
