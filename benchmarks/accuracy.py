r"""Accuracy and CPU-speed table for every preset against FP32, under the project protocol.

Regenerate (2 CPU cores, nothing else running: ~30 min for SmolLM2, ~3 min for stories260K); with
``--out benchmarks/`` the file is named by model and CPU class (``qcompiler.backends.machine``), e.g.
``benchmarks/results_smollm2-135m_avx512-vnni.md``:

    python benchmarks/accuracy.py --model smollm2-135m --target inductor --out benchmarks/
    python benchmarks/accuracy.py --model stories260K --target inductor --out benchmarks/

The AVX2 class measured on an AVX-512 machine by limiting the ISA every library dispatches on
(the file is named ``..._avx2-limited.md``; a real AVX2-only CPU also has other caches and clocks,
and its ``torch._int_mm`` is exact but slow where the limited one saturates like oneDNN). Give it an
inductor cache of its own: TorchInductor 2.13 reuses kernels compiled without the limit, whose
outputs were NaN here. The ``:7bit`` rows show what the int16-pair saturation costs (7-bit weights
make the same kernels exact; ``:exact`` runs ``kernels="exact"`` instead):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
        MKL_ENABLE_INSTRUCTIONS=AVX2 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-avx2 \
        python benchmarks/accuracy.py --model smollm2-135m --target inductor --out benchmarks/ --no-peers \
        --presets fp8,fp8-dynamic,w8a16,w8a8-int8-sq,w8a8-int8-sq-dynamic,w4a16-rtn,w8a8-int8-sq:7bit,\
w8a8-int8-sq-dynamic:7bit

Nothing else may run meanwhile: two PyTorch processes on two cores stall each other's OpenMP
barriers (a stories260K row measured 100x slow beside another job).

``--target inductor`` runs the quantized rows through TorchInductor (the quantize / epilogue ops
fused around the GEMM kernels chosen for the CPU) and adds an ``FP32 (inductor)`` row; speedups are
against eager FP32. ``w4a16-rtn`` stands for the INT4 weight-only presets' speed (AWQ and GPTQ run
the same kernels); their accuracy is in the INT4 table (``benchmarks/int4.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import sys
from pathlib import Path

import qcompiler
from qcompiler.backends import BACKENDS, machine
from qcompiler.tools.bench import PROTOCOLS, format_table, run_table


CORE_PRESETS = "fp8,fp8-dynamic,w8a16,w8a8-int8-naive,w8a8-int8-sq,w8a8-int8-sq-dynamic,w4a16-rtn"


def _preset(text: str):
    """``name``, ``name:exact`` (kernels="exact") or ``name:7bit`` (7-bit INT8 weights, reduce_range)."""
    name, _, variant = text.partition(":")
    recipe = qcompiler.recipes.get(name)
    if variant == "exact":
        return recipe, "exact"
    if variant == "7bit":
        return recipe.replace(name=f"{name}-7bit", weight=dataclasses.replace(recipe.weight, reduce_range=True))
    if variant:
        raise SystemExit(f"accuracy.py: unknown variant {variant!r} in {text!r} (exact, 7bit)")
    return recipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--presets", default=CORE_PRESETS,
                    help=f"comma-separated preset names (default: {CORE_PRESETS}; INT4: benchmarks/int4.py); "
                         "NAME:exact runs a preset with kernels='exact', NAME:7bit with 7-bit INT8 weights")
    ap.add_argument("--out", type=Path, help="write the markdown table to this file, or (a folder) to "
                    "<folder>/results_<model>_<CPU class>.md")
    ap.add_argument("--no-peers", action="store_true", help="skip the torchao peer row")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill speed measurement")
    ap.add_argument("--target", default="reference", choices=sorted(BACKENDS),
                    help="backend of the quantized rows (inductor: fused quantize / epilogue, adds an FP32 inductor row)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    presets = [_preset(p) for p in args.presets.split(",") if p]
    rows, facts = run_table(args.model, presets, prefill=not args.no_prefill,
                             progress=sys.stderr.isatty(), peers=not args.no_peers, target=args.target)
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    limits = "".join(f"{k}={v} " for k, v in machine.isa_limits().items())
    text = (f"# {args.model}: accuracy and CPU speed per preset ({facts['machine_class']})\n\n"
            f"Generated {datetime.date.today()} by `{limits}{cmd}`.\n\n" + format_table(rows, facts) + "\n")
    print(text)
    if args.out:
        out = args.out / f"results_{args.model}_{facts['machine_class']}.md" if args.out.is_dir() else args.out
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
