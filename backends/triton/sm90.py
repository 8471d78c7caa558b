"""Compile the Triton kernels for a GPU that is not here: PTX and ptxas statistics on any machine.

``triton.compile`` with a ``GPUTarget`` runs the whole CUDA pipeline (TTIR, TTGIR, LLVM IR, PTX,
and ptxas, which ships inside the triton wheel) without a driver, so what the kernels become on
Hopper can be checked on a CPU-only machine: which dot instructions (wgmma), whether fp8 sums
are promoted to fp32 (``maxNumImpreciseAcc``), IEEE square roots and divisions (``sqrt.rn``,
``div.rn``), registers and spills of a tile configuration. Run it in a process without
``TRITON_INTERPRET`` (the kernels must be ``JITFunction``s): ``python -m
qcompiler.backends.triton.sm90`` prints a table for the default tiles of every kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

__all__ = ["Compiled", "compile_kernel", "ptxas_usage", "default_kernels", "main"]

#: Triton signature types of the kernels' runtime arguments, by argument name (pointers by role).
_SCALARS = {"M", "N", "K", "KB", "group_size", "K_PER_SPLIT"}
_FLOAT_SCALARS = {"eps"}


@dataclass(frozen=True)
class Compiled:
    name: str
    ttgir: str
    ptx: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) that ptxas reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(int(arch.removeprefix("sm_").rstrip("a"))).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = max((int(r) for r in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, *, capability: int = 90,
                   num_warps: int = 4, num_stages: int = 3, name: str = "") -> Compiled:
    """Compile ``kernel`` (a ``JITFunction``) for ``sm_<capability>``; ``pointers``: {arg: '*fp32', ...}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(kernel, "arg_names"):
        raise RuntimeError("compile_kernel needs JITFunctions: run without TRITON_INTERPRET=1")
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        elif arg in _FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    regs, spills = ptxas_usage(compiled.asm["ptx"], arch)
    return Compiled(name or kernel.__name__, compiled.asm["ttgir"], compiled.asm["ptx"], regs, spills,
                    int(compiled.metadata.shared))


