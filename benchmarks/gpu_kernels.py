"""GPU speed of the Triton backend: the linear shapes of Llama-2-7B and Llama-3-8B, and end to end.

Kernels (``--part kernels``): every linear shape (N, K) of the two models at M in
{1, 16, 128, 2048, 8192} rows, timed with ``triton.testing.do_bench`` (median; CUDA graphs
through ``do_bench_cudagraph`` for M <= 16), for cuBLAS bf16, the Triton kernels (W8A8 INT8 /
FP8 with per-token x per-channel scales, W8A16, W4A16 and W4A8 with group-128 INT4),
``torch._int_mm``, ``torch._scaled_mm`` (row-wise scales) and torchao's equivalents (when
importable), all in one run. The quantized GEMMs take already-quantized activations, as
``_int_mm`` / ``_scaled_mm`` do (the activation quantization is fused into the preceding norm
by the backend); torchao's modules quantize their input inside the call. Each row reports
time, TFLOP/s, GB/s (ideal bytes: weights, scales, activations, output) and the fraction of
the peaks measured in the same run (bf16 / fp8 / int8 8192^3 matmuls, a device copy).

End to end (``--part e2e``): a random-initialised Llama-3-8B-shaped (or ``--e2e-model SmolLM2-135M``) model
per preset through ``qcompiler.backend(..., target="triton")`` against the bf16 model:
prefill tokens/s (batch 1) and decode tokens/s at batch 1 (a static KV cache, the step
captured in a CUDA graph when it can be), with the decode step's weight-bandwidth floor.

On an H100 (through the device tool; torchao travels as a wheel in the git-ignored
``device_carry/``, see the README's "Triton backend" section):

    python benchmarks/gpu_kernels.py --part kernels     # writes benchmarks/results_<gpu>_kernels.md
    python benchmarks/gpu_kernels.py --part e2e         # writes benchmarks/results_<gpu>_e2e.md

``benchmarks/gpu_check.py`` runs these with the compiled kernel tests in one device call.

Without a GPU, ``--dry-run`` walks the same tables on CPU at reduced sizes (N, K
and M > 128 divided by ``--shrink``; a 2-layer model) with the reference kernels, and prints them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.core import numerics
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.core.packing import pack_int4
from qcompiler.recipes import ActivationSpec, Granularity, QuantDtype, Recipe, WeightSpec

HERE = Path(__file__).resolve().parent
MODELS = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32, vocab_size=32000),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=32, vocab_size=128256),
}
#: End-to-end shapes: the kernel table's models and SmolLM2-135M (the project's default model; its
#: weights do not travel to a GPU machine, and speed does not depend on their values).
E2E_MODELS = {**MODELS,
              "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                   num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152,
                                   tie_word_embeddings=True)}
M_VALUES = (1, 16, 128, 2048, 8192)
GROUP = 128
W4A8_G128 = Recipe(name="w4a8-g128", weight=WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=GROUP),
                   activation=ActivationSpec(QuantDtype.FP8_E4M3, Granularity.PER_TOKEN))
W4A8_INT8_G128 = W4A8_G128.replace(name="w4a8-int8-g128",
                                   activation=ActivationSpec(QuantDtype.INT8, Granularity.PER_TOKEN))
W4A16_G128 = Recipe(name="w4a16-g128", weight=WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=GROUP))
E2E_RECIPES = {"w8a16": "w8a16", "w4a16-g128": W4A16_G128, "w8a8-int8-sq-dynamic": "w8a8-int8-sq-dynamic",
               "fp8-dynamic": "fp8-dynamic", "w4a8-g128": W4A8_G128, "w4a8-int8-g128": W4A8_INT8_G128}


def linear_shapes(cfg: dict) -> list[tuple[str, int, int]]:
    """(layers, N, K) of a Llama config's decoder linears, one row per distinct (N, K)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    rows: dict[tuple[int, int], list[str]] = {}
    for name, n, k in (("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", i, h), ("up", i, h),
                       ("down", h, i)):
        rows.setdefault((n, k), []).append(name)
    return [("/".join(names), n, k) for (n, k), names in rows.items()]


# ----------------------------------------------------------------------------- timing


@dataclass
class Env:
    gpu: bool
    device: str
    act_dtype: torch.dtype
    shrink: int
    kernels: dict[str, Callable]     # op name -> Triton launcher (GPU) or reference kernel (dry run)
    peaks: dict[str, float]          # "bf16" / "fp8" / "int8" TFLOP/s, "bw" GB/s


