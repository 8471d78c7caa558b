"""Which GEMM kernel each quantized layer runs on this machine.

For every fused GEMM the lowering asks ``KernelChooser.choose``. The candidates are the op's
kernels in ``gemm_kernels.KERNELS`` that this device and torch build have and that take the
layer's argument forms. Each candidate's numerics are probed once per process on worst-case
operands (``probe``: exact, float32 sums, or int16 pair saturation; a kernel that is none of
these is dropped), then refined for the layer's weight (``gemm_kernels.layer_contract``). The
policy admits:

- ``"auto"`` (default): any probed contract, the fastest wins;
- ``"exact"``: only kernels at least as exact as the op's reference kernel (int8: bit-exact);
- ``"reference"``: the op's reference kernel, no timing;
- a kernel name (``"onednn-u8s8"``) or ``{op: name}``: that kernel where it exists, an error where it
  cannot run.

Among admitted kernels the fastest is chosen by a short micro-benchmark on the layer's own
weight and a synthetic activation of the graph's row count (bucketed: 1, 16, 128, 512), run the
way the target runs it (eagerly for ``reference``, compiled by TorchInductor for ``inductor``).
Timings are cached per process and on disk (``$QCOMPILER_CACHE/kernel_timings.json``, keyed by
``machine.fingerprint()`` and ``TIMINGS_VERSION``; ``QCOMPILER_KERNEL_CACHE=0`` turns the disk cache off). GEMMs too small
to time reliably (``MIN_WORK``) keep the reference kernel when it is admitted.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qcompiler.core import numerics
from qcompiler.errors import RecipeError, UnsupportedError
from qcompiler.core.formats import ActivationSource, op_format

from . import machine
from .gemm_kernels import KERNELS, REFERENCE_CONTRACT, Contract, GemmKernel, int16_pair_reference, kernels_for, \
    layer_contract

__all__ = ["ActivationSource", "Choice", "KernelChooser", "POLICIES", "probe", "check_policy", "MIN_WORK", "BUCKETS"]

log = logging.getLogger(__name__)

POLICIES = ("auto", "exact", "reference")
#: multiply-adds below which a GEMM is not timed (timer noise exceeds the differences; 1M is
#: ~0.1 ms in float32 on 2 cores, where a kernel 10x slower than the rest, e.g. ``_int_mm`` without
#: VNNI or ``_scaled_mm`` on a CPU, still shows)
MIN_WORK = 1 << 20
#: row counts the benchmark uses: the smallest bucket >= the graph's rows (the last one above)
BUCKETS = (1, 16, 128, 512)
#: the timing of the float model's linear at the same shape, the bar a quantized kernel has to clear
_FLOAT = "float32 linear"
#: the same float linear on oneDNN's GEMM: what the float model alone would gain from that library
_FLOAT_ONEDNN = "oneDNN float32 linear"
#: the float linears timed as bars, by name
_FLOAT_LINEARS = {_FLOAT: lambda x, w: F.linear(x, w),
                  _FLOAT_ONEDNN: lambda x, w: torch.ops.qcompiler.onednn_linear(x, w, None)}


@dataclass(frozen=True)
class Choice:
    """The kernel one GEMM runs, the contract it keeps for that layer and why it was chosen."""

    kernel: GemmKernel
    contract: Contract
    reason: str


def check_policy(policy: str | Mapping[str, str]) -> None:
    """Raise ``RecipeError`` for a policy that names no policy or kernel."""
    names = {k.name for k in KERNELS}
    items = policy.items() if isinstance(policy, Mapping) else [(None, policy)]
    for op, name in items:
        if op is not None and op not in REFERENCE_CONTRACT:
            raise RecipeError(f"kernels: unknown op {op!r}; known: {sorted(REFERENCE_CONTRACT)}")
        if name not in POLICIES and name not in names:
            raise RecipeError(f"kernels={name!r} is neither a policy {list(POLICIES)} nor a kernel "
                              f"{sorted(names)}")
        if op is not None and name not in POLICIES and name not in {k.name for k in KERNELS if k.op == op}:
            raise RecipeError(f"kernels: {op} has no kernel {name!r}; its kernels: "
                              f"{[k.name for k in KERNELS if k.op == op]}")


# ---- numerics probes -------------------------------------------------------------------------

_PROBES: dict[tuple[str, str, str], tuple[Contract | None, str]] = {}


def _probe_int8(kernel: GemmKernel, device: torch.device) -> tuple[Contract | None, str]:
    g = torch.Generator().manual_seed(0)
    k = 64
    a = torch.randint(-127, 128, (6, k), generator=g).to(torch.int8)
    a[0], a[1], a[2, 0::2], a[2, 1::2] = 127, -128, 127, -127
    w = torch.randint(-127, 128, (5, k), generator=g).to(torch.int8)
    w[0], w[1], w[2, 0::2], w[2, 1::2] = 127, -127, 127, -127
    exact = (a.double() @ w.double().t())
    a_d, w_d = a.to(device), w.to(device)
    w_arg = kernel.prepare(w_d, None) if kernel.prepare else w_d
    one = torch.tensor(1.0, device=device)
    out = kernel.run(a_d, one, w_arg, torch.ones(5, 1, device=device), None, torch.float32).double().cpu()
    if torch.equal(out, exact):
        return Contract.EXACT, "int32 sums exact on worst-case operands"
    if torch.equal(out, int16_pair_reference(a, w).double()):
        return Contract.INT16_PAIRS, "products summed in saturating int16 pairs (no VNNI on this CPU)"
    return None, f"wrong int8 sums on worst-case operands (max error {float((out - exact).abs().max()):.0f})"


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300))


def _probe_float(kernel: GemmKernel, device: torch.device) -> tuple[Contract | None, str]:
    g = torch.Generator().manual_seed(0)
    k, n = 96, 5
    w_scale = torch.rand(n, 1, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    if kernel.op == "fp8_gemm":
        a = torch.randn(6, k, generator=g).to(torch.float8_e4m3fn)
        w = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn)
        a_scale = torch.tensor(0.5)
        ref = (a.double() * 0.5) @ (w.double() * w_scale.double()).t() + bias.double()
        args = [a, a_scale, w, w_scale, bias, torch.float32]
    elif kernel.op == "weight_only_gemm":
        x = torch.randn(6, k, generator=g)
        w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
        ref = x.double() @ (w.double() * w_scale.double()).t() + bias.double()
        args = [x, w, w_scale, None, bias, 0]
    elif kernel.op == "int4_gemm":
        from qcompiler.core.packing import pack_int4
        x = torch.randn(6, k, generator=g)
        q = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
        zero = torch.randint(0, 16, (n, k // 32), generator=g).to(torch.uint8)
        scale = torch.rand(n, k // 32, generator=g) + 0.5
        w_deq = (q.double() - zero.double().repeat_interleave(32, 1)) * scale.double().repeat_interleave(32, 1)
        ref = x.double() @ w_deq.t() + bias.double()
        args = [x, pack_int4(q), scale, zero, bias, 32, k]
    else:
        return REFERENCE_CONTRACT[kernel.op], "reference kernel"
    if kernel.accepts(*args):
        return None, f"probe arguments refused: {kernel.accepts(*args)}"
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]
    if kernel.prepare:
        args[kernel.weight_arg] = kernel.prepare(args[kernel.weight_arg], args)
    err = _rel(kernel.run(*args), ref)
    if err <= 1e-5:
        return Contract.FP32, f"float32 sums (probe relative error {err:.1e})"
    return None, f"probe relative error {err:.1e} exceeds float32 sums' 1e-5"


def probe(kernel: GemmKernel, device: torch.device) -> tuple[Contract | None, str]:
    """The contract ``kernel`` keeps on this machine (None: unusable) and a note; cached per process."""
    key = (kernel.op, kernel.name, str(device))
    if key not in _PROBES:
        reason = kernel.available(device)
        if reason:
            _PROBES[key] = (None, reason)
        else:
            try:
                with torch.no_grad():
                    _PROBES[key] = _probe_int8(kernel, device) if kernel.op == "int8_gemm" \
                        else _probe_float(kernel, device)
            except Exception as e:   # a kernel this build / machine cannot run
                _PROBES[key] = (None, f"failed on this machine: {type(e).__name__}: {e}")
        log.debug("probe %s/%s on %s: %s", kernel.op, kernel.name, device, _PROBES[key])
    return _PROBES[key]


# ---- timing ----------------------------------------------------------------------------------

def _bucket(m: int | None) -> int:
    if m is None:
        return BUCKETS[-1]
    return next((b for b in BUCKETS if m <= b), BUCKETS[-1])


def _synthetic(value: Any, rows: int, device: torch.device, g: torch.Generator) -> Any:
    """A real tensor like ``value`` (a fake or real activation) with its leading dims folded to ``rows``;
    a 0-d tensor (a static activation scale, a real constant) is kept as it is."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    shape = (rows, int(value.shape[-1]))
    if value.dtype == torch.int8:
        t = torch.randint(-127, 128, shape, generator=g).to(torch.int8)
    elif value.dtype == torch.uint8:
        t = torch.randint(0, 256, shape, generator=g).to(torch.uint8)
    elif value.dtype == torch.float8_e4m3fn:
        t = torch.randn(shape, generator=g).to(torch.float8_e4m3fn)
    elif shape[1] == 1:    # a per-token scale
        t = torch.rand(shape, generator=g) * 0.01 + 1e-3
    else:
        t = torch.randn(shape, generator=g).to(value.dtype)
    return t.to(device)


