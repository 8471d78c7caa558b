"""What this machine's CPU is: its model, the ISA extensions that decide kernel speed and
numerics, and the environment variables that limit them (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, ``FBGEMM_ENABLE_INSTRUCTIONS``, ``MKL_ENABLE_INSTRUCTIONS``)."""

from __future__ import annotations

import functools
import os
import platform

import torch

__all__ = ["cpu_model", "cpu_flags", "isa_limits", "machine_class", "describe", "fingerprint"]

#: the flags that change which int8 / bf16 / fp8 kernels are fast or exact
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16",
          "amx_fp16", "asimd", "sve")
#: (flag, class name), the first flag present names the class
_CLASSES = (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx512f", "avx512"), ("avx_vnni", "avx2-vnni"),
            ("avx2", "avx2"), ("asimd", "arm64"))
_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> tuple[str, ...]:
    """The kernel-relevant ISA flags the CPU reports (``/proc/cpuinfo``; empty elsewhere)."""
    present = set((_cpuinfo().get("flags") or _cpuinfo().get("Features") or "").split())
    return tuple(f for f in _FLAGS if f in present)


def isa_limits() -> dict[str, str]:
    """Environment variables set in this process that limit the ISA torch's libraries use."""
    return {v: os.environ[v] for v in _LIMIT_VARS if os.environ.get(v)}


def machine_class() -> str:
    """A short name for the CPU class that decides int8 kernel speed, e.g. ``avx512-vnni``, ``avx2``,
    ``amx``; ``-limited`` is appended when an ISA-limiting variable is set (see ``isa_limits``)."""
    flags = set(cpu_flags())
    name = next((n for flag, n in _CLASSES if flag in flags), platform.machine().lower() or "unknown")
    limits = isa_limits()
    if limits:
        capped = (limits.get("ONEDNN_MAX_CPU_ISA") or limits.get("ATEN_CPU_CAPABILITY") or "").lower()
        name = f"{capped.replace('_', '-') or name}-limited"
    return name


def describe() -> str:
    """One line for a table header: model, relevant flags, ISA limits, torch and thread count."""
    flags = ", ".join(cpu_flags()) or "no ISA flags read"
    limits = "".join(f"; {k}={v}" for k, v in isa_limits().items())
    return (f"{cpu_model()} ({platform.machine()}; {flags}{limits}), {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def fingerprint() -> str:
    """What a kernel timing depends on: CPU model and flags, ISA limits, torch, threads."""
    limits = ",".join(f"{k}={v}" for k, v in sorted(isa_limits().items()))
    return f"{cpu_model()}|{','.join(cpu_flags())}|{limits}|torch {torch.__version__}|{torch.get_num_threads()}t"
