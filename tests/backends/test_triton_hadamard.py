"""The online Hadamard transform (``qcompiler::hadamard_transform``): its reference is the orthogonal
matrix ``online_hadamard`` builds (float64), and the Triton kernel equals the reference bit for bit
(same butterflies, same summation order) in float32, bfloat16 and float16."""

from __future__ import annotations

import pytest
import torch

import triton_interpreter  # noqa: F401  (interpreter without a GPU; skip without triton)

from qcompiler.algorithms.hadamard import online_factors, online_hadamard
from qcompiler.backends.triton.availability import availability
from qcompiler.core.reference_kernels import hadamard_transform_ref

if not availability().runs_kernels:
    pytest.skip(f"Triton kernels cannot run here: {availability().reason}", allow_module_level=True)

from qcompiler.backends.triton.hadamard import hadamard_transform  # noqa: E402

DEVICE = "cuda" if availability().mode == "gpu" else "cpu"
# (rows, n): powers of two; Paley blocks (96 = 12 x 8, 576 = 72 x 8: SmolLM2's hidden, 1536 = 12 x 128: its MLP)
SHAPES = [(1, 8), (5, 64), (3, 96), (2, 576), (4, 1536)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,n", SHAPES, ids=lambda v: str(v))
def test_kernel_equals_reference_bit_for_bit(rows, n, dtype):
    h_block, _, scale = online_hadamard(n)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE)
    out = hadamard_transform(x, h_block.to(DEVICE), scale)
    ref = hadamard_transform_ref(x.cpu(), h_block, scale)
    assert out.dtype == dtype and torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("n", [8, 96, 576, 1536])
def test_reference_is_the_orthogonal_matrix(n):
    """``y = D x`` with ``D = (h_block kron H_p) / sqrt(n)`` orthogonal (float64 reference, relative error)."""
    h_block, dense, scale = online_hadamard(n)
    assert torch.allclose(dense @ dense.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = x @ dense.t()
    assert ((hadamard_transform_ref(x, h_block, scale) - exact).norm() / exact.norm()).item() < 1e-13
    y32 = hadamard_transform_ref(x.float(), h_block, scale).double()
    assert ((y32 - exact).norm() / exact.norm()).item() < 1e-6


def test_factors_and_bad_sizes():
    assert online_factors(1536) == (12, 128) and online_factors(576) == (72, 8) and online_factors(4096) == (1, 4096)
    assert online_factors(6) is None
    with pytest.raises(ValueError, match="no online Hadamard transform of order 6"):
        online_hadamard(6)
    with pytest.raises(ValueError, match="last dim 100 must be"):
        torch.ops.qcompiler.hadamard_transform(torch.zeros(2, 100), torch.ones(12, 12), 0.1)
    h_block, _, scale = online_hadamard(96)
    with pytest.raises(ValueError, match="is not h_block's order"):
        hadamard_transform(torch.zeros(2, 100, device=DEVICE), h_block.to(DEVICE), scale)