def default_kernels(capability: int = 90) -> list[Compiled]:
    """Each GEMM kernel at the default prefill and decode tiles of a 4096 x 4096 layer, and the
    fused norm + quantize kernel at K = 4096, compiled for ``sm_<capability>``."""
    import triton.language as tl

    from . import config as cfgs
    from .common import fp8_imprecise_acc
    from .gemm_decode import _decode_kernel
    from .gemm_w4a8 import _w4a8_gemm_kernel
    from .gemm_w8a8 import _w8a8_gemm_kernel
    from .gemm_weight_only import GROUP_ALIGNED, _weight_only_gemm_kernel
    from .norm_quant import _norm_quant_kernel

    out = []
    for m in (2048, 1):
        phase = "prefill" if m > cfgs.DECODE_MAX_M else "decode"
        for kind in ("int8", "fp8"):
            cfg = cfgs.default_config(m, 4096, 4096, kind=kind)
            ptr = "*i8" if kind == "int8" else "*u8"
            out.append(compile_kernel(
                _w8a8_gemm_kernel,
                {"a_ptr": ptr, "a_scale_ptr": "*fp32", "w_ptr": ptr, "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
                 "c_ptr": "*bf16"},
                dict(IS_FP8=kind == "fp8", A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=False, SOFT_BF16=False,
                     IMPRECISE_ACC=fp8_imprecise_acc(cfg.block_k), **_tiles(cfg)),
                capability=capability, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                name=f"{kind} W8A8 {phase} {_label(cfg)}"))
        g128 = lambda c: cfgs.fits_groups(c, 128)                        # noqa: E731
        default = cfgs.default_config(m, 4096, 4096, kind="int4")
        dots = [default] if default.kernel == "dot" else [cfgs.dot_decode_config(m, 4096, 4096, "int4")]
        for cfg in [c if g128(c) else cfgs._first_valid(c, g128) for c in dots]:
            out.append(compile_kernel(
                _weight_only_gemm_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "bias_ptr": "*fp32",
                 "c_ptr": "*bf16" if cfg.split_k == 1 else "*fp32"},
                dict(PACKED=True, SIGNED=True, SCALE_MODE=GROUP_ALIGNED, HAS_ZERO=False, HAS_BIAS=False,
                     X_DTYPE=tl.bfloat16, DOT_F32=False, SOFT_BF16=False, **_tiles(cfg)),
                capability=capability, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                name=f"W4A16 g128 {phase} {_label(cfg)}"))
        if default.kernel == "fma":
            cfg = default if g128(default) else cfgs._first_valid(default, g128)
            out.append(compile_kernel(
                _decode_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "bias_ptr": "*fp32",
                 "c_ptr": "*bf16", "p_ptr": "*fp32", "lock_ptr": "*i32"},
                dict(PACKED=True, SIGNED=True, SCALE_MODE=GROUP_ALIGNED, HAS_ZERO=False, HAS_BIAS=False,
                     X_DTYPE=tl.bfloat16, SOFT_BF16=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k),
                capability=capability, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                name=f"W4A16 g128 {phase} FMA (gemm_decode) {_label(cfg)}"))
        cfg = cfgs.default_config(m, 4096, 4096, kind="w4a8")
        for act in ("fp8", "int8") if capability >= 89 else ("int8",):
            out.append(compile_kernel(
                _w4a8_gemm_kernel,
                {"a_ptr": "*u8" if act == "fp8" else "*i8", "a_scale_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": "*fp32",
                 "z_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16" if cfg.split_k == 1 else "*fp32"},
                dict(SIGNED=True, SCALE_MODE=GROUP_ALIGNED, HAS_ZERO=False, A_PER_ROW=True, HAS_BIAS=False,
                     SOFT_BF16=False, IS_FP8=act == "fp8", IMPRECISE_ACC=fp8_imprecise_acc(cfg.block_k),
                     **_tiles(cfg)),
                capability=capability, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                name=f"W4A8 {act} g128 {phase} {_label(cfg)}"))
    out.append(compile_kernel(
        _norm_quant_kernel,
        {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "smooth_ptr": "*fp32", "q_ptr": "*i8",
         "scale_ptr": "*fp32"},
        dict(NORM=1, HAS_W=True, HAS_B=False, HAS_SMOOTH=False, IS_FP8=False, NORM_DTYPE=tl.float32,
             MUL_DTYPE=tl.bfloat16, OUT_DTYPE=tl.bfloat16, SOFT_BF16=False, BLOCK_R=2, BLOCK_K=4096),
        capability=capability, num_warps=4, num_stages=1, name="RMSNorm + int8 per-token quantize, K 4096"))
    return out


def _tiles(cfg) -> dict:
    meta = cfg.meta()
    meta.pop("num_warps")
    meta.pop("num_stages")
    return meta


def _label(cfg) -> str:
    return (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} split {cfg.split_k} "
            f"{cfg.num_warps}w {cfg.num_stages}s")


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 80, 89, 90")
    args = ap.parse_args()
    import triton
    print(f"# Triton kernels compiled for sm_{args.capability} without a GPU\n\n"
          f"Generated by `python -m qcompiler.backends.triton.sm90 --capability {args.capability}` (triton "
          f"{triton.__version__}, its own ptxas; no GPU involved): each kernel at the default tiles of a "
          f"4096 x 4096 layer at M = 2048 (prefill) and M = 1 (decode), bf16 outputs. Registers and spill bytes "
          f"per thread as ptxas reports them; 'fp8 partial depth' is the dot's maxNumImpreciseAcc (products "
          f"summed in the tensor cores' reduced precision before the fp32 accumulator). No timing: a lent GPU "
          f"decides whether a spilling default is slower than a smaller tile.\n")
    print(f"| kernel (sm_{args.capability}) | registers | spill bytes (stores + loads) | shared KB | wgmma | fp8 partial depth |")
    print("|---|---|---|---|---|---|")
    for c in default_kernels(args.capability):
        depth = re.findall(r"maxNumImpreciseAcc = (\d+)", c.ttgir)
        print(f"| {c.name} | {c.registers} | {c.spill_bytes} | {c.shared_bytes / 1024:.0f} | "
              f"{'yes' if 'wgmma.mma_async' in c.ptx else 'no'} | {depth[0] if depth else '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
