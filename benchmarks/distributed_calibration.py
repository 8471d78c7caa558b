r"""Layer-by-layer calibration on 1 and N processes (torch.distributed, gloo on CPU): wall time, each
rank's time in collectives (waiting for the slowest rank included), peak resident memory per rank, and
whether the quantized weights equal one process's bit for bit.

    python benchmarks/distributed_calibration.py --model smollm2-135m --preset w4a16-gptq --procs 1,2 \
        --out benchmarks/results_distributed_smollm2.md

The machine's cores are split between the processes (``cores // N`` threads each), so on a 2-core machine
two processes have one thread each: the table measures what splitting the work costs and saves there, not
what more machines would give (docs/scale-out.md models that from these per-block costs).
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from qcompiler import recipes
from qcompiler.calibration import distributed as dd
from qcompiler.calibration.layerwise import LayerwiseCalibration
from qcompiler.tools import data, models
from qcompiler.tools.bench import PROTOCOLS, _text


def _calibration(model_name: str, tok) -> list[torch.Tensor]:
    protocol = PROTOCOLS[model_name]
    bos = tok.bos_token_id if protocol.bos else None
    return data.calibration_batches(data.tokenize_text(tok, _text(protocol.calib_text)), protocol.calib_samples,
                                    protocol.calib_seq, seed=0, bos_id=bos)


def _rank(rank: int, size: int, store: str, model_name: str, preset: str, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    if size > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                                             timeout=datetime.timedelta(seconds=3600))
    try:
        model, tok = models.load_model(model_name)
        batches = _calibration(model_name, tok)
        cal = LayerwiseCalibration(batches, recipes.resolve(preset), progress=False)
        dd.COLLECTIVE_TIME.seconds, dd.COLLECTIVE_TIME.calls = 0.0, 0
        t0 = time.perf_counter()
        cal.collect(model)
        wall = time.perf_counter() - t0
        torch.save({"wall": wall, "comm": dd.COLLECTIVE_TIME.seconds, "calls": dd.COLLECTIVE_TIME.calls,
                    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "state_mb": cal.peak_state_bytes / 1e6, "act_mb": cal.activation_bytes / 1e6,
                    "results": {f: (r.qweight.q, r.qweight.scale) for f, r in cal.results.items()} if rank == 0 else None},
                   f"{out}.{rank}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(size: int, args, work: Path) -> list[dict]:
    threads = max(1, (os.cpu_count() or 1) // size)
    ctx = mp.get_context("spawn")
    out = work / f"out{size}"
    procs = [ctx.Process(target=_rank, args=(r, size, str(work / f"store{size}"), args.model, args.preset, threads,
                                             str(out))) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"{size} processes: exit codes {[p.exitcode for p in procs]}")
    return [torch.load(f"{out}.{r}", weights_only=False) | {"threads": threads} for r in range(size)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--preset", default="w4a16-gptq", help="a layer-by-layer preset (default w4a16-gptq)")
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts (default 1,2)")
    ap.add_argument("--out", type=Path, help="write the markdown table to this file")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/distributed_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from qcompiler.backends import machine
    rows, base = [], None
    with tempfile.TemporaryDirectory(prefix="dist-calib-") as work:
        for size in (int(x) for x in args.procs.split(",")):
            ranks = _run(size, args, Path(work))
            res = ranks[0]["results"]
            if base is None:
                base = res
            same = base.keys() == res.keys() and all(torch.equal(a, b) for f in base for a, b in zip(base[f], res[f]))
            wall = max(r["wall"] for r in ranks)
            rows.append(f"| {size} | {ranks[0]['threads']} | {wall:.1f} | "
                        + " / ".join(f"{r['wall'] - r['comm']:.1f}" for r in ranks) + " | "
                        + " / ".join(f"{r['comm']:.1f}" for r in ranks) + f" | {ranks[0]['calls']} | "
                        + " / ".join(f"{r['rss_mb']:.0f}" for r in ranks) + f" | {ranks[0]['state_mb']:.1f} | "
                        + f"{ranks[0]['act_mb']:.1f} | {'yes' if same else 'NO'} |")
            print(rows[-1], flush=True)
    protocol = PROTOCOLS[args.model]
    text = (f"# {args.model}: layer-by-layer `{args.preset}` calibration on torch.distributed (gloo, CPU)\n\n"
            f"Generated {datetime.date.today()} by `{cmd}`.\n\n"
            f"Calibration {protocol.calib_samples} x {protocol.calib_seq} tokens of {protocol.calib_text}; each "
            f"process gets `cores // N` threads on this machine ({os.cpu_count()} cores), torch {torch.__version__}, "
            f"CPU: {machine.describe()}. Wall: the slowest rank's `LayerwiseCalibration.collect`; compute: a rank's "
            "wall minus its time in collectives; collectives: time inside `torch.distributed` calls (waiting for a "
            "slower rank counts here); peak RSS: the process's maximum resident set (model, captured block inputs, "
            "one block's statistics); state / activations: one block's statistics and the captured block inputs "
            "on a rank.\n\n"
            "| processes | threads each | wall s | compute s per rank | collectives s per rank | collectives | "
            "peak RSS MB per rank | block state MB | activations MB | weights = 1 process |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
