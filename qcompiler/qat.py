"""Quantization-aware training: ``prepare_qat`` puts a recipe's fake quantization into a model, the user
trains it with their own loop, ``convert`` gives the quantized model ``qcompiler.quantize`` would.

``prepare_qat`` runs the recipe's post-training plan first (``qcompiler.quantize``: the same passes, scales,
fallback decisions and weight algorithm), then stands a ``FakeQuantLinear`` in for each ``QuantizedLinear``:
a trainable latent weight, the plan's weight scales (and zero points), the recipe's activation quantization,
all as the same Q/DQ arithmetic (``qcompiler.core.numerics``, ONNX semantics) with straight-through
gradients: a rounded value passes its gradient to the value it came from where it is inside the format's
range, and none where it saturated. With ``learn_scales`` the weight scales (and static activation scales)
are trained too, with LSQ's gradient (Esser et al., "Learned Step Size Quantization", ICLR 2020):
``(y - x) / s`` inside the range, ``y / s`` where clipped, scaled by ``1 / sqrt(n * qmax)`` per scale.

The latent weight starts (``init="auto"``) at the float weight when the recipe rounds to nearest, so that
``convert`` after zero steps gives round to nearest again, and at the plan's dequantized weight when the
recipe has a weight algorithm (GPTQ, AWQ's clipping, SparseGPT), so that it gives that algorithm's codes:
either way ``convert(prepare_qat(m))`` equals ``quantize(m)`` bit for bit before training. A sparse recipe's
(``SparseGPTSpec``) pruned weights stay 0 through training, so the N:M pattern survives ``convert``.
SmoothQuant / AWQ input scales are not trained: they stay where the plan put them (in the norms, or at the
linear's input as ``inv_smooth``) and the latent weights are the scaled ones.
Fused mixture-of-experts weights (``QuantizedExperts``) keep the plan's codes and are not trained (a warning
says so). ``distillation_loss`` is the KL divergence to a float teacher's logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from qcompiler.core import numerics
from qcompiler.core.layer_quant import QuantizedWeight, weight_qdtype
from qcompiler.core.linear_probe import linear_orientation
from qcompiler.errors import UnsupportedError
from qcompiler.recipes import Recipe, SparseGPTSpec, resolve

__all__ = ["FakeQuantLinear", "prepare_qat", "convert", "distillation_loss", "fake_quantize_ste"]


class _FakeQuantize(torch.autograd.Function):
    """``dequantize(quantize(x))`` forward; straight-through (clipped) gradient for ``x``, LSQ's for ``scale``."""

    @staticmethod
    def forward(ctx, x, scale, zero, dtype: str, block_size: int | None, lsq_factor: float):
        q = numerics.quantize(x, scale, zero, dtype, block_size=block_size)
        y = numerics.dequantize(q, scale, zero, x.dtype, block_size=block_size)
        ctx.save_for_backward(x, y, scale, zero)
        ctx.meta = (dtype, block_size, lsq_factor)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, zero = ctx.saved_tensors
        dtype, block_size, lsq_factor = ctx.meta
        qmin, qmax = numerics.QRANGE[dtype]
        s = numerics.expand_blocks(scale.float(), x, block_size)
        v = x.float() / s
        if zero is not None:
            v = v + numerics.expand_blocks(zero.float(), x, block_size)
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad * inside
        grad_scale = None
        if ctx.needs_input_grad[1]:
            local = torch.where(inside, (y.float() - x.float()) / s, y.float() / s) * grad.float()
            grad_scale = _reduce_to(local, scale, block_size) * lsq_factor
        return grad_x, grad_scale, None, None, None, None


