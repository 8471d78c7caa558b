"""Per-layer quantization: quantized weight storage, static activation scales, and the
float simulation of a quantized linear used by searches and sensitivity checks.

Weight layout (``QuantizedWeight``): ``q`` [N, K] row-major (output channel first) in the
storage dtype (int8 / uint8, fp8 e4m3, int4 / uint4 one value per byte); ``scale`` 0-d
(per-tensor), [N, 1] (per-channel) or [N, ceil(K / group_size)] (per-group, ONNX
``block_size`` along axis 1, the last group may be partial); ``zero`` like ``scale`` or None.
INT4 is held unpacked here (one value per byte, for searches) and packed two per byte in
graphs and files (``storage()``, layout in ``qcompiler.core.packing``). Reduced-range (7-bit) INT8
weights (``WeightSpec.reduce_range``) are ``dtype`` int8 / uint8 with ``reduce_range`` set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from qcompiler.core import numerics
from qcompiler.core.packing import pack_int4, unpack_int4
from qcompiler.recipes import ActivationSpec, Calibrator, Granularity, Recipe, WeightSpec

__all__ = ["QuantizedWeight", "quantize_weight", "weight_qdtype", "static_act_scale", "fake_quant_act", "simulate_linear",
           "relative_error", "gather_rows"]


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight, its scales and zero-points (see the module docstring)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    dtype: str
    group_size: int | None = None
    reduce_range: bool = False       # int8 / uint8 values in 7 bits: [-64, 63] / [0, 127]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return numerics.dequantize(self.q, self.scale, self.zero, out_dtype, block_size=self.group_size)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """This weight with its tensors on ``device``."""
        return dataclasses.replace(self, q=self.q.to(device), scale=self.scale.to(device),
                                   zero=None if self.zero is None else self.zero.to(device))

    @property
    def is_int4(self) -> bool:
        return self.dtype in ("int4", "uint4")

    def storage(self) -> torch.Tensor:
        """The tensor stored in graphs and files: ``q``, or for INT4 its packed bytes (``qcompiler.core.packing``)."""
        return pack_int4(self.q) if self.is_int4 else self.q

    @classmethod
    def from_storage(cls, stored: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: str,
                     group_size: int | None, in_features: int) -> "QuantizedWeight":
        q = unpack_int4(stored, in_features, signed=dtype == "int4") if dtype in ("int4", "uint4") else stored
        return cls(q, scale, zero, dtype, group_size)

    def nbytes(self) -> int:
        """Bytes at rest: int4 counts half a byte per value (packed two per byte)."""
        bits = 4 if self.dtype in ("int4", "uint4") else 8
        total = math.ceil(self.q.numel() * bits / 8) + self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            total += math.ceil(self.zero.numel() * bits / 8)
        return total

    def describe(self) -> str:
        if self.scale.dim() == 0:
            gran = "per-tensor"
        elif self.group_size:
            gran = f"group {self.group_size}"
        else:
            gran = "per-channel"
        return (f"{self.dtype} {gran}" + (" asym" if self.zero is not None else "")
                + (" (7-bit)" if self.reduce_range else ""))


def weight_qdtype(spec: WeightSpec) -> str:
    """The ``numerics`` dtype whose range ``spec``'s weights take: int8 / int4 / fp8_e4m3 when
    symmetric, uint8 / uint4 when not; int7 / uint7 with ``reduce_range``."""
    name = "int7" if spec.reduce_range else spec.dtype.value
    return name if spec.symmetric else numerics.UNSIGNED[name]


def quantize_weight(w: torch.Tensor, spec: WeightSpec, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight with ``spec``'s dtype and granularity.

    ``importance`` [K] (e.g. the diagonal of a layer's input Hessian) weights each input column's
    squared error in the ``mse`` calibrator's clipping search; without it every column counts alike.
    """
    w = w.detach().float()
    n, k = w.shape
    if spec.granularity is Granularity.PER_TENSOR:
        lo, hi = w.amin(), w.amax()
        absmax = w.abs().amax()
    elif spec.granularity is Granularity.PER_CHANNEL:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        absmax = w.abs().amax(1, keepdim=True)
    else:
        g = spec.group_size
        groups = -(-k // g)
        padded = torch.nn.functional.pad(w, (0, groups * g - k)).view(n, groups, g)
        lo, hi = padded.amin(-1), padded.amax(-1)
        absmax = padded.abs().amax(-1)
    qdtype = weight_qdtype(spec)
    group = spec.group_size if spec.granularity is Granularity.PER_GROUP else None
    if spec.calibrator is Calibrator.MSE:
        ratio = _mse_clip_ratio(w, absmax, lo, hi, spec, qdtype, group, importance)
        absmax, lo, hi = absmax * ratio, lo * ratio, hi * ratio
    scale, zero = numerics.choose_scale(absmax, qdtype, minimum=lo, maximum=hi, symmetric=spec.symmetric)
    q = numerics.quantize(w, scale, zero, qdtype, block_size=group)
    return QuantizedWeight(q, scale, zero if zero is None else zero.to(numerics.STORAGE_DTYPE[qdtype]),
                           numerics.storage_name(qdtype), group, spec.reduce_range)


def _mse_clip_ratio(w, absmax, lo, hi, spec: WeightSpec, qdtype: str, group: int | None,
                    importance: torch.Tensor | None = None, grid: int = 20, lowest: float = 0.7) -> torch.Tensor:
    """Per scale entry, the ratio r in [lowest, 1] of the range whose (importance-weighted) squared
    quantization error is least."""
    if importance is not None and tuple(importance.shape) != (w.shape[1],):
        raise ValueError(f"importance must have shape ({w.shape[1]},), got {tuple(importance.shape)}")
    best_ratio = torch.ones_like(absmax)
    best_err = None
    for r in torch.linspace(1.0, lowest, grid + 1):
        scale, zero = numerics.choose_scale(absmax * r, qdtype, minimum=lo * r, maximum=hi * r,
                                            symmetric=spec.symmetric)
        deq = numerics.fake_quantize(w, scale, zero, qdtype) if group is None else numerics.dequantize(
            numerics.quantize(w, scale, zero, qdtype, block_size=group), scale, zero, block_size=group)
        err = (deq - w).pow(2)
        if importance is not None:
            err = err * importance.float()
        if scale.dim() == 0:
            err = err.sum()
        elif group is None:
            err = err.sum(1, keepdim=True)
        else:
            k = w.shape[1]
            err = torch.nn.functional.pad(err, (0, scale.shape[1] * group - k)).view(*scale.shape, group).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, r, best_ratio)
    return best_ratio


