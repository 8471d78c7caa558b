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
import os
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GROUP_SIZE = 64
NUM_BITS = 4


def _max_distinct(w: torch.Tensor) -> int:
    """The most distinct values in one group of ``GROUP_SIZE`` along K over sampled rows (all of a group's columns);
    more than any grid holds when K is not a multiple of the group."""
    if w.shape[1] % GROUP_SIZE:
        return w.shape[1]
    g = w.reshape(w.shape[0], -1, GROUP_SIZE)
    return max(len(torch.unique(g[r, c])) for r in range(0, g.shape[0], max(1, g.shape[0] // 8))
               for c in range(g.shape[1]))


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (wall time alone hides shared cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    # the GGUF loader's markers on a model whose tensors are all dequantized float32: without them transformers'
    # save_pretrained refuses the model ("quantized with gguf and is not serializable")
    if getattr(model.config, "quantization_config", None) is not None:
        delattr(model.config, "quantization_config")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {k: v for k, v in (("iters", args.iters), ("batch_size", args.batch_size), ("lr", args.lr))
              if v is not None}
    t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), os.getloadavg()
    ar = AutoRound(model, tokenizer=tok, scheme="W4A16", bits=NUM_BITS, group_size=GROUP_SIZE, sym=True,
                   dataset=rows, nsamples=nsamples, seqlen=calib.shape[1], device_map="cpu", **kwargs)
    # AutoRound's post-save fix (auto_round/export/utils.py, apply_post_save_source_fixes) copies every tensor that is
    # float32 in the model's source folder and bfloat16 in its output back from the source, which puts the float
    # weights back over its own fake-quantized ones when the source holds float32 safetensors (stories260K);
    # without a source path it leaves the output as saved. Nothing numeric changes in the quantization.
    for obj, attr in ((model, "name_or_path"), (model.config, "_name_or_path"), (model.config, "name_or_path")):
        if isinstance(getattr(obj, attr, None), str):
            setattr(obj, attr, "")
    saved = args.out / "fake"
    ar.quantize_and_save(str(saved), format="fake")
    seconds, cpu_seconds, load1 = time.perf_counter() - t0, _cpu_seconds() - cpu0, os.getloadavg()

    tensors = {}
    for f in sorted(saved.rglob("*.safetensors")):      # AutoRound writes a subfolder named after the model
        tensors.update(load_file(str(f)))
    changed = {n.removesuffix(".weight"): t.float() for n, t in tensors.items()
               if n.endswith(".weight") and t.dim() == 2 and n in before and not torch.equal(t.float(), before[n])}
    # quantized: each group of GROUP_SIZE along K holds at most 2^NUM_BITS distinct values (rows sampled); the fake
    # format also stores the linears AutoRound left in float rounded to its dtype (bfloat16): changed, not on a grid
    linears = {n: w for n, w in changed.items() if _max_distinct(w) <= 1 << NUM_BITS}
    rounded = sorted(set(changed) - set(linears))
    if not linears:
        raise RuntimeError(f"AutoRound's fake-quantized checkpoint in {saved} holds no linear weight on a "
                           f"{NUM_BITS}-bit grid per group of {GROUP_SIZE} ({len(changed)} changed)")
    worst = max(_max_distinct(w) for w in linears.values())
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({f"{n}.weight": w.contiguous() for n, w in linears.items()}, str(args.out / "weights.safetensors"))
    meta = {"tool": "auto-round", "versions": {p: md.version(p) for p in ("auto-round", "torch", "transformers")},
            "model": args.model, "scheme": f"W4A16 int{NUM_BITS} g{GROUP_SIZE} sym", "settings": kwargs or "defaults",
            "nsamples": nsamples, "seqlen": calib.shape[1],
            "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(), "seconds": seconds,
            "cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": [load0[0], load1[0]],
            "linears": len(linears), "max_distinct_per_group": worst,
            "rounded_not_quantized": rounded,
            "patches": ["the GGUF loader's quantization_config and hf_quantizer removed (the tensors are dequantized "
                        "float32; transformers refuses to save a gguf-quantized model)",
                        "model name_or_path cleared before saving: AutoRound's post-save FP32 restore from the source "
                        "folder would overwrite its fake-quantized weights"]}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
