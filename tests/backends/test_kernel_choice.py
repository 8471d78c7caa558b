"""GEMM kernel choice: every kernel keeps its numerics contract, the probes classify kernels,
policies admit what they say, the micro-benchmark picks and caches, the report names the kernel.

The int16-pair model is checked against oneDNN itself with its ISA limited to AVX2 (no VNNI) in a
subprocess, which is how a CPU without VNNI runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qcompiler
from qcompiler.core import numerics
from qcompiler.backends import gemm_kernels, kernel_choice, machine
from qcompiler.backends.gemm_kernels import KERNELS, Contract, int16_pair_reference, layer_contract
from qcompiler.backends.kernel_choice import KernelChooser, check_policy, probe
from qcompiler.errors import RecipeError, UnsupportedError
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _int8_args(m=7, k=96, n=40, per_token=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
    w = (torch.randn(n, k, generator=g) * 30).round().clamp(-127, 127).to(torch.int8)
    sa = torch.rand(m, 1, generator=g) * 0.02 + 1e-3 if per_token else torch.tensor(0.013)
    sw = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    return [a, sa, w, sw, b, torch.float32]


def _run(kernel, args):
    args = list(args)
    if kernel.prepare:
        args[kernel.weight_arg] = kernel.prepare(args[kernel.weight_arg], args)
    return kernel.run(*args)


def _usable(kernel):
    contract, note = probe(kernel, CPU)
    if contract is None:
        pytest.skip(f"{kernel.name} does not run here: {note}")
    return contract


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("name", ["onednn-u8s8", "int8-fp32"])
def test_int8_kernels_equal_the_reference_kernel_where_exact(name, per_token):
    kernel = next(k for k in KERNELS if k.op == "int8_gemm" and k.name == name)
    machine_contract = _usable(kernel)
    args = _int8_args(per_token=per_token)
    contract, _ = layer_contract(kernel, machine_contract, args[2])
    out = _run(kernel, args)
    ref = gemm_kernels.ref.int8_gemm_ref(*args)
    if contract is Contract.EXACT:
        assert torch.equal(out, ref)
    else:   # int16 pairs: the model reproduces it (the epilogue applied to the modelled sums)
        acc = int16_pair_reference(args[0], args[2]).float()
        assert torch.equal(out, gemm_kernels.ref._epilogue(acc, *args[1:2], args[3], args[4], args[5], (7,)))


def test_int16_pair_model_saturates_where_vpmaddubsw_does():
    a = torch.tensor([[127, 127, 0, 0]], dtype=torch.int8)        # as uint8: 255, 255, 128, 128
    w = torch.tensor([[127, 127, 1, -1], [127, -127, 100, 100]], dtype=torch.int8)
    got = int16_pair_reference(a, w)
    # row 0: 255*127*2 = 64770 -> 32767; 128*1 - 128*1 = 0; minus 128 * sum(w) = 128 * 254
    # row 1: 255*127 - 255*127 = 0; 128*200 = 25600 (no saturation); minus 128 * 200
    assert got.tolist() == [[32767 + 0 - 128 * 254, 0 + 25600 - 128 * 200]]
    exact = a.long() @ w.long().t()
    assert exact.tolist() == [[2 * 127 * 127, 0]]


def test_layer_contract_proves_exactness_per_layer():
    onednn = next(k for k in KERNELS if k.name == "onednn-u8s8")
    fp32 = next(k for k in KERNELS if k.name == "int8-fp32")
    safe = torch.full((4, 64), 64, dtype=torch.int8)               # every pair sums to 128: cannot saturate
    risky = safe.clone()
    risky[0, 0:2] = 127
    assert layer_contract(onednn, Contract.INT16_PAIRS, safe)[0] is Contract.EXACT
    contract, note = layer_contract(onednn, Contract.INT16_PAIRS, risky)
    assert contract is Contract.INT16_PAIRS and "0.78% of weight pairs" in note   # 1 of 128 pairs
    assert layer_contract(onednn, Contract.EXACT, risky)[0] is Contract.EXACT
    assert layer_contract(fp32, Contract.EXACT, safe)[0] is Contract.EXACT
    big = torch.full((2, 1100), 127, dtype=torch.int8)             # 128 * 127 * 1100 > 2**24
    assert layer_contract(fp32, Contract.EXACT, big)[0] is Contract.FP32


def test_probe_classifies_exact_saturating_and_wrong_kernels():
    base = next(k for k in KERNELS if k.name == "int8-fp32")

    def saturating(a_q, a_scale, w_q, w_scale, bias, out_dtype):
        acc = int16_pair_reference(a_q.reshape(-1, a_q.shape[-1]), w_q).float()
        return gemm_kernels.ref._epilogue(acc, a_scale, w_scale, bias, out_dtype, a_q.shape[:-1])

    def wrong(*args):
        return base.run(*args) + 1.0

    import dataclasses
    assert probe(base, CPU)[0] is Contract.EXACT
    assert probe(dataclasses.replace(base, name="test-saturating", run=saturating), CPU)[0] is Contract.INT16_PAIRS
    contract, note = probe(dataclasses.replace(base, name="test-wrong", run=wrong), CPU)
    assert contract is None and "wrong int8 sums" in note


def test_onednn_without_vnni_is_the_int16_pair_model(tmp_path):
    """oneDNN limited to AVX2 (as on a CPU without VNNI) returns exactly the modelled sums."""
    if "avx2" not in machine.cpu_flags():
        pytest.skip("needs an x86 CPU with AVX2")
    if probe(next(k for k in KERNELS if k.name == "onednn-u8s8"), CPU)[0] is None:
        pytest.skip("no oneDNN int8 linear in this torch build")
    script = textwrap.dedent("""
        import json, torch
        from qcompiler.backends import gemm_kernels, kernel_choice
        k = next(k for k in gemm_kernels.KERNELS if k.name == "onednn-u8s8")
        contract, note = kernel_choice.probe(k, torch.device("cpu"))
        g = torch.Generator().manual_seed(3)
        a = torch.randint(-128, 128, (33, 200), generator=g).to(torch.int8)
        w = torch.randint(-127, 128, (50, 200), generator=g).to(torch.int8)
        acc = torch.ops.qcompiler.onednn_int8_mm(a, gemm_kernels._onednn_prepack(w), 50).double()
        model = gemm_kernels.int16_pair_reference(a, w).double()
        exact = a.double() @ w.double().t()
        print(json.dumps({"contract": contract and contract.value, "model": torch.equal(acc, model),
                          "exact": torch.equal(acc, exact)}))
    """)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", QCOMPILER_KERNEL_CACHE="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"contract": "int16-pairs", "model": True, "exact": False}


@pytest.mark.parametrize("name,op", [("fp8-dequant", "fp8_gemm"), ("int8pack", "weight_only_gemm"),
                                     ("fp8-dequant-onednn", "fp8_gemm"), ("fp8-words-onednn", "fp8_gemm"),
                                     ("fp8-words", "fp8_gemm"),
                                     ("dequant-onednn", "weight_only_gemm"),
                                     ("int8-words-onednn", "weight_only_gemm")])
def test_float_kernels_keep_float32_sums(name, op):
    kernel = next(k for k in KERNELS if k.name == name and k.op == op)
    assert _usable(kernel) is Contract.FP32
    reference = next(k for k in KERNELS if k.op == op and k.reference)
    g = torch.Generator().manual_seed(1)
    if op == "fp8_gemm":
        args = [torch.randn(2, 5, 96, generator=g).to(torch.float8_e4m3fn), torch.rand(2, 5, 1, generator=g) + 0.1,
                torch.randn(33, 96, generator=g).to(torch.float8_e4m3fn), torch.rand(33, 1, generator=g) + 0.1,
                torch.randn(33, generator=g), torch.float32]
    else:
        args = [torch.randn(2, 5, 96, generator=g), (torch.randn(33, 96, generator=g) * 40).round().clamp(
            -127, 127).to(torch.int8), torch.rand(33, 1, generator=g) * 0.01, None, torch.randn(33, generator=g), 0]
    out, ref = _run(kernel, args), _run(reference, args)
    assert out.shape == ref.shape == (2, 5, 33)
    assert rel_err(out, ref) <= 1e-6
    # against float64: within float32 summation's bound |err| <= K * 2**-24 * sum|a*w| per output
    a, w = (args[0].double() * args[1].double(), args[2].double() * args[3].double()) if op == "fp8_gemm" \
        else (args[0].double(), args[1].double() * args[2].double())
    exact = a @ w.t() + args[4].double()
    bound = 96 * 2.0 ** -24 * (a.abs() @ w.abs().t()) + 2.0 ** -24 * exact.abs()
    assert ((out.double() - exact).abs() <= bound).all()


def _same_floats(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal values, NaN where NaN, and the sign of zero kept."""
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(torch.signbit(out), torch.signbit(ref))     # -0.0 stays -0.0


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_decoded_by_integer_ops_is_the_fp8_conversion_for_every_code(compiled):
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    convert = gemm_kernels.fp8_to_float_via_bits
    out, ref = (torch.compile(convert) if compiled else convert)(codes), codes.float()
    assert int(ref.isnan().sum()) == 2
    _same_floats(out, ref)


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_byte_words_decode_every_code_in_column_order(compiled):
    """Every code at every byte position of a word: the quarters come back as the row."""
    g = torch.Generator().manual_seed(5)
    codes = torch.arange(256, dtype=torch.uint8)[torch.randperm(256 * 8, generator=g) % 256].reshape(16, 128)
    codes = codes.view(torch.float8_e4m3fn)
    words = gemm_kernels.pack_words(codes, 8)
    assert words.dtype == torch.int32 and words.shape == (16, 32)
    assert words.untyped_storage().nbytes() == codes.untyped_storage().nbytes()      # as many bytes

    def decode(w):
        return gemm_kernels.word_fields(w, 8, gemm_kernels._e4m3_from_top_byte)
    _same_floats((torch.compile(decode) if compiled else decode)(words), codes.float())


