"""A third-party weight algorithm in ~40 lines, registered from outside qcompiler and run through torch.compile.

Output-aware clipping: each output channel's clipping threshold is searched on a grid, keeping the
one whose quantized weight changes the layer's output on calibration rows least (round-to-nearest is
the grid's first point, so it is never worse on those rows).  Run: python examples/custom_weight_algorithm.py
"""

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qcompiler
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.algorithms.registry import WeightAlgorithm, register_weight_algorithm


@dataclass(frozen=True)
class OutputClipSpec:
    """The recipe's switch and settings for this algorithm (frozen: recipes are values; JSON round-trips)."""

    grid: int = 10            # thresholds absmax * (1 - i / grid), i < grid * max_shrink
    max_shrink: float = 0.5


def output_clip(fqn, w, stats, recipe, spec):
    """(QuantizedWeight, note) for one linear: w is its float32 [N, K] weight, stats its calibration statistics."""
    x = stats.samples.float()                                   # [rows, K] inputs seen in calibration
    absmax = w.abs().amax(dim=1, keepdim=True)
    best_t, best_err = absmax, None
    for i in range(max(1, int(spec.grid * spec.max_shrink))):
        t = absmax * (1 - i / spec.grid)
        deq = quantize_weight(w.clamp(-t, t), recipe.weight).dequantize()
        err = ((x @ (deq - w).t()) ** 2).sum(0)[:, None]        # output error per channel [N, 1]
        take = err < best_err if best_err is not None else torch.ones_like(err, dtype=torch.bool)
        best_t = torch.where(take, t, best_t)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    shrunk = int((best_t < absmax).sum())
    return quantize_weight(w.clamp(-best_t, best_t), recipe.weight), f"output clip ({shrunk}/{len(w)} channels clipped)"


register_weight_algorithm(WeightAlgorithm("output-clip", OutputClipSpec, output_clip))

if __name__ == "__main__":
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    recipe = qcompiler.recipes.get("w4a16-rtn").replace(name="w4a16-output-clip", weight_algorithm=OutputClipSpec())
    calibration = [torch.randint(0, 128, (1, 64)) for _ in range(4)]
    compiled = torch.compile(model, backend=qcompiler.backend(recipe, calibration=calibration))
    with torch.no_grad():
        compiled(torch.randint(0, 128, (1, 16)))
    print(qcompiler.report(compiled))
