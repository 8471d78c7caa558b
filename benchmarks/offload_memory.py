r"""Memory of layer-by-layer calibration with the decoder blocks in RAM and memory-mapped from disk
(``qcompiler.calibration.offload``), measured, each mode in a fresh process.

    python benchmarks/offload_memory.py --model smollm2-135m --preset w4a16-gptq \
        --out benchmarks/results_offload_memory_smollm2.md

A thread samples the process's ``/proc/self/status`` every 20 ms: ``RssAnon`` is memory the process
owns (what an out-of-memory kill counts), ``RssFile`` the file pages it has mapped in (memory-mapped
weights read so far: page cache the kernel may drop again and read back). Phases: the model loaded
(and offloaded), ``collect`` (layer-by-layer calibration: every block's quantized weights), then
``qcompiler.quantize`` with that calibration (the graph passes and the quantized modules). Both modes
must give the same quantized weights (checked, bit for bit). Modes: blocks in memory, blocks memory-mapped
(``offload_blocks``), and blocks plus each block's sampled calibration rows memory-mapped
(``LayerwiseCalibration(samples_dir=...)``, what ``qcompiler quantize --offload-dir`` does).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


class _Sampler:
    """Peak RssAnon / RssFile since the last ``mark``."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, {}, threading.Event()
        self.mark()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self) -> dict[str, int]:
        done, self.peak = dict(self.peak), _status()
        return done

    def _run(self):
        while not self._stop.wait(self.every):
            for k, v in _status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)

    def stop(self):
        self._stop.set()
        self._thread.join()


#: the blocks in memory; memory-mapped from disk; and the sampled calibration rows on disk too (the CLI's
#: --offload-dir: LayerwiseCalibration(samples_dir=...))
MODES = ("in-memory", "offloaded", "offloaded+rows")


def _child(args) -> None:
    import qcompiler
    from qcompiler import recipes
    from qcompiler.calibration.layerwise import LayerwiseCalibration
    from qcompiler.calibration.offload import offload_blocks
    from qcompiler.tools import data, models
    from qcompiler.tools.bench import PROTOCOLS, _text
    torch.set_num_threads(args.threads)
    sampler = _Sampler()
    row = {"mode": args.child}
    model, tok = models.load_model(args.model)
    protocol = PROTOCOLS[args.model]
    bos = tok.bos_token_id if protocol.bos else None
    batches = data.calibration_batches(data.tokenize_text(tok, _text(protocol.calib_text)), args.calib_samples,
                                       protocol.calib_seq, seed=0, bos_id=bos)
    with tempfile.TemporaryDirectory(prefix="offload-") as work:
        if args.child != "in-memory":
            done = offload_blocks(model, work)
            row["offloaded_mb"] = done.nbytes / 1e6
        import gc
        gc.collect()
        row["load"] = {**sampler.mark(), "now": _status()}
        from qcompiler.calibration.layerwise import find_decoder_blocks
        row["block_float_mb"] = sum(t.numel() * t.element_size() for t in find_decoder_blocks(model)[1].parameters()) / 1e6
        recipe = recipes.resolve(args.preset)
        cal = LayerwiseCalibration(batches, recipe, progress=False,
                                   samples_dir=work if args.child == "offloaded+rows" else None)
        t0 = time.perf_counter()
        cal.collect(model)
        row["collect_s"] = time.perf_counter() - t0
        row["collect"] = sampler.mark()
        h = hashlib.sha256()
        for f in sorted(cal.results):
            h.update(cal.results[f].qweight.q.numpy().tobytes())
            h.update(cal.results[f].qweight.scale.numpy().tobytes())
        row["results_sha"] = h.hexdigest()[:16]
        row["state_mb"], row["act_mb"] = cal.peak_state_bytes / 1e6, cal.activation_bytes / 1e6
        t0 = time.perf_counter()
        qcompiler.quantize(model, recipe, calibration=cal, progress=False)
        row["quantize_s"] = time.perf_counter() - t0
        row["quantize"] = sampler.mark()
        sampler.stop()
    print("RESULT " + json.dumps(row), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="w4a16-gptq")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    cmd = "python benchmarks/offload_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for mode in MODES:
        child = [sys.executable, __file__, "--child", mode, "--model", args.model, "--preset", args.preset,
                 "--calib-samples", str(args.calib_samples), "--threads", str(args.threads)]
        out = subprocess.run(child, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            raise SystemExit(f"{mode}: the child failed ({out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(rows[-1], flush=True)
    mb = lambda b: f"{b / 1e6:.0f}"   # noqa: E731
    from qcompiler.backends import machine
    same = len({r["results_sha"] for r in rows}) == 1
    body = "\n".join(
        f"| {r['mode']} | {mb(r['load']['now']['RssAnon'])} | {mb(r['collect']['RssAnon'])} | "
        f"{mb(r['collect']['RssFile'])} | {mb(r['quantize']['RssAnon'])} | {mb(r['quantize']['RssFile'])} | "
        f"{r['collect_s']:.0f} | {r['quantize_s']:.0f} | {r['results_sha']} |" for r in rows)
    text = (f"# {args.model}: layer-by-layer calibration with decoder blocks in memory and memory-mapped from disk\n\n"
            f"Generated {datetime.date.today()} by `{cmd}`.\n\n"
            f"Preset `{args.preset}`, {args.calib_samples} calibration sequences; decoder blocks' float weights "
            f"{rows[0]['block_float_mb']:.0f} MB, captured activations {rows[0]['act_mb']:.0f} MB, largest one-block "
            f"statistics {rows[0]['state_mb']:.0f} MB. Memory in MB from `/proc/self/status` sampled every 20 ms: "
            "`RssAnon` (the process's own memory) after loading (and offloading), its peak during `collect` "
            "(layer-by-layer calibration) and during `qcompiler.quantize` (graph passes, quantized modules); "
            "`RssFile` peaks (mapped file pages: page cache the kernel can drop). "
            f"torch {torch.__version__}, {args.threads} threads, CPU: {machine.describe()}. Quantized weights "
            f"{'identical in every mode (same digest)' if same else '**differ between the modes**'}.\n\n"
            "| blocks | RssAnon loaded | RssAnon peak, collect | RssFile peak, collect | RssAnon peak, quantize | "
            "RssFile peak, quantize | collect s | quantize s | weights digest |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + body + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