def test_word_kernels_refuse_k_they_cannot_split():
    fp8 = next(k for k in KERNELS if k.name == "fp8-words-onednn")
    w = torch.zeros(3, 6, dtype=torch.float8_e4m3fn)
    assert "divisible by 4" in fp8.accepts(torch.zeros(2, 6, dtype=torch.float8_e4m3fn), torch.tensor(1.0), w)
    int4 = next(k for k in KERNELS if k.name == "int4-words-onednn")
    from qcompiler.core.packing import pack_int4
    args = [torch.zeros(2, 36), pack_int4(torch.zeros(3, 36, dtype=torch.int8)), torch.ones(3, 1), None, None, 0, 36]
    assert "divisible by 8" in int4.accepts(*args)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("group", [0, 32])
def test_int8_words_weight_is_the_reference_bit_for_bit(group, signed, compiled):
    g = torch.Generator().manual_seed(4)
    n, k = 24, 128
    if signed:
        q, zero = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8), None
    else:
        q, zero = torch.randint(0, 256, (n, k), generator=g).to(torch.uint8), \
            torch.randint(0, 256, (n, k // group if group else 1), generator=g).to(torch.uint8)
    scale = torch.rand(n, k // group if group else 1, generator=g) + 0.01
    words = gemm_kernels.pack_words(q, 8)
    decode = torch.compile(gemm_kernels.int8_words_weight) if compiled else gemm_kernels.int8_words_weight
    ref = numerics.dequantize(q, scale, zero, torch.float32, block_size=group or None)
    assert torch.equal(decode(words, scale, zero, group), ref)


def _int4_weight(n: int, k: int, group: int, symmetric: bool, seed: int):
    """(generator, int4 values [N, K], zero-points or None, groups): symmetric int8 in [-8, 7], else uint4 + zeros."""
    g = torch.Generator().manual_seed(seed)
    groups = k // group if group else 1
    if symmetric:
        return g, torch.randint(-8, 8, (n, k), generator=g).to(torch.int8), None, groups
    return g, torch.randint(0, 16, (n, k), generator=g).to(torch.uint8), \
        torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8), groups


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 32, 64])
def test_int4_words_weight_is_the_reference_bit_for_bit(group, symmetric, compiled):
    from qcompiler.core.packing import pack_int4
    from qcompiler.core.reference_kernels import dequantize_int4_ref
    n, k = 24, 192
    g, q, zero, groups = _int4_weight(n, k, group, symmetric, seed=6)
    scale = torch.rand(n, groups, generator=g) + 0.01
    args = [torch.randn(3, k, generator=g), pack_int4(q), scale, zero, None, group, k]
    kernel = next(k_ for k_ in KERNELS if k_.name == "int4-words-onednn")
    assert kernel.accepts(*args) is None
    words = kernel.prepare(args[1], args)
    assert words.dtype == torch.int32 and words.numel() * 4 == args[1].numel()      # as many bytes
    decode = torch.compile(gemm_kernels.int4_words_weight) if compiled else gemm_kernels.int4_words_weight
    ref = dequantize_int4_ref(args[1], scale, zero, group, k, torch.float32)
    assert torch.equal(decode(words, scale, zero, group, k), ref)
    if not kernel.available(CPU):       # and the kernel: oneDNN's float32 sums of that weight
        reference = next(k_ for k_ in KERNELS if k_.op == "int4_gemm" and k_.reference)
        assert rel_err(_run(kernel, args), _run(reference, args)) <= 1e-6


