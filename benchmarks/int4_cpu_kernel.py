r"""PyTorch's own CPU INT4 GEMM (``torch._weight_int4pack_mm_for_cpu``) against the float32 GEMM at
SmolLM2's prefill shapes: whether INT4 weight-only could beat float on a CPU without fp8 / int4
arithmetic (the README's AVX2 paragraph). Prints ms per call (2 threads, median of 20).

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
        MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/int4_cpu_kernel.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from qcompiler.backends import machine


def _ms(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    print(f"CPU: {machine.describe()} (class {machine.machine_class()}), torch {torch.__version__}")
    print("| M x K x N | float32 F.linear ms | int4pack fp32 ms | int4pack bf16 ms |\n|---|---|---|---|")
    group = 64
    for m, k, n in ((512, 576, 1536), (512, 1536, 576), (512, 576, 576), (1, 576, 1536)):
        x, w = torch.randn(m, k), torch.randn(n, k)
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales_zeros = torch.stack([torch.rand(k // group, n), torch.zeros(k // group, n)], -1).contiguous()
        fp = _ms(lambda: F.linear(x, w))
        i4 = _ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros), n=3)
        xb, szb = x.bfloat16(), scales_zeros.bfloat16()
        i4b = _ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, szb))
        print(f"| {m} x {k} x {n} | {fp:.2f} | {i4:.1f} | {i4b:.2f} |")


if __name__ == "__main__":
    main()