def time_ms(env: Env, fn: Callable, graph: bool = False) -> tuple[float, str]:
    """Median milliseconds of ``fn`` and a note ("graph" when timed through a CUDA graph)."""
    fn()   # compile / autotune / warm the allocator outside any timing or capture
    if not env.gpu:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(runs), "cpu"
    import triton.testing
    torch.cuda.synchronize()
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"), "graph"
        except Exception:   # not capturable (e.g. a host sync inside): time the launches instead
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "launch"


def measure_peaks(env: Env) -> dict[str, float]:
    """Peak TFLOP/s of bf16 / fp8 / int8 matmuls and copy GB/s, measured here."""
    n = 8192 if env.gpu else max(256, 8192 // env.shrink)
    dev = env.device
    a = torch.randn(n, n, device=dev).to(env.act_dtype)
    b = torch.randn(n, n, device=dev).to(env.act_dtype)
    peaks = {"bf16": 2 * n ** 3 / time_ms(env, lambda: a @ b)[0] / 1e9}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device=dev)
    fp8_ms = time_ms(env, lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=env.act_dtype))[0]
    peaks["fp8"] = 2 * n ** 3 / fp8_ms / 1e9
    ai = torch.randint(-128, 128, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-128, 128, (n, n), device=dev, dtype=torch.int8).t()
    peaks["int8"] = 2 * n ** 3 / time_ms(env, lambda: torch._int_mm(ai, bi))[0] / 1e9
    src = torch.empty(((1 << 30) if env.gpu else (1 << 24)) // 4, device=dev)
    dst = torch.empty_like(src)
    peaks["bw"] = 2 * src.numel() * 4 / time_ms(env, lambda: dst.copy_(src))[0] / 1e6
    return peaks


# ----------------------------------------------------------------------------- kernels


@dataclass
class Method:
    name: str
    peak: str              # which peak bounds its math: "bf16", "fp8" or "int8"
    weight_bits: float     # bits per weight element at rest (scales counted separately)
    act_bytes: float       # bytes per activation element read
    fn: Callable[[], object] | None
    note: str = ""


def _operands(env: Env, m: int, n: int, k: int, gen: torch.Generator) -> dict:
    dev, dt = env.device, env.act_dtype
    x = torch.randn(m, k, generator=gen).to(dev, dt)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dev)
    a8, sa8 = numerics.quantize_per_token(x, "int8")
    af8, saf8 = numerics.quantize_per_token(x, "fp8_e4m3")
    w8 = quantize_weight(w, WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL))
    wf8 = quantize_weight(w, WeightSpec(QuantDtype.FP8_E4M3, Granularity.PER_CHANNEL))
    w4 = quantize_weight(w, W4A16_G128.weight)
    return dict(x=x, w=w.to(dt), a8=a8, sa8=sa8, af8=af8, saf8=saf8, w8=w8.q, sw8=w8.scale, wf8=wf8.q,
                swf8=wf8.scale, w4=pack_int4(w4.q), sw4=w4.scale)


def _torchao_linear(env: Env, w: torch.Tensor, config_name: str):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow, quantize_)
    configs = {"int8dq": [Int8DynamicActivationInt8WeightConfig()],
               "fp8-rowwise": [Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())],
               "int4wo": [Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"),
                          Int4WeightOnlyConfig(group_size=GROUP)],
               "int8wo": [Int8WeightOnlyConfig()]}[config_name]
    err = None
    for cfg in configs:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=env.device, dtype=env.act_dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        try:
            quantize_(lin, cfg)
            return lin
        except Exception as e:   # a packing format without its kernel on this build
            err = e
    raise err


