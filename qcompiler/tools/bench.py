"""The FP32-vs-quantized table: perplexity, calibration and quantize time, weight bytes and
CPU prefill speed per preset, under one protocol. Used by the CLI's main job and by
``benchmarks/accuracy.py``."""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qcompiler import api, recipes
from qcompiler.tools import data, evaluate, models, texts
from qcompiler.backends import machine
from qcompiler.backends.gemm_kernels import onednn_float_available
from qcompiler.calibration.statistics import CalibrationCache

__all__ = ["Protocol", "PROTOCOLS", "CLI_PROTOCOLS", "Row", "run_table", "format_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """How a model is evaluated and calibrated."""

    eval_text: str              # a key of texts.TEXTS or a file path
    eval_tokens: int | None     # first N tokens of the evaluation text (None: all)
    context: int
    bos: bool
    calib_text: str
    calib_samples: int = 128
    calib_seq: int = 512
    prefill_seq: int = 512


#: The benchmark tables' protocols: WikiText-2 (the field's perplexity text) read from the shared
#: folder; stories260K on disjoint halves of TinyStories.
PROTOCOLS = {
    "smollm2-135m": Protocol("wikitext-test", 32768, 1024, False, "wikitext-valid"),
    "stories260K": Protocol("tinystories-eval", 20480, 512, True, "tinystories-calib"),
}
#: The command line's defaults: texts fetched from PyPI, so the main job runs on a bare machine
#: (no shared folder); evaluation and calibration are disjoint plays.
CLI_PROTOCOLS = {
    "smollm2-135m": Protocol("shakespeare-eval", 8192, 1024, False, "shakespeare-calib"),
    "stories260K": PROTOCOLS["stories260K"],
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
    kernels: str = ""            # the GEMM kernels the quantized linears ran, with their numerics
    speedup_iqr: tuple[float, float] | None = None    # interquartile range of the paired rounds' ratios


def _text(kind: str) -> str:
    path = texts.text_path(kind) if kind in texts.TEXTS else Path(kind)
    return Path(path).read_text(encoding="utf-8")


def _int8_kernel_line(m: int = 512, k: int = 576, n: int = 1536) -> str:
    """The int8 GEMM kernels this machine has against an fp32 matmul at one SmolLM2 MLP shape: speed
    and the numerics each keeps here (what bounds, and what decides, the INT8 rows)."""
    from qcompiler.backends.gemm_kernels import KERNELS
    from qcompiler.backends.kernel_choice import _time_all, probe
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    one, ws = torch.tensor(1.0), torch.ones(n, 1)
    fns, notes = {}, {}
    for kernel in (kk for kk in KERNELS if kk.op == "int8_gemm"):
        contract, note = probe(kernel, torch.device("cpu"))
        if contract is None:
            notes[kernel.name] = f"{kernel.name} unavailable ({note})"
            continue
        wk = kernel.prepare(w) if kernel.prepare else w
        fns[kernel.name] = (lambda x, kernel=kernel, wk=wk: kernel.run(x, one, wk, ws, None, torch.float32))
        notes[kernel.name] = contract.value
    af, wf = a.float(), w.float()
    fns["fp32 matmul"] = lambda x: torch.nn.functional.linear(af, wf)
    with torch.no_grad():
        times = _time_all(fns, [a], slow=1e9)
    fp = times.pop("fp32 matmul")
    parts = [f"{name} {fp / t:.2f}x ({notes[name]})" for name, t in sorted(times.items(), key=lambda kv: kv[1])]
    parts += [v for name, v in notes.items() if name not in times]
    return (f"int8 GEMM kernels at {m}x{k}x{n} against an fp32 matmul ({1e3 * fp:.2f} ms), with the numerics "
            f"each keeps on this CPU: " + ", ".join(parts))


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

    ``presets`` holds preset names or ``Recipe`` objects (labelled by ``recipe.name``), or
    ``(preset, kernels)`` pairs for a kernel policy other than "auto" (``qcompiler.backend``). Recipes
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

    facts = {"kernel_line": _int8_kernel_line(), "model": model_name, "torch": torch.__version__,
             "threads": torch.get_num_threads(), "machine": machine.describe(), "machine_class": machine.machine_class(),
             "protocol": protocol, "eval_windows": len(windows), "load_start": _load(), "prefill": prefill}
    fp_ppl = evaluate.perplexity(model, windows, progress=progress, desc="FP32")
    fp_speed = evaluate.prefill_tokens_per_s(model, protocol.prefill_seq, vocab_size=vocab, repeats=5) \
        if prefill else 0.0

    def speed_of(runner) -> dict:
        """Row fields: tokens/s, speedup over eager FP32 and its interquartile range, timed in
        alternation with the eager float model."""
        if not prefill:
            return {"prefill_tok_s": 0.0, "speedup": 0.0}
        s = evaluate.paired_prefill(model, runner, protocol.prefill_seq, vocab_size=vocab)
        return {"prefill_tok_s": s.tok_s, "speedup": s.speedup, "speedup_iqr": (s.low, s.high)}

    rows = _RowLog([Row("FP32", fp_ppl, weight_mb=fp_bytes / 1e6, prefill_tok_s=fp_speed)])
    facts["target"] = target
    float_variants = [("FP32 (inductor)", lambda: torch.compile(model, backend="inductor", dynamic=False))] \
        if target == "inductor" else []
    if onednn_float_available(next(model.parameters()).device) is None:
        float_variants.append(("FP32 (oneDNN GEMM, eager)",
                               lambda: torch.compile(model, backend=_onednn_gemm_backend, dynamic=False)))
    for label, make in float_variants:
        torch._dynamo.reset()
        runner = make()
        ppl = evaluate.perplexity(runner, windows, progress=progress, desc=label)
        rows.append(Row(label, ppl, 100.0 * (ppl / fp_ppl - 1.0), weight_mb=fp_bytes / 1e6, **speed_of(runner)))
        del runner

    cache = CalibrationCache(calib, samples_per_layer=1024, progress=progress)
    for preset in presets:
        preset, kernels = preset if isinstance(preset, tuple) else (preset, "auto")
        recipe = recipes.resolve(preset)
        name = recipe.name + (f" (kernels={kernels})" if kernels != "auto" else "")
        torch._dynamo.reset()
        subject = model
        if recipe.rotation is not None:
            # a backend sees the model after Dynamo captured it: the rotation goes into a copy first
            from qcompiler.rotation import apply_recipe_rotation
            subject = copy.deepcopy(model)
            apply_recipe_rotation(subject, recipe)
        own = (recipe.layerwise or recipe.gptq is not None or recipe.samples_per_layer != 1024
               or recipe.rotation is not None)      # the shared cache holds the unrotated model's statistics
        qb = api.backend(recipe, calibration=calib if own else cache, target=target, progress=progress,
                         kernels=kernels)
        compiled = torch.compile(subject, backend=qb, dynamic=False)
        t0 = time.perf_counter()
        ppl = evaluate.perplexity(compiled, windows, progress=progress, desc=name)
        eval_and_compile = time.perf_counter() - t0
        rep = qb.report
        quantize_s = sum(p["wall_s"] for p in rep.passes if p["name"] != "calibrate")
        before, after = rep.weight_bytes()
        decoder = [d for d in rep.layers.values() if d.op_kind == "linear"]
        calib_s = (qb.calibration.seconds if qb.calibration else 0.0) + rep.tensor_calibration_s
        rows.append(Row(name, ppl, 100.0 * (ppl / fp_ppl - 1.0), calib_s,
                        quantize_s, (fp_bytes - before + after) / 1e6, quantized=len(rep.quantized),
                        fallbacks=[f"{d.fqn} ({d.reason})" for d in decoder if not d.quantize],
                        decoder_linears=len(decoder), kernels=kernel_summary(rep), **speed_of(compiled)))
        log.info("%s: ppl %.3f, eval+compile %.1f s", name, ppl, eval_and_compile)
        del compiled, subject
    for extra in extra_rows:
        rows += extra(model, windows, calib, fp_ppl, facts)
    if peers:
        rows += _torchao_rows(model, windows, fp_ppl, fp_bytes, speed_of, protocol, progress, facts)
    facts["load_end"] = _load()
    return list(rows), facts


class _RowLog(list):
    """The table's rows, each also logged (stderr) as it is measured, so a run stopped before the table is
    written keeps the rows it finished."""

    def __init__(self, rows):
        super().__init__()
        for r in rows:
            self.append(r)

    def append(self, row: Row) -> None:
        super().append(row)
        print(f"[row] {row.name}: ppl {row.ppl:.4f} ({row.delta_pct:+.2f}%), calib {row.calib_s:.0f} s",
              file=sys.stderr, flush=True)

    def __iadd__(self, rows):
        for r in rows:
            self.append(r)
        return self


def _onednn_gemm_backend(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """A ``torch.compile`` backend that runs the float graph eagerly with every ``F.linear`` on
    oneDNN's float32 GEMM (``qcompiler::onednn_linear``): the float model's share of that library's
    speed, shown beside the quantized rows whose kernels use it."""
    swapped = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch._C._nn.linear, torch.nn.functional.linear):
            x, w, *rest = node.args
            bias = rest[0] if rest else node.kwargs.get("bias")
            node.target, node.args, node.kwargs = torch.ops.qcompiler.onednn_linear, (x, w, bias), {}
            swapped += 1
    if not swapped:
        raise RuntimeError("FP32 (oneDNN GEMM): the captured graph has no F.linear to run on oneDNN")
    gm.recompile()
    return gm


def kernel_summary(rep) -> str:
    """``kernel [numerics] count`` per kernel the report's quantized linears ran."""
    counts = Counter(f"{d.kernel} [{d.kernel_contract}]" for d in rep.quantized if d.kernel)
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common())


