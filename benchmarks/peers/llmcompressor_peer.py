"""llm-compressor GPTQ / AWQ peer rows (W4A16, group 64, symmetric) for the INT4 accuracy table.

Runs in the project environment. llm-compressor pins an older transformers, so it lives in its
own virtual environment (``llmcompressor_setup.sh``); this module builds the calibration set
with the benchmark's protocol, runs ``llmcompressor_oneshot.py`` in that venv as a subprocess,
loads the fake-quantized float weights it writes into our SmolLM2 model and evaluates perplexity
with ``qcompiler.tools.evaluate`` on the protocol's windows, so the peer is measured exactly as our rows.

Regenerate ``results_llmcompressor.json`` (see README.md: GPTQ ~1 h on 2 shared cores, AWQ several hours):

    nice -n 5 python benchmarks/peers/llmcompressor_peer.py --json benchmarks/peers/results_llmcompressor.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qcompiler.tools import data, evaluate, models
from qcompiler.tools.bench import PROTOCOLS, Protocol, Row, _load, _text

__all__ = ["LLMCOMPRESSOR_VERSION", "COMPRESSED_TENSORS_VERSION", "METHODS", "default_venv", "default_out_dir",
           "ensure_venv", "calibration_ids", "run_oneshot", "load_peer_weights", "run_llmcompressor_peer"]

log = logging.getLogger(__name__)

LLMCOMPRESSOR_VERSION = "0.14.0.1"
COMPRESSED_TENSORS_VERSION = "0.19.0"
METHODS = ("gptq", "awq")
MODEL = "smollm2-135m"      # the only model the oneshot script loads

_HERE = Path(__file__).resolve().parent
SETUP_SCRIPT = _HERE / "llmcompressor_setup.sh"
ONESHOT_SCRIPT = _HERE / "llmcompressor_oneshot.py"
VENV_MARKER = ".qcompiler-llmcompressor-ready"


def _oneshot_module():
    """The oneshot script as a module, for its constants and hash helpers (it imports only torch and safetensors)."""
    spec = importlib.util.spec_from_file_location("_llmcompressor_oneshot", ONESHOT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_venv() -> Path:
    """``<cache>/venvs/llmcompressor`` (cache: ``$QCOMPILER_CACHE`` or ``~/.cache/qcompiler``)."""
    return models.cache_dir() / "venvs" / "llmcompressor"


def default_out_dir() -> Path:
    """``<cache>/peers/llmcompressor``: oneshot outputs (~430 MB per method) stay out of the repository."""
    return models.cache_dir() / "peers" / "llmcompressor"


def ensure_venv(venv: Path | None = None) -> Path:
    """Create the llm-compressor venv with ``llmcompressor_setup.sh`` unless it is ready; return its python."""
    venv = Path(venv) if venv is not None else default_venv()
    if not (venv / VENV_MARKER).is_file():
        log.info("creating the llm-compressor venv in %s", venv)
        proc = subprocess.run(["bash", str(SETUP_SCRIPT), str(venv)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
            raise RuntimeError(f"{SETUP_SCRIPT.name} failed (exit {proc.returncode}):\n{tail}")
    return venv / "bin" / "python"


def _protocol(protocol: Protocol | str | None) -> Protocol:
    if protocol is None:
        return PROTOCOLS[MODEL]
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} unknown; known: {sorted(PROTOCOLS)}")
        return PROTOCOLS[protocol]
    return protocol


def calibration_ids(tokenizer, protocol: Protocol) -> torch.Tensor:
    """The benchmark's calibration set as one int64 [samples, seq_len] tensor (same calls as ``run_table``)."""
    bos_id = tokenizer.bos_token_id if protocol.bos else None
    ids = data.tokenize_text(tokenizer, _text(protocol.calib_text))
    batches = data.calibration_batches(ids, protocol.calib_samples, protocol.calib_seq, seed=0, bos_id=bos_id)
    return torch.cat(batches, dim=0)