def _reduce_to(full: torch.Tensor, scale: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Sum ``full`` [..., K] over the elements each entry of ``scale`` covers."""
    if scale.dim() == 0:
        return full.sum()
    out = full
    for d, (s, n) in enumerate(zip(scale.shape, full.shape)):
        if s == 1 and n != 1:
            out = out.sum(d, keepdim=True)
        elif s != n:
            block = block_size or -(-n // s)
            pad = [0, 0] * (out.dim() - 1 - d) + [0, s * block - n]
            out = F.pad(out, pad).unflatten(d, (s, block)).sum(d + 1)
    return out


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: str,
                      block_size: int | None = None) -> torch.Tensor:
    """Fake quantization with straight-through gradients (and LSQ's for ``scale`` when it requires grad)."""
    qmax = numerics.QRANGE[dtype][1]
    per_scale = x.numel() / max(scale.numel(), 1)
    return _FakeQuantize.apply(x, scale, zero, dtype, block_size, 1.0 / math.sqrt(per_scale * qmax))


def _fake_quantize_per_token(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Dynamic per-token fake quantization: the scale follows the data (no gradient), the values straight through."""
    q, s = numerics.quantize_per_token(x.detach(), dtype)
    y = numerics.dequantize(q, s, None, x.dtype)
    return x + (y - x).detach()


class FakeQuantLinear(torch.nn.Module):
    """A planned linear during QAT: ``linear(fq(x), fq(weight)) + bias`` with the plan's scales.

    ``weight`` [N, K] is the trainable latent weight; ``w_scale`` (a parameter with ``learn_scales``),
    ``w_zero``, ``act_scale`` as ``QuantizedLinear``'s buffers; ``source`` the ``QuantizedLinear`` it came from
    (kernels, report), reused by ``convert``."""

    def __init__(self, source, weight: torch.Tensor, qdtype: str, act_qdtype: str | None, learn_scales: bool,
                 pruned: torch.Tensor | None = None):
        super().__init__()
        # a sparse recipe's pattern stays: pruned weights are held at 0 (and get no gradient)
        self.register_buffer("pruned", pruned)
        self.fqn, self.qdtype, self.act_qdtype = source.fqn, qdtype, act_qdtype
        self.act_dynamic, self.group_size = source.act_dynamic, source.group_size or None
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = torch.nn.Parameter(weight.detach().clone().float())
        scale = source.w_scale.detach().clone().float()
        if learn_scales:
            self.w_scale = torch.nn.Parameter(scale)
        else:
            self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", None if source.w_zero is None else source.w_zero.detach().clone())
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().clone().float())
        # a SmoothQuant / AWQ scale not folded upstream (fixed: the plan's choice)
        self.register_buffer("inv_smooth", None if source.inv_smooth is None else source.inv_smooth.detach().clone())
        act_scale = None if source.act_scale is None else source.act_scale.detach().clone().float()
        if learn_scales and act_scale is not None:
            self.act_scale = torch.nn.Parameter(act_scale)
        else:
            self.register_buffer("act_scale", act_scale)
        self._source = (source,)          # a tuple: not a submodule (its buffers are not trained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        x = x.float()
        if self.act_qdtype is not None:
            x = (_fake_quantize_per_token(x, self.act_qdtype) if self.act_dynamic
                 else fake_quantize_ste(x, self.act_scale.clamp(min=1e-12), None, self.act_qdtype))
        w = self.weight if self.pruned is None else self.weight.masked_fill(self.pruned, 0.0)
        w = fake_quantize_ste(w, self.w_scale.clamp(min=1e-12), self.w_zero, self.qdtype, self.group_size)
        return F.linear(x, w, self.bias).to(out_dtype)

    def quantized_weight(self) -> QuantizedWeight:
        """The latent weight rounded with the current scales: what ``convert`` stores."""
        with torch.no_grad():
            scale = self.w_scale.detach().clamp(min=1e-12).clone()
            w = self.weight.detach() if self.pruned is None else self.weight.detach().masked_fill(self.pruned, 0.0)
            q = numerics.quantize(w, scale, self.w_zero, self.qdtype, block_size=self.group_size)
        source = self._source[0]
        return QuantizedWeight(q, scale, None if self.w_zero is None else self.w_zero.clone(), source.weight_dtype,
                               self.group_size, self.qdtype in ("int7", "uint7"))

    def extra_repr(self) -> str:
        act = f", act {self.act_qdtype}{' per-token' if self.act_dynamic else ''}" if self.act_qdtype else ""
        return f"{self.fqn}: {self.in_features} -> {self.out_features}, weight {self.qdtype}{act}"


def prepare_qat(model: torch.nn.Module, recipe: Recipe | str, calibration: Iterable | None = None, *,
                init: str = "auto", learn_scales: bool = False, progress: bool = True,
                kernels: str | Mapping[str, str] = "auto") -> torch.nn.Module:
    """Put ``recipe``'s fake quantization into ``model`` in place for training; returns ``model``.

    Args:
        model: a float model whose parameters require grad (the latent weights train; everything else the
            user's optimizer may train or freeze as they like).
        recipe: a preset name or ``Recipe``; the linears it quantizes become ``FakeQuantLinear``.
        calibration: as ``qcompiler.quantize`` (static scales, the weight algorithm, the fallback rule).
        init: ``"float"`` (latent weights start at the float weights), ``"ptq"`` (at the plan's dequantized
            weights), or ``"auto"`` (``"ptq"`` when the recipe has a weight algorithm, else ``"float"``).
        learn_scales: train the weight scales and static activation scales (LSQ).
        progress, kernels: as ``qcompiler.quantize`` (kernels: what ``convert`` will run).

    Raises:
        UnsupportedError: the recipe quantizes the KV cache or embeddings (not trained here yet), or the
            model has no trainable parameters / grad is off.

    SmoothQuant / AWQ input scales stay what the plan chose (folded into the norms as ``quantize`` folds
    them, or applied at the linear's input): the latent weights are the scaled ones, ``W * s``.
    """
    from qcompiler.api import _quantize_planned
    from qcompiler.pipeline import Analysis
    from qcompiler.runtime.eager import QuantizedLinear, _carry_hooks

    recipe = resolve(recipe)
    if init not in ("auto", "float", "ptq"):
        raise ValueError(f"prepare_qat: init={init!r} must be 'auto', 'float' or 'ptq'")
    if not torch.is_grad_enabled():
        raise UnsupportedError("prepare_qat: gradients are disabled here (torch.no_grad / inference_mode); QAT "
                               "trains the latent weights: call it, and train, with grad enabled")
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedError("prepare_qat: no parameter of the model requires grad; QAT trains the weights "
                               "(model.requires_grad_(True))")
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise UnsupportedError("prepare_qat: the model is already prepared; call convert first")
    refused = [what for what, present in (("a quantized KV cache (recipe.kv_cache)", recipe.kv_cache),
                                          ("quantized embeddings (recipe.embedding)", recipe.embedding)) if present]
    if refused:
        raise UnsupportedError(f"prepare_qat: recipe {recipe.name!r} has {' and '.join(refused)}, which QAT does "
                               "not train yet; quantize them after training, or pick a recipe without them")
    def planned(module) -> torch.Tensor:
        return QuantizedWeight.from_storage(module.w_q, module.w_scale, module.w_zero, module.weight_dtype,
                                            module.group_size or None, module.in_features).dequantize()

    if init == "auto":
        init = "ptq" if recipe.weight_algorithm is not None else "float"
    before = dict(model.named_modules())
    contexts = _quantize_planned(model, recipe, calibration, progress=progress, kernels=kernels)
    _warn_frozen_experts(model)
    # the float weights the plan quantized: smoothing (W * s) and producer row scales already applied
    planned_float = {}
    for ctx in contexts if init == "float" else ():
        ann = ctx.analyses.get(Analysis.ANNOTATE)
        weights = getattr(ann, "weights", {})
        planned_float.update({fqn: weights[fqn].w for fqn in ctx.layer_plan if fqn in weights})
    qdtype = weight_qdtype(recipe.weight)
    act_qdtype = None if recipe.activation is None else recipe.activation.dtype.value
    for fqn, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        if init == "float" and fqn in planned_float:
            weight = planned_float[fqn]
        elif init == "float":
            # a linear the captured graphs did not hold (quantized from its module's weights)
            found = linear_orientation(before[fqn], module.in_features)
            if found is None:
                raise UnsupportedError(f"prepare_qat: {fqn} is not a plain linear; use init='ptq'")
            weight = found[0].t() if found[1] else found[0]
            if module.inv_smooth is not None:
                weight = weight.float() / module.inv_smooth.float()
        else:
            weight = planned(module)
        # a sparse recipe (SparseGPTSpec): its zeros are the pattern, kept through training
        pruned = _pruned(planned(module), recipe.weight_algorithm) \
            if isinstance(recipe.weight_algorithm, SparseGPTSpec) else None
        fq = FakeQuantLinear(module, weight, qdtype, act_qdtype, learn_scales, pruned).to(module.w_scale.device)
        _carry_hooks(module, fq)
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fq)
    return model


def _warn_frozen_experts(model: torch.nn.Module) -> None:
    """Fused mixture-of-experts weights stay as the plan quantized them (``QuantizedExperts``): say so."""
    import warnings

    from qcompiler.runtime.fused_experts import quantized_experts
    held = sorted(quantized_experts(model))
    if held:
        warnings.warn(f"prepare_qat: {len(held)} fused mixture-of-experts weights (e.g. {held[0]}) keep the codes the "
                      "post-training plan gave them and are not trained: QAT trains the linears' latent weights only "
                      "(keep the experts in float with fallback.keep_op_kinds += ('experts',) to train them in float)",
                      stacklevel=3)


def _pruned(weight: torch.Tensor, spec: SparseGPTSpec) -> torch.Tensor:
    """The positions a sparse plan pruned: in each run of ``spec.m`` input channels, its first ``m - n`` zeros
    (a kept weight that rounded to 0 beyond those stays trainable)."""
    zeros = (weight == 0).unflatten(-1, (-1, spec.m))
    return (zeros & (zeros.cumsum(-1) <= spec.m - spec.n)).flatten(-2)


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``FakeQuantLinear`` by the ``QuantizedLinear`` of its trained weight and scales; returns
    ``model``. ``UnsupportedError`` when the model was not prepared with ``prepare_qat``."""
    from qcompiler.runtime.eager import QuantizedLinear, _carry_hooks

    found = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not found:
        raise UnsupportedError("convert: the model has no FakeQuantLinear; call qcompiler.prepare_qat(model, "
                               "recipe, ...) first")
    for fqn, fq in found:
        source = fq._source[0]
        act_scale = None if fq.act_scale is None else float(fq.act_scale.detach().clamp(min=1e-12))
        new = QuantizedLinear(fq.quantized_weight(), None if fq.bias is None else fq.bias.detach().clone(),
                              source.act_dtype, source.act_dynamic, act_scale, source.inv_smooth, source.fqn,
                              source.kernels, source._report)
        _carry_hooks(fq, new)
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` averaged over positions (``mask``: the ones
    that count, e.g. not padding)."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        return (kl * mask).sum() / mask.sum().clamp(min=1) * t * t
    return kl.mean() * t * t
