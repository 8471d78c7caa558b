"""Run every registered quantization target beyond linear weights (``qcompiler.targets``)."""

from __future__ import annotations

from torch.fx import GraphModule

from qcompiler.pipeline import Analysis, PassContext, PassResult
from qcompiler.targets import registered_targets

from . import embedding, kv_cache  # noqa: F401  (register the built-in targets: embedding tables, KV cache)

__all__ = ["QuantizeTensors"]


class QuantizeTensors:
    """For each registered target whose spec the recipe sets, rewrite the nodes it finds; each
    rewrite's ``TensorDecision`` goes to ``ctx.tensor_plan``."""

    name = "quantize_tensors"
    requires = ("annotate",)
    reads = (Analysis.ANNOTATE,)
    writes = (Analysis.QUANTIZED_TENSORS,)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        ctx.analyses.setdefault(Analysis.QUANTIZED_TENSORS, {})
        ann = ctx.analyses[Analysis.ANNOTATE]
        counts: dict[str, int] = {}
        for target in registered_targets():
            spec = target.spec(ctx.recipe)
            if spec is None:
                continue
            for fqn, node in target.find(gm, ann):
                decision = target.apply(gm, node, fqn, spec, ctx)
                ctx.tensor_plan[fqn] = decision
                key = f"{target.name}_{'quantized' if decision.quantize else 'kept'}"
                counts[key] = counts.get(key, 0) + 1
        changed = any(k.endswith("_quantized") for k in counts)
        if changed:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, changed, counts)