def methods(env: Env, m: int, n: int, k: int, gen: torch.Generator, torchao: bool) -> list[Method]:
    o = _operands(env, m, n, k, gen)
    kr, dt = env.kernels, env.act_dtype
    out = [
        Method("bf16 cuBLAS" if env.gpu else "float (torch)", "bf16", 16, 2, lambda: F.linear(o["x"], o["w"])),
        Method("W8A8 int8", "int8", 8, 1, lambda: kr["int8_gemm"](o["a8"], o["sa8"], o["w8"], o["sw8"], None, dt)),
        Method("W8A8 fp8", "fp8", 8, 1, lambda: kr["fp8_gemm"](o["af8"], o["saf8"], o["wf8"], o["swf8"], None, dt)),
        Method("W8A16", "bf16", 8, 2, lambda: kr["weight_only_gemm"](o["x"], o["w8"], o["sw8"], None, None, 0)),
        Method("W4A16 g128", "bf16", 4, 2, lambda: kr["int4_gemm"](o["x"], o["w4"], o["sw4"], None, None, GROUP, k)),
        Method("W4A8 g128", "fp8", 4, 1,
               lambda: kr["w4a8_gemm"](o["af8"], o["saf8"], o["w4"], o["sw4"], None, None, GROUP, k, dt)),
        Method("W4A8 int8 g128", "int8", 4, 1,
               lambda: kr["w4a8_gemm"](o["a8"], o["sa8"], o["w4"], o["sw4"], None, None, GROUP, k, dt)),
    ]
    if env.gpu and m <= 16:
        # the decode path's alternative (the default is the FMA kernel, backends/triton/gemm_decode.py)
        from qcompiler.backends.triton.config import dot_decode_config
        dot8, dot4 = dot_decode_config(m, n, k, "weight_only"), dot_decode_config(m, n, k, "int4")
        out += [Method("W8A16 (tl.dot decode)", "bf16", 8, 2,
                       lambda: kr["weight_only_gemm"](o["x"], o["w8"], o["sw8"], None, None, 0, config=dot8)),
                Method("W4A16 g128 (tl.dot decode)", "bf16", 4, 2,
                       lambda: kr["int4_gemm"](o["x"], o["w4"], o["sw4"], None, None, GROUP, k, config=dot4))]
        out.append(Method("torch._int_mm", "int8", 8, 1, None, "needs M > 16 on CUDA"))
    else:
        w8t = o["w8"].t()
        out.append(Method("torch._int_mm", "int8", 8, 1, lambda: torch._int_mm(o["a8"], w8t)))
    sa, sw = o["saf8"].float().contiguous(), o["swf8"].float().reshape(1, -1).contiguous()
    wf8t = o["wf8"].t()
    out.append(Method("torch._scaled_mm", "fp8", 8, 1,
                      lambda: torch._scaled_mm(o["af8"], wf8t, sa, sw, out_dtype=dt)))
    if torchao:
        for label, cfg, peak, bits, act in (("torchao int8dq", "int8dq", "int8", 8, 2),
                                            ("torchao fp8 rowwise", "fp8-rowwise", "fp8", 8, 2),
                                            ("torchao int4wo g128", "int4wo", "bf16", 4, 2),
                                            ("torchao int8wo", "int8wo", "bf16", 8, 2)):
            try:
                lin = _torchao_linear(env, o["w"], cfg)
                out.append(Method(label, peak, bits, act, lambda lin=lin: lin(o["x"])))
            except Exception as e:
                out.append(Method(label, peak, bits, act, None, f"unavailable: {type(e).__name__}"))
    return out


@dataclass
class Row:
    model: str
    layers: str
    m: int                 # the table's M (the shape run is m_run x n x k, reduced in a dry run)
    m_run: int
    n: int
    k: int
    method: str
    ms: float | None
    tflops: float | None = None
    gbs: float | None = None
    frac_flops: float | None = None
    frac_bw: float | None = None
    speedup: float | None = None
    note: str = ""