def test_onednn_float_linear_is_a_float32_linear():
    """``qcompiler::onednn_linear``: F.linear's products and float32 sums, any leading dims, under compile."""
    from qcompiler.backends.gemm_kernels import onednn_float_available
    if onednn_float_available(CPU):
        pytest.skip(onednn_float_available(CPU))
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 3, 70, generator=g), torch.randn(17, 70, generator=g), torch.randn(17, generator=g)
    op = torch.ops.qcompiler.onednn_linear
    exact = x.double() @ w.double().t() + b.double()
    for out in (op(x, w, b), torch.compile(lambda x: op(x, w, b), backend="inductor")(x)):
        assert out.shape == (2, 3, 17) and out.dtype == torch.float32
        assert rel_err(out, exact) <= 1e-6
    assert rel_err(op(x, w, None), exact - b.double()) <= 1e-6


@pytest.mark.parametrize("group", [32, 64, 0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_group_halves_kernel_is_the_reference_bit_for_bit(group, symmetric):
    """The repacked INT4 layout dequantizes to the reference's weight exactly (same bytes in memory)."""
    from qcompiler.core.packing import pack_int4
    kernel = next(k for k in KERNELS if k.name == "int4-groups")
    reference = next(k for k in KERNELS if k.op == "int4_gemm" and k.reference)
    onednn = next(k for k in KERNELS if k.name == "int4-groups-onednn")
    assert _usable(kernel) is Contract.FP32
    k, n = 192, 40
    g, q, zero, groups = _int4_weight(n, k, group, symmetric, seed=2)
    args = [torch.randn(3, 5, k, generator=g), pack_int4(q), torch.rand(n, groups, generator=g) + 0.01, zero,
            torch.randn(n, generator=g), group, k]
    packed = kernel.prepare(args[1], args)
    assert packed.dtype == torch.uint8 and packed.numel() == args[1].numel()
    assert torch.equal(_run(kernel, args), _run(reference, args))
    if probe(onednn, CPU)[0] is not None:     # same weight, oneDNN's float32 sums
        assert probe(onednn, CPU)[0] is Contract.FP32
        assert rel_err(_run(onednn, args), _run(reference, args)) <= 1e-6
    odd = [args[0][..., :100], pack_int4(q[:, :100]), args[2][:, :4], None, None, 32, 100]   # K not whole groups
    assert "needs even groups" in kernel.accepts(*odd)


def test_policies_and_their_errors(monkeypatch):
    check_policy("auto")
    check_policy({"int8_gemm": "int8-fp32"})
    with pytest.raises(RecipeError, match="neither a policy"):
        check_policy("fastest")
    with pytest.raises(RecipeError, match="int8_gemm has no kernel 'fp8-dequant'"):
        check_policy({"int8_gemm": "fp8-dequant"})
    with pytest.raises(RecipeError):
        qcompiler.backend("w8a16", kernels="nope")
    args = _int8_args()
    onednn = next(k for k in KERNELS if k.name == "onednn-u8s8")
    # pretend this machine saturates: "exact" refuses the kernel for a layer whose pairs can saturate
    monkeypatch.setitem(kernel_choice._PROBES, ("int8_gemm", "onednn-u8s8", "cpu"),
                        (Contract.INT16_PAIRS, "pretend: no VNNI"))
    args[2][0, :2] = 127
    auto = KernelChooser("reference", "onednn-u8s8").choose("int8_gemm", args, CPU)
    assert auto.kernel is onednn and auto.contract is Contract.INT16_PAIRS
    exact = KernelChooser("reference", "exact").choose("int8_gemm", args, CPU)
    assert exact.contract is Contract.EXACT and exact.kernel is not onednn
    # a kernel this machine cannot run is an error when asked for by name
    monkeypatch.setitem(kernel_choice._PROBES, ("int8_gemm", "onednn-u8s8", "cpu"), (None, "pretend: missing"))
    with pytest.raises(UnsupportedError, match="pretend: missing"):
        KernelChooser("reference", "onednn-u8s8").choose("int8_gemm", args, CPU)
    assert KernelChooser("reference", "auto").choose("int8_gemm", args, CPU).kernel is not onednn


@pytest.mark.parametrize("target", ["reference", "inductor"])
def test_benchmark_picks_a_kernel_caches_it_and_reports_it(target, monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_choice, "MIN_WORK", 0)
    monkeypatch.setattr(kernel_choice, "_TIMINGS", {})
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    monkeypatch.delenv("QCOMPILER_KERNEL_CACHE", raising=False)
    model = tiny_model("llama")
    torch._dynamo.reset()
    # "exact": the comparison with the reference kernels below holds on CPUs without VNNI too
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=calibration_batches(), target=target, progress=False,
                           kernels="exact")
    x = token_batches(1, 12, seed=7)[0]
    with torch.no_grad():
        out = torch.compile(model, backend=qb)(x).logits
    torch._dynamo.reset()
    ref_qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=calibration_batches(), target=target,
                               progress=False, kernels="reference")
    with torch.no_grad():
        ref = torch.compile(model, backend=ref_qb)(x).logits
    assert rel_err(out, ref) <= 1e-5
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "lower")
    assert stats["kernel_benchmarks"] > 0
    assert any("fastest at 16x" in c and " ms" in c for c in qb.report.kernel_choices)
    layer = qb.report.quantized[0]
    assert layer.kernel and layer.kernel_contract and "fastest" in layer.kernel_note
    assert layer.kernel in qb.report.summary()
    cached = json.loads((tmp_path / "kernel_timings.json").read_text())
    assert f"v{kernel_choice.TIMINGS_VERSION}|{machine.fingerprint()}" in cached   # versioned: older timings unused
    # a new process (empty in-process cache) reads the timings from disk: nothing is timed again
    monkeypatch.setattr(kernel_choice, "_TIMINGS", {})
    torch._dynamo.reset()
    again = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=calibration_batches(), target=target,
                              progress=False, kernels="exact")
    with torch.no_grad():
        torch.compile(model, backend=again)(x)
    stats = next(p["stats"] for p in again.report.passes if p["name"] == "lower")
    assert "kernel_benchmarks" not in stats
    assert again.report.kernel_choices == qb.report.kernel_choices


