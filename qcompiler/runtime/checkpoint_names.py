"""The names a model's tensors take in its architecture's published checkpoints, and where each expert of a fused
mixture-of-experts weight lives there.

transformers 5 renames some modules when it loads a checkpoint (Mixtral's ``block_sparse_moe`` becomes ``mlp``) and
names them back when it saves one (``save_pretrained``). ``CheckpointNames`` applies those renamings (transformers'
own ``conversion_mapping``, no architecture named here) both ways: ``checkpoint_key`` / ``checkpoint_module`` /
``checkpoint_state`` for a checkpoint serving runtimes read (vLLM's Mixtral loads ``block_sparse_moe.gate``, not
``mlp.gate``), ``model_key`` / ``model_module`` to read one back.

transformers 5 holds a model's experts as one 3-D parameter per projection (``mlp.experts.gate_up_proj``
``[experts, 2 x intermediate, hidden]``) and converts the per-expert tensors of the checkpoints published for
the architecture (Mixtral's ``block_sparse_moe.experts.3.w1.weight``, Qwen2-MoE's
``mlp.experts.3.gate_proj.weight``) when it loads them (``transformers.conversion_mapping``). Serving formats
(compressed-tensors for vLLM, what llm-compressor writes) store quantized experts in that per-expert layout,
one linear each.

``checkpoint_slices(model, key)`` finds the layout from transformers' own reverse conversion
(``revert_weight_conversion``, what ``save_pretrained`` runs) without naming any architecture: it converts an
index tensor of the fused parameter's shape (element ``i`` holds ``i``) and reads back, from each per-expert
tensor it gets, which expert and which rows of that expert's ``[N, K]`` matrix it holds. Anything that is not
a whole expert's rows in the ``[out, in]`` layout of a linear (a fused name kept, columns split, a permutation)
is refused by name.

The index tensor costs 4 bytes per element of the fused parameter (8 past 2^31 elements), one parameter at a
time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from qcompiler.errors import UnsupportedError

__all__ = ["CheckpointNames", "ExpertSlice", "checkpoint_slices"]


class CheckpointNames:
    """The renamings between ``model``'s tensor names and its architecture's checkpoint names (transformers'
    ``WeightRenaming`` entries of its default conversion mapping; converters that merge tensors, such as fused
    experts, are ``checkpoint_slices``' part)."""

    def __init__(self, model: torch.nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming
        try:
            conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                           if not isinstance(c, PrefixChange)]
        except (AttributeError, TypeError):     # not a transformers model: no renaming
            conversions = []
        self.model = model
        self._forward = [c for c in conversions if isinstance(c, WeightRenaming)]
        self._reverse = [r for r in (c.reverse_transform() for c in conversions[::-1]) if isinstance(r, WeightRenaming)]

    def checkpoint_key(self, key: str) -> str:
        """The checkpoint name of the model's tensor ``key``."""
        return _renamed(key, self._reverse)

    def checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The float tensors ``tensors`` (model names) as the checkpoint holds them: renamed, and split or merged
        by transformers' reverse converters (fused float experts become per-expert weights), as ``save_pretrained``
        writes them."""
        from transformers.core_model_loading import revert_weight_conversion
        if not tensors:
            return {}
        return revert_weight_conversion(_without_load_history(self.model), tensors)

    def checkpoint_module(self, fqn: str) -> str:
        """The checkpoint name of the model's module ``fqn`` (renamed as its ``.weight`` is)."""
        return _renamed(fqn + ".weight", self._reverse).removesuffix(".weight")

    def model_key(self, key: str) -> str:
        """The model's name of the checkpoint tensor ``key``."""
        return _renamed(key, self._forward)

    def model_module(self, fqn: str) -> str:
        """The model's name of the checkpoint's module ``fqn``."""
        return _renamed(fqn + ".weight", self._forward).removesuffix(".weight")


def _renamed(key: str, renamings: list) -> str:
    from transformers.core_model_loading import apply_renamings
    return apply_renamings(key, renamings) if renamings else key


@dataclass(frozen=True)
class ExpertSlice:
    """Rows ``[start, stop)`` of expert ``expert``'s ``[N, K]`` matrix, stored in the checkpoint as the linear
    ``name`` (its weight ``name + ".weight"``)."""

    name: str
    expert: int
    start: int
    stop: int


def checkpoint_slices(model: torch.nn.Module, key: str, shape: tuple[int, int, int], transposed: bool
                      ) -> list[ExpertSlice]:
    """The per-expert linears that the fused parameter ``key`` of ``model`` (shape ``shape``: ``[E, N, K]``, or
    ``[E, K, N]`` when ``transposed``) is saved as, in the model's default checkpoint layout, by expert and row.

    Raises:
        UnsupportedError: transformers has no per-expert layout for it (the parameter is saved fused, or split
            other than into whole rows of one expert's ``[out, in]`` matrix).
    """
    from transformers.core_model_loading import revert_weight_conversion

    numel = shape[0] * shape[1] * shape[2]
    dtype = torch.int32 if numel < 2 ** 31 else torch.int64
    index = torch.arange(numel, dtype=dtype).reshape(shape)
    probe = _without_load_history(model)
    out = revert_weight_conversion(probe, {key: index})
    slices = [_slice_of(key, name, t, shape, transposed) for name, t in out.items()]
    if not slices:
        raise UnsupportedError(f"fused experts {key!r}: transformers' reverse conversion gives no tensor for it")
    return sorted(slices, key=lambda s: (s.expert, s.start))


def _without_load_history(model: torch.nn.Module):
    """``model`` as transformers sees a model built from its config: its default conversion mapping (that of the
    checkpoints published for the architecture), not the one recorded when it was loaded."""
    if getattr(model, "_weight_conversions", None) is None:
        return model
    shallow = copy.copy(model)        # the modules are shared, not copied
    shallow._weight_conversions = None
    return shallow


def _slice_of(key: str, name: str, t: torch.Tensor, shape: tuple[int, int, int], transposed: bool) -> ExpertSlice:
    """Which expert and rows the reverse-converted index tensor ``t`` (saved as ``name``) holds."""
    def refuse(why: str) -> UnsupportedError:
        return UnsupportedError(f"fused experts {key!r}: transformers saves them as {name!r} {list(t.shape)}, {why}; "
                                "only whole rows of one expert's [out, in] matrix per tensor are written per expert")

    if t.dim() != 2:
        raise refuse("not a 2-D linear weight (the architecture's checkpoints keep the experts fused)")
    if not name.endswith(".weight"):
        raise refuse("not a linear's '.weight'")
    experts, a_size, b_size = shape
    local = t.to(torch.int64)
    expert = local // (a_size * b_size)
    a, b = (local // b_size) % a_size, local % b_size
    rows, cols = (b, a) if transposed else (a, b)     # the expert's [N, K] row and column of each element
    e = int(expert.flatten()[0])
    start = int(rows.flatten()[0])
    n, k = t.shape
    want_rows = torch.arange(start, start + n).unsqueeze(1).expand(n, k)
    want_cols = torch.arange(k).unsqueeze(0).expand(n, k)
    k_full = a_size if transposed else b_size
    if not (expert == e).all() or k != k_full or not torch.equal(rows, want_rows) or not torch.equal(cols, want_cols):
        raise refuse("not whole rows of one expert")
    return ExpertSlice(name.removesuffix(".weight"), e, start, start + n)
