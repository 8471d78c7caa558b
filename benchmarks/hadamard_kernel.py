"""CPU time of the online Hadamard transform's reference kernel (``qcompiler::hadamard_transform``) against the
token-major form it replaced (the same additions; kept here only as the baseline), at SmolLM2's widths.

Regenerate (idle cores; the CPU is named in the output):

    python benchmarks/hadamard_kernel.py --out benchmarks/results_hadamard_kernel.md
"""
import argparse
import platform
import time

import torch

from qcompiler.algorithms.hadamard import online_hadamard
from qcompiler.core.reference_kernels import hadamard_transform_ref
from qcompiler.backends import machine


def token_major(x, h_block, scale):
    """The earlier reference: slices of p values per token, one full-tensor pass per butterfly stage and block term."""
    n, m = x.shape[-1], h_block.shape[0]
    p = n // m
    y = x.float().reshape(-1, m, p)
    h = 1
    while h < p:
        pairs = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(-1, m, p)
        h *= 2
    acc = torch.zeros_like(y)
    for j in range(m):
        acc = acc + h_block[:, j, None] * y[:, j:j + 1, :]
    return (acc * scale).reshape(x.shape)


def median_ms(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per call (a calibration replay: 8 x 512)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args()
    lines = [f"# Online Hadamard reference kernel, {args.tokens} tokens per call",
             "", f"CPU: {machine.describe()} (class `{machine.machine_class()}`); torch {torch.__version__}; {platform.python_version()}.", "",
             "| width (m x p) | threads | token-major ms | reference ms | speedup | bit-identical |", "|---|---|---|---|---|---|"]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for n in (576, 1536):
            h_block, _, scale = online_hadamard(n)
            x = torch.randn(args.tokens, n, generator=torch.Generator().manual_seed(n))
            old = median_ms(lambda: token_major(x, h_block, scale))
            new = median_ms(lambda: hadamard_transform_ref(x, h_block, scale))
            same = torch.equal(token_major(x, h_block, scale), hadamard_transform_ref(x, h_block, scale))
            m = h_block.shape[0]
            lines.append(f"| {n} ({m} x {n // m}) | {threads} | {old:.1f} | {new:.1f} | {old / new:.1f}x | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