def static_act_scale(absmax: torch.Tensor, samples: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """A static per-tensor scale from per-channel |x| maxima and sampled rows, by ``spec.calibrator``."""
    amax = absmax.float().max()
    if spec.calibrator is Calibrator.PERCENTILE and spec.percentile < 100.0:
        flat = samples.float().abs().flatten()
        kth = max(1, min(flat.numel(), math.ceil(flat.numel() * spec.percentile / 100.0)))
        amax = torch.minimum(amax, flat.kthvalue(kth).values)
    elif spec.calibrator is Calibrator.MSE:
        x = samples.float()
        best, best_err = amax, None
        for ratio in torch.linspace(0.2, 1.0, 41):
            s, _ = numerics.choose_scale(amax * ratio, spec.dtype)
            err = (numerics.fake_quantize(x, s, None, spec.dtype.value) - x).pow(2).mean()
            if best_err is None or err < best_err:
                best, best_err = amax * ratio, err
        amax = best
    scale, _ = numerics.choose_scale(amax, spec.dtype)
    return scale


def fake_quant_act(x: torch.Tensor, spec: ActivationSpec, scale: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize activations as the compiled graph does (static or per-token)."""
    if spec.dynamic:
        q, s = numerics.quantize_per_token(x, spec.dtype.value)
        return numerics.dequantize(q, s, None, x.dtype)
    return numerics.fake_quantize(x, scale, None, spec.dtype.value)


def simulate_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                    act_scale: torch.Tensor | None, qweight: QuantizedWeight | None = None) -> torch.Tensor:
    """Float simulation of the quantized linear (fake-quant weight and activations)."""
    qweight = qweight if qweight is not None else quantize_weight(w, recipe.weight)
    wd = qweight.dequantize()
    if recipe.activation is not None:
        x = fake_quant_act(x.float(), recipe.activation, act_scale)
    return torch.nn.functional.linear(x.float(), wd, None if bias is None else bias.float())


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def gather_rows(ids: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: str,
                group_size: int, dim: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of a quantized [V, dim] table (``QuantizedWeight.storage()`` with its scale and zero-point),
    dequantized with DequantizeLinear semantics: ``embedding(ids, table)`` of the float table, computed
    from the quantized one (only the gathered rows are decoded; ``group_size`` 0 for none)."""
    rows = torch.nn.functional.embedding(ids, stored)
    if dtype in ("int4", "uint4"):
        rows = unpack_int4(rows, dim, signed=dtype == "int4")
    s = scale if scale.dim() == 0 else torch.nn.functional.embedding(ids, scale)
    z = zero if zero is None or zero.dim() == 0 else torch.nn.functional.embedding(ids, zero)
    return numerics.dequantize(rows, s, z, out_dtype, block_size=group_size or None)
