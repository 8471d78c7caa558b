r"""Decode attention over a quantized KV cache on the GPU: qcompiler's Triton kernel reading the
codes (``qcompiler::kv_decode_attention``: int8 / fp8 per head, int4 KIVI layout) against
``scaled_dot_product_attention`` over a bf16 cache (what an unquantized cache costs) and against
reading the quantized cache back (``qcompiler::kv_cache_read``) then SDPA (the reference path), at
Llama-3-8B's attention shape (32 query heads, 8 KV heads, head dim 128), batch 1 and 8, cached
lengths 1,024 and 4,096, one decode row. Each kernel is checked against the reference first.

Run by ``benchmarks/gpu_check.py`` (step ``kv-attention``); by hand on a GPU:

    python benchmarks/gpu_kv_attention.py --out benchmarks/results_h200_kv_attention.md

``--dry-run`` runs the same rows on CPU at reduced sizes (Triton interpreter, no timing claim).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
#: name -> (KVCacheSpec arguments, residual window)
FORMATS = {
    "int8 per head": (("int8", "per_head", "per_head", True), 0),
    "fp8 per tensor": (("fp8_e4m3", "per_tensor", "per_tensor", True), 0),
    "int4 KIVI (keys per channel, values per token, window 128)": (("int4", "per_channel", "per_token", False), 128),
}


def _time_ms(fn, gpu: bool) -> float:
    fn()
    if not gpu:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(runs)
    import triton.testing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _cache(spec, window: int, b: int, hkv: int, t: int, d: int, device, gen):
    """Codes, scales and window of keys and values for ``t`` cached tokens (static scales from the data)."""
    from qcompiler.core import kv_format
    from qcompiler.recipes import Granularity
    out = {}
    for role in ("key", "value"):
        x = (torch.randn(b, hkv, t, d, generator=gen) * (1 + torch.rand(1, hkv, 1, d, generator=gen) * 4)).to(device)
        gran = spec.key if role == "key" else spec.value
        scale = zero = None
        if gran is not Granularity.PER_TOKEN:
            stats = (x.amin(dim=(0, 2)).float().cpu(), x.amax(dim=(0, 2)).float().cpu())
            scale, zero = kv_format.static_scale(stats, hkv, gran, spec)
            scale, zero = scale.to(device), zero.to(device) if zero is not None else None
        cut = t - window
        codes, s, z = kv_format.write(x[:, :, :cut], spec, scale, zero)
        out[role] = (codes, s, z, x[:, :, cut:].to(torch.bfloat16).contiguous(), x.to(torch.bfloat16))
    return out


def run(dry_run: bool) -> list[str]:
    from qcompiler.core import kv_format
    from qcompiler.recipes import KVCacheSpec
    gpu = not dry_run
    device = torch.device("cuda" if gpu else "cpu")
    from qcompiler.backends.triton.decode_attention import kv_decode_attention_triton as kernel
    rows = []
    shapes = [(1, 1024), (1, 4096), (8, 1024), (8, 4096)] if gpu else [(1, 64), (2, 96)]
    hq, hkv, d = (HQ, HKV, D) if gpu else (4, 2, 32)
    gen = torch.Generator().manual_seed(0)
    for name, (args, window) in FORMATS.items():
        spec = KVCacheSpec(*args, residual_window=window)
        name_s = kv_format.storage_name(spec)
        for b, t in shapes:
            c = _cache(spec, min(window, t // 2), b, hkv, t, d, device, gen)
            q = torch.randn(b, hq, 1, d, generator=gen).to(device, torch.bfloat16)
            scale = d ** -0.5
            (kc, ks, kz, kw, kfull), (vc, vs, vz, vw, vfull) = c["key"], c["value"]

            def fused():
                return kernel(q, kc, ks, kz, kw, vc, vs, vz, vw, None, scale, name_s, name_s)

            def read_then_sdpa():
                k = torch.cat([torch.ops.qcompiler.kv_cache_read(kc, ks, kz, name_s, d, torch.bfloat16), kw], -2)
                v = torch.cat([torch.ops.qcompiler.kv_cache_read(vc, vs, vz, name_s, d, torch.bfloat16), vw], -2)
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

            def bf16_sdpa():
                return F.scaled_dot_product_attention(q, kfull, vfull, scale=scale, enable_gqa=True)

            ref = torch.ops.qcompiler.kv_decode_attention(q, kc, ks, kz, kw, vc, vs, vz, vw, None, scale, name_s, name_s)
            err = ((fused().float() - ref.float()).norm() / ref.float().norm()).item()
            times = {f: _time_ms(fn, gpu) for f, fn in (("fused", fused), ("read", read_then_sdpa), ("bf16", bf16_sdpa))}
            held = sum(x.numel() * x.element_size() for x in (kc, ks, vc, vs, kw, vw) + tuple(z for z in (kz, vz) if z is not None))
            bf16_bytes = kfull.numel() * 2 * 2
            rows.append(f"| {name} | {b} | {t} | {held / bf16_bytes:.3f}x | {err:.1e} | {times['fused']:.4f} | "
                        f"{times['read']:.4f} | {times['bf16']:.4f} | {times['bf16'] / times['fused']:.2f}x |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, reduced sizes")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: use --dry-run")
    import qcompiler  # noqa: F401  (registers the ops)
    where = torch.cuda.get_device_name() if not args.dry_run else "CPU dry run (interpreter; times mean nothing)"
    lines = [f"# Decode attention over a quantized KV cache ({where})", "",
             f"torch {torch.__version__}; one decode row, q bf16, {HQ if not args.dry_run else 4} query heads; "
             "`python benchmarks/gpu_kv_attention.py`. ms: median (triton.testing.do_bench). fused: "
             "qcompiler::kv_decode_attention's Triton kernel on the codes; read + SDPA: kv_cache_read then "
             "scaled_dot_product_attention; bf16 SDPA: an unquantized bf16 cache.", "",
             "| cache | batch | cached tokens | bytes vs bf16 | fused rel. err vs reference | fused ms | "
             "read + SDPA ms | bf16 SDPA ms | bf16 / fused |", "|---|---|---|---|---|---|---|---|---|"]
    lines += run(args.dry_run)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
