"""The attention value paths of a graph, head by head: which linear's rows (the value projection) an output
linear's input channels (``o_proj``) read through an attention, and in blocks of which head size. An orthogonal
``R`` per head then folds offline (SpinQuant's R2): the value rows of each head ``W_v -> R^T W_v``, the output
linear's columns of each head ``W_o -> W_o R``; the attention averages each value channel over positions with
one weight per head, so ``softmax(.) (v R) = (softmax(.) v) R``.

Found from the graph, not from module names: the output linear's input is traced back through layout ops, casts,
a KV cache's concatenation and the attention to a producer linear (``smoothing_paths``, which proves channel by
channel which producer row each input channel reads); the head size is the attention's value width. Refused,
with the reason, where a path holds anything else (a per-channel factor or a relu does not commute with a
rotation), where a head's channels do not read one contiguous block of producer rows, or where the producer or
the output linear is used more than once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qcompiler.pipeline import META_KEY

from .annotate import GraphAnnotation
from .smoothing_paths import _MAX_PATHS, _paths, _Refused, _shape, _step, _trace_rows

__all__ = ["ValueHeads", "find_value_heads"]

#: the steps a rotation of the value channels passes through unchanged
_ROTATION_SAFE = {"cast", "gather", "attention", "cache"}


@dataclass
class ValueHeads:
    """One attention's value path: ``producer`` (the value projection's linear node), ``consumer`` (the linear
    reading the attention's output), ``head_dim``, and the first producer row of each of the consumer's input
    blocks of ``head_dim`` channels (``blocks[i]`` for channels ``i * head_dim ...``)."""

    producer: Node
    consumer: Node
    head_dim: int
    blocks: list[int]

    @property
    def producer_blocks(self) -> list[int]:
        """The producer's row blocks, each once (grouped-query attention: several heads read one)."""
        return sorted(set(self.blocks))


def _linear_input(node: Node) -> Node | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, Node) else None


def _blocks(rows: torch.Tensor, head_dim: int, name: str) -> list[int]:
    """The first producer row of each block of ``head_dim`` consumer channels; refused unless each block reads
    ``head_dim`` consecutive rows and blocks read the same rows or disjoint ones."""
    if rows.numel() % head_dim:
        raise _Refused(f"{name}: {rows.numel()} input channels are not a whole number of heads of {head_dim}")
    step = torch.arange(head_dim)
    starts = []
    for b in range(rows.numel() // head_dim):
        block = rows[b * head_dim:(b + 1) * head_dim]
        if not torch.equal(block - block[0], step):
            raise _Refused(f"{name}: the channels of head {b} do not read {head_dim} consecutive value rows")
        starts.append(int(block[0]))
    distinct = sorted(set(starts))
    if any(b - a < head_dim for a, b in zip(distinct, distinct[1:])):
        raise _Refused(f"{name}: heads read overlapping blocks of value rows")
    return starts


def find_value_heads(gm: GraphModule, ann: GraphAnnotation) -> tuple[list[ValueHeads], dict[str, str]]:
    """Every linear whose input is an attention's output, with its value projection and head size, and the
    refused ones (consumer module path -> reason). A linear whose input is not an attention's is neither."""
    found: list[ValueHeads] = []
    refused: dict[str, str] = {}
    for node in gm.graph.nodes:
        info = node.meta.get(META_KEY)
        if info is None or info.kind != "linear":
            continue
        x = _linear_input(node)
        if x is None:
            continue
        notes: list[str] = []
        try:
            for i, path in enumerate(_paths(x, notes, None)):
                if i == _MAX_PATHS:
                    break
                kinds = [_step(n)[0] for n in path[1:]]
                if "attention" not in kinds:
                    continue
                attention = path[1 + kinds.index("attention")]
                unsafe = sorted(set(kinds) - _ROTATION_SAFE)
                if unsafe:
                    raise _Refused(f"the value path holds {', '.join(unsafe)} steps, which do not commute with a "
                                   "rotation")
                producer = path[0]
                if len(ann.linears[producer.meta[META_KEY].fqn]) != 1 or len(ann.linears[info.fqn]) != 1:
                    raise _Refused("the value projection or this linear is applied more than once")
                shape = _shape(attention)
                if not shape:
                    raise _Refused(f"attention {attention.name} has no known shape")
                target = _trace_rows(path)
                found.append(ValueHeads(producer, node, shape[-1], _blocks(target.rows, shape[-1], info.fqn)))
                break
        except _Refused as e:
            refused[info.fqn] = str(e)
    return found, refused
