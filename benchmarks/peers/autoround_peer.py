"""AutoRound peer rows (issue 19): Intel's AutoRound W4A16 group 64 symmetric, run in its own venv
(``autoround_setup.sh``) on the benchmark's calibration tokens, its dequantized weights evaluated here with
our evaluator and protocol.

Settings: ``default`` (AutoRound's own: 200 iterations, its learning rate and batch size) and ``best``
(AutoRound's "best" recipe: 1000 iterations, 512 calibration sequences: the protocol's sequences cycled);
``--iters`` overrides the iterations (a quick check). AutoRound tunes every decoder block with a forward and backward
per iteration: on 2 Xeon cores SmolLM2's ``default`` took ~20 min of tuning, and ``best`` has five times the
iterations, so run them alone. The oneshot's result is cached (``<cache>/peers/autoround/<model>-<setting>``) and
reused when the version, settings and calibration tokens match (``--rerun`` runs it again); its output goes to
``oneshot.log`` there while it runs.

    python benchmarks/peers/autoround_peer.py --model stories260K --setting default --iters 20
    python benchmarks/peers/autoround_peer.py --model smollm2-135m --setting default
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import subprocess
import sys
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
AUTOROUND_VERSION = "0.16.0"      # autoround_setup.sh's pin
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


def default_out_dir() -> Path:
    """``<cache>/peers/autoround``: oneshot results (~0.5 GB each for SmolLM2) stay out of the repository."""
    return models.cache_dir() / "peers" / "autoround"


def _matches(meta: dict, model_name: str, options: dict, calib_sha: str, nsamples: int) -> bool:
    """A cached oneshot's meta.json is this run's: same tool version, model, settings and calibration tokens."""
    return (meta.get("tool") == "auto-round" and meta.get("versions", {}).get("auto-round") == AUTOROUND_VERSION
            and meta.get("model") == model_name and meta.get("calib_sha256") == calib_sha
            and meta.get("nsamples") == nsamples
            and meta.get("settings") == ({k: v for k, v in options.items() if k != "nsamples"} or "defaults"))


def run_oneshot(model_name: str, calib: torch.Tensor, options: dict, out_dir: Path, *, venv: Path | None = None,
                threads: int = 0, rerun: bool = False) -> tuple[Path, dict]:
    """Run (or reuse) AutoRound on ``calib`` with ``options``; its result folder and meta.json. A folder whose
    meta.json matches the version, model, settings and calibration hash is reused unless ``rerun``; the
    oneshot's output goes to ``oneshot.log`` there while it runs."""
    calib_sha = hashlib.sha256(calib.numpy().tobytes()).hexdigest()
    nsamples = options.get("nsamples", calib.shape[0])
    meta_path, weights = out_dir / "meta.json", out_dir / "weights.safetensors"
    if not rerun and meta_path.is_file() and weights.is_file():
        meta = json.loads(meta_path.read_text())
        if _matches(meta, model_name, options, calib_sha, nsamples):
            written = datetime.datetime.fromtimestamp(meta_path.stat().st_mtime, datetime.timezone.utc)
            log.info("reusing %s (oneshot %.0f s)", out_dir, meta["seconds"])
            return out_dir, {**meta, "reused_from_cache": f"{written:%Y-%m-%d %H:%M} UTC"}
    python = ensure_venv(venv)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    save_file({"input_ids": calib.contiguous()}, str(out_dir / "calib.safetensors"))
    cmd = [str(python), str(ONESHOT_SCRIPT), "--model", model_name, "--calib", str(out_dir / "calib.safetensors"),
           "--out", str(out_dir), "--threads", str(threads)]
    for k, v in options.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    log_path = out_dir / "oneshot.log"
    log.info("running %s (log %s)", " ".join(cmd), log_path)
    with open(log_path, "w") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not meta_path.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "it/s]" not in ln]
        raise RuntimeError(f"AutoRound oneshot failed (exit {proc.returncode}); log {log_path}:\n"
                           + "\n".join(lines[-20:]))
    return out_dir, json.loads(meta_path.read_text())


def run_autoround_peer(setting: str, model_name: str = "smollm2-135m", *, model=None, tokenizer=None, windows=None,
                       fp_ppl: float | None = None, iters: int | None = None, venv: Path | None = None,
                       threads: int = 0, out_dir: Path | None = None, rerun: bool = False) -> dict:
    """One AutoRound row: ``{"row": Row, "meta": the oneshot's meta.json, "note": a footnote line}``. The oneshot's
    result is cached under ``out_dir`` (default ``default_out_dir()/<model>-<setting>[-iters<N>]``) and reused
    when its version, settings and calibration tokens match (``rerun``: run it again)."""
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
    options = dict(SETTINGS[setting]) | ({"iters": iters} if iters else {})
    if out_dir is None:
        out_dir = default_out_dir() / (f"{model_name}-{setting}" + (f"-iters{iters}" if iters else ""))
    result, meta = run_oneshot(model_name, calibration_ids(tokenizer, protocol), options, Path(out_dir), venv=venv,
                               threads=threads, rerun=rerun)
    tensors = load_file(str(result / "weights.safetensors"))
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
            f"{meta['seconds']:.0f} s{_load_note(meta)}; {meta['linears']} of {n_linear} decoder linears quantized "
            "(AutoRound skips those whose input size is not a multiple of the group); weights dequantized and "
            "evaluated here"
            + (f"; a cached oneshot written {meta['reused_from_cache']} with the same version, settings and "
               "calibration tokens, reused" if "reused_from_cache" in meta else "") + ".")
    return {"row": row, "meta": meta, "note": note}


def _load_note(meta: dict) -> str:
    """`` (CPU time, load averages)`` from the oneshot's meta.json, when it recorded them."""
    if "cpu_seconds" not in meta:
        return ""
    return (f" ({meta['cpu_seconds']:.0f} CPU-s on {meta.get('threads', '?')} threads; load average "
            f"{meta['load_average'][0]:.1f} / {meta['load_average'][1]:.1f} at start / end on "
            f"{meta.get('cpus', '?')} CPUs)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--setting", default="default", choices=sorted(SETTINGS))
    ap.add_argument("--iters", type=int, default=None, help="override the setting's iterations (a quick check)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="oneshot result folder (default: <cache>/peers/autoround/<model>-<setting>[-iters<N>])")
    ap.add_argument("--rerun", action="store_true", help="ignore a cached oneshot result")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    t0 = time.perf_counter()
    r = run_autoround_peer(args.setting, args.model, iters=args.iters, threads=args.threads, out_dir=args.out_dir,
                           rerun=args.rerun)
    row = r["row"]
    print(f"| {row.name} | {row.ppl:.3f} | {row.delta_pct:+.2f} | {row.calib_s:.0f} | {row.weight_mb:.1f} |")
    print(r["note"])
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
