"""The Triton backend end to end: tiny Llama and GPT-2 through ``target="triton"`` against
``target="reference"``; per-op and whole-backend fallback; import hygiene; tile configs.

Runs under Triton's CPU interpreter when there is no GPU (``TRITON_INTERPRET=1``, set here
before any kernel is defined).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import triton_interpreter  # noqa: E402,F401  (interpreter without a GPU; skip without triton)

import qcompiler  # noqa: E402
from qcompiler.backends.triton import config as cfgs  # noqa: E402
from qcompiler.backends.triton.availability import availability  # noqa: E402
from qcompiler.backends.triton.lowering import TRITON_KERNELS, register_report  # noqa: E402
from qcompiler.core.ops import GEMM_OPS, TRITON_KERNEL_OPS, triton_op  # noqa: E402
from qcompiler.recipes import ActivationSpec, Granularity, QuantDtype, Recipe, WeightSpec  # noqa: E402
from numerics_util import rel_err  # noqa: E402
from tiny_models import ARCHS, calibration_batches, tiny_model, token_batches  # noqa: E402

kernels = pytest.mark.skipif(not availability().runs_kernels, reason=f"Triton kernels cannot run here: "
                                                                     f"{availability().reason}")
DEVICE = "cuda" if availability().mode == "gpu" else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INT4_G32 = Recipe(name="int4-g32", weight=WeightSpec(dtype=QuantDtype.INT4, granularity=Granularity.PER_GROUP,
                                                    group_size=32), activation=None)
W4A8_G32 = Recipe(name="w4a8-g32", weight=WeightSpec(dtype=QuantDtype.INT4, granularity=Granularity.PER_GROUP,
                                                    group_size=32),
                  activation=ActivationSpec(QuantDtype.FP8_E4M3, Granularity.PER_TOKEN))
W4A8_INT8_G32 = W4A8_G32.replace(name="w4a8-int8-g32", activation=ActivationSpec(QuantDtype.INT8, Granularity.PER_TOKEN))
FP8_WEIGHT_ONLY = Recipe(name="fp8-weight-only", weight=WeightSpec(dtype=QuantDtype.FP8_E4M3), activation=None)
RECIPES = {"w8a8-int8-sq-dynamic": "w8a8-int8-sq-dynamic", "fp8-dynamic": "fp8-dynamic", "w8a16": "w8a16",
           "int4-g32": INT4_G32, "w4a8-g32": W4A8_G32, "w4a8-int8-g32": W4A8_INT8_G32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch).to(DEVICE) for arch in ARCHS}


def _run(model, recipe, target: str):
    torch._dynamo.reset()
    calib = [t.to(DEVICE) for t in calibration_batches()]
    qb = qcompiler.backend(recipe, calibration=calib, target=target, progress=False)
    compiled = torch.compile(model, backend=qb)
    with torch.no_grad():
        logits = compiled(token_batches(1, 12, seed=7)[0].to(DEVICE)).logits
    return logits, qb


@kernels
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_matches_reference_target(models, arch, recipe):
    out, qb = _run(models[arch], RECIPES[recipe], "triton")
    ref, ref_qb = _run(models[arch], RECIPES[recipe], "reference")
    assert rel_err(out, ref) <= 1e-3
    gm = qb.graphs[-1]
    triton_ops = {triton_op(name) for name in TRITON_KERNEL_OPS}
    lowered = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in triton_ops]
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in GEMM_OPS]
    ref_gemms = [n for n in ref_qb.graphs[-1].graph.nodes if n.op == "call_function" and n.target in GEMM_OPS]
    assert ref_gemms and not left, [n.target for n in left]
    assert sum(n.target.name().endswith("gemm") for n in lowered) == len(ref_gemms)
    assert all(n.kwargs["report_id"] for n in lowered)
    assert qb.report.target == "triton"
    assert not [w for w in qb.report.warnings if "reference kernel" in w], qb.report.warnings


@kernels
def test_unsupported_op_falls_back_and_is_reported(models):
    """FP8 weight-only linears fuse into weight_only_gemm with fp8 weights, which the Triton
    weight-only kernel does not take: each stays on the reference kernel, the report says so."""
    out, qb = _run(models["llama"], FP8_WEIGHT_ONLY, "triton")
    ref, _ = _run(models["llama"], FP8_WEIGHT_ONLY, "reference")
    assert rel_err(out, ref) <= 1e-5      # the reference GEMMs; Inductor may reassociate the float code around
    gm = qb.graphs[-1]
    kept = [n for n in gm.graph.nodes if n.target is torch.ops.qcompiler.weight_only_gemm]
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "lower")
    assert kept and stats["fallback_weight_only_gemm"] == len(kept)
    msgs = [w for w in qb.report.warnings if "weight_only_gemm" in w]
    assert len(msgs) == len({n.meta["qcompiler"].fqn for n in kept})
    assert all("runs the reference kernel: w_q must be int8 or uint8" in w for w in msgs)
    assert "model.layers.0.self_attn.q_proj" in " ".join(msgs)
    assert "weight_only_gemm" in qb.report.summary()


@kernels
def test_triton_op_falls_back_at_run_time(caplog):
    """Arguments the kernel cannot take at run time (here fp8 weights) go to the reference."""
    op, kernel = triton_op("weight_only_gemm"), TRITON_KERNELS["weight_only_gemm"]
    x = torch.randn(3, 16, device=DEVICE)
    w = (torch.randn(8, 16, device=DEVICE) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(8, 1, device=DEVICE) + 0.1
    with caplog.at_level("WARNING"):
        out = op(x, w, s, None, None, 0)
        op(x, w, s, None, None, 0)
    assert torch.equal(out, torch.ops.qcompiler.weight_only_gemm(x, w, s, None, None, 0))
    assert sum("runs its reference kernel" in r.message for r in caplog.records) == 1
    assert kernel.unsupported(x, w, s, None, None, 0).startswith("w_q must be int8 or uint8")
    assert kernel.unsupported(x, w.view(torch.int8), s, None, None, 0) is None


@kernels
def test_run_time_fallback_lands_in_the_report():
    """A call that names a compile report counts each call that ran the reference kernel, by reason."""
    from qcompiler.pipeline import CompileReport
    report = CompileReport()
    op, rid = triton_op("weight_only_gemm"), register_report(report)
    x = torch.randn(3, 16, device=DEVICE)
    w = (torch.randn(8, 16, device=DEVICE) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(8, 1, device=DEVICE) + 0.1
    for _ in range(3):
        op(x, w, s, None, None, 0, report_id=rid)
    op(x, w, s, None, None, 0)                                     # no report named: logged only
    op(x, w.view(torch.int8), s, None, None, 0, report_id=rid)     # the kernel takes this one
    (what, calls), = report.runtime_fallbacks.items()
    assert calls == 3 and what.startswith("triton: weight_only_gemm ran its reference kernel at run time: w_q")
    assert report.warnings == [what] and f"{what} (3 calls)" in report.summary()
    assert report.to_dict()["runtime_fallbacks"] == {what: 3}


_UNAVAILABLE_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import qcompiler, qcompiler.backends.triton, qcompiler.passes
    assert "triton" not in sys.modules, "import qcompiler imported triton"
    from tiny_models import tiny_model, token_batches
    model = tiny_model("llama")
    outs = {{}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for target in ("triton", "reference"):
            torch._dynamo.reset()
            qb = qcompiler.backend("w8a16", calibration=token_batches(2, 16), target=target, progress=False)
            compiled = torch.compile(model, backend=qb)
            with torch.no_grad():
                outs[target] = [compiled(token_batches(1, n, seed=7)[0]).logits for n in (8, 12)]
            if target == "triton":
                report = qb.report
    notices = [w for w in caught if "triton backend" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in notices]
    assert report.graphs >= 2 and report.warnings == [str(notices[0].message)], report.warnings
    assert all(torch.equal(a, b) for a, b in zip(outs["triton"], outs["reference"]))
    assert "TRITON_INTERPRET" not in os.environ
    print("OK", report.warnings[0])
""")


