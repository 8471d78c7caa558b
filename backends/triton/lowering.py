"""The Triton backend's lowering table and the kernels of the ``qcompiler::triton_<op>`` ops.

Each op in ``qcompiler.core.ops.TRITON_KERNEL_OPS`` has a twin ``qcompiler::triton_<op>`` declared
in ``qcompiler.core.ops`` (same schema plus ``*, int report_id=0``, same fake kernel). This module
registers its CPU and CUDA kernel: run the Triton launcher when ``checks.CHECKS[op]`` accepts the
arguments, else the generic op (its reference kernel), logging the reason once per op and reason
and recording the call in the compile report ``report_id`` names (``runtime_fallbacks``: calls
per "op: reason", one warning per reason), so no fallback goes unreported. Reports are held
weakly in a registry (``register_report(report)`` gives the id); id 0 records nothing.

The table maps each generic op packet to a ``TritonKernel``. The Lower pass asks its
``unsupported(*args)`` on the traced graph's fake tensors (an op that fails keeps its reference
kernel, the report says why) and rewrites the node with ``bind(report)``: target the twin's
OpOverload, add ``report_id``. The lowered graph holds only OpOverloads, so it traces with fake
tensors (any device), and ``compile_graph`` hands it to TorchInductor, which compiles the rest of
the graph around the kernels (extern calls). Under Inductor's CUDA-graph capture
(``torch._inductor.config.triton.cudagraphs``) a replay runs what the captured call ran: fallbacks
are counted when captured, not per replay.

When the kernels cannot run at all (no GPU, no interpreter, no triton: see ``availability``) the
table is empty, carries the one-time notice in ``notice``, and the graph runs eagerly.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import weakref
from typing import Callable

import torch

from qcompiler.core.ops import TRITON_KERNEL_OPS, triton_op

from .availability import availability, notify_unavailable
from .checks import CHECKS

__all__ = ["TritonKernel", "TRITON_KERNELS", "LoweringTable", "lowering_table", "KERNELS", "register_report"]

log = logging.getLogger(__name__)

#: op name -> (kernel module, launcher)
KERNELS: dict[str, tuple[str, str]] = {
    "int8_gemm": ("gemm_w8a8", "int8_gemm"),
    "fp8_gemm": ("gemm_w8a8", "fp8_gemm"),
    "weight_only_gemm": ("gemm_weight_only", "weight_only_gemm"),
    "int4_gemm": ("gemm_weight_only", "int4_gemm"),
    "w4a8_gemm": ("gemm_w4a8", "w4a8_gemm"),
    "norm_quantize_per_token": ("norm_quant", "norm_quantize_per_token"),
    "hadamard_transform": ("hadamard", "hadamard_transform"),
}
assert set(KERNELS) == set(TRITON_KERNEL_OPS), "every qcompiler::triton_<op> needs a launcher"

# ----------------------------------------------------------------------------- report registry

_REPORTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # id -> CompileReport
_NEXT_ID = itertools.count(1)
_WARNED: set[tuple[str, str]] = set()


def register_report(report) -> int:
    """The id under which ``report`` (a ``CompileReport``, held weakly) records run-time fallbacks."""
    for rid, held in _REPORTS.items():
        if held is report:
            return rid
    rid = next(_NEXT_ID)
    _REPORTS[rid] = report
    return rid


# ----------------------------------------------------------------------------- kernels


class TritonKernel:
    """One op's Triton kernel: its ``qcompiler::triton_<name>`` op, check, launcher and reference."""

    def __init__(self, name: str):
        self.name = name
        self.__name__ = f"triton_{name}"
        self.op = triton_op(name)
        self.reference = getattr(torch.ops.qcompiler, name).default
        self._module, self._launcher = KERNELS[name]
        self._check = CHECKS[name]
        self._kernel: Callable | None = None

    def unsupported(self, *args, **kwargs) -> str | None:
        """Why the Triton kernel cannot take these arguments (real or fake tensors), or None."""
        if not availability().runs_kernels:
            return availability().reason
        return self._check(*args, **kwargs)

    def kernel(self) -> Callable:
        """The launcher (imports triton and defines the @triton.jit kernels on first use)."""
        if self._kernel is None:
            module = importlib.import_module(f"{__package__}.{self._module}")
            self._kernel = getattr(module, self._launcher)
        return self._kernel

    def bind(self, report) -> tuple[torch._ops.OpOverload, dict]:
        """The node target and the keyword arguments that make a call record its fallbacks in ``report``."""
        return self.op, {"report_id": register_report(report)}

    def __call__(self, *args, report_id: int = 0, **kwargs):
        """The registered CPU / CUDA kernel of ``qcompiler::triton_<name>``."""
        reason = self.unsupported(*args, **kwargs)
        if reason is None:
            return self.kernel()(*args, **kwargs)
        if (self.name, reason) not in _WARNED:
            _WARNED.add((self.name, reason))
            log.warning("triton backend: %s runs its reference kernel: %s", self.name, reason)
        report = _REPORTS.get(report_id) if report_id else None
        if report is not None:
            report.note_runtime_fallback(f"triton: {self.name} ran its reference kernel at run time: {reason}")
        return self.reference(*args, **kwargs)

    def __repr__(self) -> str:
        return f"TritonKernel({self.name!r})"


#: op name -> TritonKernel, each registered as its op's CPU and CUDA kernel (CPU: the interpreter)
TRITON_KERNELS = {name: TritonKernel(name) for name in KERNELS}
for _k in TRITON_KERNELS.values():
    torch.library.register_kernel(_k.op, ("cpu", "cuda"), _k)


def compile_graph(gm: torch.fx.GraphModule, example_inputs):
    """Finish the lowered graph with TorchInductor (the kernels stay opaque extern calls).

    ``emulate_precision_casts``: Inductor rounds bf16 / fp16 intermediates where eager torch does
    (by default a fused kernel keeps them in fp32), so the code around the kernels has the reference
    target's numerics (tiny bf16 Llama: 0.6% relative off the reference without it, bit-equal with it).
    """
    from qcompiler.backends.inductor import compile_graph as inductor_compile
    return inductor_compile(gm, example_inputs, config_patches={"emulate_precision_casts": True})


class LoweringTable(dict):
    """{op packet: TritonKernel}, plus ``notice``: why no kernel can run here (empty when they can),
    and ``compile_graph`` (None when no kernel runs: the graph then runs the reference kernels eagerly)."""

    notice: str = ""
    compile_graph = None
    fuses_norm_quantize = True     # the fuse_norm_quant pass runs for this target (its kernel: norm_quant.py)
    fuses_kv_decode_attention = True   # attention over the quantized KV cache as one op (decode_attention.py)


@functools.cache
def lowering_table() -> LoweringTable:
    """The table, built once per process (after the availability decision)."""
    table = LoweringTable()
    if not availability().runs_kernels:
        table.notice = notify_unavailable()
        return table
    ops = torch.ops.qcompiler
    for name, kernel in TRITON_KERNELS.items():
        table[getattr(ops, name)] = kernel
    from .decode_attention import register as register_decode_attention
    table[ops.kv_decode_attention] = register_decode_attention()
    table.compile_graph = compile_graph
    return table
