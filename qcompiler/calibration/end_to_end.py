"""End-to-end scale tuning: after layer-by-layer calibration, the quantized linears' scales are tuned
together, their integer codes and zero points fixed, so that the whole quantized model's next-token
distribution matches the float model's (``EndToEndSpec``).

Layer-by-layer algorithms (GPTQ, GPTAQ, AWQ, SignRound) each fit one linear or one block; none sees
how the errors of thirty blocks add up at the output. This stage does, at a small cost: the codes
stay, and only one number per group moves. It is EfficientQAT's second stage (E2E-QP: Chen et al.,
"EfficientQAT: Efficient Quantization-Aware Training for Large Language Models", arXiv:2407.11062,
which trains the step sizes end to end with the codes fixed), with the float model as the teacher
(KL divergence of the quantized model's next-token distribution from the float model's, at every
position) instead of the next token, so the calibration text's own tokens are not fitted.

Each scale is ``s = s0 (1 + d)`` with ``d`` learned by Adam (one learning rate for every layer,
whatever its scales' size), cosine-decayed to zero over ``epochs`` passes of the calibration
sequences in a seeded order. The student's forward and backward may run in bfloat16 (autocast); the
teacher, the scales and the loss stay float32. The float weights are never written:
``torch.func.functional_call`` runs the model with the dequantized weights in their place.

The tuned scales are kept only when they lower the mean KL on a probe of calibration sequences
(``probe`` of them, spread over the set, measured before and after in float32); otherwise the
layer-by-layer scales stay, and the summary says so.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.core.linear_probe import linear_orientation
from qcompiler.errors import CalibrationError
from qcompiler.recipes import EndToEndSpec

__all__ = ["ScaleTuning", "EndToEndSummary", "tune_scales_end_to_end"]


@dataclasses.dataclass
class EndToEndSummary:
    """What the end-to-end tuning did: the probe's mean KL before and after, whether the tuned scales
    were kept, the steps run and the seconds taken."""

    linears: int
    steps: int
    kl_before: float
    kl_after: float
    kept: bool
    seconds: float

    def text(self) -> str:
        verdict = "kept" if self.kept else "not kept: the layer-by-layer scales stay"
        return (f"scales of {self.linears} linears tuned end to end ({self.steps} steps, {self.seconds:.0f} s): "
                f"probe KL {self.kl_before:.4g} -> {self.kl_after:.4g}, {verdict}")


class ScaleTuning:
    """One quantized [N, K] weight with learnable relative scale changes ``d`` ([N, groups]); its
    effective weight is ``(q - z) s0 (1 + d)``, divided by an AWQ input scale's columns when there is one."""

    def __init__(self, qweight: QuantizedWeight, input_scale: torch.Tensor | None, device: torch.device):
        n, k = qweight.shape
        g = qweight.group_size or k
        groups = -(-k // g)
        q = qweight.q.to(device).float()
        if qweight.zero is not None:
            q = q - qweight.zero.to(device).float().reshape(n, -1).repeat_interleave(g, dim=1)[:, :k]
        self.n, self.k, self.g, self.groups = n, k, g, groups
        self.codes = F.pad(q, (0, groups * g - k)).view(n, groups, g)
        self.qweight = qweight
        self.s0 = qweight.scale.to(device).float().reshape(n, groups)
        self.input_scale = None if input_scale is None else input_scale.to(device).float()
        self.d = torch.zeros_like(self.s0, requires_grad=True)

    def weight(self) -> torch.Tensor:
        """The effective [N, K] float32 weight at the current scales (differentiable in ``d``)."""
        w = (self.codes * (self.s0 * (1.0 + self.d))[..., None]).reshape(self.n, -1)[:, :self.k]
        return w if self.input_scale is None else w / self.input_scale[None, :]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.d.clamp_(min=-0.9)     # scales stay positive

    def tuned(self) -> QuantizedWeight:
        """The weight with the tuned scales (the original's dtype and shape), codes and zero points unchanged."""
        scale = (self.s0 * (1.0 + self.d.detach())).reshape(self.qweight.scale.shape)
        return dataclasses.replace(self.qweight, scale=scale.to(self.qweight.scale.dtype).to(self.qweight.scale.device))


def _inputs(batch, device: torch.device) -> tuple[dict, torch.Tensor | None]:
    """The model kwargs of one calibration batch and its attention mask (None: every position counts)."""
    if isinstance(batch, Mapping):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return kwargs, kwargs.get("attention_mask")
    ids = batch if batch.dim() == 2 else batch.unsqueeze(0)
    return {"input_ids": ids.to(device)}, None


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise CalibrationError(f"end-to-end tuning needs the model's logits: its output is a {type(out).__name__} "
                               "with no .logits")
    return logits


def _kl(teacher_logp: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the (unmasked) positions of KL(teacher || student), float32."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - s)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)


def _call(model, kwargs: dict, overrides: dict[str, torch.Tensor] | None = None):
    """``model(**kwargs)`` without a KV cache where it takes ``use_cache``, with ``overrides`` in place of its
    parameters of those names (``torch.func.functional_call``; the module's own tensors are never written)."""
    try:
        return torch.func.functional_call(model, overrides or {}, (), {**kwargs, "use_cache": False})
    except TypeError:
        return torch.func.functional_call(model, overrides or {}, (), kwargs)


def tune_scales_end_to_end(model: torch.nn.Module, qweights: dict[str, tuple[QuantizedWeight, torch.Tensor | None]],
                           batches: list, spec: EndToEndSpec,
                           progress: bool = True) -> tuple[dict[str, QuantizedWeight], EndToEndSummary]:
    """Tune the scales of ``qweights`` ({module path: (quantized weight, AWQ input scale or None)}) of
    ``model`` (holding its float weights, the teacher) on ``batches``; returns the weights to keep (the
    tuned ones, or the given ones when the probe's KL did not fall) and a summary."""
    t0 = time.perf_counter()
    if not qweights:
        raise CalibrationError("end-to-end tuning: no quantized linears to tune")
    device = next(model.parameters()).device
    tunings, names = {}, {}
    for fqn, (qw, input_scale) in qweights.items():
        module = model.get_submodule(fqn)
        found = linear_orientation(module, qw.shape[1])
        if found is None:
            raise CalibrationError(f"end-to-end tuning: {fqn} is not a linear of {qw.shape[1]} input channels")
        tunings[fqn] = ScaleTuning(qw, input_scale, device)
        names[fqn] = (f"{fqn}.weight", found[1], found[0].dtype)

    def overrides() -> dict[str, torch.Tensor]:
        out = {}
        for fqn, t in tunings.items():
            name, transposed, dtype = names[fqn]
            w = t.weight()
            out[name] = (w.t() if transposed else w).to(dtype)
        return out

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    probe_idx = sorted({round(i * (len(batches) - 1) / max(spec.probe - 1, 1)) for i in range(min(spec.probe, len(batches)))})
    try:
        with torch.compiler.set_stance("force_eager"):
            def probe_kl() -> float:
                total = 0.0
                with torch.no_grad():
                    ov = overrides()
                    for i in probe_idx:
                        kwargs, mask = _inputs(batches[i], device)
                        target = F.log_softmax(_logits(_call(model, kwargs)).float(), dim=-1)
                        total += float(_kl(target, _logits(_call(model, kwargs, ov)), mask))
                return total / len(probe_idx)

            before = probe_kl()
            params = [t.d for t in tunings.values()]
            opt = torch.optim.Adam(params, lr=spec.lr)
            steps = max(1, round(spec.epochs * len(batches)))
            gen = torch.Generator().manual_seed(spec.seed)
            order: list[int] = []
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.compute_dtype == "bfloat16")
            for step in tqdm(range(steps), desc="end-to-end scales", disable=not progress, leave=False):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                kwargs, mask = _inputs(batches[order.pop()], device)
                with torch.no_grad():
                    target = F.log_softmax(_logits(_call(model, kwargs)).float(), dim=-1)
                for group in opt.param_groups:
                    group["lr"] = spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
                with torch.enable_grad():
                    with amp:
                        logits = _logits(_call(model, kwargs, overrides()))
                    loss = _kl(target, logits, mask)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                if not math.isfinite(float(loss.detach())):
                    raise CalibrationError(f"end-to-end tuning: the KL is {float(loss)} at step {step}; lower "
                                           f"end_to_end.lr (now {spec.lr:g}) or use compute_dtype='float32'")
                opt.step()
                for t in tunings.values():
                    t.clamp_()
            after = probe_kl()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = after < before
    out = {f: t.tuned() if kept else t.qweight for f, t in tunings.items()}
    return out, EndToEndSummary(len(tunings), steps, before, after, kept, time.perf_counter() - t0)

