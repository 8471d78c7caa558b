"""The ``inductor`` target: the reference kernels' torch code, compiled by TorchInductor.

Lowering replaces each qcompiler op with the plain torch function behind its reference kernel,
so the graph holds ordinary aten ops around ``torch._int_mm`` (the FP8 GEMMs stay calls to
their reference kernels, see ``OPAQUE_OPS``); the
backend then hands the graph to ``torch._inductor.compile_fx``. Inductor fuses the per-token
quantization (absmax, divide, round, clamp, cast) into the norm before it and the int32 ->
float epilogue (scales, bias) into the ops after it, which on a CPU is most of what separates
an int8 GEMM's speed from a quantized model's. The numerics are the reference's (same torch
operations; inductor's C++ / Triton code may reassociate float reductions, so float outputs
agree to ~1e-6 relative, not bit for bit). Weights stay quantized: inductor is not run with
freezing, so it does not constant-fold dequantized weights into float copies.
"""

from __future__ import annotations

import torch

from qcompiler.core import numerics
from qcompiler.core import reference_kernels as ref

from . import register_backend

__all__ = ["InductorTable", "inductor_table", "compile_graph", "OPAQUE_OPS"]


#: op name -> the plain torch function with the custom op's signature and numerics. The fused
#: GEMMs are not here: the Lower pass gives each the kernel chosen for the machine
#: (``kernel_choice``), whose plain torch code inductor compiles the same way.
_DECOMPOSITIONS = {
    "quantize": ref.quantize_ref,
    "dequantize": ref.dequantize_ref,
    "quantize_per_token": numerics.quantize_per_token,
    "dequantize_int4": ref.dequantize_int4_ref,
}

#: ops a chosen kernel may leave in the graph as calls to their reference kernels (inductor runs
#: them as extern kernels; the quantize ops around them are still decomposed and fused):
#: TorchInductor 2.13's ``_scaled_mm`` lowering wants mat_b column-major and does not keep a
#: transposed constant so.
OPAQUE_OPS = ("fp8_gemm", "w4a8_gemm")


def compile_graph(gm: torch.fx.GraphModule, example_inputs, config_patches: dict | None = None):
    """Compile a lowered graph with TorchInductor (also how target "triton" finishes its graphs);
    ``config_patches``: ``torch._inductor.config`` settings for this compile."""
    from torch._inductor.compile_fx import compile_fx
    # The passes added get_attr tensors (quantized weights, scales) that Dynamo's
    # parameter-to-source map does not know; AOTAutograd asserts on that map only for
    # graphs marked as Dynamo's, so hand it an unmarked copy (the guards stay Dynamo's).
    plain = torch.fx.GraphModule(gm, gm.graph)
    plain.meta = {k: v for k, v in gm.meta.items() if k != "dynamo_compile_id"}
    return compile_fx(plain, example_inputs, config_patches=config_patches)


class InductorTable(dict):
    """{op packet: plain torch function}, plus ``compile_graph(gm, example_inputs)``, which the
    backend calls on the lowered graph."""

    notice: str = ""
    compile_graph = staticmethod(compile_graph)


@register_backend("inductor")
def inductor_table() -> InductorTable:
    ops = torch.ops.qcompiler
    table = InductorTable()
    for name, fn in _DECOMPOSITIONS.items():
        table[getattr(ops, name)] = fn
    return table
