r"""KV-cache quantization: perplexity per KV preset, alone and composed with weight presets, beside
the plain baselines a user gets without the compiler, under the project protocol.

Regenerate (2 CPU cores; accuracy only, so other jobs change the time columns, not the figures):

    python benchmarks/kv_cache.py --model smollm2-135m --presets kv-int8,kv-fp8,kv-fp8-r128,kv-int4 \
        --out benchmarks/results_kv_smollm2.md
    python benchmarks/kv_cache.py --model smollm2-135m --no-baselines \
        --presets w8a8-int8-sq-dynamic,w8a8-int8-sq-dynamic+kv-int8,w8a8-int8-sq-dynamic+kv-fp8-r128,w8a8-int8-sq-dynamic+kv-int4 \
        --out benchmarks/results_kv_smollm2_composed.md
    # long-context drift (~40 min on 2 cores)
    python benchmarks/kv_cache.py --model smollm2-135m --context 4096 --eval-tokens 16384 --no-baselines \
        --presets kv-int8,kv-fp8-r128,kv-int4 --out benchmarks/results_kv_smollm2_ctx4096.md
    python benchmarks/kv_cache.py --model stories260K --out benchmarks/results_kv_stories260K.md
    # the rotated / centered INT8 cache beside kv-int8, at 1,024 and 4,096
    python benchmarks/kv_cache.py --model smollm2-135m --no-baselines --presets kv-int8,kv-int8-rot \
        --out benchmarks/results_kv_rot_smollm2.md
    python benchmarks/kv_cache.py --model smollm2-135m --context 4096 --eval-tokens 16384 --no-baselines \
        --presets kv-int8-rot --out benchmarks/results_kv_rot_smollm2_ctx4096.md
    python benchmarks/kv_cache.py --model smollm2-135m --no-baselines \
        --presets w8a8-int8-sq-dynamic,w8a8-int8-sq-dynamic+kv-int8-rot --out benchmarks/results_kv_rot_smollm2_composed.md
    python benchmarks/kv_cache.py --model smollm2-135m --no-baselines \
        --presets w4a16-gptq,w4a16-gptq+kv-int8-rot --out benchmarks/results_kv_rot_smollm2_composed_gptq.md
    python benchmarks/kv_cache.py --model smollm2-135m --no-baselines \
        --presets w4a16-gptq,w4a16-gptq+kv-int8,w4a16-gptq+kv-fp8-r128 --out benchmarks/results_kv_smollm2_composed_gptq_more.md
    # memory: the quantized cache (qcompiler.kv_cache) after a 4,096-token prompt, model in bf16
    python benchmarks/kv_cache.py --model smollm2-135m --memory --context 4096 \
        --presets kv-int8,kv-int8-rot,kv-fp8,kv-fp8-r128,kv-int4 --out benchmarks/results_kv_memory_smollm2.md

Baselines ("plain" rows): the outputs of the modules named ``k_proj`` / ``v_proj`` fake-quantized
by forward hooks, what a user writes by hand: one static absmax scale per tensor (INT8, FP8, INT4;
absmax over the calibration batches) or dynamic per token and head (INT8, INT4). They quantize keys
before RoPE; the presets quantize what enters the cache (after RoPE), found from the graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

from qcompiler.backends import BACKENDS, machine
from qcompiler.core import numerics
from qcompiler.tools import evaluate
from qcompiler.tools.bench import PROTOCOLS, Row, format_table, run_table

PRESETS = ("kv-int8,kv-fp8,kv-int4,w4a16-gptq,w4a16-gptq+kv-int8,w4a16-gptq+kv-fp8,w4a16-gptq+kv-int4,"
           "w8a8-int8-sq-dynamic,w8a8-int8-sq-dynamic+kv-int8,w8a8-int8-sq-dynamic+kv-fp8,"
           "w8a8-int8-sq-dynamic+kv-int4")

#: the plain baselines: (label, dtype, per token and head?)
BASELINES = (("plain k/v_proj int8 per-tensor static", "int8", False),
             ("plain k/v_proj fp8 per-tensor static", "fp8_e4m3", False),
             ("plain k/v_proj int4 per-tensor static", "int4", False),
             ("plain k/v_proj int8 per-token-head dynamic", "int8", True),
             ("plain k/v_proj int4 per-token-head dynamic", "int4", True))


def _projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.rpartition(".")[2] in ("k_proj", "v_proj")]


def _baseline_rows(model, windows, calib, fp_ppl, facts) -> list[Row]:
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    mods = _projections(model)
    if not mods:
        return []
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    absmax: dict[torch.nn.Module, torch.Tensor] = {}

    def observe(module, args, out):
        a = out.detach().abs().amax()
        absmax[module] = torch.maximum(absmax.get(module, a), a)

    t0 = time.perf_counter()
    handles = [m.register_forward_hook(observe) for m in mods]
    with torch.no_grad():
        for b in calib:
            model(b)
    for h in handles:
        h.remove()
    calib_s = time.perf_counter() - t0
    rows = []
    for label, dtype, per_token in BASELINES:
        def fake(module, args, out, dtype=dtype, per_token=per_token):
            if per_token:
                x = out.reshape(*out.shape[:-1], -1, head_dim)
                q, s = numerics.quantize_per_token(x, dtype)
                return numerics.dequantize(q, s, None, out.dtype).reshape(out.shape)
            scale, _ = numerics.choose_scale(absmax[module], dtype)
            return numerics.fake_quantize(out, scale, None, dtype)

        handles = [m.register_forward_hook(fake) for m in mods]
        try:
            ppl = evaluate.perplexity(model, windows, progress=sys.stderr.isatty(), desc=label)
        finally:
            for h in handles:
                h.remove()
        rows.append(Row(label, ppl, 100.0 * (ppl / fp_ppl - 1.0), 0.0 if per_token else calib_s,
                        weight_mb=weight_mb))
    return rows


def _windowed(presets: list[str]) -> list:
    """Preset names, ``NAME@rN`` standing for preset NAME with a full-precision residual window of N
    tokens (``KVCacheSpec.residual_window``; per_group blocks shortened to N when longer), labelled ``NAME@rN``."""
    from qcompiler import recipes
    out: list = []
    for name in presets:
        base, _, window = name.partition("@r")
        if not window:
            out.append(name)
            continue
        recipe = recipes.get(base)
        if recipe.kv_cache is None:
            raise SystemExit(f"{name}: preset {base!r} has no kv_cache to give a residual window")
        kv = recipe.kv_cache           # per_group blocks fit in the window (none: per_group needs one)
        out.append(recipe.replace(name=name, kv_cache=dataclasses.replace(
            kv, residual_window=int(window), group_size=min(kv.group_size, int(window)))))
    return out


def _memory_table(model_name: str, presets: list[str], tokens: int, calib_samples: int = 16) -> str:
    """Bytes the cache holds after one prompt of ``tokens`` tokens, measured from its tensors
    (``QuantizedKVCache.nbytes()``; a DynamicCache's key / value storages for bf16), model in bf16."""
    import qcompiler
    from transformers import DynamicCache
    from qcompiler.tools import data, models
    from qcompiler.tools.bench import _text

    protocol = PROTOCOLS[model_name]
    model, tok = models.load_model(model_name, dtype=torch.bfloat16)
    ids = data.tokenize_text(tok, _text(protocol.eval_text))[:tokens].unsqueeze(0)
    if ids.shape[1] < tokens:
        raise SystemExit(f"the evaluation text has only {ids.shape[1]} tokens, fewer than {tokens}")
    calib = data.calibration_batches(data.tokenize_text(tok, _text(protocol.calib_text)), calib_samples,
                                     protocol.calib_seq, seed=0)
    rows = []
    plain = DynamicCache()
    with torch.no_grad():
        model(ids, cache=plain, use_cache=True)
    bf16 = sum(t.untyped_storage().nbytes() for layer in plain.layers for t in (layer.keys, layer.values))
    rows.append(("bf16 DynamicCache (transformers)", bf16))
    del plain
    for preset in presets:
        recipe = qcompiler.recipes.resolve(preset)
        cache = qcompiler.kv_cache(model, recipe, calib, progress=False)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        rows.append((f"{recipe.name} ({recipe.kv_cache.describe()})", cache.nbytes()))
        del cache
    lines = [f"Model {model_name} in bf16; one prompt of the first {tokens} tokens of {protocol.eval_text}; static "
             f"scales from {calib_samples} x {protocol.calib_seq} tokens of {protocol.calib_text}. Bytes are "
             "measured from the tensors each cache holds after the prompt (codes, scales, zero points, the "
             "full-precision window; each storage once), not computed from dtypes.", "",
             f"| cache | bytes at {tokens} tokens | MB | bytes / token | vs bf16 |", "|---|---|---|---|---|"]
    for label, nbytes in rows:
        lines.append(f"| {label} | {nbytes} | {nbytes / 1e6:.2f} | {nbytes / tokens:.1f} | {nbytes / bf16:.3f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--presets", default=PRESETS,
                    help=f"comma-separated presets; NAME@rN: preset NAME with an N-token full-precision residual "
                         f"window (default: {PRESETS})")
    ap.add_argument("--context", type=int, help="evaluation window length (default: the protocol's)")
    ap.add_argument("--eval-tokens", type=int, help="evaluate the first N tokens (default: the protocol's)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the plain k_proj / v_proj rows")
    ap.add_argument("--target", default="reference", choices=sorted(BACKENDS))
    ap.add_argument("--memory", action="store_true",
                    help="measure the quantized caches' bytes after one --context-token prompt instead of perplexity")
    ap.add_argument("--out", type=Path, help="write the markdown table to this file")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/kv_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.memory:
        body = _memory_table(args.model, _windowed([p for p in args.presets.split(",") if p]), args.context or 4096)
        text = (f"# {args.model}: KV-cache memory\n\nGenerated {datetime.date.today()} by `{cmd}`.\n\n"
                f"{body}\n\nCPU: {machine.describe()}\n")
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    protocol = PROTOCOLS[args.model]
    if args.context:
        protocol = dataclasses.replace(protocol, context=args.context)
    if args.eval_tokens:
        protocol = dataclasses.replace(protocol, eval_tokens=args.eval_tokens)
    presets = _windowed([p for p in args.presets.split(",") if p])
    rows, facts = run_table(args.model, presets, protocol, progress=sys.stderr.isatty(), prefill=False,
                            extra_rows=[] if args.no_baselines else [_baseline_rows], target=args.target)
    text = (f"# {args.model}: KV-cache quantization (perplexity)\n\nGenerated {datetime.date.today()} by `{cmd}`.\n\n"
            + format_table(rows, facts) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