def test_without_gpu_or_interpreter_says_so_once_and_runs_reference():
    """A fresh process with no GPU and no TRITON_INTERPRET: one notice, reference kernels, the
    same logits as target='reference'; ``import qcompiler`` does not import triton."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the backend runs its kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    script = _UNAVAILABLE_SCRIPT.format(tests=os.path.join(ROOT, "tests"))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK triton backend: no CUDA GPU and TRITON_INTERPRET is not set" in res.stdout


# ----------------------------------------------------------------------------- tile configs


def test_default_configs_follow_shape():
    decode = cfgs.default_config(1, 4096, 4096, kind="int4")
    assert decode.kernel == "fma" and decode.block_m == 1 and decode.split_k > 1   # weight-only decode on FMA
    assert cfgs.default_config(1, 4096, 4096, kind="int4") == decode           # deterministic
    assert cfgs.default_config(16, 14336, 4096, kind="weight_only").block_m == 16
    assert cfgs.default_config(5, 4096, 4096, kind="weight_only").block_m == 8  # all rows in one tile
    assert all(cfgs.fits(cfgs.default_config(m, 4096, 4096, kind=kind), 2, 2)
               for m in (1, 2, 3, 8, 16) for kind in cfgs.FMA_DECODE_KINDS)
    w4a8 = cfgs.default_config(1, 4096, 4096, kind="w4a8")
    assert w4a8.kernel == "dot" and w4a8.block_m == 16 and w4a8.split_k > 1
    prefill = cfgs.default_config(2048, 4096, 4096, kind="int8")
    assert prefill.block_m == 128 and prefill.split_k == 1 and prefill.block_k == 128
    assert cfgs.default_config(128, 4096, 4096, kind="int4").split_k == 1
    assert cfgs.default_config(128, 4096, 4096, kind="int4").block_n <= 64     # narrow tiles fill the SMs
    assert cfgs.default_config(1, 4096, 4096, kind="int8").split_k == 1        # W8A8 has no split-K
    interp = cfgs.default_config(1, 4096, 4096, kind="int4", interpreter=True)
    assert interp.split_k == 1 and interp.block_k == 128


def test_autotune_space_fits_hopper_shared_memory_and_registers():
    for a_bytes, b_bytes in ((1, 1), (2, 2)):
        space = cfgs.prefill_space(a_bytes, b_bytes, capability=(9, 0))
        assert space and all(c.num_stages * (c.block_m * c.block_k * a_bytes + c.block_n * c.block_k * b_bytes)
                             <= 227 * 1024 for c in space)                     # per block, not per SM
        assert all(c.block_m * c.block_n // (32 * c.num_warps) <= cfgs.MAX_ACC_REGS for c in space)
    assert not any(c.block_m * c.block_n == 128 * 256 and c.num_warps == 4 for c in cfgs.prefill_space(1, 1))
    assert len(cfgs.prefill_space(1, 1)) > len(cfgs.prefill_space(2, 2))      # 8-bit tiles can be deeper
    assert len(cfgs.prefill_space(2, 2, capability=(8, 9))) < len(cfgs.prefill_space(2, 2, capability=(9, 0)))
    assert all(c.block_m == 16 and c.kernel == "dot" and (c.split_k == 1 or 2 * c.split_k * c.block_k <= 4096)
               for c in cfgs.decode_space(4096))
    fma = [c for c in cfgs.decode_space(4096, m=3, fma=True) if c.kernel == "fma"]
    assert fma and all(c.block_m == 4 and c.block_m * c.block_n * c.block_k <= 32 * c.num_warps * cfgs.MAX_ACC_REGS
                       for c in fma)
    assert {c.kernel for c in cfgs.search_space(1, 4096, kind="int4")} == {"fma", "dot"}
    assert {c.kernel for c in cfgs.search_space(1, 4096, kind="w4a8")} == {"dot"}


@pytest.mark.parametrize("kind", ["int8", "fp8", "weight_only", "int4", "w4a8"])
def test_autotune_space_has_valid_candidates_at_every_group_size_and_m(kind):
    """Per-group kernels keep candidates (and a valid default) at groups 32 / 64 / 128 and at
    M = 1 ... 8192: a K tile must divide the group, so the spaces carry 32-wide K tiles."""
    groups = (0, 32, 64, 128) if kind in cfgs.WEIGHT_ONLY_KINDS else (0,)
    for group in groups:
        valid = lambda c, g=group: cfgs.fits_groups(c, g)                     # noqa: E731
        for m in (1, 2, 8, 16, 17, 64, 128, 256, 257, 2048, 8192):
            space = [c for c in cfgs.search_space(m, 4096, kind=kind) if valid(c)]
            assert space, (kind, group, m)
            assert all(not group or group % c.block_k == 0 for c in space)
            cfgs.clear_cache()
            chosen = cfgs.choose_config(m, 4096, 4096, kind=kind, variant=group, interpreter=False, valid=valid)
            assert valid(chosen), (kind, group, m, chosen)


def test_autotune_reports_failed_candidates_and_raises_when_all_fail(caplog):
    cfgs.clear_cache()
    try:
        cfgs.set_autotune(True)

        def flaky(cfg):
            if cfg.block_k == 256:
                raise RuntimeError("out of resource: shared memory")
            return float(cfg.block_n)

        with caplog.at_level("WARNING"):
            best = cfgs.choose_config(1, 4096, 4096, kind="int4", variant="f", interpreter=False, bench=flaky)
        failures = cfgs.autotune_failures()
        assert best.block_k != 256 and failures and all(f[2].block_k == 256 for f in failures)
        assert all("out of resource" in f[3] for f in failures)
        assert sum("failed: RuntimeError: out of resource" in r.message for r in caplog.records) == len(failures)

        def broken(cfg):
            raise RuntimeError("ptxas error")

        with pytest.raises(RuntimeError, match="all .* candidates failed"):
            cfgs.choose_config(2, 4096, 4096, kind="int4", variant="b", interpreter=False, bench=broken)
    finally:
        cfgs.set_autotune(None)
        cfgs.clear_cache()


def test_autotune_times_each_candidate_once_and_caches(monkeypatch):
    cfgs.clear_cache()
    calls = []

    def bench(cfg):
        calls.append(cfg)
        return 1.0 / (cfg.block_n * cfg.block_k * cfg.split_k)   # the largest tile "wins"

    try:
        cfgs.set_autotune(True)
        space = [c for c in cfgs.search_space(1, 4096, kind="int4") if c.block_k <= 128]
        first = cfgs.choose_config(1, 4096, 4096, kind="int4", variant="t", interpreter=False, bench=bench,
                                   valid=lambda c: c.block_k <= 128)
        assert len(calls) == len(space) and first == max(space, key=lambda c: c.block_n * c.block_k * c.split_k)
        again = cfgs.choose_config(1, 4096, 4096, kind="int4", variant="t", interpreter=False, bench=bench)
        assert again == first and len(calls) == len(space)                   # cached per shape
        cfgs.set_autotune(False)
        off = cfgs.choose_config(2, 4096, 8192, kind="int4", variant="t", interpreter=False, bench=bench)
        assert off == cfgs.default_config(2, 4096, 8192, kind="int4") and len(calls) == len(space)
    finally:
        cfgs.set_autotune(None)
        cfgs.clear_cache()
