"""Tensors that say they live on a GPU, on a machine without one: device mixing caught on CPU.

``shadow_devices()`` is a dispatch mode under which ``on("cuda", t)`` wraps a CPU tensor as a
tensor whose ``.device`` is ``cuda:0``: every op runs on the CPU data, the results stay on the
wrapper's device, factories and ``.to(...)`` given a CUDA device make such tensors, ``.cpu()``
gives a plain tensor back, and an op whose tensors sit on two devices raises the error CUDA
raises ("Expected all tensors to be on the same device") — except what CUDA itself allows: 0-d
CPU tensors as scalars, ``copy_`` across devices, CPU index tensors. Unlike ``FakeTensorMode``
the values are real, so code that reads them (``.item()``, ``tolist()``, thresholds) runs.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["ShadowTensor", "shadow_devices", "on"]

_CPU = torch.device("cpu")
#: ops CUDA itself lets meet a CPU tensor (copies, CPU index tensors, reading a scalar out)
_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::index.Tensor", "aten::index_put_", "aten::index_put",
                    "aten::_local_scalar_dense"}


class ShadowTensor(torch.Tensor):
    """CPU data reporting another device (see the module docstring)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device):
        r = torch.Tensor._make_wrapper_subclass(cls, data.size(), strides=data.stride(),
                                                storage_offset=data.storage_offset(), dtype=data.dtype,
                                                layout=data.layout, device=device,
                                                requires_grad=data.requires_grad)
        r.inner = data
        return r

    def __repr__(self) -> str:
        return f"ShadowTensor({self.inner!r}, device='{self.device}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: ShadowTensor used outside shadow_devices()")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Indexing takes a device guard before dispatch, which a CPU build has none of for CUDA:
        # index the CPU data instead (same mixing rules as the mode).
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            self, index = args
            out = _inner(self)[tree_map(_inner, index)]
            return ShadowTensor(out, self.device) if isinstance(out, torch.Tensor) else out
        if func is torch.Tensor.__setitem__:
            self, index, value = args
            if isinstance(value, torch.Tensor) and value.dim() and value.device != self.device:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {self.device} and {value.device}! (__setitem__)")
            _inner(self)[tree_map(_inner, index)] = _inner(value)
            return None
        if func is torch.Tensor.tolist:
            return _inner(args[0]).tolist()
        try:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
        # A Python binding that takes a device guard before dispatch (``.T``, ...): run it on the
        # CPU data, after the mode's mixing check, and put the results back on the device.
        flat, _ = tree_flatten((args, kwargs))
        _check_one_device([t for t in flat if isinstance(t, torch.Tensor)], str(func))
        device = next(t.device for t in flat if isinstance(t, ShadowTensor))
        out = func(*tree_map(_inner, args), **tree_map(_inner, kwargs))
        return tree_map(lambda t: ShadowTensor(t, device) if isinstance(t, torch.Tensor) else t, out)


def _check_one_device(tensors: list, what: str) -> None:
    devices = {t.device for t in tensors if not (t.device == _CPU and t.dim() == 0)}
    if len(devices) > 1:
        found = sorted(str(d) for d in devices)
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                           f"devices, {found[0]} and {found[1]}! ({what})")


def _inner(t):
    return t.inner if isinstance(t, ShadowTensor) else t


class shadow_devices(TorchDispatchMode):
    """The mode that runs ``ShadowTensor`` ops on their CPU data (see the module docstring).

    While active, ``torch.cuda``'s lazy initialisation is marked as under way (its own
    re-entrancy guard), so that a factory given ``device="cuda"`` reaches this mode instead of
    failing with "Torch not compiled with CUDA enabled".
    """

    def __enter__(self):
        self._had_flag = hasattr(torch.cuda._tls, "is_initializing")
        torch.cuda._tls.is_initializing = True
        return super().__enter__()

    def __exit__(self, *exc):
        if not self._had_flag and hasattr(torch.cuda._tls, "is_initializing"):
            del torch.cuda._tls.is_initializing
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = func._schema.name
        overload = f"{name}.{func._overloadname}" if func._overloadname != "default" else name
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        target = kwargs.get("device")
        if target is not None:
            target = torch.device(target)
            if target.type == "cuda" and target.index is None:
                target = torch.device("cuda", 0)
            kwargs["device"] = _CPU
        else:
            if name not in _CROSS_DEVICE_OK and overload not in _CROSS_DEVICE_OK:
                _check_one_device(tensors, str(func))
            shadowed = [t.device for t in tensors if isinstance(t, ShadowTensor)]
            target = shadowed[0] if shadowed else _CPU
            if name in ("aten::copy_", "aten::index_put_") and args and isinstance(args[0], torch.Tensor):
                target = args[0].device
        unwrap = lambda t: t.inner if isinstance(t, ShadowTensor) else t   # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor) and \
                func._schema.arguments[0].alias_info is not None and func._schema.arguments[0].alias_info.is_write:
            return args[0]                       # in place: the caller's tensor, as torch returns it
        if "out" in kwargs and kwargs["out"] is not None:
            return kwargs["out"]
        if target.type == "cpu":
            return out
        return tree_map(lambda t: ShadowTensor(t, target) if isinstance(t, torch.Tensor) else t, out)


def on(device: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a CPU tensor) as a tensor on ``device``; use under ``shadow_devices()``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return ShadowTensor(t.detach(), dev) if dev.type != "cpu" else t
