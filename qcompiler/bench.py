"""The FP32-vs-quantized table: perplexity, calibration and quantize time, weight bytes and
CPU prefill speed per preset, under one protocol. Used by the CLI's main job and by
``benchmarks/accuracy.py``."""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import api, data, evaluate, models
from .calibration import CalibrationCache

__all__ = ["Protocol", "PROTOCOLS", "Row", "run_table", "format_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """How a model is evaluated and calibrated."""

    eval_text: str              # a key of models.TEXTS or a file path
    eval_tokens: int | None     # first N tokens of the evaluation text (None: all)
    context: int
    bos: bool
    calib_text: str
    calib_samples: int = 128
    calib_seq: int = 512
    prefill_seq: int = 512


PROTOCOLS = {
    "smollm2-135m": Protocol("wikitext-test", 32768, 1024, False, "wikitext-valid"),
    "stories260K": Protocol("tinystories", 20480, 512, True, "tinystories"),
}


@dataclass
class Row:
    name: str
    ppl: float
    delta_pct: float = 0.0
    calib_s: float = 0.0
    quantize_s: float = 0.0
    weight_mb: float = 0.0
    prefill_tok_s: float = 0.0
    speedup: float = 1.0
    quantized: int = 0
    fallbacks: list[str] = field(default_factory=list)
    decoder_linears: int = 0


def _text(kind: str) -> str:
    path = models.text_path(kind) if kind in models.TEXTS else Path(kind)
    return Path(path).read_text(encoding="utf-8")


def _int_mm_vs_fp32(m: int = 512, k: int = 576, n: int = 1536, reps: int = 30) -> float:
    """How much faster ``torch._int_mm`` is than an fp32 matmul of the same shape on this machine."""
    a, b = torch.randint(-127, 127, (m, k), dtype=torch.int8), torch.randint(-127, 127, (n, k), dtype=torch.int8)
    af, bf = a.float(), b.float()
    times = []
    for fn in (lambda: torch._int_mm(a, b.t()), lambda: af @ bf.t()):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append(time.perf_counter() - t0)
    return times[1] / times[0]


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def run_table(model_name: str, presets: list, protocol: Protocol | None = None, *,
              progress: bool = True, prefill: bool = True, peers: bool = False,
              extra_rows: list[Callable] = (), target: str = "reference") -> tuple[list[Row], dict]:
    """Evaluate FP32 and each preset on ``model_name``; returns rows and run facts.

    ``target``: the backend the quantized rows run on. With "inductor", FP32 compiled by
    inductor is measured too (row "FP32 (inductor)"), so that a speedup from fusing the
    float ops is not credited to quantization; the speedup column stays relative to eager FP32.

    ``presets`` holds preset names or ``Recipe`` objects (labelled by ``recipe.name``). Recipes
    that need Hessians or layer-by-layer calibration calibrate on their own (timed in their
    row); the others share one calibration pass. ``extra_rows``: callables
    ``(model, windows, calib, fp_ppl, facts) -> list[Row]`` for peer tools.
    """
    protocol = protocol or PROTOCOLS.get(model_name) or PROTOCOLS["smollm2-135m"]
    model, tok = models.load_model(model_name)
    bos_id = tok.bos_token_id if protocol.bos else None
    eval_ids = data.tokenize_text(tok, _text(protocol.eval_text))
    windows = data.eval_windows(eval_ids, protocol.eval_tokens, protocol.context, bos_id=bos_id)
    calib_ids = data.tokenize_text(tok, _text(protocol.calib_text))
    calib = data.calibration_batches(calib_ids, protocol.calib_samples, protocol.calib_seq, seed=0, bos_id=bos_id)
    vocab = model.config.vocab_size
    fp_bytes = _model_bytes(model)

    facts = {"gemm_ratio": _int_mm_vs_fp32(), "model": model_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "machine": platform.processor() or platform.machine(), "protocol": protocol,
             "eval_windows": len(windows), "load_start": _load(), "prefill": prefill}
    fp_ppl = evaluate.perplexity(model, windows, progress=progress, desc="FP32")
    fp_speed = evaluate.prefill_tokens_per_s(model, protocol.prefill_seq, vocab_size=vocab) if prefill else 0.0
    rows = [Row("FP32", fp_ppl, weight_mb=fp_bytes / 1e6, prefill_tok_s=fp_speed)]
    facts["target"] = target
    if target == "inductor":
        torch._dynamo.reset()
        compiled_fp = torch.compile(model, backend="inductor", dynamic=False)
        ppl = evaluate.perplexity(compiled_fp, windows, progress=progress, desc="FP32 (inductor)")
        speed = evaluate.prefill_tokens_per_s(compiled_fp, protocol.prefill_seq, vocab_size=vocab) if prefill else 0.0
        rows.append(Row("FP32 (inductor)", ppl, 100.0 * (ppl / fp_ppl - 1.0), weight_mb=fp_bytes / 1e6,
                        prefill_tok_s=speed, speedup=speed / fp_speed if fp_speed else 0.0))
        del compiled_fp

    cache = CalibrationCache(calib, samples_per_layer=1024, progress=progress)
    for preset in presets:
        recipe = api._as_recipe(preset)
        name = recipe.name
        torch._dynamo.reset()
        own = recipe.layerwise or recipe.gptq is not None or recipe.samples_per_layer != 1024
        qb = api.backend(recipe, calibration=calib if own else cache, target=target, progress=progress)
        compiled = torch.compile(model, backend=qb, dynamic=False)
        t0 = time.perf_counter()
        ppl = evaluate.perplexity(compiled, windows, progress=progress, desc=name)
        eval_and_compile = time.perf_counter() - t0
        rep = qb.report
        quantize_s = sum(p["wall_s"] for p in rep.passes if p["name"] != "calibrate")
        before, after = rep.weight_bytes()
        speed = evaluate.prefill_tokens_per_s(compiled, protocol.prefill_seq, vocab_size=vocab) if prefill else 0.0
        decoder = [d for d in rep.layers.values() if d.op_kind == "linear"]
        rows.append(Row(name, ppl, 100.0 * (ppl / fp_ppl - 1.0), qb.calibration.seconds if qb.calibration else 0.0,
                        quantize_s,
                        (fp_bytes - before + after) / 1e6, speed, speed / fp_speed if fp_speed else 0.0,
                        len(rep.quantized), [f"{d.fqn} ({d.reason})" for d in decoder if not d.quantize],
                        len(decoder)))
        log.info("%s: ppl %.3f, eval+compile %.1f s", name, ppl, eval_and_compile)
    for extra in extra_rows:
        rows += extra(model, windows, calib, fp_ppl, facts)
    if peers:
        rows += _torchao_rows(model, windows, fp_ppl, fp_bytes, fp_speed, protocol, progress, prefill, facts)
    facts["load_end"] = _load()
    return rows, facts


def _load() -> float | None:
    """The 1-minute load average (other work on the machine skews the speed columns)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _torchao_rows(model, windows, fp_ppl, fp_bytes, fp_speed, protocol, progress, prefill, facts) -> list[Row]:
    """torchao's int8 dynamic-activation / int8-weight config on the same model (output head kept float)."""
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as e:   # not installed, or does not import beside this torch
        facts["torchao"] = f"not available ({type(e).__name__}: {e})"
        return []
    import copy
    peer = copy.deepcopy(model)
    head = peer.get_output_embeddings()
    t0 = time.perf_counter()
    quantize_(peer, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
    quant_s = time.perf_counter() - t0
    facts["torchao"] = torchao.__version__
    ppl = evaluate.perplexity(peer, windows, progress=progress, desc="torchao")
    speed = evaluate.prefill_tokens_per_s(peer, protocol.prefill_seq, vocab_size=model.config.vocab_size) \
        if prefill else 0.0
    n = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1
    return [Row(f"torchao {torchao.__version__} int8 dyn-act/int8-weight (eager)", ppl, 100.0 * (ppl / fp_ppl - 1.0),
                0.0, quant_s, _model_bytes(peer) / 1e6, speed, speed / fp_speed if fp_speed else 0.0, n, [], n)]


def format_table(rows: list[Row], facts: dict) -> str:
    """Markdown table of ``rows`` under a header stating the protocol; without prefill timing
    (``run_table(prefill=False)``) the speed columns are left out rather than printed as zeros."""
    p = facts["protocol"]
    timed = facts.get("prefill", True)
    head = (f"Model {facts['model']}; perplexity on the first {p.eval_tokens or 'all'} tokens of {p.eval_text} "
            f"(context {p.context}, non-overlapping, {'BOS per window' if p.bos else 'no BOS'}, fp32 compute, "
            f"{facts['eval_windows']} windows); calibration {p.calib_samples} x {p.calib_seq} tokens of "
            f"{p.calib_text} at seeded random offsets; ")
    if timed:
        head += (f"prefill = one {p.prefill_seq}-token sequence run as generate() runs its prefill (KV cache "
                 f"built, logits of the last position only), ")
    else:
        head += "prefill speed not measured in this table, "
    head += (f"{facts['threads']} threads, torch {facts['torch']}. On this machine torch._int_mm is "
             f"{facts['gemm_ratio']:.1f}x faster than an fp32 matmul at 512x576x1536 (the bound on INT8 speedups).")
    if facts.get("load_start") is not None and facts.get("load_end") is not None:
        head += (f" Load average at start / end: {facts['load_start']:.1f} / {facts['load_end']:.1f} on "
                 f"{os.cpu_count()} CPUs (the benchmark's own threads count; a load well above the CPU count "
                 f"means other processes shared the cores and skewed the "
                 f"{'speed and ' if timed else ''}calibration-time columns).")
    if facts.get("target", "reference") != "reference":
        head += (f" Quantized rows run on target `{facts['target']}`"
                 + (" (the graph compiled by TorchInductor, quantize / epilogue ops fused); `FP32 (inductor)` is "
                    "the float model through the same compiler, speedups are against eager FP32."
                    if facts["target"] == "inductor" else "."))
    speed_head, speed_rule = ("prefill tok/s | speedup | ", "---|---|") if timed else ("", "")
    lines = [head, "",
             f"| recipe | perplexity | Δ% vs FP32 | calibration s | quantize s | weight MB | {speed_head}"
             "fallback decoder linears |",
             f"|---|---|---|---|---|---|{speed_rule}---|"]
    for r in rows:
        fb = "-" if r.name.startswith("FP32") else f"{len(r.fallbacks)}/{r.decoder_linears}"
        speed = f"{r.prefill_tok_s:.0f} | {r.speedup:.2f}x | " if timed else ""
        lines.append(f"| {r.name} | {r.ppl:.3f} | {r.delta_pct:+.2f} | {r.calib_s:.1f} | {r.quantize_s:.1f} | "
                     f"{r.weight_mb:.1f} | {speed}{fb} |")
    if "torchao" in facts:
        lines.append(f"\ntorchao peer row: {facts['torchao']}; int8 per-token dynamic activations, int8 per-channel "
                     "weights on every decoder nn.Linear (output head kept float), run eagerly.")
    for r in rows:
        if r.fallbacks:
            lines.append(f"\n{r.name} keeps in high precision: " + "; ".join(r.fallbacks))
    return "\n".join(lines)
