"""A KV cache that stores keys and values quantized: ``QuantizedKVCache``, a transformers ``Cache``.

Pass it to ``model.generate(..., cache=cache)`` or to a forward (eager, quantized with
``qcompiler.quantize``, or compiled with a qcompiler backend); build it with ``qcompiler.kv_cache``,
which takes the static scales from the recipe's calibration. Each layer keeps, for keys and for
values, the codes and scales of ``qcompiler.core.kv_format`` (INT4 packed two per byte) and its
``residual_window`` most recent tokens in the model's dtype. A token that leaves the window is
quantized and appended to the codes; every read dequantizes the codes (``qcompiler::kv_cache_read``)
and appends the window. The cache therefore gives back, at each decode step, exactly what the
KV-cache pass computes in the graph for that position (tested), while holding the quantized format:
``nbytes()`` measures what it holds. With a window, an update of several tokens (a prefill, a chunk
of one) reads them, and the window, in full precision and stores the tokens that left the window
afterwards, as KIVI and transformers' ``QuantizedCache`` do: its attention is at least as precise as
the graph's per-position window (which treats every position as a decode step), and the decode steps
after it read the quantized cache as the graph does. Without a window every read is of the codes.

per_group scales (``KVCacheSpec.group_size``): a block's scales are fixed when its first token leaves
the window, from the whole block (which the window then holds), and kept per block ``[B, H, NB, D]``.
Blocks start at the cache's first position, so under left padding a padded row's blocks hold its
padding too (its pad keys widen those blocks' ranges; the attention still masks them).

``rotate`` / ``center``: the codes are those of ``kv_format.to_stored(x)`` (rotated, centered; the
window stays as given) and each read goes back through ``kv_format.from_stored`` (in ``kv_cache_read``).

Under ``torch.compile`` the cache's update is traced into the graph; the KV-cache pass recognises
its read op and adds no quantization of its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qcompiler.core import kv_format
from qcompiler.core.kv_format import KV_STATS_ATTR
from qcompiler.errors import CalibrationError, UnsupportedError
from qcompiler.passes.kv_cache import kv_rotation
from qcompiler.recipes import Granularity, KVCacheSpec

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "KV_STATS_ATTR"]

_ROLES = ("key", "value")
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


class QuantizedKVLayer(DynamicLayer):
    """One attention's cache: quantized codes (+ scales) for the tokens older than the window, the
    window in full precision. ``stats``: the calibration's ``{"key": (min, max), "value": ...}``
    per observed head and channel, needed when the spec has static scales."""

    is_croppable = False

    def __init__(self, spec: KVCacheSpec, stats: Stats | None = None):
        super().__init__()
        if spec.static and stats is None:
            raise CalibrationError(f"the KV cache spec ({spec.describe()}) has static scales: the cache needs the "
                                   "calibration's key / value ranges (build it with qcompiler.kv_cache)")
        self.spec = spec
        self.stats = stats
        if spec.rotate and stats is not None:
            kv_rotation(stats["key"][0].shape[-1])       # built here, outside any compiled forward
        self.storage_name = kv_format.storage_name(spec)
        self.cumulative_length = 0
        self.codes: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.zeros: dict[str, torch.Tensor | None] = {}
        self._static: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._transform: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}    # (rotation, center)

    def _granularity(self, role: str) -> Granularity:
        return self.spec.key if role == "key" else self.spec.value

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        heads, head_dim = key_states.shape[1], key_states.shape[-1]
        if self.spec.dtype.value == "int4" and head_dim % 2:
            raise UnsupportedError(f"recipe.kv_cache.dtype='int4' packs two values per byte along the head "
                                   f"dimension, which is odd ({head_dim})")
        rotation = kv_rotation(head_dim).to(self.device) if self.spec.rotate else None
        for role, states in zip(_ROLES, (key_states, value_states)):
            scale = zero = None
            stats = self.stats[role] if self.stats is not None else None
            if stats is not None and (stats[0].shape[0] % heads or stats[0].shape[-1] != head_dim):
                raise UnsupportedError(f"the calibration saw {role}s of {tuple(stats[0].shape)} heads x channels; "
                                       f"this layer caches {heads} heads x {head_dim}")
            center = None
            if self.spec.center:
                center = kv_format.static_center(stats, heads).to(self.device)
            if stats is not None and (self.spec.rotate or self.spec.center):
                stats = kv_format.stored_stats(self.stats, role, heads, self.spec, rotation)
            self._transform[role] = (rotation, center)
            states = self._stored(role, states)
            if self._granularity(role) is Granularity.PER_GROUP:     # no blocks yet: [B, H, 0, D] scales
                empty, _ = kv_format.block_scale(states[:, :, :0], self.spec.group_size, self.spec.dtype.value,
                                                 self.spec.symmetric)
                self.codes[role] = kv_format.write(states[:, :, :0], self.spec, empty, None)[0]
                self.scales[role] = empty
                self.zeros[role] = None if self.spec.symmetric else empty.to(torch.uint8)
                self._static[role] = (None, None)
                continue
            if self.spec.is_static(role):
                scale, zero = kv_format.static_scale(stats, heads, self._granularity(role), self.spec)
                scale, zero = scale.to(self.device), zero.to(self.device) if zero is not None else None
            self._static[role] = (scale, zero)
            codes, s, z = kv_format.write(states[:, :, :0], self.spec, scale, zero)
            self.codes[role], self.scales[role], self.zeros[role] = codes, s, z
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.head_dim = head_dim
        self.is_initialized = True

    def _stored(self, role: str, states: torch.Tensor) -> torch.Tensor:
        """``states`` as the codes hold them: rotated / centered (float32) when the spec says so."""
        rotation, center = self._transform.get(role, (None, None))
        return states if rotation is None and center is None else kv_format.to_stored(states, rotation, center)

    def _store(self, role: str, recent: torch.Tensor, spill: int) -> None:
        """Quantize the ``spill`` oldest tokens of ``recent`` (the window and the new tokens) into the codes."""
        recent = self._stored(role, recent)
        states = recent[:, :, :spill]
        if self._granularity(role) is Granularity.PER_GROUP:
            self._store_grouped(role, recent, spill)
            return
        scale, zero = self._static[role]
        codes, s, z = kv_format.write(states, self.spec, scale, zero)
        self.codes[role] = torch.cat([self.codes[role], codes], dim=-2)
        if scale is None:                                # per token: the scales grow with the codes
            self.scales[role] = torch.cat([self.scales[role], s], dim=-2)
            if z is not None:
                self.zeros[role] = torch.cat([self.zeros[role], z], dim=-2)

    def _store_grouped(self, role: str, recent: torch.Tensor, spill: int) -> None:
        """per_group: the scales of each block a spilled token opens come from the whole block, which
        ``recent`` holds (the spec keeps group_size <= residual_window); then the tokens are written
        with their blocks' scales."""
        group, start = self.spec.group_size, self.codes[role].shape[-2]      # position of recent[..., 0, :]
        have, need = self.scales[role].shape[-2], (start + spill - 1) // group + 1
        if need > have:
            first = have * group - start                                      # >= 0: the spill starts in a block
            s, z = kv_format.block_scale(recent[:, :, first:first + (need - have) * group], group,
                                         self.spec.dtype.value, self.spec.symmetric)
            self.scales[role] = torch.cat([self.scales[role], s], dim=-2)
            if z is not None:
                self.zeros[role] = torch.cat([self.zeros[role], z], dim=-2)
        blocks = torch.arange(start, start + spill, device=recent.device) // group
        scale = self.scales[role].index_select(-2, blocks)
        zero = self.zeros[role].index_select(-2, blocks) if self.zeros[role] is not None else None
        codes, _, _ = kv_format.write(recent[:, :, :spill], self.spec, scale, zero)
        self.codes[role] = torch.cat([self.codes[role], codes], dim=-2)

    def _read(self, role: str) -> torch.Tensor:
        group = self.spec.group_size if self._granularity(role) is Granularity.PER_GROUP else 0
        rotation, center = self._transform[role]
        return torch.ops.qcompiler.kv_cache_read(self.codes[role], self.scales[role], self.zeros[role],
                                                 self.storage_name, self.head_dim, self.dtype, group, rotation, center)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens; return every cached key and value as the attention reads them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        # a prefill (several new tokens) with a window reads its own tokens in full precision
        prefill = key_states.shape[-2] > 1 and self.spec.residual_window > 0
        out = []
        for role, new in zip(_ROLES, (key_states, value_states)):
            recent = torch.cat([self.keys if role == "key" else self.values, new], dim=-2)
            read = torch.cat([self._read(role), recent], dim=-2) if prefill else None
            spill = recent.shape[-2] - self.spec.residual_window
            if spill > 0:
                self._store(role, recent, spill)
                recent = recent[:, :, spill:].clone()    # the window alone, not the tensor it was cut from
            if role == "key":
                self.keys = recent
            else:
                self.values = recent
            out.append(read if prefill else torch.cat([self._read(role), recent], dim=-2))
        return out[0], out[1]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds: codes, scales, zero points, the full-precision window, and a
        rotated / centered cache's rotation and centers."""
        if not self.is_initialized:
            return []
        held = [self.keys, self.values]
        for role in _ROLES:
            held += [self.codes[role], self.scales[role]]
            if self.zeros[role] is not None:
                held.append(self.zeros[role])
            held += [t for t in self._transform.get(role, ()) if t is not None]
        return held

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        for role in _ROLES:
            self.codes[role] = fn(self.codes[role])
            if self._static[role][0] is None:           # per-token / per-group scales have a batch dimension
                self.scales[role] = fn(self.scales[role])
                if self.zeros[role] is not None:
                    self.zeros[role] = fn(self.zeros[role])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        raise UnsupportedError("a quantized KV cache cannot be cropped (its codes are not rewound); "
                               "use a DynamicCache for assisted decoding")

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.codes, self.scales, self.zeros = {}, {}, {}


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` of ``QuantizedKVLayer`` per attention, in the order the model runs
    them. ``stats``: one ``{"key": (min, max), "value": (min, max)}`` per attention (the KV
    observer's result, in call order), needed for static scales; without static scales layers are
    added as the model asks for them."""

    def __init__(self, spec: KVCacheSpec, stats: Sequence[Stats] | None = None, head_dim: int | None = None):
        """``head_dim``: the heads' size, for a rotated spec without calibration (``rotate`` with
        per_token / per_group scales), so its rotation is built here rather than in a compiled forward."""
        if not isinstance(spec, KVCacheSpec):
            raise TypeError(f"QuantizedKVCache takes a KVCacheSpec, got {type(spec).__name__}")
        if spec.rotate and head_dim is not None:
            kv_rotation(head_dim)
        self.spec = spec
        if stats is not None:
            super().__init__(layers=[QuantizedKVLayer(spec, s) for s in stats])
        elif spec.static:
            raise CalibrationError(f"the KV cache spec ({spec.describe()}) has static scales: build the cache with "
                                   "qcompiler.kv_cache(model), which takes them from the recipe's calibration")
        else:
            super().__init__(layer_class_to_replicate=lambda: QuantizedKVLayer(spec))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is None and layer_idx >= len(self.layers):
            raise UnsupportedError(f"the model writes cache layer {layer_idx}, but calibration saw "
                                   f"{len(self.layers)} attentions: build the cache for this model")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of the tensors the cache holds now (each storage counted once), measured from the
        tensors themselves."""
        seen, total = set(), 0
        for layer in self.layers:
            for t in getattr(layer, "tensors", lambda: [])():
                storage = t.untyped_storage()
                key = (storage.data_ptr(), t.device)
                if key not in seen and storage.nbytes():
                    seen.add(key)
                    total += storage.nbytes()
        return total
