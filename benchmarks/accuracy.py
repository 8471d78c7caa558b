r"""Accuracy and CPU-speed table for every preset against FP32, under the project protocol.

Regenerate (2 CPU cores, nothing else running: ~50 min for SmolLM2, ~2 min for stories260K):

    python benchmarks/accuracy.py --model smollm2-135m \
        --presets fp8,fp8-dynamic,w8a16,w8a8-int8-naive,w8a8-int8-sq,w8a8-int8-sq-dynamic \
        --target inductor --out benchmarks/results_smollm2.md
    python benchmarks/accuracy.py --model stories260K \
        --presets fp8,fp8-dynamic,w8a16,w8a8-int8-naive,w8a8-int8-sq,w8a8-int8-sq-dynamic \
        --target inductor --out benchmarks/results_stories260K.md

``--target inductor`` runs the quantized rows through TorchInductor (the quantize / epilogue ops
fused around ``torch._int_mm``) and adds an ``FP32 (inductor)`` row; speedups are against eager
FP32. The INT4 presets have their own table (``benchmarks/int4.py``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

import qcompiler
from qcompiler.backends import BACKENDS
from qcompiler.bench import PROTOCOLS, format_table, run_table


CORE_PRESETS = "fp8,fp8-dynamic,w8a16,w8a8-int8-naive,w8a8-int8-sq,w8a8-int8-sq-dynamic"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--presets", default=CORE_PRESETS,
                    help=f"comma-separated preset names (default: {CORE_PRESETS}; INT4: benchmarks/int4.py)")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--no-peers", action="store_true", help="skip the torchao peer row")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill speed measurement")
    ap.add_argument("--target", default="reference", choices=sorted(BACKENDS),
                    help="backend of the quantized rows (inductor: fused quantize / epilogue, adds an FP32 inductor row)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        qcompiler.recipes.get(p)
    rows, facts = run_table(args.model, presets, prefill=not args.no_prefill,
                             progress=sys.stderr.isatty(), peers=not args.no_peers, target=args.target)
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (f"# {args.model}: accuracy and CPU speed per preset\n\nGenerated {datetime.date.today()} by `{cmd}`.\n\n"
            + format_table(rows, facts) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
