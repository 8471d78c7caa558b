"""Fitting each layer to the float model's own output, not to its float self on the quantized inputs.

Layer by layer, calibration feeds block i the outputs of blocks 0..i-1 as already quantized, ``X_q``, and
GPTQ minimizes ``||X_q W^T - X_q W_hat^T||``: each layer is fitted to the float layer *on the quantized
inputs*, so the error the earlier blocks made travels on untouched. Running a second stream of activations
through the float blocks gives the float model's own inputs ``X_f`` beside them, and the objective
``||X_f W^T - X_q W_hat^T||`` lets each layer correct what reaches it (Li, Yin, Lee, Xiao, Panda: "GPTAQ:
Efficient Finetuning-Free Quantization for Asymmetric Calibration", 2025, first titled GPTQv2; AutoRound
tunes against the float stream's block outputs the same way, its ``enable_quanted_input``).

Its least-squares split makes this GPTQ on another weight: with ``H = X_q^T X_q`` and ``C = X_q^T X_f``,

    ||X_f W^T - X_q W_hat^T||^2 = ||X_q (W*^T - W_hat^T)||^2 + const,   W* = W C^T H^-1,

(``W* X_q^T`` is the projection of ``W X_f^T`` on the row space of ``X_q``), so GPTQ run on ``W*`` against the
usual Hessian minimizes the asymmetric objective: each GPTQ step keeps the not-yet-quantized columns at the
optimum given the fixed ones, and ``W*`` is that optimum before the first (``float_target_weight``; written
``W* = W + W (C - H)^T H^-1`` with ``H`` dampened as GPTQ dampens it, so only the correction is dampened;
``GPTQSpec.target_alpha`` scales the correction, as GPTAQ's reference code scales its own by 0.25).
``paired_linear_inputs`` accumulates ``C`` from the two streams, call by call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection

import torch

from qcompiler.calibration.statistics import _first_float, linear_input_dims
from qcompiler.errors import CalibrationError

__all__ = ["paired_linear_inputs", "float_target_weight"]


class paired_linear_inputs:
    """Pre-hooks on the linears of ``block`` (modules owning a 2-D float parameter, paths prefixed ``prefix``)
    pairing the float stream's inputs with the quantized stream's, one block call at a time.

    Run the block on a call's float-model activations inside ``recording()`` (each linear's input is kept),
    then on the same call's quantized-model activations inside ``pairing()``: each linear adds
    ``X_q^T X_f`` (a float32 term to a float64 sum, as ``X^T X``) for its rows. ``cross`` holds the sums by
    path; use as a context manager (the hooks are removed on exit). ``only``: the paths to pair (None: all).
    ``take()`` after ``recording()`` hands over a call's float inputs, for ``pairing(recorded)`` to pair again
    later without rerunning the float stream (``true_sequential``'s level passes)."""

    def __init__(self, block: torch.nn.Module, prefix: str, only: Collection[str] | None = None):
        self.cross: dict[str, torch.Tensor] = {}
        self._stored: dict[str, list[torch.Tensor]] = {}
        self._phase: str | None = None
        self._shared: tuple = ()
        self.handles = []
        for path, module in block.named_modules():
            dims = linear_input_dims(module)
            if dims:
                fqn = f"{prefix}.{path}" if path else prefix
                if only is not None and fqn not in only:
                    continue
                self.handles.append(module.register_forward_pre_hook(self._hook(fqn, dims), with_kwargs=True))

    def _hook(self, fqn: str, dims: set[int]):
        def hook(module, args, kwargs):
            x = _first_float(args, kwargs)
            if self._phase is None or x is None or x.shape[-1] not in dims:
                return
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            if self._phase == "float":
                self._stored.setdefault(fqn, []).append((x, rows))
                return
            queue = self._stored.get(fqn)
            if not queue:
                raise CalibrationError(f"{fqn}: called on the quantized model's activations more often than on the "
                                       "float model's: the block does not run the same way on both streams")
            fx, frows = queue.pop(0)
            if frows.shape != rows.shape:
                raise CalibrationError(f"{fqn}: its input is {tuple(rows.shape)} on the quantized stream and "
                                       f"{tuple(frows.shape)} on the float stream")
            # q/k/v read one tensor on each stream: one product for the three
            if not (self._shared and self._shared[0] is x and self._shared[1] is fx):
                self._shared = (x, fx, rows.t() @ frows)
            total = self.cross.get(fqn)
            if total is None:
                total = self.cross[fqn] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                                      device=rows.device)
            total += self._shared[2]
        return hook

    @contextlib.contextmanager
    def recording(self):
        """The block runs on the float model's activations: keep each linear's input."""
        self._stored.clear()
        self._phase = "float"
        try:
            yield
        finally:
            self._phase = None

    def take(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The float inputs the last ``recording()`` kept, ``{path: [(input, float32 rows), ...]}`` in call order;
        this object forgets them."""
        stored, self._stored = self._stored, {}
        return stored

    @contextlib.contextmanager
    def pairing(self, recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None):
        """The block runs on the quantized model's activations of the same call: add ``X_q^T X_f``. ``recorded``:
        that call's float inputs from ``take()`` (left as they are), instead of the last ``recording()``'s."""
        if recorded is not None:
            self._stored = {path: list(queue) for path, queue in recorded.items()}
        self._phase = "quantized"
        try:
            yield
        finally:
            self._phase = None
            self._stored.clear()
            self._shared = ()

    def __enter__(self) -> "paired_linear_inputs":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._stored.clear()
        self._shared = ()


def float_target_weight(w: torch.Tensor, xtx: torch.Tensor, cross: torch.Tensor, dampening: float,
                        name: str = "?", alpha: float = 1.0) -> torch.Tensor:
    """``W* = W + alpha W D^T (H + d I)^-1`` with ``D = C - H = X_q^T (X_f - X_q)`` (float64 solve, returned in ``w``'s
    dtype): the float weight whose output on the quantized inputs is, in least squares, the float model's output
    (undamped, ``W C^T H^-1``). ``xtx`` is ``H = X_q^T X_q`` and ``cross`` is ``C = X_q^T X_f``, on one scale (sums,
    or both ``2/n``); ``d`` is ``dampening`` times the mean of ``H``'s diagonal, GPTQ's. Only the correction is
    dampened, so where the two streams agree ``W* = W`` exactly (GPTAQ's form); inputs no quantized row reached
    (zero diagonal) keep their weight. ``alpha`` < 1 takes that fraction of the correction (GPTAQ's reference
    code scales its correction term by 0.25)."""
    k = w.shape[1]
    if tuple(xtx.shape) != (k, k) or tuple(cross.shape) != (k, k):
        raise CalibrationError(f"{name}: Hessian {tuple(xtx.shape)} and cross-covariance {tuple(cross.shape)} "
                               f"do not match the weight {tuple(w.shape)}")
    h = xtx.to(w.device, torch.float64)       # statistics live on the CPU; the solve runs on the weight's device
    d = cross.to(w.device, torch.float64) - h
    diag = torch.diagonal(h)
    dead = diag == 0
    if bool(dead.all()):
        return w
    h = h.clone()
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * float(diag[~dead].mean()))
    d[dead, :] = 0.0
    delta = torch.linalg.solve(h, d @ w.double().t()).t()       # W D^T (H + d I)^-1, as its transpose's solve
    if not torch.isfinite(delta).all():
        raise CalibrationError(f"{name}: the float-model target weight is not finite (Hessian too ill-conditioned; "
                               "raise gptq.dampening)")
    return (w.double() + alpha * delta).to(w.dtype)