def _time_all(fns: dict[str, Any], inputs: list, budget_s: float = 0.4, max_rounds: int = 9,
              slow: float = 5.0) -> dict[str, float]:
    """Minimum wall time of each ``fn(*inputs)``, timed in interleaved rounds after one warm-up call
    each (so that a burst of load on a shared machine hits every candidate alike). A candidate more
    than ``slow`` times slower than the best in a round is not timed again."""
    for fn in fns.values():
        fn(*inputs)
    best = {name: math.inf for name in fns}
    active, spent, rounds = list(fns), 0.0, 0
    while active and rounds < max_rounds and (rounds < 3 or spent < budget_s):
        for name in active:
            t0 = time.perf_counter()
            fns[name](*inputs)
            dt = time.perf_counter() - t0
            best[name], spent = min(best[name], dt), spent + dt
        fastest = min(best.values())
        active = [name for name in active if best[name] <= slow * fastest]
        rounds += 1
    return best


def _callable(kernel: GemmKernel, args: list, act_idx: tuple[int, ...], target: str,
              source: ActivationSource | None = None):
    """``fn(*inputs)`` running ``kernel`` on ``args`` as ``target`` runs it: the inputs are the activation
    arguments, or with ``source`` the float activation, quantized as the graph quantizes it."""
    if target != "inductor" and source is None:
        def eager(*acts):
            full = list(args)
            for i, a in zip(act_idx, acts):
                full[i] = a
            return kernel.run(*full)
        return eager
    root, graph = torch.nn.Module(), torch.fx.Graph()
    nodes: list[Any] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and (i not in act_idx or (source is not None and i == 1 and source.kind == "static")):
            setattr(root, f"const{i}", a)       # the lowered graph's form: constants as get_attr
            nodes.append(graph.get_attr(f"const{i}"))
        elif i in act_idx and source is None:
            nodes.append(graph.placeholder(f"act{i}"))
        else:
            nodes.append(a)
    run = kernel.run
    if source is not None:
        x = graph.placeholder("x")
        if source.kind == "static":
            q = graph.call_function(numerics.quantize, (x, nodes[1], None, source.dtype))
        else:
            qpt = graph.call_function(numerics.quantize_per_token, (x, source.dtype))
            q, nodes[1] = (graph.call_function(operator.getitem, (qpt, i)) for i in (0, 1))
        nodes[0] = q
        if kernel.from_float is not None:
            nodes[0], run = x, kernel.from_float
    graph.output((graph.call_function(run, tuple(nodes)),))
    graph.eliminate_dead_code()
    gm = torch.fx.GraphModule(root, graph)
    if target != "inductor":
        return lambda *inputs: gm(*inputs)[0]
    from torch._inductor.compile_fx import compile_fx
    example = [a for i, a in enumerate(args) if i in act_idx] if source is None else [args[0]]
    with torch._guards.tracing(None):
        compiled = compile_fx(gm, example)
    return lambda *inputs: compiled(*inputs)


