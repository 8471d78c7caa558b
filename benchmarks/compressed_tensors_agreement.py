r"""compressed-tensors agreement: for each preset, the perplexity qcompiler computes from its quantized
model against the perplexity transformers computes from the checkpoint ``save_compressed_tensors``
wrote (loaded with ``AutoModelForCausalLM.from_pretrained``, compressed-tensors installed), on the
model's full protocol; plus the relative L2 error of their logits on the first window (float64) and
the logits of the checkpoint read back by ``qcompiler.load_compressed_tensors`` against qcompiler's.
qcompiler runs its exact kernels (``kernels="exact"``): on a CPU without VNNI the fast int8 GEMMs
saturate int16 pair sums, which would be a kernel difference, not a checkpoint one.

    python benchmarks/compressed_tensors_agreement.py --model smollm2-135m \
        --out benchmarks/results_ct_agreement_smollm2.md
    python benchmarks/compressed_tensors_agreement.py --model stories260K \
        --out benchmarks/results_ct_agreement_stories260K.md

For a dynamic-activation preset the two models part through rounding flips of the per-token scales
(``benchmarks/ct_agreement_spread.py`` measures that spread); scoring the whole test text averages it down:

    python benchmarks/compressed_tensors_agreement.py --model smollm2-135m --eval-tokens 0 \
        --presets fp8-dynamic,w8a8-int8-sq-dynamic --out benchmarks/results_ct_agreement_smollm2_full.md

A preset name may carry weight-spec overrides after a colon: ``w4a16-rtn:g32-asym`` (group size 32,
asymmetric: the layout the GGUF source of SmolLM2 was quantized with) or ``w4a16-gptq:g128``, or keep
modules in float: ``w8a8-int8-sq:float_o_proj`` (``fallback.keep_modules`` += ``*o_proj``: the layers whose
SmoothQuant / AWQ scale no norm absorbs, which compressed-tensors cannot express):

    python benchmarks/compressed_tensors_agreement.py --model smollm2-135m \
        --presets fp8,w8a8-int8-sq:float_o_proj,w4a16-awq:float_o_proj
A checkpoint transformers cannot load is a row saying why (asymmetric weight-only: packed zero
points, README), never a number. A name ending in ``@int-quantized`` writes asymmetric weight-only
layers in the layout transformers loads (``save_compressed_tensors(..., asymmetric_format=...)``):

    python benchmarks/compressed_tensors_agreement.py --model smollm2-135m \
        --presets w4a16-rtn:g32-asym@int-quantized,w4a16-gptq:asym@int-quantized
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

import qcompiler
from qcompiler import recipes
from qcompiler.backends import machine
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.tools import data, evaluate, models
from qcompiler.tools.bench import PROTOCOLS, _text

PRESETS = "w8a16,w4a16-rtn,w4a16-gptq,w4a16-gptq:g128,w4a16-rtn:g32-asym,fp8-dynamic,w8a8-int8-sq-dynamic"


def _recipe(name: str):
    name = name.partition("@")[0]
    base, _, tweaks = name.partition(":")
    recipe = recipes.get(base)
    changes, keep = {}, []
    for t in filter(None, tweaks.split("-")):
        if t.startswith("g") and t[1:].isdigit():
            changes["group_size"] = int(t[1:])
        elif t == "asym":
            changes["symmetric"] = False
        elif t.startswith("float_") and len(t) > 6:
            keep.append("*" + t[6:])
        else:
            raise SystemExit(f"{name}: unknown override {t!r} (gN, asym, float_<module name suffix>)")
    if changes:
        recipe = recipe.replace(name=name, weight=dataclasses.replace(recipe.weight, **changes))
    if keep:
        fallback = recipe.fallback
        recipe = recipe.replace(name=name, fallback=dataclasses.replace(
            fallback, keep_modules=tuple(fallback.keep_modules) + tuple(keep)))
    return recipe


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _row(model_name: str, name: str, windows, calib, progress: bool, work: Path) -> str:
    from transformers import AutoModelForCausalLM
    recipe = _recipe(name)
    model, tok = models.load_model(model_name)
    t0 = time.perf_counter()
    qcompiler.quantize(model, recipe, calibration=calib if recipe.needs_calibration else None, progress=progress,
                       kernels="exact")
    quantize_s = time.perf_counter() - t0
    layout = name.partition("@")[2] or "pack-quantized"
    folder = qcompiler.save_compressed_tensors(model, work / name.replace(":", "-").replace("@", "-"), recipe,
                                               tokenizer=tok, asymmetric_format=layout)
    mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
    ours = evaluate.perplexity(model, windows, progress=progress, desc=f"{name} qcompiler")
    first = windows[0][None] if windows[0].dim() == 1 else windows[0]
    ours_logits = _logits(model, first)
    reread, _ = qcompiler.load_compressed_tensors(folder)
    for m in reread.modules():
        if isinstance(m, QuantizedLinear):
            m.kernels = "exact"
    reread_err = _rel(_logits(reread, first), ours_logits)
    del reread
    try:
        theirs_model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    except Exception as e:      # noqa: BLE001 — the row says why transformers refused the checkpoint
        why = str(e).strip().splitlines()[0][:160]
        return (f"| {name} | {ours:.3f} | transformers cannot load it: {type(e).__name__}: {why} | - | - | "
                f"{reread_err:.1e} | {mb:.1f} | {quantize_s:.0f} |")
    theirs_err = _rel(_logits(theirs_model, first), ours_logits)
    theirs = evaluate.perplexity(theirs_model, windows, progress=progress, desc=f"{name} transformers")
    return (f"| {name} | {ours:.3f} | {theirs:.3f} | {100 * (theirs / ours - 1):+.3f} | {theirs_err:.1e} | "
            f"{reread_err:.1e} | {mb:.1f} | {quantize_s:.0f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--presets", default=PRESETS, help=f"comma-separated presets (default: {PRESETS})")
    ap.add_argument("--out", type=Path, help="write the markdown table to this file")
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="score the first N tokens of the evaluation text instead of the protocol's (0: all of "
                         "it): more tokens average out the chaotic part of a dynamic-activation difference")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/compressed_tensors_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv)
    import compressed_tensors
    import transformers
    protocol = PROTOCOLS[args.model]
    if args.eval_tokens is not None:
        protocol = dataclasses.replace(protocol, eval_tokens=args.eval_tokens or None)
    _, tok = models.load_model(args.model)
    bos = tok.bos_token_id if protocol.bos else None
    windows = data.eval_windows(data.tokenize_text(tok, _text(protocol.eval_text)), protocol.eval_tokens,
                                protocol.context, bos_id=bos)
    calib = data.calibration_batches(data.tokenize_text(tok, _text(protocol.calib_text)), protocol.calib_samples,
                                     protocol.calib_seq, seed=0, bos_id=bos)
    progress = sys.stderr.isatty()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ct-agreement-") as work:
        for name in filter(None, args.presets.split(",")):
            rows.append(_row(args.model, name, windows, calib, progress, Path(work)))
            print(rows[-1], flush=True)
    text = (f"# {args.model}: compressed-tensors checkpoints, qcompiler vs transformers\n\n"
            f"Generated {datetime.date.today()} by `{cmd}`.\n\n"
            f"Perplexity on the first {protocol.eval_tokens or 'all'} tokens of {protocol.eval_text} (context "
            f"{protocol.context}, {len(windows)} windows, float32); calibration {protocol.calib_samples} x "
            f"{protocol.calib_seq} tokens of {protocol.calib_text}. `qcompiler`: the model `qcompiler.quantize` "
            f"returns, eager, exact kernels (`kernels=exact`); `transformers`: `AutoModelForCausalLM.from_pretrained` on the written folder "
            f"(transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}: it "
            f"decompresses each layer and runs float `F.linear` with fake-quantized inputs). Logits errors: "
            f"relative L2 (float64) on the first window against qcompiler's. torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CPU: {machine.describe()}.\n\n"
            "| preset | qcompiler ppl | transformers ppl | Δ% | logits rel. err (transformers) | "
            "logits rel. err (load_compressed_tensors) | checkpoint MB | quantize s |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
