r"""Quick recipe sweep on SmolLM2: perplexity of recipe variants on a few windows, for choosing a
preset's knobs (not the issue's protocol; benchmarks/accuracy.py is). Each variant is a Python
expression over ``R`` (``qcompiler.recipes.get``), ``rep`` (``dataclasses.replace``) and the
recipe classes. ``--eval valid`` scores the first ``--windows`` x 1024 tokens of wikitext-2 valid
(held out from the test text) and calibrates on the rest of valid, so calibration never overlaps
the scored text; choices are made on valid only. ``--eval test`` exists to check a choice afterwards,
never to make one.

The choices behind the ``w8a8-int8-sq`` preset, on held-out text (2026-12-01; an earlier
version of this sweep scored the calibrator on the test windows, this one on valid only):
the MSE calibrator for static scales (minmax +3.68% with 1 linear in float, percentile 99.99
+2.53% with 8, mse +1.34% with 7; valid, 16 windows, FP32 15.471, 64 x 512 calibration):

    python benchmarks/recipe_sweep.py --eval valid --windows 16 \
        "minmax=R('w8a8-int8-sq').replace(activation=ActivationSpec('int8', 'per_tensor'))" \
        "percentile=R('w8a8-int8-sq').replace(activation=ActivationSpec('int8', 'per_tensor', calibrator='percentile'))" \
        "mse=R('w8a8-int8-sq')"

Its alpha (0.8) and 20 dB fallback (scored on valid, calibrated on all of valid: see below):

    python benchmarks/recipe_sweep.py --eval valid \
        "a65=R('w8a8-int8-sq').replace(smoothquant=SmoothQuantSpec(alpha=0.65), fallback=FallbackSpec(min_sqnr_db=40.0))" \
        "a72=R('w8a8-int8-sq').replace(smoothquant=SmoothQuantSpec(alpha=0.72), fallback=FallbackSpec(min_sqnr_db=40.0))" \
        "a80=R('w8a8-int8-sq').replace(fallback=FallbackSpec(min_sqnr_db=40.0))" \
        "fb20=R('w8a8-int8-sq')" "fb0=R('w8a8-int8-sq').replace(fallback=FallbackSpec())"

The command line's default of 128 calibration sequences (``qcompiler run`` / ``quantize``), on
held-out text (2026-12-01; valid, 16 windows): ``w8a8-int8-sq`` +1.49% / +1.34% / +1.08% at 32 /
64 / 128 sequences, ``w8a8-int8-sq-dynamic`` +0.58% / +0.30% / +0.56%, ``w8a16`` +0.21% at each:
the static preset, the one calibration decides most, is best at 128; the others are flat:

    for n in 32 64 128; do python benchmarks/recipe_sweep.py --eval valid --windows 16 --calib-samples $n \
        "sq=R('w8a8-int8-sq')" "sqdyn=R('w8a8-int8-sq-dynamic')" "w8a16=R('w8a16')"; done

The alpha / fallback sweep above and the w8a16 and AWQ sweeps below scored valid but calibrated
on all of valid, the scored windows included (before ``--eval valid`` took its calibration from the
rest of valid); the w8a16 preset's +0.21% above is the same choice rerun without the overlap.

The choices behind the ``w8a16`` preset (sensitivity fallback at 36 dB; AWQ scales for int8 do less):

    python benchmarks/recipe_sweep.py --eval valid --windows 16 \
        "base=R('w8a16').replace(fallback=FallbackSpec())" "fb36=R('w8a16')" \
        "fb38=R('w8a16').replace(fallback=FallbackSpec(min_sqnr_db=38.0))" \
        "awq=R('w8a16').replace(weight_algorithm=AWQSpec(), layerwise=True, fallback=FallbackSpec())" \
        "awqfb38=R('w8a16').replace(weight_algorithm=AWQSpec(), layerwise=True, fallback=FallbackSpec(min_sqnr_db=38.0))"

The choice behind the ``w4a16-awq`` / ``w4a8-awq`` presets' 4096 search rows per linear
(2026-12-01, run with the presets' earlier 1024 rows, which ``base`` was): on valid, 16 windows,
FP32 15.471, RTN +34.31%, 1024 rows +18.08% (0.53x RTN), 4096 rows +15.20% (0.44x, 303 s vs
268 s), 8192 rows +15.93% (0.46x), duo scaling +16.44% (0.48x), 4096 rows with duo scaling
+16.14% (0.47x):

    python benchmarks/recipe_sweep.py --eval valid --windows 16 "rtn=R('w4a16-rtn')" \
        "base=R('w4a16-awq').replace(samples_per_layer=1024, weight_algorithm=AWQSpec())" \
        "s4k=R('w4a16-awq').replace(samples_per_layer=4096, weight_algorithm=AWQSpec(samples=4096))" \
        "duo=R('w4a16-awq').replace(samples_per_layer=1024, weight_algorithm=AWQSpec(duo_scaling=True))"
    python benchmarks/recipe_sweep.py --eval valid --windows 16 \
        "s4kduo=R('w4a16-awq').replace(samples_per_layer=4096, weight_algorithm=AWQSpec(samples=4096, duo_scaling=True))" \
        "s8k=R('w4a16-awq').replace(samples_per_layer=8192, weight_algorithm=AWQSpec(samples=8192))"
The choice behind ``w4a8-int8-sq-gptq`` (INT4 g64 weights, INT8 per-token dynamic activations;
2026-12-04, AMD EPYC AVX2, 2 threads, frozen installs of the working tree; valid, 16 windows, FP32
15.471, 64 x 512 calibration): RTN +38.13%; ``w4a16-gptq``'s recipe (layer by layer) +15.15%, the
same on whole-model Hessians +15.24%; ``w4a8-awq``'s +17.06%; SmoothQuant alpha 0.5 then GPTQ
(whole-model) +9.87%, with alpha searched per layer group +9.13% (808 s calibration against 462 s):

    python benchmarks/recipe_sweep.py --eval valid --windows 16 \
        "rtn=R('w4a16-rtn').replace(activation=ActivationSpec('int8', 'per_token'))" \
        "gptq=R('w4a16-gptq').replace(activation=ActivationSpec('int8', 'per_token'))" \
        "awq=R('w4a8-awq').replace(activation=ActivationSpec('int8', 'per_token'))" \
        "gptqsq=R('w4a16-gptq').replace(activation=ActivationSpec('int8', 'per_token'), layerwise=False, smoothquant=SmoothQuantSpec(alpha=0.5))"
    python benchmarks/recipe_sweep.py --eval valid --windows 16 \
        "gptqwhole=R('w4a16-gptq').replace(activation=ActivationSpec('int8', 'per_token'), layerwise=False)" \
        "gptqsqsearch=R('w4a16-gptq').replace(activation=ActivationSpec('int8', 'per_token'), layerwise=False, smoothquant=SmoothQuantSpec(alpha=0.5, search=True))"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from qcompiler import api, recipes
from qcompiler.tools import data, evaluate, models, texts

TEXTS = {"test": "wikitext-test", "valid": "wikitext-valid"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="label=expression, e.g. \"mse=R('w8a8-int8-sq')\"")
    ap.add_argument("--eval", choices=sorted(TEXTS), default="valid", help="text scored (default valid)")
    ap.add_argument("--windows", type=int, default=8, help="1024-token windows scored (default 8)")
    ap.add_argument("--calib-samples", type=int, default=64, help="512-token calibration sequences (default 64)")
    args = ap.parse_args(argv)
    namespace = {**vars(recipes), "R": recipes.get, "rep": dataclasses.replace}   # the recipe classes too
    variants = []
    for v in args.variants:
        label, sep, expr = v.partition("=")
        if not sep:
            ap.error(f"variant {v!r} is not label=expression")
        variants.append((label, eval(expr, namespace)))   # noqa: S307 (a developer's own expressions)
    model, tok = models.load_model("smollm2-135m")
    eval_ids = data.tokenize_text(tok, texts.text_path(TEXTS[args.eval]).read_text(encoding="utf-8"))
    windows = data.eval_windows(eval_ids, 1024 * args.windows, 1024)
    calib_ids = data.tokenize_text(tok, texts.text_path("wikitext-valid").read_text(encoding="utf-8"))
    if args.eval == "valid":   # calibrate on the part of valid after the scored windows: no overlap
        calib_ids = calib_ids[1024 * args.windows:]
    calib = data.calibration_batches(calib_ids, args.calib_samples, 512, seed=0)
    fp = evaluate.perplexity(model, windows, progress=False)
    print(f"{args.eval}, {args.windows} windows, {args.calib_samples} x 512 calibration; FP32 {fp:.3f}", flush=True)
    for label, recipe in variants:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        qb = api.backend(recipe, calibration=calib, progress=False)
        ppl = evaluate.perplexity(torch.compile(model, backend=qb, dynamic=False), windows, progress=False)
        fell = sum(1 for d in qb.report.layers.values() if d.op_kind == "linear" and not d.quantize)
        print(f"{label:24s} ppl {ppl:.3f}  {100 * (ppl / fp - 1):+.2f}%  float linears {fell}  "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
