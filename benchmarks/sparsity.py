r"""2:4 sparsity: perplexity of SparseGPT against plain magnitude pruning (float weights), and 2:4 composed
with quantized formats beside the dense presets, under the project protocol.

Regenerate (2 CPU cores, ~30 min for SmolLM2; accuracy only, prefill speed not measured):

    python benchmarks/sparsity.py --model smollm2-135m --out benchmarks/results_sparsity_smollm2.md
    python benchmarks/sparsity.py --model stories260K --out benchmarks/results_sparsity_stories260K.md
    python benchmarks/sparsity.py --model smollm2-135m --storage --out benchmarks/results_sparsity_storage_smollm2.md

Rows: "magnitude 2:4 (float)" prunes the two smallest |w| of every run of four input channels of each decoder
linear (the baseline a user writes by hand); "SparseGPT 2:4 (float)" is ``qcompiler.sparsify`` (layer by
layer, Hessians from the calibration set); the ``sparse24-*`` presets prune and quantize in one SparseGPT
sweep. The output head, embeddings and routers stay dense. Weight MB is what the runtime holds in memory
(dense codes: no CPU kernel reads the compressed layout); ``--storage`` measures the saved checkpoints, where
2:4 layers are stored compressed.
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


def _storage_table(model_name: str, presets: list[str]) -> str:
    """Bytes of ``save_quantized``'s weights file and of its decoder linears' weight tensors, measured on disk, for
    each 2:4 preset and for the same format without pruning. Run with magnitude pruning and no calibration: the
    stored format (which codes are 0, the layout, the scales) does not depend on how the mask was chosen."""
    import dataclasses
    import tempfile

    import safetensors
    import qcompiler
    from qcompiler import recipes
    from qcompiler.runtime.serialization import save_quantized
    from qcompiler.tools import models

    lines = ["| format | weights file MB | decoder linears' weight tensors MB | 2:4-compressed layers |",
             "|---|---|---|---|"]
    for name in presets:
        base = recipes.get(name)
        for label, algorithm in ((f"{name} without pruning (dense)", None),
                                 (name, SparseGPTSpec(method="magnitude"))):
            recipe = dataclasses.replace(base, name=label, weight_algorithm=algorithm, layerwise=False)
            model, _ = models.load_model(model_name)
            qcompiler.quantize(model, recipe, None, progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                path = save_quantized(model, tmp, recipe)
                total = path.stat().st_size
                with safetensors.safe_open(str(path), "pt") as f:
                    keys = [k for k in f.keys() if ".layers." in k
                            and k.rsplit(".", 1)[1] in ("w_q", "w_q_values", "w_q_meta", "w_scale")]
                    linear = sum(_nbytes(f, k) for k in keys)
                    compressed = sum(k.endswith(".w_q_values") for k in keys)
            lines.append(f"| {label} | {total / 1e6:.1f} | {linear / 1e6:.1f} | {compressed} |")
    return "\n".join(lines)


def _nbytes(f, key: str) -> int:
    t = f.get_tensor(key)
    return t.numel() * t.element_size()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--presets", default=PRESETS, help=f"comma-separated presets (default: {PRESETS})")
    ap.add_argument("--no-float", action="store_true", help="skip the float magnitude / SparseGPT rows")
    ap.add_argument("--storage", action="store_true",
                    help="measure the saved checkpoints' sizes (each 2:4 preset beside its format unpruned) instead")
    ap.add_argument("--out", type=Path, help="write the markdown table to this file")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/sparsity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.storage:
        body = _storage_table(args.model, ["sparse24-fp8-dynamic", "sparse24-w8a8-int8-dynamic"])
        text = (f"# {args.model}: stored size of 2:4 checkpoints\n\nGenerated {datetime.date.today()} by `{cmd}`.\n\n"
                f"{body}\n\nMeasured on disk (`save_quantized`'s model.safetensors; the embeddings and head are float "
                "in every row). A compressed layer stores its kept codes [N, K/2] and CUTLASS metadata "
                "(`qcompiler.core.sparse24`) instead of the dense codes; the runtime decompresses at load.\n")
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
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
