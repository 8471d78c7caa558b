"""The ``qcompiler::triton_<op>`` ops: declared beside their generic ops, fake kernels that match the
generic ops' on any device (CUDA fake tensors included, on a CPU-only machine), a lowered graph that
holds only OpOverloads and traces with fake tensors, Inductor compiling around the kernels, and
run-time fallbacks that still reach ``qcompiler.report(model)``.

Runs under Triton's CPU interpreter when there is no GPU (``TRITON_INTERPRET=1``, set here before
any kernel is defined).
"""

from __future__ import annotations

import pytest
import torch

import triton_interpreter  # noqa: E402,F401  (interpreter without a GPU; skip without triton)

from torch._inductor.utils import run_and_get_code  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.backends.triton.availability import availability  # noqa: E402
from qcompiler.backends.triton.lowering import TRITON_KERNELS  # noqa: E402
from qcompiler.core.ops import TRITON_KERNEL_OPS, triton_op  # noqa: E402
from qcompiler.core.packing import pack_int4  # noqa: E402
from numerics_util import rel_err  # noqa: E402

kernels = pytest.mark.skipif(not availability().runs_kernels, reason=f"Triton kernels cannot run here: "
                                                                     f"{availability().reason}")
pytestmark = pytest.mark.usefixtures("one_thread")
F32, FP8 = torch.float32, torch.float8_e4m3fn


