r"""The prepared GPU check: everything a lent GPU must show, in one device call of under 10 minutes.

Steps, each with its own time limit, each logged to ``<out>/<step>.log``, summarised last:

1. ``env``: GPU, driver, torch / triton / transformers versions (what the numbers hold for).
2. ``kernel-tests``: the Triton kernel tests, compiled for the GPU (not the interpreter):
   ``tests/backends/test_triton_kernels.py``, ``test_triton_norm_quant.py``, ``test_triton_backend.py``.
3. ``kernels``: ``benchmarks/gpu_kernels.py --part kernels`` on Llama-3-8B's linear shapes at
   M = 1, 16, 128, 2048, 8192 against cuBLAS bf16, ``torch._scaled_mm``, ``torch._int_mm`` and
   torchao (when carried), writing ``<out>/results_<gpu>_kernels.md``.
4. ``e2e``: ``benchmarks/gpu_kernels.py --part e2e --e2e-model SmolLM2-135M``: prefill and batch-1
   decode tokens/s per preset against bf16 (random weights of SmolLM2's shape: the GGUF does not
   travel), writing ``<out>/results_<gpu>_e2e.md``.
5. ``kv-tests``: the decode-attention kernel's tests (``tests/backends/test_triton_decode_attention.py``),
   compiled for the GPU.
6. ``kv-attention``: ``benchmarks/gpu_kv_attention.py``: decode attention over the quantized KV cache
   (int8 / fp8 / int4 codes read by the Triton kernel) against SDPA over a bf16 cache, writing
   ``<out>/results_<gpu>_kv_attention.md``.
7. ``sparse24``: ``benchmarks/gpu_sparse24.py``: 2:4 weights as checkpoints store them (kept codes and
   CUTLASS metadata) read by CUTLASS's INT8 sparse GEMM as they are, and FP8 through cuSPARSELt, against
   the dense ``torch._int_mm`` / ``torch._scaled_mm`` (equal results, times), writing
   ``<out>/results_<gpu>_sparse24.md``.

A step that fails or runs out of time does not stop the next; the exit status is non-zero if any
failed. Through the device tool (the checkout travels; torchao as a carried wheel, see README
"Triton backend"; ``--no-deps`` keeps pip off the machine's own torch and triton)::

    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . \
        && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --out $OUT

then copy ``results_*.md`` from the returned files into ``benchmarks/``. ``--dry-run`` walks the
same steps on CPU in about a minute (tests collected, not run; kernels and e2e at reduced sizes
on the reference kernels): ``tests/test_gpu_check.py`` runs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL_TESTS = ["tests/backends/test_triton_kernels.py", "tests/backends/test_triton_norm_quant.py",
                "tests/backends/test_triton_backend.py"]
#: Seconds per step on the GPU (560 s together: under the device's 10-minute call with the install).
LIMITS = {"env": 60, "kernel-tests": 130, "kernels": 120, "e2e": 90, "kv-tests": 60, "kv-attention": 60,
          "sparse24": 40}
KV_TESTS = ["tests/backends/test_triton_decode_attention.py"]

_ENV_SCRIPT = """
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__)
for name in ("triton", "transformers", "torchao"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "not importable:", type(e).__name__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory GiB", round(p.total_memory / 2**30, 1))
else:
    print("gpu: none (dry run)")
"""


def steps(out: Path, dry_run: bool) -> list[tuple[str, list[str], dict]]:
    """(name, command, extra environment) of each step."""
    py = sys.executable
    bench = [py, str(HERE / "gpu_kernels.py")]
    if dry_run:
        return [
            ("env", [py, "-c", _ENV_SCRIPT], {}),
            ("kernel-tests", [py, "-m", "pytest", "--collect-only", "-q", *KERNEL_TESTS, "-p", "no:cacheprovider"],
             {"TRITON_INTERPRET": "1"}),
            ("kernels", bench + ["--part", "kernels", "--dry-run", "--shrink", "64", "--models", "Llama-3-8B",
                                 "--m", "1,16", "--no-torchao", "--out", str(out / "results_dry_kernels.md")], {}),
            ("e2e", bench + ["--part", "e2e", "--dry-run", "--e2e-model", "SmolLM2-135M", "--presets",
                             "w8a16,w8a8-int8-sq-dynamic", "--prefill-len", "256", "--decode-ctx", "128",
                             "--out", str(out / "results_dry_e2e.md")], {}),
            ("kv-tests", [py, "-m", "pytest", "--collect-only", "-q", *KV_TESTS, "-p", "no:cacheprovider"],
             {"TRITON_INTERPRET": "1"}),
            ("kv-attention", [py, str(HERE / "gpu_kv_attention.py"), "--dry-run", "--out",
                              str(out / "results_dry_kv_attention.md")], {"TRITON_INTERPRET": "1"}),
            ("sparse24", [py, str(HERE / "gpu_sparse24.py"), "--dry-run"], {}),
        ]
    import torch
    tag = torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else "gpu"
    return [
        ("env", [py, "-c", _ENV_SCRIPT], {}),
        ("kernel-tests", [py, "-m", "pytest", "-q", "-x", *KERNEL_TESTS, "-p", "no:cacheprovider"], {}),
        ("kernels", bench + ["--part", "kernels", "--models", "Llama-3-8B", "--out",
                             str(out / f"results_{tag}_kernels.md")], {}),
        ("e2e", bench + ["--part", "e2e", "--e2e-model", "SmolLM2-135M", "--prefill-len", "2048",
                         "--decode-ctx", "512", "--out", str(out / f"results_{tag}_e2e.md")], {}),
        ("kv-tests", [py, "-m", "pytest", "-q", "-x", *KV_TESTS, "-p", "no:cacheprovider"], {}),
        ("kv-attention", [py, str(HERE / "gpu_kv_attention.py"), "--out", str(out / f"results_{tag}_kv_attention.md")],
         {}),
        ("sparse24", [py, str(HERE / "gpu_sparse24.py"), "--out", str(out / f"results_{tag}_sparse24.md")], {}),
    ]


def run_step(name: str, cmd: list[str], extra_env: dict, out: Path, limit: float) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return status, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the logs and result tables")
    ap.add_argument("--dry-run", action="store_true", help="CPU walk-through of every step (about a minute)")
    ap.add_argument("--only", help=f"comma-separated steps to run ({', '.join(LIMITS)})")
    args = ap.parse_args(argv)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            ap.error("no CUDA GPU here: use --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = set(args.only.split(",")) if args.only else None
    rows, failed = [], False
    for name, cmd, extra in steps(args.out, args.dry_run):
        if chosen is not None and name not in chosen:
            continue
        status, secs = run_step(name, cmd, extra, args.out, LIMITS[name] * (2 if args.dry_run else 1))
        failed |= status != "ok"
        tail = (args.out / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
        rows.append(f"| {name} | {status} | {secs:.0f} | {tail[0][:100]} |")
        print(f"{name}: {status} in {secs:.0f} s", file=sys.stderr, flush=True)
    summary = "\n".join(["| step | status | s | last line of its log |", "|---|---|---|---|", *rows])
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
