"""AutoRound peer rows (issue 19): Intel's AutoRound W4A16 group 64 symmetric, run in its own venv
(``autoround_setup.sh``) on the benchmark's calibration tokens, its dequantized weights evaluated here with
our evaluator and protocol.

Settings: ``default`` (AutoRound's own: 200 iterations, its learning rate and batch size) and ``best``
(AutoRound's "best" recipe: 1000 iterations, 512 calibration sequences: the protocol's sequences cycled);
``--iters`` overrides the iterations (a quick check). On 2 CPU cores the SmolLM2 rows take hours (AutoRound
tunes every decoder block with a forward and backward per iteration), so run them alone.

    python benchmarks/peers/autoround_peer.py --model stories260K --setting default --iters 20
    python benchmarks/peers/autoround_peer.py --model smollm2-135m --setting default
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmcompressor_peer import _w4_weight_mb, calibration_ids  # noqa: E402  (the same calibration set)

from qcompiler.tools import data, evaluate, models  # noqa: E402
from qcompiler.tools.bench import PROTOCOLS, Row, _text  # noqa: E402

log = logging.getLogger("autoround_peer")
_HERE = Path(__file__).resolve().parent
SETUP_SCRIPT = _HERE / "autoround_setup.sh"
ONESHOT_SCRIPT = _HERE / "autoround_oneshot.py"
VENV_MARKER = ".qcompiler-autoround-ready"
SETTINGS = {"default": {}, "best": {"iters": 1000, "nsamples": 512}}


def ensure_venv(venv: Path | None = None) -> Path:
    """Create the AutoRound venv with ``autoround_setup.sh`` unless it is ready; return its python."""
    venv = Path(venv) if venv is not None else models.cache_dir() / "venvs" / "autoround"
    if not (venv / VENV_MARKER).is_file():
        proc = subprocess.run(["bash", str(SETUP_SCRIPT), str(venv)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
            raise RuntimeError(f"{SETUP_SCRIPT.name} failed (exit {proc.returncode}):\n{tail}")
    return venv / "bin" / "python"


def run_autoround_peer(setting: str, model_name: str = "smollm2-135m", *, model=None, tokenizer=None, windows=None,
                       fp_ppl: float | None = None, iters: int | None = None, venv: Path | None = None,
                       threads: int = 0) -> dict:
    """One AutoRound row: ``{"row": Row, "meta": the oneshot's meta.json, "note": a footnote line}``."""
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: expected one of {sorted(SETTINGS)}")
    protocol = PROTOCOLS[model_name]
    if model is None or tokenizer is None:
        model, tokenizer = models.load_model(model_name)
    if windows is None:
        bos_id = tokenizer.bos_token_id if protocol.bos else None
        windows = data.eval_windows(data.tokenize_text(tokenizer, _text(protocol.eval_text)), protocol.eval_tokens,
                                    protocol.context, bos_id=bos_id)
    if fp_ppl is None:
        fp_ppl = evaluate.perplexity(model, windows, progress=False)
    python = ensure_venv(venv)
    options = dict(SETTINGS[setting]) | ({"iters": iters} if iters else {})
    with tempfile.TemporaryDirectory(prefix="autoround-") as tmp:
        tmp = Path(tmp)
        save_file({"input_ids": calibration_ids(tokenizer, protocol).contiguous()}, str(tmp / "calib.safetensors"))
        cmd = [str(python), str(ONESHOT_SCRIPT), "--model", model_name, "--calib", str(tmp / "calib.safetensors"),
               "--out", str(tmp / "out"), "--threads", str(threads)]
        for k, v in options.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise RuntimeError(f"AutoRound oneshot failed (exit {proc.returncode}):\n{tail}")
        meta = json.loads((tmp / "out" / "meta.json").read_text())
        tensors = load_file(str(tmp / "out" / "weights.safetensors"))
    peer, _ = models.load_model(model_name)
    params = dict(peer.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in params or params[name].shape != t.shape:
                raise RuntimeError(f"AutoRound's tensor {name} {tuple(t.shape)} has no matching parameter")
            params[name].copy_(t.to(params[name].dtype))
    label = f"AutoRound {meta['versions']['auto-round']} {setting} W4A16 g64 sym" + (f" (iters {iters})" if iters else "")
    ppl = evaluate.perplexity(peer, windows, progress=False)
    quantized = [n.removesuffix(".weight") for n in tensors]
    head = model.get_output_embeddings()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    n_linear = len(linears)
    skipped = [f"{n} (AutoRound left it in float)" for n in linears if n not in quantized]
    row = Row(label, ppl, 100.0 * (ppl / fp_ppl - 1.0), meta["seconds"], 0.0,
              _w4_weight_mb(model, quantized, 64), 0.0, 0.0, len(quantized), skipped, n_linear)
    note = (f"{label}: auto-round {meta['versions']['auto-round']} (transformers {meta['versions']['transformers']}) in "
            f"its own venv, settings {meta['settings']}, {meta['nsamples']} x {meta['seqlen']} calibration tokens "
            f"(this protocol's set{', cycled' if meta['nsamples'] > protocol.calib_samples else ''}); "
            f"{meta['seconds']:.0f} s; {meta['linears']} of {n_linear} decoder linears quantized (AutoRound skips "
            "those whose input size is not a multiple of the group); weights dequantized and evaluated here.")
    return {"row": row, "meta": meta, "note": note}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--setting", default="default", choices=sorted(SETTINGS))
    ap.add_argument("--iters", type=int, default=None, help="override the setting's iterations (a quick check)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    t0 = time.perf_counter()
    r = run_autoround_peer(args.setting, args.model, iters=args.iters, threads=args.threads)
    row = r["row"]
    print(f"| {row.name} | {row.ppl:.3f} | {row.delta_pct:+.2f} | {row.calib_s:.0f} | {row.weight_mb:.1f} |")
    print(r["note"])
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
