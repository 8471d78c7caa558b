"""Seconds per SignRound step (one forward and backward of a SmolLM2 decoder block through the learnable
rounding of its 7 linears, int4 g64) in float32 and in bfloat16 autocast (``SignRoundSpec.compute_dtype``).

    python benchmarks/signround_step.py [--batch 4] [--block 10]

Random hidden states of ``batch`` x 512 tokens (the speed does not depend on their values), no rotation.
2026-12-06, Intel Xeon (AVX-512, AMX), 2 threads, idle cores, batch 4: float32 0.271 s, bfloat16 0.139 s per step.
The whole-model figure is higher: on the same machine ``SignRoundSpec(init="gptaq", iters=100, batch_size=4,
compute_dtype="bfloat16")`` with online rotations spent ~36 s per block on its 100 steps and the
keep-the-start check (``benchmarks/rotation_validation.py`` docstring).
"""
import argparse
import time

import torch

from qcompiler.algorithms.signround import LearnableRounding
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.recipes import get
from qcompiler.tools.models import load_model

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--batch", type=int, default=4, help="sequences of 512 tokens per step")
ap.add_argument("--block", type=int, default=10, help="which decoder block")
ap.add_argument("--steps", type=int, default=5)
args = ap.parse_args()

torch.set_num_threads(2)
model, _ = load_model("smollm2-135m")
block = model.model.layers[args.block]
for p in block.parameters():
    p.requires_grad_(False)
h = torch.randn(args.batch, 512, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
pos = torch.arange(512)[None].expand(args.batch, 512)
kwargs = dict(position_embeddings=model.model.rotary_emb(h, pos), attention_mask=None, position_ids=pos)
spec = get("w4a16-signround").weight
learn = {n: LearnableRounding(m.weight, quantize_weight(m.weight, spec), spec)
         for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
params = [p for lr in learn.values() for p in lr.parameters()]


def _out(o):
    return o[0] if isinstance(o, tuple) else o


with torch.no_grad():
    target = _out(block(h, **kwargs))


def step(bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = _out(torch.func.functional_call(block, {n + ".weight": lr.fake() for n, lr in learn.items()},
                                              (h,), kwargs))
    torch.nn.functional.mse_loss(out.float(), target).backward()
    for p in params:
        p.grad = None


print(f"| compute dtype | s / step ({args.batch} x 512 tokens, block {args.block}) |\n|---|---|")
for name, bf16 in (("float32", False), ("bfloat16", True)):
    step(bf16)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(bf16)
    print(f"| {name} | {(time.perf_counter() - t0) / args.steps:.3f} |")