def run_kernels(env: Env, model_names: list[str], m_values: list[int], torchao: bool) -> list[Row]:
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    for model in model_names:
        for layers, n_full, k_full in linear_shapes(MODELS[model]):
            n, k = max(16, n_full // env.shrink), max(16, k_full // env.shrink)
            for m_full in m_values:
                m = max(1, m_full // env.shrink) if m_full > 128 else m_full
                base = None
                for i, meth in enumerate(methods(env, m, n, k, gen, torchao)):
                    row = Row(model, layers, m_full, m, n, k, meth.name, None, note=meth.note)
                    if meth.fn is not None:
                        try:
                            row.ms, how = time_ms(env, meth.fn, graph=env.gpu and m <= 16)
                            row.note = row.note or ("" if how in ("graph", "cpu") or m > 16 else "no CUDA graph")
                        except Exception as e:   # a baseline this build cannot run at this shape
                            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    if row.ms:
                        sec = row.ms / 1e3
                        scales = n * (math.ceil(k / GROUP) if meth.weight_bits == 4 else 1) * 4
                        nbytes = n * k * meth.weight_bits / 8 + scales + m * k * meth.act_bytes + m * n * 2
                        row.tflops = 2 * m * n * k / sec / 1e12
                        row.gbs = nbytes / sec / 1e9
                        row.frac_flops = row.tflops / env.peaks[meth.peak]
                        row.frac_bw = row.gbs / env.peaks["bw"]
                        if i == 0:
                            base = row.ms
                        row.speedup = base / row.ms if base else None
                    rows.append(row)
                if env.gpu:
                    torch.cuda.empty_cache()
                print(f"  {model} {layers} M={m_full}: done", file=sys.stderr)
    return rows


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def kernel_tables(rows: list[Row]) -> str:
    names = list(dict.fromkeys(r.method for r in rows))
    out = ["## Time per GEMM (µs) and speed-up over the first column", "",
           "| model | layers | M | N | K | run M x N x K | " + " | ".join(names) + " |",
           "|---|---|---:|---:|---:|---|" + "---:|" * len(names)]
    groups: dict[tuple, dict[str, Row]] = {}
    full = {(m, layers): (n, k) for m in MODELS for layers, n, k in linear_shapes(MODELS[m])}
    for r in rows:
        n_full, k_full = full[(r.model, r.layers)]
        key = (r.model, r.layers, r.m, n_full, k_full, f"{r.m_run}x{r.n}x{r.k}")
        groups.setdefault(key, {})[r.method] = r
    for key, by in groups.items():
        cells = []
        for name in names:
            r = by.get(name)
            cells.append("n/a" if r is None or r.ms is None else f"{r.ms * 1e3:.1f} ({_f(r.speedup, '.2f')}x)")
        out.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    out += ["", "## Throughput and fraction of the measured peaks", "",
            "| model | layers | M | method | µs | TFLOP/s | GB/s | % peak math | % peak bandwidth | note |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r.model} | {r.layers} | {r.m} | {r.method} | {_f(r.ms and r.ms * 1e3, '.1f')} | "
                   f"{_f(r.tflops, '.1f')} | {_f(r.gbs, '.0f')} | {_f(r.frac_flops and 100 * r.frac_flops, '.0f')} | "
                   f"{_f(r.frac_bw and 100 * r.frac_bw, '.0f')} | {r.note} |")
    return "\n".join(out)


def _ratios(rows: list[Row], method: str, over: str, ms: Callable[[int], bool]) -> list[float]:
    by = {(r.model, r.layers, r.m, r.method): r for r in rows}
    vals = []
    for r in rows:
        if r.method == method and ms(r.m) and r.ms:
            o = by.get((r.model, r.layers, r.m, over))
            if o is not None and o.ms:
                vals.append(o.ms / r.ms)
    return vals


def target_table(rows: list[Row], env: Env) -> str:
    base = "bf16 cuBLAS" if env.gpu else "float (torch)"
    checks = [("W4A16 g128 vs bf16, M <= 16", "W4A16 g128", base, lambda m: m <= 16, 3.2),
              ("W4A16 g128 vs bf16, M = 128", "W4A16 g128", base, lambda m: m == 128, 2.0),
              ("W8A8 fp8 vs bf16, M >= 2048", "W8A8 fp8", base, lambda m: m >= 2048, 1.6),
              ("W8A8 int8 vs bf16, M >= 2048", "W8A8 int8", base, lambda m: m >= 2048, 1.6),
              ("W8A8 fp8 vs torch._scaled_mm, M >= 2048", "W8A8 fp8", "torch._scaled_mm", lambda m: m >= 2048, 0.95),
              ("W8A8 int8 vs torch._int_mm, M >= 2048", "W8A8 int8", "torch._int_mm", lambda m: m >= 2048, 0.95)]
    out = ["## Targets (speed-up = other's time / ours; geometric mean and worst over the shapes)", "",
           "| target | goal | geo-mean | worst | shapes | met (geo-mean) |", "|---|---:|---:|---:|---:|---|"]
    for label, meth, over, sel, goal in checks:
        vals = _ratios(rows, meth, over, sel)
        if not vals:
            out.append(f"| {label} | {goal} | - | - | 0 | n/a |")
            continue
        geo = math.exp(sum(math.log(v) for v in vals) / len(vals))
        met = "yes" if geo >= goal else "no"
        out.append(f"| {label} | {goal} | {geo:.2f} | {min(vals):.2f} | {len(vals)} | {met} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- end to end


def _e2e_model(env: Env, name: str = "Llama-3-8B"):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(E2E_MODELS[name])
    if not env.gpu:
        cfg.update(hidden_size=max(64, cfg["hidden_size"] // env.shrink),
                   intermediate_size=max(128, cfg["intermediate_size"] // env.shrink), num_attention_heads=4,
                   num_key_value_heads=1, num_hidden_layers=2, vocab_size=max(512, cfg["vocab_size"] // env.shrink))
    config = LlamaConfig(**cfg, max_position_embeddings=4096)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(env.act_dtype)
    try:
        with torch.device(env.device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(prev)
    return model


def _decode_ms(env: Env, fwd, model, ctx: int) -> tuple[float, str]:
    """Milliseconds of one batch-1 decode step after ``ctx`` tokens, with a static KV cache."""
    from transformers import StaticCache
    dev = env.device
    cache = StaticCache(config=model.config, max_cache_len=ctx + 16)
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=dev)
    with torch.no_grad():
        fwd(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ctx, device=dev), use_cache=True)
        tok = torch.randint(0, model.config.vocab_size, (1, 1), device=dev)
        pos = torch.tensor([ctx], device=dev)

        def step():
            return fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

        for _ in range(3):
            step()   # compiles (and recompiles once for the decode shape)
        if env.gpu:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                return time_ms(env, graph.replay)[0], "CUDA graph"
            except Exception as e:
                torch.cuda.synchronize()
                return time_ms(env, step)[0], f"launches (capture failed: {type(e).__name__})"
        return time_ms(env, step)[0], "cpu"


def run_e2e(env: Env, prefill_len: int, ctx: int, presets: list[str],
            model_name: str = "Llama-3-8B") -> tuple[list[dict], dict]:
    model = _e2e_model(env, model_name)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (1, 128 if env.gpu else 32), device=env.device) for _ in range(2)]
    ids = torch.randint(0, vocab, (1, prefill_len), device=env.device)
    kv_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * ctx * 2
    lin_bytes = sum(mod.weight.numel() * mod.weight.element_size() for mod in model.modules()
                    if isinstance(mod, torch.nn.Linear))
    target = "triton" if env.gpu else "reference"
    results = []
    for name, recipe in [("bf16", None)] + [(p, E2E_RECIPES[p]) for p in presets]:
        torch._dynamo.reset()
        row = {"preset": name, "note": ""}
        try:
            t0 = time.perf_counter()
            if recipe is None:
                fwd, weight_bytes = model, lin_bytes
            else:
                qb = qcompiler.backend(recipe, calibration=calib, target=target, progress=False)
                fwd = torch.compile(model, backend=qb)
            with torch.no_grad():
                row["prefill_ms"] = time_ms(env, lambda: fwd(input_ids=ids, use_cache=False).logits)[0]
            if recipe is not None:
                weight_bytes = qcompiler.report(fwd).weight_bytes()[1]
                row["note"] = f"{len(qcompiler.report(fwd).fallbacks)} linears in float"
            row["setup_s"] = time.perf_counter() - t0
            row["decode_ms"], how = _decode_ms(env, fwd, model, ctx)
            row["note"] = ", ".join(x for x in (row["note"], how) if x)
            row["floor_ms"] = (weight_bytes + kv_bytes) / (env.peaks["bw"] * 1e6)
            row["weight_gb"] = weight_bytes / 1e9
        except Exception as e:
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        results.append(row)
        print(f"  e2e {name}: {row}", file=sys.stderr)
        fwd = qb = None
        gc.collect()
        if env.gpu:
            torch.cuda.empty_cache()
    facts = {"model": model_name, "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
             "prefill_len": prefill_len, "ctx": ctx, "target": target}
    return results, facts


def e2e_table(results: list[dict], facts: dict) -> str:
    bf16 = next((r for r in results if r["preset"] == "bf16" and "prefill_ms" in r), None)
    out = [f"## End to end: {facts['model']}-shaped, random weights ({facts['layers']} layers, hidden {facts['hidden']}), "
           f"target {facts['target']!r}", "",
           f"Prefill: batch 1 x {facts['prefill_len']} tokens. Decode: batch 1 after {facts['ctx']} tokens; the floor "
           "is (linear weight bytes + KV cache bytes) / measured copy bandwidth.", "",
           "| preset | linear weights GB | prefill tok/s | x bf16 | decode tok/s | x bf16 | floor ms | % of floor "
           "| note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        pre = r.get("prefill_ms")
        dec = r.get("decode_ms")
        pre_x = bf16["prefill_ms"] / pre if bf16 and pre else None
        dec_x = bf16["decode_ms"] / dec if bf16 and dec and bf16.get("decode_ms") else None
        frac = r["floor_ms"] / dec if dec and r.get("floor_ms") else None
        out.append(f"| {r['preset']} | {_f(r.get('weight_gb'), '.2f')} | "
                   f"{_f(pre and facts['prefill_len'] / pre * 1e3, '.0f')} | {_f(pre_x, '.2f')} | "
                   f"{_f(dec and 1e3 / dec, '.1f')} | {_f(dec_x, '.2f')} | {_f(r.get('floor_ms'), '.2f')} | "
                   f"{_f(frac and 100 * frac, '.0f')} | {r['note']} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def make_env(dry_run: bool, shrink: int, autotune: bool) -> Env:
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run (reference kernels on CPU at reduced sizes)")
    if dry_run:
        from qcompiler.backends.triton.lowering import KERNELS
        kernels = {name: getattr(torch.ops.qcompiler, name) for name in KERNELS}   # the reference kernels
        return Env(False, "cpu", torch.float32, shrink, kernels, {})
    from qcompiler.backends.triton import config as cfgs
    from qcompiler.backends.triton.availability import availability
    from qcompiler.backends.triton.lowering import lowering_table
    if availability().mode != "gpu":
        raise SystemExit(f"the Triton kernels cannot run on the GPU here: {availability().reason}")
    cfgs.set_autotune(autotune)
    kernels = {op.name: op.kernel() for op in lowering_table().values()}
    return Env(True, "cuda", torch.bfloat16, 1, kernels, {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("kernels", "e2e", "all"), default="all")
    ap.add_argument("--dry-run", action="store_true", help="CPU, reference kernels, sizes divided by --shrink")
    ap.add_argument("--shrink", type=int, default=16, help="dry run: divide N, K (and M > 128) by this")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated row counts")
    ap.add_argument("--no-torchao", action="store_true", help="skip torchao's modules")
    ap.add_argument("--autotune", action="store_true", help="autotune the Triton tiles per shape (slower start)")
    ap.add_argument("--presets", default=",".join(E2E_RECIPES), help=f"e2e presets, from {list(E2E_RECIPES)}")
    ap.add_argument("--e2e-model", default="Llama-3-8B", choices=sorted(E2E_MODELS),
                    help="shape of the random-weight end-to-end model")
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--decode-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (dry run default 1: tiny ops only contend on a shared CPU)")
    ap.add_argument("--out", type=Path, help="markdown output (default on a GPU: benchmarks/results_<gpu>_<part>.md, e.g. h200)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; known: {list(MODELS)}")
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in E2E_RECIPES:
            ap.error(f"unknown e2e preset {p!r}; known: {list(E2E_RECIPES)}")
    if args.threads or args.dry_run:
        torch.set_num_threads(args.threads or 1)
    env = make_env(args.dry_run, args.shrink, args.autotune)
    env.peaks = measure_peaks(env)
    device = torch.cuda.get_device_name() if env.gpu else f"CPU dry run (sizes / {env.shrink}, reference kernels)"
    cmd = "python benchmarks/gpu_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = [f"# Triton backend speed: {device}", "",
            f"Generated {datetime.date.today()} by `{cmd}` (torch {torch.__version__}"
            + (f", triton {__import__('triton').__version__}" if env.gpu else "") + ").", "",
            "Measured peaks: " + ", ".join(f"{k} {v:.4g} {'GB/s' if k == 'bw' else 'TFLOP/s'}"
                                           for k, v in env.peaks.items()), ""]
    if not env.gpu:
        head += ["Dry run: CPU timings of the reference kernels at reduced sizes say nothing about GPU speed; "
                 "they check that every row of the table can be produced.", ""]
    parts = []
    if args.part in ("kernels", "all"):
        rows = run_kernels(env, models, [int(v) for v in args.m.split(",")], torchao=not args.no_torchao)
        parts += [kernel_tables(rows), "", target_table(rows, env), ""]
    if args.part in ("e2e", "all"):
        prefill = args.prefill_len if env.gpu else max(8, args.prefill_len // env.shrink)
        ctx = args.decode_ctx if env.gpu else max(8, args.decode_ctx // env.shrink)
        results, facts = run_e2e(env, prefill, ctx, presets, args.e2e_model)
        parts += [e2e_table(results, facts), ""]
    text = "\n".join(head + parts)
    print(text)
    gpu_tag = torch.cuda.get_device_name().split()[-1].lower() if env.gpu else ""
    out = args.out or (HERE / f"results_{gpu_tag}_{'kernels' if args.part != 'e2e' else 'e2e'}.md" if env.gpu else None)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
