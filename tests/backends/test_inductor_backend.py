"""The ``inductor`` target: the reference numerics compiled by TorchInductor.

Tiny Llama and GPT-2 (Conv1D) through ``target="inductor"`` against ``target="reference"``
for a static, a dynamic, a weight-only and an INT4 recipe; the lowered graph holds no
qcompiler op (everything is plain torch for inductor to fuse) and the weights stay quantized.
"""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler.backends.inductor import OPAQUE_OPS
from qcompiler.core.ops import GEMM_OPS, QDQ_OPS
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model, token_batches

RECIPES = ["w8a8-int8-sq", "w8a8-int8-sq-dynamic", "w8a16", "w4a16-rtn", "fp8", "fp8-dynamic"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model, recipe, target):
    torch._dynamo.reset()
    qb = qcompiler.backend(recipe, calibration=calibration_batches(), target=target, progress=False)
    compiled = torch.compile(model, backend=qb)
    with torch.no_grad():
        logits = compiled(token_batches(1, 12, seed=7)[0]).logits
    return logits, qb


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inductor_matches_reference(arch, recipe):
    model = tiny_model(arch)
    out, qb = _run(model, recipe, "inductor")
    ref, ref_qb = _run(model, recipe, "reference")
    assert rel_err(out, ref) <= 1e-4
    gm = qb.graphs[-1]
    opaque = tuple(getattr(torch.ops.qcompiler, name) for name in OPAQUE_OPS)
    left = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in GEMM_OPS + QDQ_OPS]
    assert all(t in opaque for t in left)
    assert qb.report.target == "inductor"
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "lower")
    ref_gemms = [n for n in ref_qb.graphs[-1].graph.nodes if n.op == "call_function" and n.target in GEMM_OPS]
    lowered = sum(v for k, v in stats.items() if k.startswith("lowered_") and "gemm" in k)
    assert ref_gemms and lowered + len(left) == len(ref_gemms)
    # the lowered graph keeps the quantized weights (int8 / fp8 / packed uint8), no float copies of them
    before, after = qb.report.weight_bytes()
    assert after < before
    stored = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    quantized = (torch.int8, torch.uint8, torch.float8_e4m3fn)
    assert any(t.dtype in quantized for t in stored if isinstance(t, torch.Tensor))


def test_inductor_int8_activations_equal_reference():
    """The quantize step is elementwise torch code: inductor's kernel gives the same int8 values."""
    from qcompiler.backends.inductor import inductor_table
    table = inductor_table()
    qpt = table[torch.ops.qcompiler.quantize_per_token]
    x = torch.randn(37, 96) * torch.logspace(-2, 2, 96)
    eager_q, eager_s = torch.ops.qcompiler.quantize_per_token(x, "int8")
    q, s = torch.compile(lambda t: qpt(t, "int8"), backend="inductor")(x)
    assert torch.equal(s, eager_s)
    assert torch.equal(q, eager_q)
