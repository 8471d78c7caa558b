"""Tensors that say they live on a GPU, on a machine without one: device mixing caught on CPU.

``shadow_devices()`` is a dispatch mode under which ``on("cuda", t)`` wraps a CPU tensor as a
tensor whose ``.device`` is ``cuda:0``: every op runs on the CPU data, the results stay on the
wrapper's device, factories and ``.to(...)`` given a CUDA device make such tensors, ``.cpu()``
gives a plain tensor back, and an op whose tensors sit on two devices raises the error CUDA
raises ("Expected all tensors to be on the same device") — except what CUDA itself allows: 0-d
CPU tensors as scalars, ``copy_`` across devices, CPU index tensors. Unlike ``FakeTensorMode``
the values are real, so code that reads them (``.item()``, ``tolist()``, thresholds) runs; a
``FakeTensorMode`` used inside (shape propagation) sees each shadow tensor as a fake tensor on
its device, and checks mixing itself. ``module_on`` moves a model's parameters and buffers,
``graph_on`` makes a graph Dynamo captured on the CPU look captured on the device.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["ShadowTensor", "shadow_devices", "on", "module_on", "graph_on"]

_CPU = torch.device("cpu")
#: ops CUDA itself lets meet a CPU tensor (copies, CPU index tensors, reading a scalar out)
_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::index.Tensor", "aten::index_put_", "aten::index_put",
                    "aten::_local_scalar_dense"}


class ShadowTensor(torch.Tensor):
    """CPU data reporting another device (see the module docstring)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device):
        # never an inference tensor: a view op (detach) under inference_mode sets its result's version counter
        with torch.inference_mode(False):
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


def _fake_mode():
    """The active ``FakeTensorMode``, if any (an infra mode: it sees ops after this one)."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


def _inner(t):
    return t.inner if isinstance(t, ShadowTensor) else t


#: factories that build their tensor below the dispatcher's Python key (a CUDA device there
#: fails on a CPU build): made on the CPU and wrapped by ``_ShadowFactories``
_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor}


class _ShadowFactories(TorchFunctionMode):
    """Python bindings that build or move tensors before dispatch, where a CPU build refuses a
    CUDA device: ``torch.tensor(data, device="cuda")`` and its kin, ``cpu_tensor.to("cuda")`` (a
    device guard), and under a ``FakeTensorMode`` indexing of fake CUDA tensors. Each runs on the
    CPU and its results are put on the device (``ShadowTensor``s, or fake tensors under a fake mode)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        fake = _fake_mode()
        target = kwargs.get("device")
        if func in _DATA_FACTORIES and target is not None and torch.device(target).type != "cpu" and fake is None:
            kwargs["device"] = _CPU
            return on(str(target), func(*tree_map(_inner, args), **kwargs))
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        named = [d for d in map(_as_device, flat) if d is not None and d.type != "cpu"]
        if func is torch.Tensor.cuda and not named:
            named = [torch.device("cuda", 0)]
        if not named:
            _check_one_device(tensors, str(func))
        device = named[0] if named else next((t.device for t in tensors if t.device.type != "cpu"), None)
        if device is None:
            raise RuntimeError(f"{func}: no device to shadow")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        if fake is not None:    # fake CUDA tensors: run on fake CPU copies, move the results back
            to_cpu = lambda a: a.to(_CPU) if isinstance(a, torch.Tensor) else _CPU if _as_device(a) else a  # noqa: E731
            out = func(*tree_map(to_cpu, args), **tree_map(to_cpu, kwargs))
            return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, out)
        # real tensors: run on the CPU data; a result sharing an input's memory is copied (a move copies)
        to_cpu = lambda a: _inner(a) if isinstance(a, torch.Tensor) else _CPU if _as_device(a) else a  # noqa: E731
        out = func(*tree_map(to_cpu, args), **tree_map(to_cpu, kwargs))
        shared = {_inner(t).untyped_storage().data_ptr() for t in tensors}
        return tree_map(lambda t: on(str(device), t.clone() if t.untyped_storage().data_ptr() in shared else t)
                        if isinstance(t, torch.Tensor) else t, out)