def _sample_args(name: str) -> tuple:
    """Small valid arguments of op ``name`` (CPU tensors): M = 2 x 3 rows, K = 64, N = 16."""
    g = torch.Generator().manual_seed(0)
    m, k, n = (2, 3), 64, 16
    x = torch.randn(*m, k, generator=g)
    a8 = torch.randint(-127, 128, (*m, k), generator=g, dtype=torch.int8)
    a_scale = torch.rand(*m, 1, generator=g) + 0.01
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, 1, generator=g) * 0.01
    bias = torch.randn(n, generator=g)
    w4 = pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
    g_scale = torch.rand(n, k // 32, generator=g) * 0.01
    return {
        "int8_gemm": (a8, a_scale, w8, w_scale, bias, F32),
        "fp8_gemm": (x.to(FP8), a_scale, (w8.float() / 4).to(FP8), w_scale, None, F32),
        "weight_only_gemm": (x, w8, w_scale, None, bias, 0),
        "int4_gemm": (x, w4, g_scale, None, bias, 32, k),
        "w4a8_gemm": (x.to(FP8), a_scale, w4, g_scale, None, bias, 32, k, F32),
        "norm_quantize_per_token": (x, "rms", torch.rand(k, generator=g) + 0.5, None, 1e-6,
                                    torch.rand(k, generator=g) + 0.5, "int8", F32, F32, F32),
        "hadamard_transform": (x, torch.tensor([[1.0, 1, 1, 1], [-1, 1, -1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1]]),
                               k ** -0.5),      # a Paley block of order 4 (x 16 butterflies)
    }[name]


def _meta(out) -> list[tuple]:
    outs = out if isinstance(out, tuple) else (out,)
    return [(tuple(t.shape), t.dtype, t.stride()) for t in outs]


def _fake_like(mode: FakeTensorMode, t, device: str):
    """A fake tensor of ``t``'s shape, strides and dtype on ``device`` (CUDA works without a GPU)."""
    if not isinstance(t, torch.Tensor):
        return t
    with mode:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


@pytest.mark.parametrize("name", TRITON_KERNEL_OPS)
def test_triton_op_has_the_generic_schema_plus_report_id(name):
    generic = str(getattr(torch.ops.qcompiler, name).default._schema)
    params, returns = generic.split("(", 1)[1].rsplit(") ->", 1)
    assert str(triton_op(name)._schema) == f"qcompiler::triton_{name}({params}, *, int report_id=0) ->{returns}"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", TRITON_KERNEL_OPS)
def test_fake_kernel_matches_the_reference_ops_meta(name, device):
    """The fake of ``triton_<op>`` on fake tensors (CPU or CUDA) has the shapes, dtypes and strides of
    the generic op's real output, on the inputs' device."""
    args = _sample_args(name)
    expected = _meta(getattr(torch.ops.qcompiler, name)(*args))
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake_args = [_fake_like(mode, a, device) for a in args]
    with mode:
        out = triton_op(name)(*fake_args, report_id=0)
    assert _meta(out) == expected
    assert {t.device.type for t in (out if isinstance(out, tuple) else (out,))} == {device}


@kernels
@pytest.mark.parametrize("name", TRITON_KERNEL_OPS)
def test_opcheck(name):
    """Schema, fake kernel against the real one (the Triton kernel, or its reference fallback), and
    AOT dispatch with dynamic shapes. opcheck's schema test multiplies inputs to compare them, which
    torch 2.13 does not implement for fp8 on CPU (it fails on the generic fp8 ops too): skipped there."""
    fp8_inputs = name in ("fp8_gemm", "w4a8_gemm")
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(triton_op(name), _sample_args(name), {"report_id": 0},
                          test_utils=utils if fp8_inputs else ("test_schema", *utils))


# ----------------------------------------------------------------------------- a lowered graph


class Block(torch.nn.Module):
    """Embedding, a Llama-style RMSNorm, an ungated MLP and a side projection: a graph with no
    device constants (a Hugging Face graph traced on CPU bakes ``device=cpu`` into its mask code)."""

    def __init__(self, d: int = 64, f: int = 96):
        super().__init__()
        self.emb = torch.nn.Embedding(128, d)
        self.norm_w = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.up, self.down, self.proj = torch.nn.Linear(d, f), torch.nn.Linear(f, d, bias=False), torch.nn.Linear(d, d)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        h = x.float()
        h = self.norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.down(torch.nn.functional.silu(self.up(h))) + self.proj(h)


def _compile_block(recipe: str, target: str = "triton", lengths=(5,)):
    """The model, compiled for ``target``; its backend; its outputs at each sequence length."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    calib = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    qb = qcompiler.backend(recipe, calibration=calib, target=target, progress=False)
    compiled = torch.compile(model, backend=qb)
    with torch.no_grad():
        outs = [compiled(torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(n))) for n in lengths]
    return model, compiled, qb, outs


def _defined_in_qcompiler(target) -> bool:
    module = getattr(target, "__module__", None) or type(target).__module__
    return module.startswith("qcompiler")


@kernels
@pytest.mark.parametrize("recipe,ops", [
    ("w8a8-int8-sq-dynamic", {"triton_norm_quantize_per_token", "triton_int8_gemm"}),
    ("w8a16", {"triton_weight_only_gemm"}),
    ("w4a16-rtn", {"triton_int4_gemm"})])
def test_lowered_graph_holds_op_overloads_and_traces_on_fake_cuda_tensors(recipe, ops):
    _, _, qb, [out] = _compile_block(recipe)
    _, _, _, [ref] = _compile_block(recipe, "reference")
    assert qb.report.target == "triton" and rel_err(out, ref) <= 1e-3
    gm = qb.graphs[-1]
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    lowered = [n for n in calls if "qcompiler_op" in n.meta]        # the nodes the Lower pass rewrote
    assert lowered and all(isinstance(n.target, torch._ops.OpOverload) for n in lowered)
    assert {n.target.name().split("::")[1] for n in lowered} == ops
    assert all(n.kwargs["report_id"] > 0 for n in lowered)
    assert not [n.target for n in calls if _defined_in_qcompiler(n.target)]   # no Python callables of ours
    constants = {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for device in ("cpu", "cuda"):
        mode = FakeTensorMode(allow_non_fake_inputs=False)
        fake_gm = torch.fx.GraphModule({k: _fake_like(mode, v, device) for k, v in constants.items()}, gm.graph)
        inputs = [_fake_like(mode, t, device) for t in qb.last_context.example_inputs]
        with mode:
            traced = make_fx(fake_gm)(*inputs)
        kernels_traced = {n.target.name().split("::")[1] for n in traced.graph.nodes
                          if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "qcompiler"}
        assert kernels_traced == ops
        values = [n.meta["val"] for n in traced.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        assert values and {v.device.type for v in values} == {device}


@kernels
def test_inductor_compiles_around_the_kernels_and_run_time_fallbacks_reach_the_report(monkeypatch):
    """Two sequence lengths (the second compile has dynamic shapes) through Inductor, whose code calls
    the kernels as extern ops; then a check that refuses at run time: each call's fallback is counted
    in ``qcompiler.report(model)``."""
    _, _, _, refs = _compile_block("w8a8-int8-sq-dynamic", "reference", lengths=(5, 7))
    (model, compiled, qb, outs), codes = run_and_get_code(              # resets Dynamo: compile last
        lambda: _compile_block("w8a8-int8-sq-dynamic", lengths=(5, 7)))
    assert qb.report.graphs == 2 and all(rel_err(o, r) <= 1e-3 for o, r in zip(outs, refs))
    assert len(codes) == 2 and all("torch.ops.qcompiler.triton_int8_gemm.default(" in c
                                   and "torch.ops.qcompiler.triton_norm_quantize_per_token.default(" in c
                                   for c in codes)
    assert not qb.report.runtime_fallbacks
    kernel = TRITON_KERNELS["int8_gemm"]
    monkeypatch.setattr(kernel, "_check", lambda *args, **kwargs: "refused by the test")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = compiled(ids)                                           # no recompile: the graph of length 7
    report = qcompiler.report(model)
    what = "triton: int8_gemm ran its reference kernel at run time: refused by the test"
    assert report is qb.report and report.graphs == 2
    assert report.runtime_fallbacks == {what: 3}                      # three int8 GEMMs, one call
    assert what in report.warnings and f"{what} (3 calls)" in report.summary()
    assert rel_err(out, outs[1]) <= 1e-5                              # the reference GEMM, same values