def _matches(meta: dict, method: str, calib_sha: str, group_size: int, ignored: list[str]) -> bool:
    return (meta.get("tool") == "llm-compressor" and meta.get("method") == method
            and meta.get("version") == LLMCOMPRESSOR_VERSION
            and meta.get("compressed_tensors_version") == COMPRESSED_TENSORS_VERSION
            and meta.get("group_size") == group_size and meta.get("symmetric") is True
            and meta.get("calibration_sha256") == calib_sha and meta.get("ignored") == ignored)


def _progress(log_path: Path) -> str:
    """The last "(k/n): stage" the sequential pipeline printed, e.g. "(3/31): Calibrating"."""
    marks = re.findall(r"\((\d+)/(\d+)\): (\w+)", log_path.read_text(errors="replace"))
    return f"({marks[-1][0]}/{marks[-1][1]}): {marks[-1][2]}" if marks else "before the first layer"


def run_oneshot(method: str, calib: torch.Tensor, out_dir: Path, *, venv: Path | None = None,
                rerun: bool = False, timeout_s: float | None = None) -> tuple[Path, dict]:
    """Run (or reuse) the oneshot for ``method`` on ``calib``; return its result folder and meta.json.

    A folder ``<out_dir>/<method>`` whose meta.json matches the method, llm-compressor and
    compressed-tensors versions, scheme and the calibration tensor's hash is reused unless ``rerun``.
    A oneshot still running after ``timeout_s`` is killed and reported with the layer it reached.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    oneshot = _oneshot_module()
    calib_sha = oneshot.tensor_sha256(calib)
    result = Path(out_dir) / method
    meta_path = result / "meta.json"
    if not rerun and meta_path.is_file() and (result / "weights.safetensors").is_file():
        meta = json.loads(meta_path.read_text())
        if _matches(meta, method, calib_sha, oneshot.GROUP_SIZE, oneshot.IGNORE):
            log.info("reusing %s (oneshot %.0f s)", result, meta["oneshot_seconds"])
            written = datetime.datetime.fromtimestamp(meta_path.stat().st_mtime, datetime.timezone.utc)
            return result, {**meta, "reused_from_cache": f"{written:%Y-%m-%d %H:%M} UTC"}
    python = ensure_venv(venv)
    result.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    calib_path = result / "calib.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_path))
    log_path = result / "oneshot.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [str(python), str(ONESHOT_SCRIPT), "--method", method, "--calib", str(calib_path), "--out", str(result)]
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        try:
            proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"llm-compressor {method} oneshot stopped after {time.perf_counter() - t0:.0f} s "
                               f"(timeout {timeout_s:.0f} s) at {_progress(log_path)}; log {log_path}") from None
    if proc.returncode != 0 or not meta_path.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "it/s]" not in ln]
        tail = "\n".join(lines[-25:])
        raise RuntimeError(f"llm-compressor {method} oneshot failed (exit {proc.returncode}); "
                           f"log {log_path}:\n{tail}")
    return result, json.loads(meta_path.read_text())


def load_peer_weights(model: torch.nn.Module, result: Path, meta: dict) -> torch.nn.Module:
    """A copy of ``model`` with the oneshot's float tensors loaded (``model`` itself is left untouched).

    Refuses when ``model``'s FP32 weights differ from those the venv loaded (hash in meta.json),
    or when a saved tensor has no parameter of the same name and shape.
    """
    oneshot = _oneshot_module()
    ours = oneshot.weights_sha256(model)
    if ours != meta["fp32_weights_sha256"]:
        raise RuntimeError("the llm-compressor venv loaded different FP32 weights than this environment "
                           f"({meta['fp32_weights_sha256'][:12]} vs {ours[:12]}); the comparison would not be fair")
    tensors = load_file(str(result / "weights.safetensors"))
    peer = copy.deepcopy(model)
    params = dict(peer.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            p = params.get(name)
            if p is None or p.shape != t.shape:
                raise RuntimeError(f"{result}: tensor {name} {tuple(t.shape)} has no matching parameter")
            p.copy_(t.to(p.dtype))
    return peer


def _w4_weight_mb(model: torch.nn.Module, quantized: list[str], group_size: int) -> float:
    """Weight MB with the quantized linears stored as packed int4 plus fp32 scales [N, ceil(K / group)]."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for name in quantized:
        w = model.get_submodule(name).weight
        n, k = w.shape
        total += n * ((k + 1) // 2) + n * (-(-k // group_size)) * 4 - w.numel() * w.element_size()
    return total / 1e6


def run_llmcompressor_peer(method: str, out_dir: Path | None = None, protocol: Protocol | str | None = None, *,
                           model: torch.nn.Module | None = None, tokenizer=None, windows: list[torch.Tensor] | None = None,
                           fp_ppl: float | None = None, venv: Path | None = None, progress: bool = False,
                           rerun: bool = False, timeout_s: float | None = None) -> dict:
    """One llm-compressor peer row: oneshot in its venv, perplexity with our evaluator and protocol.

    Args:
        method: "gptq" or "awq".
        out_dir: where oneshot results are kept and reused (default ``default_out_dir()``).
        protocol: a ``qcompiler.tools.bench.Protocol`` or a key of ``PROTOCOLS`` (default SmolLM2's).
        model, tokenizer, windows, fp_ppl: pass the table's float SmolLM2, its tokenizer, eval
            windows and FP32 perplexity to reuse them; whatever is missing is loaded / computed.
        venv: the llm-compressor venv (default ``default_venv()``; created when missing).
        progress: tqdm bar during evaluation.
        rerun: ignore a cached oneshot result.
        timeout_s: stop a oneshot that runs longer (RuntimeError naming the layer it reached).

    Returns:
        {"row": qcompiler.tools.bench.Row, "meta": the oneshot's meta.json, "note": a footnote line,
         "fp_ppl": float, "eval_seconds": float}. ``row.calib_s`` holds the whole oneshot wall
        time (calibration forwards and the GPTQ / AWQ solve run interleaved, layer by layer),
        ``row.quantize_s`` 0; prefill speed is 0 (fake-quantized float weights, no int4 kernel).
    """
    protocol = _protocol(protocol)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    if model is None or tokenizer is None:
        model, tokenizer = models.load_model(MODEL)
    if windows is None:
        bos_id = tokenizer.bos_token_id if protocol.bos else None
        eval_ids = data.tokenize_text(tokenizer, _text(protocol.eval_text))
        windows = data.eval_windows(eval_ids, protocol.eval_tokens, protocol.context, bos_id=bos_id)
    if fp_ppl is None:
        fp_ppl = evaluate.perplexity(model, windows, progress=progress, desc="FP32")

    result, meta = run_oneshot(method, calibration_ids(tokenizer, protocol), out_dir, venv=venv, rerun=rerun,
                               timeout_s=timeout_s)
    peer = load_peer_weights(model, result, meta)
    label = f"llm-compressor {meta['version']} {method.upper()} W4A16 g{meta['group_size']} sym"
    t0 = time.perf_counter()
    ppl = evaluate.perplexity(peer, windows, progress=progress, desc=label)
    eval_s = time.perf_counter() - t0
    head = model.get_output_embeddings()
    n_linear = sum(isinstance(m, torch.nn.Linear) and m is not head for m in model.modules())
    row = Row(label, ppl, 100.0 * (ppl / fp_ppl - 1.0), meta["oneshot_seconds"], 0.0,
              _w4_weight_mb(model, meta["quantized_linears"], meta["group_size"]), 0.0, 0.0,
              len(meta["quantized_linears"]), [], n_linear)
    note = (f"{label}: llm-compressor {meta['version']}, compressed-tensors {meta['compressed_tensors_version']}, "
            f"transformers {meta['transformers_version']} in its own venv; {'; '.join(meta['modifiers'])}; "
            f"{meta['calibration_samples']} x {meta['seq_len']} calibration tokens (this protocol's set); "
            f"oneshot {meta['oneshot_seconds']:.0f} s on {meta['threads']} threads"
            + (f" (a cached oneshot written {meta['reused_from_cache']} with the same versions, scheme and "
               "calibration tokens, reused)" if "reused_from_cache" in meta else "")
            + "; weights dequantized "
            "to float and evaluated here; weight MB counts packed int4 + fp32 scales.")
    log.info("%s: ppl %.3f (%+.2f%%), oneshot %.0f s", label, ppl, row.delta_pct, meta["oneshot_seconds"])
    del peer
    return {"row": row, "meta": meta, "note": note, "fp_ppl": fp_ppl, "eval_seconds": eval_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    ap.add_argument("--out-dir", type=Path, default=None, help="oneshot results (default: the qcompiler cache)")
    ap.add_argument("--venv", type=Path, default=None)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--rerun", action="store_true", help="ignore cached oneshot results")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before a oneshot is stopped (default: none)")
    ap.add_argument("--update", action="store_true",
                    help="keep the FP32 perplexity and other methods' rows of an existing --json of the same protocol")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="calibration sequences (default: the protocol's; anything else is not the table's protocol)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: {m!r} is not one of {list(METHODS)}")

    protocol = PROTOCOLS[MODEL]
    if args.calib_samples is not None:
        protocol = dataclasses.replace(protocol, calib_samples=args.calib_samples)
    model, tokenizer = models.load_model(MODEL)
    bos_id = tokenizer.bos_token_id if protocol.bos else None
    windows = data.eval_windows(data.tokenize_text(tokenizer, _text(protocol.eval_text)), protocol.eval_tokens,
                                protocol.context, bos_id=bos_id)
    command = "python benchmarks/peers/llmcompressor_peer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = {"model": MODEL, "protocol": dataclasses.asdict(protocol), "eval_windows": len(windows),
             "torch": torch.__version__}
    old = json.loads(args.json.read_text()) if args.update and args.json and args.json.is_file() else None
    if old is not None and all(old.get(k) == v for k, v in facts.items()):
        fp_ppl = old["fp32_perplexity"]
        results = {**old, "commands": old.get("commands", [old.get("command")]) + [command]}
        results.pop("command", None)
        log.info("reusing FP32 perplexity %.4f and rows %s from %s", fp_ppl, sorted(old["rows"]), args.json)
    else:
        fp_ppl = evaluate.perplexity(model, windows, progress=sys.stderr.isatty(), desc="FP32")
        results = {"commands": [command], "date": str(datetime.date.today()), **facts,
                   "threads": torch.get_num_threads(), "fp32_perplexity": fp_ppl, "rows": {}}
    def write() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    write()
    for method in methods:
        try:
            peer = run_llmcompressor_peer(method, args.out_dir, protocol, model=model, tokenizer=tokenizer,
                                          windows=windows, fp_ppl=fp_ppl, venv=args.venv,
                                          progress=sys.stderr.isatty(), rerun=args.rerun, timeout_s=args.timeout)
        except RuntimeError as e:
            log.error("%s failed: %s", method, e)
            results["rows"][method] = {"error": str(e)}
            write()
            continue
        meta = {k: v for k, v in peer["meta"].items() if k != "quantized_linears"}
        meta["quantized_linears"] = len(peer["meta"]["quantized_linears"])
        results["rows"][method] = {"row": dataclasses.asdict(peer["row"]), "note": peer["note"],
                                   "eval_seconds": peer["eval_seconds"], "date": str(datetime.date.today()),
                                   "load_average_1min_after": _load(), "meta": meta}
        print(f"{peer['row'].name}: ppl {peer['row'].ppl:.3f} ({peer['row'].delta_pct:+.2f}% vs FP32 {fp_ppl:.3f}), "
              f"oneshot {peer['meta']['oneshot_seconds']:.0f} s", flush=True)
        write()
    return 0 if all("error" not in r for r in results["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
