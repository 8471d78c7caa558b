"""The Triton backend's lowering table: {op packet: ``TritonOp``}.

A ``TritonOp`` has the op's signature. Called, it runs the Triton launcher when
``checks.CHECKS[op]`` accepts the arguments, else the op's reference kernel (logging the
reason once per op and reason). The Lower pass installs ``op.reporting(report)``, a copy that
also records each such run-time fallback in that compile report (``runtime_fallbacks``: calls
per "op: reason", and one warning per reason), so no fallback goes unreported. ``unsupported(*args)`` exposes the same check to the Lower
pass, which runs it on the traced graph's fake tensors, keeps an op that fails it on its
reference kernel and records why in the compile report.

When the kernels cannot run at all (no GPU, no interpreter, no triton: see
``availability``) the table is empty and carries the one-time notice in ``notice``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
from typing import Callable

import torch

from qcompiler.backends import reference as ref

from . import fused_ops
from .availability import availability, notify_unavailable
from .checks import CHECKS

__all__ = ["TritonOp", "LoweringTable", "lowering_table", "KERNELS"]

log = logging.getLogger(__name__)

#: op name -> (kernel module, launcher, reference kernel)
KERNELS: dict[str, tuple[str, str, Callable]] = {
    "int8_gemm": ("gemm_w8a8", "int8_gemm", ref.int8_gemm_ref),
    "fp8_gemm": ("gemm_w8a8", "fp8_gemm", ref.fp8_gemm_ref),
    "weight_only_gemm": ("gemm_weight_only", "weight_only_gemm",
                         lambda x, w_q, w_scale, w_zero, bias, group_size=0:
                         ref.weight_only_gemm_ref(x, w_q, w_scale, w_zero, bias, group_size or None)),
    "int4_gemm": ("gemm_weight_only", "int4_gemm", ref.int4_gemm_ref),
    "w4a8_gemm": ("gemm_w4a8", "w4a8_gemm", ref.w4a8_gemm_ref),
    "norm_quantize_per_token": ("norm_quant", "norm_quantize_per_token", fused_ops.norm_quantize_per_token_ref),
}


class TritonOp:
    """One lowered op: the Triton launcher when the arguments suit it, else the reference kernel."""

    def __init__(self, name: str):
        self.name = name
        self.__name__ = f"triton_{name}"
        self._module, self._launcher, self.reference = KERNELS[name]
        self._check = CHECKS[name]
        self._kernel: Callable | None = None
        self._warned: set[str] = set()
        self._report = None

    def reporting(self, report) -> "TritonOp":
        """This op, recording its run-time fallbacks in ``report`` (a ``CompileReport``)."""
        op = copy.copy(self)
        op._report = report
        return op

    def unsupported(self, *args, **kwargs) -> str | None:
        """Why the Triton kernel cannot take these arguments (real or fake tensors), or None."""
        return self._check(*args, **kwargs)

    def kernel(self) -> Callable:
        if self._kernel is None:   # imports triton and defines the @triton.jit kernels
            module = importlib.import_module(f"{__package__}.{self._module}")
            self._kernel = getattr(module, self._launcher)
        return self._kernel

    def __call__(self, *args, **kwargs):
        reason = self._check(*args, **kwargs)
        if reason is None:
            return self.kernel()(*args, **kwargs)
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("triton backend: %s runs its reference kernel: %s", self.name, reason)
        if self._report is not None:
            self._report.note_runtime_fallback(f"triton: {self.name} ran its reference kernel at run time: {reason}")
        return self.reference(*args, **kwargs)

    def __repr__(self) -> str:
        return f"TritonOp({self.name!r})"


class LoweringTable(dict):
    """{op packet: TritonOp}, plus ``notice``: why no kernel can run here (empty when they can)."""

    notice: str = ""


@functools.cache
def lowering_table() -> LoweringTable:
    """The table, built once per process (after the availability decision)."""
    table = LoweringTable()
    if not availability().runs_kernels:
        table.notice = notify_unavailable()
        return table
    ops = torch.ops.qcompiler
    for name in KERNELS:
        table[getattr(ops, name)] = TritonOp(name)
    return table