def _load() -> float | None:
    """The 1-minute load average (other work on the machine skews the speed columns)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a tensor subclass (torchao's quantized weights) counts its inner
    tensors, not ``numel * element_size`` of the dtype it presents."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, name)) for name in names if getattr(t, name) is not None)
    return t.numel() * t.element_size()


def _model_storage_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _storage_bytes(t)
    return total


def _torchao_rows(model, windows, fp_ppl, fp_bytes, speed_of, protocol, progress, facts) -> list[Row]:
    """torchao's int8 dynamic-activation / int8-weight config on the same model (output head kept float),
    run as its quick start runs it: ``quantize_`` (with ``reduce_range`` where its
    ``should_reduce_range`` says the CPU lacks VNNI), eagerly, then ``torch.compile(mode="max-autotune",
    fullgraph=True)``. Weight MB is what its tensors really store."""
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        from torchao.utils import should_reduce_range
    except Exception as e:   # not installed, or does not import beside this torch
        facts["torchao"] = f"not available ({type(e).__name__}: {e})"
        return []
    import copy
    peer = copy.deepcopy(model)
    head = peer.get_output_embeddings()
    # torchao reads VNNI from cpuinfo; under an ISA limit to AVX2 its kernels lack VNNI all the same
    reduce_range = should_reduce_range(torch.device("cpu")) or machine.machine_class() in ("avx2", "avx2-limited")
    t0 = time.perf_counter()
    quantize_(peer, Int8DynamicActivationInt8WeightConfig(reduce_range=reduce_range),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
    quant_s = time.perf_counter() - t0
    facts["torchao"] = f"{torchao.__version__}, reduce_range={reduce_range}"
    n = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1
    mb = _model_storage_bytes(peer) / 1e6
    label = f"torchao {torchao.__version__} int8 dyn-act/int8-weight"
    rows = []
    torch._dynamo.reset()
    compiled = torch.compile(peer, mode="max-autotune", fullgraph=True)
    for name, runner in (("eager", peer), ("torch.compile max-autotune", compiled)):
        ppl = evaluate.perplexity(runner, windows, progress=progress, desc=f"torchao {name}")
        rows.append(Row(f"{label} ({name})", ppl, 100.0 * (ppl / fp_ppl - 1.0), 0.0, quant_s, mb, quantized=n,
                        decoder_linears=n, kernels="torchao", **speed_of(runner)))
    torch._dynamo.reset()
    return rows


def format_table(rows: list[Row], facts: dict) -> str:
    """Markdown table of ``rows`` under a header stating the protocol; without prefill timing
    (``run_table(prefill=False)``) the speed columns are left out rather than printed as zeros."""
    p = facts["protocol"]
    timed = facts.get("prefill", True)
    head = (f"Model {facts['model']}; perplexity on the first {p.eval_tokens or 'all'} tokens of "
            f"{texts.describe(p.eval_text)} (context {p.context}, non-overlapping, {'BOS per window' if p.bos else 'no BOS'}, fp32 compute, "
            f"{facts['eval_windows']} windows); calibration {p.calib_samples} x {p.calib_seq} tokens of "
            f"{texts.describe(p.calib_text)} at seeded random offsets; ")
    if timed:
        head += (f"prefill = one {p.prefill_seq}-token sequence run as generate() runs its prefill (KV cache "
                 f"built, logits of the last position only); each row's speedup is the median, over at least 9 rounds "
                 f"(as many as fill 2 s when forwards are fast) that each run one eager-FP32 forward then one of the "
                 f"row's, of the round's time ratio, with the interquartile range of those ratios in brackets (the "
                 f"measurement's noise: a speedup whose range holds 1.00 is float speed within noise), ")
    else:
        head += "prefill speed not measured in this table, "
    head += f"{facts['threads']} threads, torch {facts['torch']}."
    if facts.get("machine"):
        head += f" CPU: {facts['machine']} (class `{facts.get('machine_class', '?')}`)."
    if facts.get("kernel_line"):
        head += f" On this CPU the {facts['kernel_line']}."
    elif "gemm_ratio" in facts:   # tables written before kernel choice
        head += (f" On this machine torch._int_mm is {facts['gemm_ratio']:.1f}x faster than an fp32 matmul at "
                 "512x576x1536.")
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
    if any(r.name.startswith("FP32 (oneDNN") for r in rows):
        head += (" `FP32 (oneDNN GEMM, eager)` is the float model with every linear on oneDNN's float32 GEMM "
                 "(`qcompiler::onednn_linear`): the share of the `*-onednn` kernels' speed that comes from that "
                 "GEMM library rather than from quantization.")
    speed_head, speed_rule = ("prefill tok/s | speedup | ", "---|---|") if timed else ("", "")
    lines = [head, "",
             f"| recipe | perplexity | Δ% vs FP32 | calibration s | quantize s | weight MB | {speed_head}"
             "fallback decoder linears | GEMM kernels [numerics] |",
             f"|---|---|---|---|---|---|{speed_rule}---|---|"]
    for r in rows:
        fb = "-" if r.name.startswith("FP32") else f"{len(r.fallbacks)}/{r.decoder_linears}"
        iqr = f" [{r.speedup_iqr[0]:.2f}, {r.speedup_iqr[1]:.2f}]" if r.speedup_iqr else ""
        speed = f"{r.prefill_tok_s:.0f} | {r.speedup:.2f}x{iqr} | " if timed else ""
        lines.append(f"| {r.name} | {r.ppl:.3f} | {r.delta_pct:+.2f} | {r.calib_s:.1f} | {r.quantize_s:.1f} | "
                     f"{r.weight_mb:.1f} | {speed}{fb} | {r.kernels or '-'} |")
    if "torchao" in facts:
        lines.append(f"\ntorchao peer rows: {facts['torchao']}; int8 per-token dynamic activations, int8 per-channel "
                     "weights on every decoder nn.Linear (output head kept float), run as its quick start runs it: "
                     "eagerly, and through torch.compile(mode=\"max-autotune\", fullgraph=True); weight MB counts "
                     "the bytes its quantized tensors hold.")
    for r in rows:
        if r.fallbacks:
            lines.append(f"\n{r.name} keeps in high precision: " + _fallback_note(r.fallbacks))
    return "\n".join(lines)


def _fallback_note(fallbacks: list[str]) -> str:
    """``"fqn (reason)"`` entries, those sharing a reason grouped when more than three do."""
    by_reason: dict[str, list[str]] = {}
    for entry in fallbacks:
        name, _, reason = entry.partition(" (")
        by_reason.setdefault(reason.removesuffix(")"), []).append(name)
    parts = []
    for reason, names in by_reason.items():
        if len(names) > 3:
            parts.append(f"{len(names)} linears ({reason}; {names[0]}, {names[1]}, ... {names[-1]})")
        else:
            parts += [f"{n} ({reason})" for n in names]
    return "; ".join(parts)