def _as_device(a) -> torch.device | None:
    if isinstance(a, torch.device):
        return a
    if isinstance(a, str):
        try:
            return torch.device(a)
        except RuntimeError:
            return None
    return None


class shadow_devices(TorchDispatchMode):
    """The mode that runs ``ShadowTensor`` ops on their CPU data (see the module docstring).

    While active, ``torch.cuda``'s lazy initialisation is marked as under way (its own
    re-entrancy guard), so that a factory given ``device="cuda"`` reaches this mode instead of
    failing with "Torch not compiled with CUDA enabled"; ``torch.tensor(..., device="cuda")`` and
    its kin, which build below the dispatcher, are wrapped by a torch-function mode.
    """

    def __enter__(self):
        self._had_flag = hasattr(torch.cuda._tls, "is_initializing")
        torch.cuda._tls.is_initializing = True
        self._factories = _ShadowFactories()
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._factories.__exit__(*exc)
            if not self._had_flag and hasattr(torch.cuda._tls, "is_initializing"):
                del torch.cuda._tls.is_initializing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        fake = _fake_mode()
        if fake is not None:
            # a FakeTensorMode at work (shape propagation): it sees each ShadowTensor as a fake
            # tensor on the shadow's device, and checks device mixing itself
            as_fake = lambda t: fake.from_tensor(t) if isinstance(t, ShadowTensor) else t   # noqa: E731
            return func(*tree_map(as_fake, args), **tree_map(as_fake, kwargs))
        name = func._schema.name
        overload = f"{name}.{func._overloadname}" if func._overloadname != "default" else name
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        target = kwargs.get("device")
        moved_from = None
        if target is not None:
            kwargs["device"] = _CPU
        else:                   # a positional device (``aten.to.device``, seen under inference_mode)
            pos = next((i for i, a in enumerate(args) if isinstance(a, torch.device)), None)
            if pos is not None:
                target, args = args[pos], args[:pos] + (_CPU,) + args[pos + 1:]
                moved_from = args[0] if isinstance(args[0], torch.Tensor) else None
        if target is not None:
            target = torch.device(target)
            if target.type == "cuda" and target.index is None:
                target = torch.device("cuda", 0)
        else:
            if name not in _CROSS_DEVICE_OK and overload not in _CROSS_DEVICE_OK:
                _check_one_device(tensors, str(func))
            shadowed = [t.device for t in tensors if isinstance(t, ShadowTensor)]
            target = shadowed[0] if shadowed else _CPU
            if name in ("aten::copy_", "aten::index_put_") and args and isinstance(args[0], torch.Tensor):
                target = args[0].device
        unwrap = lambda t: t.inner if isinstance(t, ShadowTensor) else t   # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if moved_from is not None and moved_from.device != target and out is unwrap(moved_from):
            out = out.clone()                    # a move to another device copies
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


def module_on(device: str, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (on the CPU) with its parameters and buffers on ``device``, in place; tied
    parameters stay tied. ``module.to("cuda")`` cannot do it: it keeps each ``Parameter`` object and
    swaps its data, which a ``ShadowTensor`` cannot be. Use under ``shadow_devices()``."""
    moved: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = torch.nn.Parameter(on(device, p), requires_grad=False)
                m._parameters[name] = moved[id(p)]
        for name, b in m._buffers.items():
            if b is not None:
                moved.setdefault(id(b), on(device, b))
                m._buffers[name] = moved[id(b)]
    return module


def graph_on(device: str, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` (a graph Dynamo captured on the CPU) as Dynamo would have captured it on ``device``,
    in place: the CPU devices its nodes pass (``arange(..., device=cpu)``, ``.to(device=cpu)``) and
    the traced example values (fake tensors) on ``device``. Run it on tensors on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    swap = lambda a: dev if isinstance(a, torch.device) and a.type == "cpu" else a   # noqa: E731
    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, swap)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        v = node.meta.get("example_value")
        if isinstance(v, torch._subclasses.FakeTensor) and v.device.type == "cpu":
            with v.fake_mode:
                node.meta["example_value"] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=dev)
    gm.recompile()
    return gm
