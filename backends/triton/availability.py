"""Where the Triton kernels can run: a CUDA GPU, Triton's CPU interpreter, or nowhere.

The decision is taken once, the first time the backend is asked for (never at
``import qcompiler``), and the kernel modules — whose ``@triton.jit`` decorators read
``TRITON_INTERPRET`` when they run — are imported only after it. This module never sets
``TRITON_INTERPRET``: to use the interpreter, set it in the environment before the first
compile with ``target="triton"``.

- ``gpu``: triton imports and ``torch.cuda.is_available()``; kernels take CUDA tensors.
- ``interpreter``: triton imports and ``TRITON_INTERPRET=1``; kernels run on CPU tensors
  (slowly: this mode is for correctness tests).
- ``unavailable``: otherwise. The backend says so once (a logged warning and a ``warnings``
  warning) and every op runs the kernel chosen for the machine; each compile's report repeats the notice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Availability", "availability", "notify_unavailable", "fp8_supported"]

log = logging.getLogger(__name__)

GPU, INTERPRETER, UNAVAILABLE = "gpu", "interpreter", "unavailable"


@dataclass(frozen=True)
class Availability:
    """The mode the Triton kernels run in, and why."""

    mode: str       # "gpu", "interpreter" or "unavailable"
    reason: str

    @property
    def runs_kernels(self) -> bool:
        return self.mode != UNAVAILABLE

    @property
    def interpreter(self) -> bool:
        return self.mode == INTERPRETER


@functools.cache
def availability() -> Availability:
    """Detect the mode once per process (see the module docstring)."""
    if importlib.util.find_spec("triton") is None:
        return Availability(UNAVAILABLE, "triton is not installed (pip install 'qcompiler[triton]')")
    try:
        knobs = importlib.import_module("triton.knobs")
        interpret = bool(knobs.runtime.interpret)
    except Exception as e:   # a triton too old or broken to import
        return Availability(UNAVAILABLE, f"triton cannot be imported: {e!r}")
    if interpret:
        return Availability(INTERPRETER, "TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter")
    if torch.cuda.is_available():
        return Availability(GPU, f"CUDA device {torch.cuda.get_device_name()}")
    return Availability(UNAVAILABLE, "no CUDA GPU and TRITON_INTERPRET is not set")


@functools.cache
def notify_unavailable() -> str:
    """The one-time notice when kernels cannot run; returns its text (empty when they can)."""
    avail = availability()
    if avail.runs_kernels:
        return ""
    msg = f"triton backend: {avail.reason}; every op runs the kernel chosen for this machine (reference target)"
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


@functools.cache
def fp8_supported() -> bool:
    """FP8 ``tl.dot`` needs compute capability 8.9+ on a GPU; the interpreter emulates it."""
    avail = availability()
    if avail.mode == GPU:
        return torch.cuda.get_device_capability() >= (8, 9)
    return avail.interpreter
