"""A user pass in ~15 lines: count each linear's outlier channels and report them.

Run: python examples/custom_pass.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qcompiler
from qcompiler.pipeline import Analysis, PassResult


class CountOutlierChannels:
    """Reads the outlier analysis and records, per layer, how many input channels exceed |x| > 6."""

    name = "count_outlier_channels"
    requires = ("outliers",)            # runs after the outlier analysis pass
    reads = (Analysis.OUTLIERS,)        # ... and needs what it leaves (checked before any pass runs)

    def run(self, gm, ctx):
        infos = ctx.analyses[Analysis.OUTLIERS]
        for fqn, info in infos.items():
            ctx.layer_plan[fqn].note = f"{len(info.outlier_channels)} outlier channels"
        total = sum(len(i.outlier_channels) for i in infos.values())
        return PassResult(gm, modified=False, stats={"outlier_channels": total})


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    calibration = [torch.randint(0, 128, (1, 32)) for _ in range(4)]
    backend = qcompiler.backend("w8a8-int8-sq", calibration=calibration, passes=[CountOutlierChannels()])
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(torch.randint(0, 128, (1, 16)))
    print(qcompiler.report(compiled))
