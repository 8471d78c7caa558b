"""The embedding target: token-embedding tables stored quantized (``Recipe.embedding``).

Found from the graph: a ``torch.nn.functional.embedding`` call whose table is a 2-D float parameter.
The table is quantized by round-to-nearest with the recipe's ``WeightSpec`` (rows are the channels)
and the call becomes ``layer_quant.gather_rows``: the quantized rows are gathered, then only they are
dequantized, so the result is ``embedding(ids, dequantize(table))`` bit for bit. A table a linear also
reads (tied input and output embeddings) is quantized for the gather only; the linear keeps reading
its own weight, as the linear passes decide.
"""

from __future__ import annotations

import fnmatch

import torch
from torch.fx import GraphModule, Node

from qcompiler.core.layer_quant import gather_rows, quantize_weight
from qcompiler.pipeline import META_KEY, Analysis, PassContext, TensorDecision
from qcompiler.recipes import WeightSpec
from qcompiler.targets import QuantTarget, register_target

from .smoothquant import add_constant

__all__ = ["EMBEDDING"]

_EMBEDDING_FUNCTIONS = (torch.nn.functional.embedding,)


def _table(node: Node) -> Node | None:
    table = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return table if isinstance(table, Node) else None


def _find(gm: GraphModule, ann) -> list[tuple[str, Node]]:
    found = []
    for node in gm.graph.nodes:
        info = node.meta.get(META_KEY)
        if node.op != "call_function" or getattr(info, "kind", "") != "embedding":
            continue
        table = _table(node)
        if table is None or table.name not in ann.param_fqn:
            continue
        value = ann.values[table.name]
        if value.dim() != 2 or not value.is_floating_point():
            continue
        found.append((ann.param_fqn[table.name].rpartition(".")[0] or ann.param_fqn[table.name], node))
    return found


def _keep_reason(node: Node, fqn: str, ctx: PassContext) -> str:
    for glob in ctx.recipe.fallback.keep_modules:
        if fnmatch.fnmatchcase(fqn, glob):
            return f"module path matches fallback.keep_modules glob {glob!r}"
    if node.target not in _EMBEDDING_FUNCTIONS:
        return f"{node.target} is not torch.nn.functional.embedding"
    max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
    if max_norm is not None:
        return "max_norm renormalizes the table's rows in place at each call"
    return ""


def _apply(gm: GraphModule, node: Node, fqn: str, spec: WeightSpec, ctx: PassContext) -> TensorDecision:
    ann = ctx.analyses[Analysis.ANNOTATE]
    table = _table(node)
    w = ann.values[table.name]
    decision = TensorDecision(fqn, "embedding", bytes_fp=w.numel() * w.element_size())
    reason = _keep_reason(node, fqn, ctx)
    if reason:
        decision.quantize, decision.reason = False, reason
        return decision
    qw = ctx.analyses[Analysis.QUANTIZED_TENSORS].get(fqn)
    if qw is None:    # the same table in a later graph of this compile: quantized once
        qw = quantize_weight(w, spec)
        ctx.analyses[Analysis.QUANTIZED_TENSORS][fqn] = qw
    decision.format, decision.bytes_q = qw.describe(), qw.nbytes()
    tied = sorted(lin for lin, nodes in ann.linears.items()
                  if any(ann.linear_weight.get(n) == table.name for n in nodes))
    if tied:
        decision.note = f"table tied to {', '.join(tied)}, which reads{'' if len(tied) > 1 else 's'} its own copy"
    ids = node.args[0] if node.args else node.kwargs["input"]
    stored = add_constant(gm, f"{fqn}_q", qw.storage(), node)
    scale = add_constant(gm, f"{fqn}_scale", qw.scale, node)
    zero = add_constant(gm, f"{fqn}_zero", qw.zero, node) if qw.zero is not None else None
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(gather_rows, (ids, stored, scale, zero, qw.dtype, qw.group_size or 0,
                                                   w.shape[1], w.dtype))
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return decision


EMBEDDING = register_target(QuantTarget("embedding", spec=lambda recipe: recipe.embedding, find=_find, apply=_apply))
