r"""2:4 sparsity: perplexity of SparseGPT against plain magnitude pruning (float weights), and 2:4 composed
with quantized formats beside the dense presets, under the project protocol.

Regenerate (2 CPU cores, ~30 min for SmolLM2; accuracy only, prefill speed not measured):

    python benchmarks/sparsity.py --model smollm2-135m --out benchmarks/results_sparsity_smollm2.md
    python benchmarks/sparsity.py --model stories260K --out benchmarks/results_sparsity_stories260K.md

Rows: "magnitude 2:4 (float)" prunes the two smallest |w| of every run of four input channels of each decoder
linear (the baseline a user writes by hand); "SparseGPT 2:4 (float)" is ``qcompiler.sparsify`` (layer by
layer, Hessians from the calibration set); the ``sparse24-*`` presets prune and quantize in one SparseGPT
sweep. The output head, embeddings and routers stay dense. Weight MB is the dense storage the runtime holds
today (zeros stored): the compressed 2:4 layout (values + metadata) is not implemented yet.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch

from qcompiler.recipes import SparseGPTSpec
from qcompiler.tools import evaluate
from qcompiler.tools.bench import PROTOCOLS, Row, format_table, run_table

PRESETS = "fp8-dynamic,sparse24-fp8-dynamic,sparse24-w8a8-int8-dynamic,sparse24-w4a16"


def _float_rows(model, windows, calib, fp_ppl, facts) -> list[Row]:
    """Float 2:4 rows: magnitude pruning and SparseGPT, each on a copy of the model."""
    import qcompiler
    rows = []
    for label, spec in (("magnitude 2:4 (float)", SparseGPTSpec(method="magnitude")),
                        ("SparseGPT 2:4 (float)", SparseGPTSpec())):
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = qcompiler.sparsify(pruned, calib, spec, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
        ppl = evaluate.perplexity(pruned, windows, progress=sys.stderr.isatty(), desc=label)
        weight_mb = sum(p.numel() * p.element_size() for p in pruned.parameters()) / 1e6
        rows.append(Row(f"{label}, {rep.zeros:.1%} of {len(rep.pruned)} linears' weights zero", ppl,
                        100.0 * (ppl / fp_ppl - 1.0), calib_s=seconds, weight_mb=weight_mb))
        del pruned
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--presets", default=PRESETS, help=f"comma-separated presets (default: {PRESETS})")
    ap.add_argument("--no-float", action="store_true", help="skip the float magnitude / SparseGPT rows")
    ap.add_argument("--out", type=Path, help="write the markdown table to this file")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/sparsity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    presets = [p for p in args.presets.split(",") if p]
    rows, facts = run_table(args.model, presets, PROTOCOLS[args.model], progress=sys.stderr.isatty(), prefill=False,
                            extra_rows=[] if args.no_float else [_float_rows])
    by_name = {r.name.split(",")[0]: r for r in rows}
    lines = []
    mag, sgpt = by_name.get("magnitude 2:4 (float)"), by_name.get("SparseGPT 2:4 (float)")
    if mag is not None and sgpt is not None and mag.delta_pct > 0:
        lines.append(f"SparseGPT's perplexity increase is {sgpt.delta_pct / mag.delta_pct:.2f}x magnitude pruning's "
                     f"(issue bound: <= 0.5x).")
    fp8, sparse_fp8 = by_name.get("fp8-dynamic"), by_name.get("sparse24-fp8-dynamic")
    if fp8 is not None and sparse_fp8 is not None:
        lines.append(f"2:4 on top of FP8 dynamic: {fp8.delta_pct:+.2f}% -> {sparse_fp8.delta_pct:+.2f}%.")
    text = (f"# {args.model}: 2:4 sparsity (perplexity)\n\nGenerated {datetime.date.today()} by `{cmd}`.\n\n"
            + format_table(rows, facts) + "\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