def test_eager_quantize_runs_and_reports_the_chosen_kernel():
    model = tiny_model("llama")
    x = token_batches(1, 12, seed=7)[0]
    torch._dynamo.reset()
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=calibration_batches(), progress=False,
                           kernels="onednn-u8s8" if probe(next(k for k in KERNELS if k.name == "onednn-u8s8"),
                                                          CPU)[0] else "int8-fp32")
    with torch.no_grad():
        compiled = torch.compile(model, backend=qb)(x).logits
    torch._dynamo.reset()
    qcompiler.quantize(model, "w8a8-int8-sq-dynamic", calibration=calibration_batches(), progress=False,
                       kernels=qb.kernels)
    with torch.no_grad():
        eager = model(x).logits
    assert rel_err(eager, compiled) <= 1e-5
    rep = qcompiler.report(model)
    assert {d.kernel for d in rep.quantized} == {qb.kernels}
    assert rep.kernel_choices
    # prepacked weights are not copied: a copy chooses (and prepacks) again at its first call
    import copy
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(x).logits, eager)


def test_machine_class_names_the_isa_and_its_limits(monkeypatch):
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": "Some EPYC", "flags": "sse fma avx2"})
    assert machine.machine_class() == "avx2" and machine.cpu_flags() == ("avx2",)
    plain = machine.fingerprint()
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": "Some Xeon",
                                                      "flags": "avx2 avx512f avx512_vnni amx_int8"})
    assert machine.machine_class() == "amx"
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": "Some EPYC", "flags": "avx2 avx512f avx512_vnni"})
    assert machine.machine_class() == "avx512-vnni"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert machine.machine_class() == "avx2-limited"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in machine.describe() and "Some EPYC" in machine.describe()
    assert machine.fingerprint() != plain     # timings measured under a limit are cached apart


