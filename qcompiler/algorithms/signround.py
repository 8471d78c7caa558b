"""SignRound: learned weight rounding and clipping per decoder block, by signed gradient descent.

SignRound (Cheng, Zhang, Shen, Meng, Lv, Liu: "Optimize Weight Rounding via Signed Gradient Descent
for the Quantization of LLMs", arXiv:2309.05516; the algorithm of Intel's AutoRound) gives each
weight a rounding offset ``v`` in [-0.5, 0.5] and each scale two clipping factors in
[min_clip, 1] (one for symmetric weights), and learns them per decoder block:

    q = clamp(round(w / s + v) + z, qmin, qmax),  w_hat = (q - z) s,  s = range(w) * clip / (qmax - qmin)

minimizing ``|| block(x; w_hat) - block(x; w) ||^2`` on the calibration inputs ``x`` (the outputs of
the blocks already quantized, GPTQ's sequential mode), with ``sign(grad)`` steps whose size decays
linearly to zero (rounding through a straight-through estimator). The best step by mini-batch loss
is kept. The start is round to nearest (AutoRound's), GPTQ's or GPTAQ's result (``SignRoundSpec.init``): at
``v = 0`` and unit clipping factors the codes are the start's bit for bit, and the codes written are
ordinary ONNX-layout integers with scales (and zero points), like GPTQ's.

Where we differ from AutoRound: mini-batches of whole calibration sequences (``batch_size``), float32
unless ``compute_dtype="bfloat16"`` (AutoRound's default), the weight spec's ``mse`` clipping (when chosen) as
the starting clip factors, and a GPTQ or GPTAQ start when chosen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qcompiler.core import numerics
from qcompiler.core.layer_quant import QuantizedWeight, quantize_weight, weight_qdtype
from qcompiler.errors import CalibrationError
from qcompiler.recipes import Granularity, SignRoundSpec, WeightSpec
from qcompiler.recipes.specs import GPTAQ_START, GPTQ_START
from qcompiler.algorithms.gptq import gptq_quantize
from qcompiler.algorithms.registry import WeightAlgorithm, register_weight_algorithm

__all__ = ["LearnableRounding", "BlockLinear", "signround_block", "GPTQ_START", "GPTAQ_START"]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LearnableRounding:
    """One [N, K] weight's learnable rounding offsets and clipping factors, starting from ``init``.

    ``w`` is the weight the offsets round (the float weight for a round-to-nearest start, GPTQ's
    dequantized weight for a GPTQ start) and ``init`` its starting codes and scales. The clipping
    factors scale ``init``'s range: symmetric ``s = s0 a``; asymmetric, the range
    ``[(qmin - z0) s0 b, (qmax - z0) s0 a]`` gives ``s`` and ``z`` as ``numerics.choose_scale`` would. At
    ``v = 0, a = b = 1`` the codes are ``init``'s (``quantized()`` returns them bit for bit when ``init``
    is ``w``'s round-to-nearest or GPTQ's result).
    """

    def __init__(self, w: torch.Tensor, init: QuantizedWeight, spec: WeightSpec, min_clip: float = 0.5):
        if spec.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise ValueError(f"SignRound needs per_channel or per_group weights, got {spec.granularity.value}")
        if tuple(init.q.shape) != tuple(w.shape):
            raise ValueError(f"SignRound: initial codes {tuple(init.q.shape)} do not match the weight {tuple(w.shape)}")
        self.spec, self.min_clip = spec, min_clip
        self.qdtype = weight_qdtype(spec)
        self.qmin, self.qmax = numerics.QRANGE[self.qdtype]
        w = w.detach().float()
        self.n, self.k = w.shape
        self.g = spec.group_size if spec.granularity is Granularity.PER_GROUP else self.k
        groups = -(-self.k // self.g)
        self.wg = torch.nn.functional.pad(w, (0, groups * self.g - self.k)).view(self.n, groups, self.g)
        self.s0 = init.scale.detach().float().reshape(self.n, groups)
        self.z0 = None if init.zero is None else init.zero.detach().float().reshape(self.n, groups)
        self.v = torch.zeros_like(self.wg, requires_grad=True)
        self.clip_hi = torch.ones_like(self.s0, requires_grad=True)
        self.clip_lo = torch.ones_like(self.s0, requires_grad=True)

    def parameters(self, clipping: bool = True) -> list[torch.Tensor]:
        if not clipping:
            return [self.v]
        return [self.v, self.clip_hi] if self.z0 is None else [self.v, self.clip_hi, self.clip_lo]

    def _scale_zero(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.z0 is None:
            return self.s0 * self.clip_hi, None
        hi_q, lo_q = self.qmax - self.z0, self.qmin - self.z0            # init's range in steps of s0
        scale = self.s0 * ((self.clip_hi * hi_q - self.clip_lo * lo_q) / (self.qmax - self.qmin))
        zero = torch.clamp(torch.round(self.qmin - self.clip_lo * lo_q * self.s0 / scale), self.qmin, self.qmax)
        return scale, zero

    def _codes(self, rounding: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        scale, zero = self._scale_zero()
        y = rounding(self.wg / scale[..., None] + self.v)
        if zero is not None:
            y = y + zero[..., None]
        return y.clamp(self.qmin, self.qmax), scale, zero

    def fake(self) -> torch.Tensor:
        """The dequantized [N, K] weight, differentiable in the offsets and clip factors."""
        q, scale, zero = self._codes(_round_ste)
        if zero is not None:
            q = q - zero[..., None]
        return (q * scale[..., None]).reshape(self.n, -1)[:, :self.k]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            self.clip_hi.clamp_(self.min_clip, 1.0)
            self.clip_lo.clamp_(self.min_clip, 1.0)

    def state(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in (self.v, self.clip_hi, self.clip_lo)]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip((self.v, self.clip_hi, self.clip_lo), state):
                t.copy_(s)

    def quantized(self) -> QuantizedWeight:
        """The current codes and scales as a ``QuantizedWeight`` (ONNX layout, as ``quantize_weight``)."""
        with torch.no_grad():
            q, scale, zero = self._codes(torch.round)
        store = numerics.STORAGE_DTYPE[self.qdtype]
        q = q.reshape(self.n, -1)[:, :self.k].to(store)
        group = self.g if self.spec.granularity is Granularity.PER_GROUP else None
        return QuantizedWeight(q, scale.detach(), None if zero is None else zero.detach().to(store),
                               numerics.storage_name(self.qdtype), group, self.spec.reduce_range)


@dataclass
class BlockLinear:
    """A linear of the block being tuned: its weight's name relative to the block, its float
    [N, K] weight, whether the module stores it transposed ([K, N], GPT-2's Conv1D), and the codes the
    weight algorithm started it from (``init``; round to nearest when None)."""

    param_name: str
    weight: torch.Tensor
    transposed: bool
    init: QuantizedWeight | None = None


def signround_block(run: Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, torch.Tensor]],
                    evaluate: Callable[[dict[str, torch.Tensor]], float], linears: dict[str, BlockLinear],
                    spec: WeightSpec, sr: SignRoundSpec) -> tuple[dict[str, QuantizedWeight], str]:
    """Tune the rounding of ``linears`` (by fqn) of one block; returns their quantized weights and a note.

    ``run(overrides, step)`` runs the block on the mini-batch of step ``step`` with the named weights
    replaced (``overrides``, block-relative names) and returns ``(output, float_target)``;
    ``evaluate(overrides)`` is the mean squared error over all the calibration inputs. The best step
    by mini-batch loss (AutoRound's choice) is kept only if ``evaluate`` finds it better than the start,
    so the block's calibration loss never rises.
    """
    t0 = time.perf_counter()
    learn = {}
    for f, bl in linears.items():
        init = bl.init if bl.init is not None else quantize_weight(bl.weight, spec)
        base = bl.weight if sr.init == "rtn" else init.dequantize()
        learn[f] = LearnableRounding(base, init, spec, sr.min_clip)
    params = [p for lr in learn.values() for p in lr.parameters(sr.tune_clipping)]

    def overrides() -> dict[str, torch.Tensor]:
        out = {}
        for f, bl in linears.items():
            w = learn[f].fake()
            out[bl.param_name] = w.t() if bl.transposed else w
        return out

    device = next(iter(linears.values())).weight.device.type
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=sr.compute_dtype == "bfloat16")
    best_loss, best_state = math.inf, None
    for step in range(sr.iters):
        with torch.enable_grad():
            with amp:
                out, target = run(overrides(), step)
            loss = torch.nn.functional.mse_loss(out.float(), target.float())
            for p in params:
                p.grad = None
            loss.backward()
        value = float(loss.detach())
        if value < best_loss:
            best_loss, best_state = value, {f: lr.state() for f, lr in learn.items()}
        size = sr.step_size * (1.0 - step / sr.iters)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(size * p.grad.sign())
        for lr in learn.values():
            lr.clamp_()
    start_state = {f: [torch.zeros_like(lr.v), torch.ones_like(lr.clip_hi), torch.ones_like(lr.clip_lo)]
                   for f, lr in learn.items()}

    def loss_at(state) -> float:
        for f, lr in learn.items():
            lr.load(state[f])
        with torch.no_grad():
            return evaluate(overrides())

    start, tuned = loss_at(start_state), loss_at(best_state)
    kept = tuned < start
    if not kept:
        loss_at(start_state)
    note = (f"signround from {sr.init}, {sr.iters} steps x {sr.batch_size} seq"
            f"{' in bfloat16' if sr.compute_dtype == 'bfloat16' else ''}, block loss {start:.3g} -> "
            f"{tuned:.3g}{'' if kept else ' (start kept)'} ({time.perf_counter() - t0:.1f} s / block)")
    return {f: lr.quantized() for f, lr in learn.items()}, note


def _initial(fqn: str, w: torch.Tensor, stats: Any, recipe: Any, spec: SignRoundSpec) -> tuple[QuantizedWeight, str]:
    """Where the rounding starts (and stays, outside the decoder blocks): round to nearest, or GPTQ."""
    gptq = spec.start
    if gptq is None:
        return quantize_weight(w, recipe.weight), "rtn (signround's start)"
    if stats is None or stats.hessian is None:
        raise CalibrationError(f"{fqn}: signround from {spec.init} needs the Hessian of this linear's inputs; no "
                               "calibration statistics reached it")
    if stats.tokens < gptq.min_samples:
        raise CalibrationError(f"{fqn}: signround from {spec.init} needs at least {gptq.min_samples} calibration rows "
                               f"(tokens) per linear, got {stats.tokens}; give more calibration data")
    qw, info = gptq_quantize(w, stats.hessian, recipe.weight, n_samples=stats.tokens, block_size=gptq.block_size,
                             dampening=gptq.dampening, act_order=gptq.act_order, static_groups=gptq.static_groups,
                             min_samples=gptq.min_samples, layer_name=fqn, scale_refit=gptq.scale_refit)
    return qw, f"{spec.init} damp {info.dampening:g} (signround's start)"


register_weight_algorithm(WeightAlgorithm(name="signround", spec_type=SignRoundSpec, quantize=_initial,
                                          needs_hessian=lambda spec: spec.start is not None,
                                          tune_block=signround_block))
