r"""2:4 weights as qcompiler stores them (``qcompiler.core.sparse24``: kept codes [N, K/2] and CUTLASS
metadata), read by the GPU's sparse kernels, against the dense GEMMs.

    python benchmarks/gpu_sparse24.py --out results_h200_sparse24.md      # on the GPU (gpu_check.py step)
    python benchmarks/gpu_sparse24.py --dry-run                             # CPU: the checks that need no GPU

Per Llama-3-8B linear shape and token count M:

- **INT8, CUTLASS**: the stored (values, metadata) pair, moved to the GPU as it is, becomes a
  ``torch.sparse.SparseSemiStructuredTensorCUTLASS`` (no conversion); its product with INT8 activations must
  equal ``torch._int_mm`` on the dense codes exactly (int32 sums), and both are timed.
- **FP8 E4M3, cuSPARSELt**: cuSPARSELt keeps its own compressed layout, built on the GPU
  (``torch._cslt_compress``) from the dense codes, which the stored pair gives back bit for bit on load
  (``sparse24.decompress``); ``torch._cslt_sparse_mm`` against ``torch._scaled_mm`` on the dense codes
  (float32 accumulation: compared within 1e-2 relative), both timed.

The dry run checks on the CPU that the stored pair is the one torch's own conversion makes
(``SparseSemiStructuredTensorCUTLASS.from_dense`` uses it) and that decompression restores the codes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from qcompiler.core import sparse24

SHAPES = {"q/o": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}   # Llama-3-8B (N, K)


def _two_of_four(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random [N, K] mask keeping 2 of every 4 along K."""
    scores = torch.rand(n, k // 4, 4, generator=gen)
    keep = scores.argsort(-1)[..., 2:]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(n, k)


def _int8_codes(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    q[q == 0] = 1
    return torch.where(_two_of_four(n, k, gen), q, torch.zeros_like(q))


def _fp8_codes(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen).clamp(-4, 4)
    w = torch.where(w.abs() < 0.05, torch.full_like(w, 0.05), w)      # no kept code rounds to 0
    return torch.where(_two_of_four(n, k, gen), w, torch.zeros_like(w)).to(torch.float8_e4m3fn)   # +0, not -0


def _timed(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def dry_run() -> str:
    """CPU: the stored pair is torch's own CUTLASS conversion, and it decompresses bit for bit."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
    gen = torch.Generator().manual_seed(0)
    lines = []
    for make, name in ((_int8_codes, "int8"), (_fp8_codes, "fp8_e4m3")):
        q = make(64, 128, gen)
        values, meta = sparse24.compress(q)
        ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(q.view(torch.int8))
        same = torch.equal(values.view(torch.int8), ref_values) and torch.equal(meta, ref_meta)
        back = torch.equal(sparse24.decompress(values, meta).view(torch.int8), q.view(torch.int8))
        lines.append(f"{name}: stored pair = torch's CUTLASS conversion: {same}; decompresses bit for bit: {back}")
        if not (same and back):
            raise SystemExit("\n".join(lines))
    return "\n".join(lines)


def gpu_rows(ms: list[int]) -> list[str]:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, (n, k) in SHAPES.items():
        q8 = _int8_codes(n, k, gen)
        values, meta = sparse24.compress(q8)                       # what the checkpoint holds
        sparse = torch.sparse.SparseSemiStructuredTensorCUTLASS(
            torch.Size((n, k)), packed=values.to(dev), meta=meta.to(dev), packed_t=None, meta_t=None,
            compressed_swizzled_bitmask=None)
        dense_t = q8.to(dev).t().contiguous().t()                  # [N, K] column-major for _int_mm's B
        qf = _fp8_codes(n, k, gen)
        fv, fm = sparse24.compress(qf)
        wf = sparse24.decompress(fv, fm).to(dev)                    # restored on load, bit for bit
        assert torch.equal(wf.view(torch.int8).cpu(), qf.view(torch.int8))
        compressed = torch._cslt_compress(wf)
        one = torch.ones((), device=dev)
        for m in ms:
            x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(dev)
            want = torch._int_mm(x8, dense_t.t())                   # [M, N] int32
            got = torch.mm(sparse, x8.t()).t()                      # CUTLASS: W_sparse @ X^T
            exact = torch.equal(got.to(torch.int32), want)
            t_sparse = _timed(lambda: torch.mm(sparse, x8.t()))
            t_dense = _timed(lambda: torch._int_mm(x8, dense_t.t()))
            rows.append(f"| {label} {n}x{k} | {m} | int8 CUTLASS (stored pair as is) | {'yes' if exact else 'NO'} | "
                        f"{t_sparse:.3f} | {t_dense:.3f} (`_int_mm`) | {t_dense / t_sparse:.2f}x |")
            xf = torch.randn(m, k, generator=gen).to(torch.float8_e4m3fn).to(dev)
            ref = torch._scaled_mm(xf, wf.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            out = torch._cslt_sparse_mm(compressed, xf.t(), alpha=None, out_dtype=torch.bfloat16).t()
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            t_sparse = _timed(lambda: torch._cslt_sparse_mm(compressed, xf.t(), out_dtype=torch.bfloat16))
            t_dense = _timed(lambda: torch._scaled_mm(xf, wf.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            rows.append(f"| {label} {n}x{k} | {m} | fp8 cuSPARSELt (decompressed, `_cslt_compress` on load) | "
                        f"{'yes' if err < 1e-2 else 'NO'} (rel. {err:.1e}) | {t_sparse:.3f} | {t_dense:.3f} "
                        f"(`_scaled_mm`) | {t_dense / t_sparse:.2f}x |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="16,128,2048", help="token counts (comma-separated)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="the CPU checks only (no GPU)")
    args = ap.parse_args(argv)
    checks = dry_run()
    print(checks, flush=True)
    if args.dry_run:
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --dry-run for the CPU checks")
    rows = gpu_rows([int(m) for m in args.m.split(",")])
    text = (f"# 2:4 weights as stored, on {torch.cuda.get_device_name()}\n\n"
            f"Generated by `python benchmarks/gpu_sparse24.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
            f"(torch {torch.__version__}). {checks.replace(chr(10), '; ')}.\n\n"
            "| weight | M | sparse kernel | equals dense | sparse ms | dense ms | dense / sparse |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    ok = all("| NO" not in r for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.exit(code)
