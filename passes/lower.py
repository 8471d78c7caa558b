"""Lowering: map qcompiler's fused ops onto a backend's kernels.

A backend's table maps an op packet (``torch.ops.qcompiler.int8_gemm``) to a replacement
callable with the same signature; ops not in the table keep their reference kernels.
"""

from __future__ import annotations

from torch.fx import GraphModule

from qcompiler.backends import get_backend
from qcompiler.pipeline import PassContext, PassResult

__all__ = ["Lower"]


class Lower:
    name = "lower"
    requires = ("fuse",)

    def __init__(self, target: str = "reference"):
        self.target = target
        get_backend(target)   # unknown targets fail at construction

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        table = get_backend(self.target)
        counts: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in table:
                node.target = table[node.target]
                key = f"lowered_{getattr(node.target, '__name__', 'op')}"
                counts[key] = counts.get(key, 0) + 1
        ctx.report.target = self.target
        return PassResult(gm, bool(counts), counts)