def test_report_warns_when_gemms_can_saturate(monkeypatch):
    """Layers left on an int16-pair kernel are named in the report with what avoids it."""
    monkeypatch.setitem(kernel_choice._PROBES, ("int8_gemm", "onednn-u8s8", "cpu"),
                        (Contract.INT16_PAIRS, "pretend: no VNNI"))
    torch._dynamo.reset()
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=calibration_batches(), progress=False,
                           kernels="onednn-u8s8")
    with torch.no_grad():
        torch.compile(tiny_model("llama"), backend=qb)(token_batches(1, 12, seed=7)[0])
    risky = [d for d in qb.report.quantized if d.kernel_contract == "int16-pairs"]
    assert risky and all("of weight pairs can saturate" in d.kernel_note for d in risky)
    assert any(f"{len(risky)} int8 GEMMs run on a kernel that sums products in saturating int16 pairs" in w
               and "reduce_range=True" in w for w in qb.report.warnings)


FOLDING = [k for k in KERNELS if k.from_float is not None]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("name", [k.name for k in FOLDING])
def test_folded_quantize_gives_the_kernels_output_on_the_quantized_activation(name, per_token, compiled):
    """``from_float(x, s, ...)`` is ``run(quantize(x, s), s, ...)`` bit for bit: the folded rounding
    (``numerics.round_to_e4m3``) forms the fp8 cast's values, saturation included."""
    kernel = next(k for k in FOLDING if k.name == name)
    _usable(kernel)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 64, generator=g) * 3
    x[0, 0, :4] = torch.tensor([1e6, -1e6, 0.0, -0.0])         # saturates at +-448, signed zeros
    if per_token:
        a_q, a_scale = numerics.quantize_per_token(x, "fp8_e4m3")
    else:
        a_scale = torch.tensor(0.01)
        a_q = numerics.quantize(x, a_scale, None, "fp8_e4m3")
    w = (torch.randn(24, 64, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    args = [a_q, a_scale, w, torch.rand(24, 1, generator=g) + 0.1, torch.randn(24, generator=g), torch.float32]
    if kernel.prepare:
        args[kernel.weight_arg] = kernel.prepare(args[kernel.weight_arg], args)
    folded = torch.compile(kernel.from_float) if compiled else kernel.from_float
    out = folded(x, *args[1:])
    torch._dynamo.reset()
    assert torch.equal(out, kernel.run(*args))


@pytest.mark.parametrize("target", ["reference", "inductor"])
@pytest.mark.parametrize("preset", ["fp8", "fp8-dynamic"])
@pytest.mark.parametrize("pair", [("fp8-words-onednn", "fp8-dequant-onednn"), ("fp8-words", "fp8-dequant")])
def test_fp8_kernels_fold_the_activation_quantize_in_the_graph(pair, preset, target):
    """Where a quantize op with the GEMM's own scale feeds an fp8 kernel that can fold it, the kernel takes
    the float activation (no fp8 tensor formed); two kernels on the same float32 GEMM agree."""
    for name in pair:
        kernel = next(k for k in KERNELS if k.name == name)
        if kernel.available(CPU):
            pytest.skip(kernel.available(CPU))
    model, x = tiny_model("llama"), token_batches(1, 12, seed=7)[0]
    outs = {}
    for name in pair:
        torch._dynamo.reset()
        qb = qcompiler.backend(preset, calibration=calibration_batches(), target=target, progress=False, kernels=name)
        with torch.no_grad():
            outs[name] = torch.compile(model, backend=qb)(x).logits
        report = qb.report
        stats = next(p["stats"] for p in report.passes if p["name"] == "lower")
        assert stats["kernel_quantize_folded"] == stats[f"kernel_fp8_gemm_{name}"] == len(report.quantized) > 0
        assert all("quantize op is folded into the kernel" in d.kernel_note for d in report.quantized)
    torch._dynamo.reset()
    assert rel_err(outs[pair[0]], outs[pair[1]]) <= 1e-6
