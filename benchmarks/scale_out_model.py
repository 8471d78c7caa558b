r"""A cost model of layer-by-layer ``w4a16-gptq`` calibration on N ranks (torch.distributed), from the
shapes of a model and stated hardware rates: time per block (replayed forwards, Hessians, GPTQ sweeps,
collectives) and memory per rank. docs/scale-out.md explains it; its tables are this script's output.

    python benchmarks/scale_out_model.py                       # 8B and 70B on 8 GPUs, 1 and 2 nodes
    python benchmarks/scale_out_model.py --measure-cpu         # also: SmolLM2 on this CPU, from a timed GEMM

What the model follows (qcompiler/calibration/layerwise.py, statistics.py, distributed.py, algorithms/gptq.py):
each rank replays its shard of the calibration batches through the block twice (observe, then propagate
with quantized weights); X^T X is one float32 matmul per distinct linear input, summed in float64 and
summed once per group of linears sharing an input onto the rank that quantizes the group (a reduce, not an
all-reduce: modelled as a pipelined ring, each byte crossing a link once); the linears sharing an input are
one GPTQ group, groups (or slices of a heavy group's output rows) go to ranks by cost and each rank's results
are broadcast (QuantizedWeight holds INT4 unpacked, one
byte per weight); GPTQ per linear is a K x K factorization and a sweep of K columns (one Python step each).
Not modelled: stragglers, the first block's capture, the output head, checkpoint writes.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int, str]]:
        """(name, N, K, input group) of one decoder block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [("q", h, h, "attn_in"), ("k", kv, h, "attn_in"), ("v", kv, h, "attn_in"), ("o", h, h, "o_in"),
                ("gate", i, h, "mlp_in"), ("up", i, h, "mlp_in"), ("down", h, i, "down_in")]

    def block_params(self) -> int:
        return sum(n * k for _, n, k, _ in self.linears())

    def params(self) -> int:
        return self.layers * self.block_params() + 2 * self.vocab * self.hidden


