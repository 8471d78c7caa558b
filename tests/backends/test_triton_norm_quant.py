"""Fused norm + SmoothQuant scale + per-token quantization: the Triton kernel against the op's
pure-torch reference, the op's schema / fake kernel, and the ``fuse_norm_quant`` pass on tiny
Llama (RMSNorm) and GPT-2 (LayerNorm) graphs.

Kernel bound: the quantized values equal the reference's except where fp32 summation order
moves a value across a rounding boundary (at most one step, on at most 1% of elements), and
the scales agree to 1e-6 relative.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import triton_interpreter  # noqa: E402,F401  (interpreter without a GPU; skip without triton)

import qcompiler  # noqa: E402
from qcompiler.backends.triton.availability import availability  # noqa: E402
from qcompiler.core.reference_kernels import norm_quantize_per_token_ref  # noqa: E402
from qcompiler.core.ops import GEMM_OPS  # noqa: E402
from numerics_util import rel_err  # noqa: E402
from tiny_models import calibration_batches, tiny_model, token_batches  # noqa: E402

if not availability().runs_kernels:
    pytest.skip(f"Triton kernels cannot run here: {availability().reason}", allow_module_level=True)

from qcompiler.backends.triton.norm_quant import norm_quantize_per_token  # noqa: E402

DEVICE = "cuda" if availability().mode == "gpu" else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (x dtype, norm_dtype, mul_dtype, out_dtype): fp32 models; Llama in bf16 (w * n.to(bf16));
# Gemma in bf16 ((n * (1 + w.float())).type_as(x)); fp16.
DTYPES = {"fp32": (F32, F32, F32, F32), "llama-bf16": (BF16, BF16, BF16, BF16),
          "gemma-bf16": (BF16, F32, F32, BF16), "fp16": (F16, F16, F16, F16)}
# (norm, dtypes) pairs: every norm in fp32 and Llama-style bf16; Gemma's casts with RMSNorm; fp16 with LayerNorm.
NORM_DTYPES = [(n, d) for n in ("none", "rms", "layer") for d in ("fp32", "llama-bf16")] + \
    [("rms", "gemma-bf16"), ("layer", "fp16")]


def _gen(key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("qdtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("norm,dtypes", NORM_DTYPES, ids=lambda v: v)
@pytest.mark.parametrize("mk", [(1, 5), (19, 200), (3, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_norm_quant_kernel_matches_reference(mk, norm, dtypes, qdtype, smooth):
    m, k = mk
    x_dtype, norm_dtype, mul_dtype, out_dtype = DTYPES[dtypes]
    if norm == "layer":
        norm_dtype = x_dtype
    g = _gen((mk, norm, qdtype, dtypes, smooth))
    x = (torch.randn(2, m, k, generator=g) * 3).to(x_dtype)
    w = (torch.randn(k, generator=g) + 1).to(mul_dtype if norm == "rms" else x_dtype) if norm != "none" else None
    b = torch.randn(k, generator=g).to(x_dtype) if norm == "layer" else None
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    args = (x, norm, w, b, 1e-5, s, qdtype, norm_dtype, mul_dtype, out_dtype)
    q_ref, s_ref = norm_quantize_per_token_ref(*args)
    q, scale = norm_quantize_per_token(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    q, scale = q.cpu(), scale.cpu()
    assert q.dtype == q_ref.dtype and q.shape == x.shape and scale.shape == (2, m, 1)
    assert float(((scale - s_ref).abs() / s_ref).max()) <= 1e-6
    step = (q.float() - q_ref.float()).abs() / torch.where(q_ref.float().abs() > 0, q_ref.float().abs(), 1.0)
    diff = q.float() != q_ref.float()
    assert diff.float().mean() <= 0.01
    # one int8 step; for fp8 one e4m3 step (<= 1/8 relative, or a subnormal step)
    if qdtype == "int8":
        assert (q.float() - q_ref.float()).abs().max() <= 1
    else:
        assert bool(((step <= 0.125) | ((q.float() - q_ref.float()).abs() <= 2 ** -9)).all())
    assert rel_err(q.float() * scale, q_ref.float() * s_ref) <= 1e-3


def test_norm_quant_op_schema_and_fake():
    g = _gen("opcheck")
    x = torch.randn(2, 3, 16, generator=g)
    w, b, s = torch.randn(16, generator=g), torch.randn(16, generator=g), torch.rand(16, generator=g) + 0.5
    op = torch.ops.qcompiler.norm_quantize_per_token.default
    for args in [(x, "rms", w, None, 1e-6, s, "int8", F32, F32, F32),
                 (x, "layer", w, b, 1e-5, None, "int8", F32, F32, F32),
                 (x, "none", None, None, 0.0, s, "int8", F32, F32, F32)]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------- the pass


def _compile(arch: str, preset: str, target: str, dtype: torch.dtype = F32):
    torch._dynamo.reset()
    model = tiny_model(arch).to(DEVICE, dtype)
    calib = [t.to(DEVICE) for t in calibration_batches()]
    qb = qcompiler.backend(preset, calibration=calib, target=target, progress=False)
    compiled = torch.compile(model, backend=qb)
    with torch.no_grad():
        out = compiled(token_batches(1, 12, seed=7)[0].to(DEVICE)).logits
    return out, qb


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,norm_kind", [("llama", "rms"), ("gpt2", "layer")])
def test_fuse_norm_quant_rewrites_graph(arch, norm_kind):
    out, qb = _compile(arch, "w8a8-int8-sq-dynamic", "triton")
    gm = qb.graphs[-1]
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "fuse_norm_quant")
    fused = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.qcompiler.triton_norm_quantize_per_token.default]
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.qcompiler.quantize_per_token]
    kinds = [n.args[1] for n in fused]
    # every norm in front of quantized linears is fused (two per decoder layer), the rest quantize only
    assert kinds.count(norm_kind) == 4 and stats[f"fused_{'rms' if norm_kind == 'rms' else 'layer_norm'}"] == 4
    assert len(fused) == stats["fused_rms"] + stats["fused_layer_norm"] + stats["fused_quant_only"]
    # the fused ops feed every activation-quantized GEMM (q, k, v share one)
    gemms = [n for n in gm.graph.nodes if n.target is torch.ops.qcompiler.triton_int8_gemm.default]
    assert gemms and all(n.args[0].args[0] in fused for n in gemms)
    if arch == "llama":
        # (q, k, v) -> 1 and (gate, up) -> 1, two layers: shared from Q/DQ insertion on
        shared = next(p["stats"] for p in qb.report.passes if p["name"] == "insert_qdq")["shared_activation_quantizers"]
        assert shared + stats["quantizers_merged"] == 6
        # only the final norm (feeding the float lm_head) keeps its rsqrt
        assert len([n for n in gm.graph.nodes if n.target is torch.rsqrt]) == 1
    else:
        assert len([n for n in gm.graph.nodes if n.target is torch.nn.functional.layer_norm]) == 1
    # SmoothQuant scales that were not folded (explicit muls) moved into the kernels
    explicit = next(p["stats"] for p in qb.report.passes if p["name"] == "smoothquant_fold")["explicit"]
    assert stats["smoothing_absorbed"] == explicit
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in GEMM_OPS]
    ref_out, _ = _compile(arch, "w8a8-int8-sq-dynamic", "reference")
    assert rel_err(out, ref_out) <= 1e-3


@pytest.mark.parametrize("arch,preset", [("llama", "w8a8-int8-sq-dynamic"), ("gemma", "fp8-dynamic")])
def test_bf16_models_keep_the_norms_casts(arch, preset):
    """bf16 models: the fused op rounds where the graph's casts round (Llama ``w * n.to(bf16)``,
    Gemma's ``(n * (1 + w.float())).type_as(x)``, its gain folded from a parameter expression)."""
    out, qb = _compile(arch, preset, "triton", BF16)
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "fuse_norm_quant")
    assert stats["fused_rms"] == 4
    ref_out, _ = _compile(arch, preset, "reference", BF16)
    assert out.dtype == BF16 and rel_err(out, ref_out) <= 1e-3