#: Bumped when a kernel's code or what its timing covers changes (v2: fp8 dequantize kernels fold the
#: activation quantize, fp8-words added), so that timings cached by an older version are not reused.
TIMINGS_VERSION = 2


class _DiskCache:
    """Kernel timings kept between processes: {fingerprint: {entry key: {kernel: seconds}}}."""

    def __init__(self):
        enabled = os.environ.get("QCOMPILER_KERNEL_CACHE", "1") not in ("0", "off", "false", "")
        root = os.environ.get("QCOMPILER_CACHE")
        self.path = (Path(root).expanduser() if root else Path.home() / ".cache" / "qcompiler") / "kernel_timings.json"
        self.enabled = enabled
        self.print = f"v{TIMINGS_VERSION}|{machine.fingerprint()}"

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict[str, float] | None:
        return self._load().get(self.print, {}).get(key) if self.enabled else None

    def put(self, key: str, timings: dict[str, float]) -> None:
        if not self.enabled:
            return
        data = self._load()
        data.setdefault(self.print, {})[key] = timings
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".part")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:   # a read-only home: keep the in-process cache only
            log.debug("kernel timing cache not written: %s", e)


_TIMINGS: dict[str, dict[str, float]] = {}


# ---- the choice ------------------------------------------------------------------------------

