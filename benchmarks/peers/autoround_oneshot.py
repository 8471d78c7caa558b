"""Run Intel's AutoRound (W4A16, group 64, symmetric) on a model and save its fake-quantized float weights.

Runs INSIDE the AutoRound virtual environment (``autoround_setup.sh``). The calibration token ids come from the
project environment (``--calib``: safetensors with ``input_ids`` int64 [samples, seq_len], sampled with the
benchmark's protocol), so both tools calibrate on identical tokens; the model is loaded with
``qcompiler.tools.models.load_model``, as the benchmark loads it.

Settings: AutoRound's defaults (``iters=200``, its learning rate and batch size) unless ``--iters`` /
``--batch-size`` / ``--lr`` say otherwise; its "best" recipe is ``--iters 1000 --nsamples 512`` (AutoRound's
README), at our sequence length. ``lm_head`` stays float, as in our presets.

Writes into ``--out``:
  weights.safetensors  float32 weights of every linear AutoRound quantized, dequantized (``format="fake"``)
  meta.json            versions, settings, calibration shape and hash, seconds, grid check

Usage (inside the venv):
    python autoround_oneshot.py --model stories260K --calib calib.safetensors --out DIR [--iters N]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GROUP_SIZE = 64
NUM_BITS = 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", type=Path, required=True, help="safetensors with 'input_ids' int64 [samples, seq_len]")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=None, help="AutoRound's iters (default: its own, 200)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration sequences used (default: all of --calib)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    calib = load_file(str(args.calib))["input_ids"]
    if calib.dtype != torch.int64 or calib.ndim != 2:
        raise ValueError(f"--calib: input_ids must be int64 [samples, seq_len], got {calib.dtype} {tuple(calib.shape)}")
    nsamples = args.nsamples or calib.shape[0]
    rows = [calib[i % calib.shape[0]][None] for i in range(nsamples)]

    from auto_round import AutoRound
    from qcompiler.tools import models

    model, tok = models.load_model(args.model, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:     # the GGUF loader's marker
        delattr(model.config, "quantization_config")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {k: v for k, v in (("iters", args.iters), ("batch_size", args.batch_size), ("lr", args.lr))
              if v is not None}
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme="W4A16", bits=NUM_BITS, group_size=GROUP_SIZE, sym=True,
                   dataset=rows, nsamples=nsamples, seqlen=calib.shape[1], device_map="cpu", **kwargs)
    saved = args.out / "fake"
    ar.quantize_and_save(str(saved), format="fake")
    seconds = time.perf_counter() - t0

    tensors = {}
    for f in sorted(saved.rglob("*.safetensors")):      # AutoRound writes a subfolder named after the model
        tensors.update(load_file(str(f)))
    linears = {n.removesuffix(".weight"): t.float() for n, t in tensors.items()
               if n.endswith(".weight") and t.dim() == 2 and n in before and not torch.equal(t.float(), before[n])}
    if not linears:
        raise RuntimeError(f"AutoRound's fake-quantized checkpoint in {saved} changed no linear weight")
    # the grid check: each group of GROUP_SIZE along K holds at most 2^NUM_BITS distinct values
    worst = 0
    for w in linears.values():
        g = w.reshape(w.shape[0], -1, GROUP_SIZE)
        distinct = max(len(torch.unique(g[r, c])) for r in range(0, g.shape[0], max(1, g.shape[0] // 8))
                       for c in range(g.shape[1]))
        worst = max(worst, distinct)
    if worst > 1 << NUM_BITS:
        raise RuntimeError(f"AutoRound's weights are not on a {NUM_BITS}-bit grid per group of {GROUP_SIZE}: "
                           f"{worst} distinct values in a group")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({f"{n}.weight": w.contiguous() for n, w in linears.items()}, str(args.out / "weights.safetensors"))
    meta = {"tool": "auto-round", "versions": {p: md.version(p) for p in ("auto-round", "torch", "transformers")},
            "model": args.model, "scheme": f"W4A16 int{NUM_BITS} g{GROUP_SIZE} sym", "settings": kwargs or "defaults",
            "nsamples": nsamples, "seqlen": calib.shape[1],
            "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(), "seconds": seconds,
            "linears": len(linears), "max_distinct_per_group": worst}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
