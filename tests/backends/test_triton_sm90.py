"""What the Triton kernels become on Hopper, checked without a GPU.

Triton compiles for ``sm_90`` on any machine (``qcompiler.backends.triton.sm90``: TTGIR, PTX and
ptxas from the triton wheel), so the numerics the interpreter cannot show are checked here on the
real instructions: fp8 dots promote each 32-deep wgmma partial into fp32 instead of summing the
whole K loop in the tensor cores' reduced precision, and the fused norm + quantize kernel's
square root and divisions are IEEE round-to-nearest (``sqrt.rn``, ``div.rn``), not the
approximate forms that ``tl.sqrt`` and ``/`` lower to. Runs in a subprocess without
``TRITON_INTERPRET`` (the kernels must be compiled, not interpreted).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed: no kernels to compile")

_SCRIPT = textwrap.dedent("""
    import json, re
    import triton.language as tl
    from qcompiler.backends.triton import config as cfgs, sm90
    from qcompiler.backends.triton.common import fp8_imprecise_acc
    from qcompiler.backends.triton.gemm_w8a8 import _w8a8_gemm_kernel
    from qcompiler.backends.triton.norm_quant import _norm_quant_kernel
    out = {}
    cfg = cfgs.GemmConfig(64, 64, 64, 8, 1, 4, 2)
    for kind in ("fp8", "int8"):
        ptr = "*u8" if kind == "fp8" else "*i8"
        c = sm90.compile_kernel(
            _w8a8_gemm_kernel,
            {"a_ptr": ptr, "a_scale_ptr": "*fp32", "w_ptr": ptr, "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
             "c_ptr": "*bf16"},
            dict(IS_FP8=kind == "fp8", A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=False, SOFT_BF16=False,
                 IMPRECISE_ACC=fp8_imprecise_acc(cfg.block_k), **sm90._tiles(cfg)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out[kind] = {"depth": re.findall(r"maxNumImpreciseAcc = (\\d+)", c.ttgir),
                     "wgmma": re.findall(r"wgmma\\.mma_async\\.sync\\.aligned\\.m\\d+n\\d+k\\d+\\.[a-z0-9.]+", c.ptx)[:1],
                     "spills": c.spill_bytes}
    for fp8 in (False, True):
        c = sm90.compile_kernel(
            _norm_quant_kernel,
            {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "smooth_ptr": "*fp32",
             "q_ptr": "*fp8e4nv" if fp8 else "*i8", "scale_ptr": "*fp32"},
            dict(NORM=1, HAS_W=True, HAS_B=False, HAS_SMOOTH=True, IS_FP8=fp8, NORM_DTYPE=tl.float32,
                 MUL_DTYPE=tl.bfloat16, OUT_DTYPE=tl.bfloat16, SOFT_BF16=False, BLOCK_R=2, BLOCK_K=1024),
            num_warps=4, num_stages=1)
        out["norm_fp8" if fp8 else "norm_int8"] = sorted(set(re.findall(r"\\b((?:sqrt|div|rsqrt|rcp)\\.[a-z0-9.]+)",
                                                                          c.ptx)))
    from qcompiler.backends.triton.gemm_decode import _decode_kernel
    from qcompiler.backends.triton.gemm_w4a8 import _w4a8_gemm_kernel
    from qcompiler.backends.triton.gemm_weight_only import GROUP_ALIGNED
    for kind in ("fp8", "int8"):       # W4A8, g128 aligned tiles: fp8 or int8 activations
        c = sm90.compile_kernel(
            _w4a8_gemm_kernel,
            {"a_ptr": "*u8" if kind == "fp8" else "*i8", "a_scale_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": "*fp32",
             "z_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16"},
            dict(SIGNED=True, SCALE_MODE=GROUP_ALIGNED, HAS_ZERO=False, A_PER_ROW=True, HAS_BIAS=False,
                 SOFT_BF16=False, IS_FP8=kind == "fp8", IMPRECISE_ACC=fp8_imprecise_acc(cfg.block_k),
                 **sm90._tiles(cfg)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out[f"w4a8_{kind}"] = re.findall(r"wgmma\\.mma_async\\.sync\\.aligned\\.m\\d+n\\d+k\\d+\\.[a-z0-9.]+", c.ptx)[:1]
    for m in (1, 16):
        cfg = cfgs.default_config(m, 4096, 4096, kind="int4")
        if not cfgs.fits_groups(cfg, 128):
            cfg = cfgs._first_valid(cfg, lambda c: cfgs.fits_groups(c, 128))
        c = sm90.compile_kernel(
            _decode_kernel,
            {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "bias_ptr": "*fp32",
             "c_ptr": "*bf16", "p_ptr": "*fp32", "lock_ptr": "*i32"},
            dict(PACKED=True, SIGNED=True, SCALE_MODE=GROUP_ALIGNED, HAS_ZERO=False, HAS_BIAS=True,
                 X_DTYPE=tl.bfloat16, SOFT_BF16=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out[f"decode_m{m}"] = {"kernel": cfg.kernel, "split": cfg.split_k, "spills": c.spill_bytes,
                               "registers": c.registers, "wgmma": "wgmma" in c.ptx, "mma": "mma.sync" in c.ptx,
                               "atomics": sorted(set(re.findall(r"\\b(atom\\.[a-z0-9.]+)", c.ptx)))}
    print("RESULT", json.dumps(out))
""")


@pytest.fixture(scope="module")
def sm90_facts():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend to compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_fp8_dot_promotes_each_wgmma_partial_to_fp32(sm90_facts):
    fp8 = sm90_facts["fp8"]
    assert fp8["depth"] == ["32"]                       # not Triton's sm_90 default of 2**30
    assert fp8["wgmma"] and fp8["wgmma"][0].endswith("f32.e4m3.e4m3")   # still on the tensor cores
    assert sm90_facts["int8"]["depth"] == [] and sm90_facts["int8"]["wgmma"][0].endswith("s32.s8.s8")


def test_w4a8_takes_the_tensor_cores_with_fp8_or_int8_activations(sm90_facts):
    """The W4A8 kernel's group-aligned tiles: an e4m3 wgmma for fp8 activations, an s8 one (int32 sums) for int8."""
    assert sm90_facts["w4a8_fp8"] and sm90_facts["w4a8_fp8"][0].endswith("f32.e4m3.e4m3")
    assert sm90_facts["w4a8_int8"] and sm90_facts["w4a8_int8"][0].endswith("s32.s8.s8")


@pytest.mark.parametrize("kind", ["norm_int8", "norm_fp8"])
def test_norm_quant_uses_ieee_sqrt_and_division(sm90_facts, kind):
    ops = sm90_facts[kind]
    assert "sqrt.rn.f32" in ops and "div.rn.f32" in ops
    assert not [op for op in ops if "approx" in op or op.startswith(("div.full", "rsqrt", "rcp"))], ops


@pytest.mark.parametrize("m", [1, 16])
def test_weight_only_decode_runs_on_fma_units_without_spills_and_reduces_split_k_in_launch(sm90_facts, m):
    """The default W4A16 decode kernel (g128, bf16) on sm_90: no tensor-core instruction (the dequantized
    tile never goes through shared memory for wgmma), no register spills, and the split-K counters as
    global atomics (one launch)."""
    facts = sm90_facts[f"decode_m{m}"]
    assert facts["kernel"] == "fma" and not facts["wgmma"] and not facts["mma"]
    assert facts["spills"] == 0 and 0 < facts["registers"] <= 255
    if facts["split"] > 1:
        assert any(a.startswith("atom.global") or a.startswith("atom.") for a in facts["atomics"])