class KernelChooser:
    """Chooses each GEMM's kernel under one policy for one target (``reference`` or ``inductor``)."""

    def __init__(self, target: str = "reference", policy: str | Mapping[str, str] = "auto"):
        check_policy(policy)
        self.target, self.policy = target, policy
        self._disk = _DiskCache()
        self.timed = 0          # micro-benchmarks run by this chooser (not served from a cache)
        self.seconds = 0.0

    def _policy_for(self, op: str) -> str:
        return self.policy.get(op, "auto") if isinstance(self.policy, Mapping) else self.policy

    def choose(self, op: str, args: list, device: torch.device, source: ActivationSource | None = None) -> Choice:
        """The kernel for one ``op`` node; ``args`` are its arguments with constants as real tensors
        and activations as traced (fake) values or None when unknown; ``source``: how the graph quantizes
        the activation (timed in front of every candidate), None to time the kernels alone."""
        policy = self._policy_for(op)
        candidates = kernels_for(op, device)
        reference = next(k for k in candidates if k.reference)
        w = args[reference.weight_arg]
        if policy == "reference":
            return Choice(reference, REFERENCE_CONTRACT[op], "kernels='reference'")
        admitted: list[tuple[GemmKernel, Contract, str]] = []
        refused: list[str] = []
        for k in candidates:
            if policy not in POLICIES and k.name != policy:
                continue
            why = k.accepts(*args)
            contract, note = probe(k, device) if not why else (None, why)
            if contract is None:
                refused.append(f"{k.name}: {note}")
                continue
            contract, layer_note = layer_contract(k, contract, w)
            if policy == "exact" and contract.strength < REFERENCE_CONTRACT[op].strength:
                refused.append(f"{k.name}: {contract.value} ({layer_note}) is weaker than kernels='exact' admits")
                continue
            admitted.append((k, contract, layer_note or note))
        if not admitted:
            if policy in POLICIES:   # the reference kernel always runs
                return Choice(reference, REFERENCE_CONTRACT[op], "; ".join(refused))
            raise UnsupportedError(f"kernels={policy!r} cannot run {op} here: {'; '.join(refused)}")
        if len(admitted) == 1:
            k, contract, note = admitted[0]
            return Choice(k, contract, f"the only admitted kernel ({note})"
                          + (f"; refused: {'; '.join(refused)}" if refused else ""))
        return self._fastest(op, args, device, admitted, reference, source)

    def _fastest(self, op, args, device, admitted, reference, source=None) -> Choice:
        act_idx = op_format(op).activation_args    # synthesized for timing
        acts = [args[i] for i in act_idx]
        w = args[reference.weight_arg]
        n = int(w.shape[0])
        k_dim = int(acts[0].shape[-1]) if isinstance(acts[0], torch.Tensor) else int(w.shape[-1])
        rows = None
        if isinstance(acts[0], torch.Tensor):
            try:
                rows = math.prod(int(s) for s in acts[0].shape[:-1])
            except (TypeError, ValueError):   # symbolic rows
                rows = None
        m = _bucket(rows)
        by_name = {k.name: (k, c, note) for k, c, note in admitted}
        if acts[0] is None or m * n * k_dim < MIN_WORK:
            pick = by_name.get(reference.name) or admitted[0]
            why = "no traced activation shape" if acts[0] is None else f"too small to time (M*N*K = {m * n * k_dim})"
            return Choice(pick[0], pick[1], f"{why}: {'reference kernel' if pick[0].reference else pick[0].name}"
                          f" ({pick[2]})")
        forms = ",".join(f"{a.dtype}{tuple(a.shape)}" if isinstance(a, torch.Tensor) and i not in act_idx
                         else (f"{a.dtype}[{a.dim()}d]" if isinstance(a, torch.Tensor) else repr(a))
                         for i, a in enumerate(args))
        key = f"{self.target}|{device.type}|{op}|M{m}|{forms}" + (f"|{source.kind}-{source.dtype}" if source else "")
        timings = dict(_TIMINGS.get(key) or self._disk.get(key) or {})
        bars = [_FLOAT] + ([_FLOAT_ONEDNN] if any(name.endswith("-onednn") for name in by_name) else [])
        missing = [name for name in [*by_name, *bars] if name not in timings]
        if missing:
            g = torch.Generator().manual_seed(0)
            inputs = [_synthetic(a, m, device, g) for a in acts] if source is None else \
                [torch.randn(m, k_dim, generator=g).to(device)]
            t_start = time.perf_counter()
            fns = {}
            with torch.no_grad():
                for name in missing:
                    if name in _FLOAT_LINEARS:   # what a float linear costs at this shape
                        xf, wf = torch.randn(m, k_dim, device=device), torch.randn(n, k_dim, device=device)
                        fns[name] = lambda *acts, xf=xf, wf=wf, linear=_FLOAT_LINEARS[name]: linear(xf, wf)
                        continue
                    kernel = by_name[name][0]
                    full = list(args)
                    if source is None:
                        for i, a in zip(act_idx, inputs):
                            full[i] = a
                    else:   # the float activation in place of the quantized one (its form for prepare)
                        full[0] = inputs[0]
                        if source.kind == "per_token":
                            full[1] = torch.ones(m, 1, device=device)
                    if kernel.prepare:
                        full[kernel.weight_arg] = kernel.prepare(full[kernel.weight_arg], full)
                    try:
                        fns[name] = _callable(kernel, full, act_idx, self.target, source)
                        fns[name](*inputs)
                    except Exception as e:   # a kernel that fails here is not chosen
                        log.warning("kernel %s for %s failed its benchmark: %s", name, op, e)
                        fns.pop(name, None)
                        timings[name] = math.inf
                timings.update(_time_all(fns, inputs))
            self.timed += len(missing)
            self.seconds += time.perf_counter() - t_start
            _TIMINGS[key] = timings
            self._disk.put(key, timings)
        ranked = sorted(by_name, key=lambda name: timings[name])
        k, contract, note = by_name[ranked[0]]
        shown = ", ".join(f"{name} {1e3 * timings[name]:.2f} ms" for name in ranked)
        slower = ""
        if timings[ranked[0]] > 1.05 * timings[_FLOAT]:
            slower = ("; no quantized kernel beats the float32 linear here: the weights stay quantized in memory "
                      "and this is the fastest correct path")
        library = ""
        if k.name.endswith("-onednn") and _FLOAT_ONEDNN in timings:
            library = (f"; oneDNN's float32 linear alone {1e3 * timings[_FLOAT_ONEDNN]:.2f} ms: the gain over the "
                       "float32 linear is oneDNN's GEMM, which the float model would get too")
        return Choice(k, contract, f"fastest at {m}x{n}x{k_dim} ({self.target}): {shown} (float32 linear "
                      f"{1e3 * timings[_FLOAT]:.2f} ms){slower}{library}; {note}")