ARCHS = {
    "smollm2-135m": Arch("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152),
    "llama-3-8b": Arch("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": Arch("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    fwd_flops: float        # sustained bf16 FLOP/s of the block forward
    fp32_flops: float       # sustained float32 FLOP/s (X^T X, factorizations, sweep GEMMs)
    step_s: float           # seconds per GPTQ column step (a handful of small kernels or ops)
    intra_bw: float         # bytes/s per rank for collectives inside a node
    inter_bw: float         # bytes/s per rank across nodes
    memory: float           # bytes per device
    ranks_per_node: int


# H100 SXM 80 GB: 989 TFLOP/s dense bf16 and 67 TFLOP/s fp32 (no TF32: torch's default matmul precision) at
# peak, taken at 40% and 50%; ~5 us per kernel launch, ~6 per GPTQ column; NVLink 4 ~450 GB/s per direction,
# 8 x 400 Gb/s InfiniBand per node = 50 GB/s per GPU across nodes, each taken at 70%.
H100 = Hardware("8x H100 SXM 80GB per node", 0.40 * 989e12, 0.50 * 67e12, 30e-6, 0.7 * 450e9, 0.7 * 50e9, 80e9, 8)


def block_costs(arch: Arch, hw: Hardware, ranks: int, nodes: int, tokens: int, seq: int) -> dict[str, float]:
    """Seconds per block on the slowest rank, by part."""
    lin = arch.linears()
    local = tokens / ranks
    attn_flops = 4 * seq * arch.hidden                    # QK^T and PV per token (causal average x2 passes ~ 1)
    fwd = 2 * (2 * arch.block_params() + attn_flops) * local / hw.fwd_flops        # observe + propagate
    distinct_k = {g: k for _, _, k, g in lin}
    hess = sum(2 * local * k * k for k in distinct_k.values()) / hw.fp32_flops
    # GPTQ: units of work to ranks by the code's cost estimate (layerwise._group_cost, k^3 + sum N k^2): a
    # group, or slices of its output rows when it alone outweighs a rank's share and its row sweeps outweigh
    # its factorization (layerwise._units); the critical path is the costliest rank's time
    members: dict[str, list[tuple[int, int]]] = {}
    for _, n, k, g in lin:
        members.setdefault(g, []).append((n, k))
    estimate = {g: ms[0][1] ** 3 + sum(n * k * k for n, k in ms) for g, ms in members.items()}
    share = sum(estimate.values()) / ranks
    units, split = [], set()
    for g, ms in members.items():
        k = ms[0][1]
        parts = min(ranks, max(1, math.ceil(estimate[g] / share - 1e-9)))
        if parts > 1 and estimate[g] - k ** 3 < k ** 3:
            parts = 1
        if parts > 1:
            split.add(g)
        # each slice repeats the factorizations (3K^3 per linear: Cholesky, inverse, Cholesky of H^-1) and
        # every column step (K per linear, latency-bound); only the lazy updates (2 N K^2) divide
        seconds = sum((3 * k ** 3 + 2 * n / parts * k * k) / hw.fp32_flops + k * hw.step_s for n, k in ms)
        units += [(estimate[g] / parts, seconds)] * parts
    loads, times = [0.0] * ranks, [0.0] * ranks
    for cost, seconds in sorted(units, key=lambda u: -u[0]):
        r = loads.index(min(loads))
        loads[r] += cost
        times[r] += seconds
    gptq = max(times)
    comm = 0.0
    if ranks > 1:
        bw = hw.inter_bw if nodes > 1 else hw.intra_bw
        # float64, one per group (input): a reduce onto its owner, an all-reduce when its rows are split
        comm = sum(8 * k * k * (2 * (ranks - 1) / ranks if g in split else 1.0)
                   for g, k in distinct_k.items()) / bw
        comm += arch.block_params() / bw                               # every result broadcast once (1 byte/weight)
    return {"forward": fwd, "hessian": hess, "gptq": gptq, "collectives": comm}


def memory_per_rank(arch: Arch, ranks: int, tokens: int, offload: bool) -> float:
    """Bytes on one rank: weights (all in bf16 today; one block with offloading), the captured block inputs and
    outputs of its shard (float32), one block's float64 Hessians and GPTQ's working copies of the largest K."""
    weights = 2 * (arch.block_params() + 2 * arch.vocab * arch.hidden if offload else arch.params())
    acts = 2 * 4 * (tokens / ranks) * arch.hidden
    hess = sum(8 * k * k for _, _, k, _ in arch.linears())
    kmax = max(k for _, _, k, _ in arch.linears())
    return weights + acts + hess + 3 * 8 * kmax * kmax


def table(hw: Hardware, tokens: int, seq: int) -> str:
    lines = [f"| model | ranks (nodes) | forward s/block | Hessians s/block | GPTQ s/block | collectives s/block | "
             f"total min | speedup | GB/rank today | GB/rank with offload | fits {hw.memory / 1e9:.0f} GB today |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("llama-3-8b", "llama-3-70b"):
        arch = ARCHS[key]
        base = None
        for ranks, nodes in ((1, 1), (8, 1), (16, 2)):
            c = block_costs(arch, hw, ranks, nodes, tokens, seq)
            total = arch.layers * sum(c.values())
            base = base or total
            today, off = memory_per_rank(arch, ranks, tokens, False), memory_per_rank(arch, ranks, tokens, True)
            lines.append(f"| {arch.name} | {ranks} ({nodes}) | {c['forward']:.2f} | {c['hessian']:.2f} | "
                         f"{c['gptq']:.2f} | {c['collectives']:.2f} | {total / 60:.1f} | {base / total:.1f}x | "
                         f"{today / 1e9:.0f} | {off / 1e9:.0f} | {'yes' if today < hw.memory else 'no'} |")
    return "\n".join(lines)


def _cpu_check(tokens: int, seq: int) -> str:
    """SmolLM2 on this CPU: the same model with float32 rates from a timed GEMM at a SmolLM2 MLP shape."""
    import torch
    a, w = torch.randn(512, 576), torch.randn(1536, 576)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    t0, reps = time.perf_counter(), 50
    for _ in range(reps):
        torch.nn.functional.linear(a, w)
    rate = 2 * 512 * 576 * 1536 * reps / (time.perf_counter() - t0)
    cpu = Hardware("this CPU", rate, rate, 10e-6, 1e9, 1e9, 24e9, 1)
    arch = ARCHS["smollm2-135m"]
    c = block_costs(arch, cpu, 1, 1, tokens, seq)
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in c.items())
    return (f"SmolLM2-135M, 1 process on this CPU ({torch.get_num_threads()} threads, float32 GEMM measured at "
            f"{rate / 1e9:.0f} GFLOP/s): per block {parts}; predicted {arch.layers * sum(c.values()):.0f} s for "
            f"{arch.layers} blocks")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128 * 512, help="calibration tokens (default 128 x 512)")
    ap.add_argument("--seq", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--measure-cpu", action="store_true", help="also predict SmolLM2 on this CPU from a timed GEMM")
    args = ap.parse_args(argv)
    print(f"Hardware: {H100.name}; calibration {args.tokens} tokens in sequences of {args.seq}.\n")
    print(table(H100, args.tokens, args.seq))
    if args.measure_cpu:
        print("\n" + _cpu_check(args.tokens, args.seq))


if __name__ == "__main__":
    main()
