"""Fused mixture-of-experts weights quantized per expert (weight-only).

transformers 5 keeps a model's experts as one 3-D parameter per projection (Mixtral's ``gate_up_proj``
``[experts, 2 x intermediate, hidden]`` and ``down_proj``), in modules built on its experts interface
(``transformers.integrations.moe.use_experts_implementation``), which says how they are laid out
(``is_transposed``: ``[experts, K, N]`` instead of ``[experts, N, K]``) and runs them by a loop over the
routed experts (``eager``), a grouped GEMM (``grouped_mm``) or a batched one (``batched_mm``).

``quantize_fused_experts`` quantizes each expert's ``[N, K]`` slice with the recipe's weight spec and puts a
``QuantizedExperts`` tensor in the parameter's place: a tensor subclass holding the codes and scales, with the
float parameter's shape and dtype, that every experts implementation reads unchanged. Taking one expert
(``weights[e]``: the eager loop) dequantizes that expert only; any other use (a transpose for the grouped GEMM,
an index for the batched one) sees the whole dequantized tensor. The module's code is not touched.

How: with a Hessian-based algorithm (GPTQ; SignRound's GPTQ start), each expert from its own Hessian, over the
tokens the router sent to it (``record_expert_inputs`` follows the experts' eager loop): layer by layer
(``LayerwiseCalibration``, on the quantized model's inputs) or in the one calibration pass of the float model
(``CalibrationCache``, as its linears); an expert no calibration token reaches is rounded to nearest from its
weights, and the report note names it. Otherwise (no algorithm, AWQ) round to nearest from the weights.

A recipe with dynamic per-token activations (``w8a8-int8-sq-dynamic``, ``fp8-dynamic``, ``w4a8-int8-sq-gptq``)
quantizes the experts' inputs too: the tensor then carries the activation spec, and what reads it is an
``ActQuantWeight`` (``qcompiler.core.expert_activations``), whose matrix products quantize their other operand
per token first.

Limits (said, not silent): a recipe with static activation scales keeps the experts in float with a warning (no
scale is calibrated for them); SmoothQuant does not smooth the experts' inputs; experts modules without
transformers' layout attribute stay in float; graphs compiled by ``qcompiler.backend`` keep them in float (its
passes quantize 2-D linears).
"""

from __future__ import annotations

import math
import torch
from torch.utils._pytree import tree_leaves, tree_map_only

from qcompiler.calibration.expert_inputs import LAYOUT_ATTR, float_reason, fused_expert_weights
from qcompiler.core.layer_quant import QuantizedWeight, quantize_weight
from qcompiler.recipes import ActivationSpec, Granularity, QuantDtype
from qcompiler.core.expert_activations import ActQuantWeight

__all__ = ["QuantizedExperts", "fused_expert_weights", "quantize_fused_experts", "quantized_experts", "refuse_experts"]

_aten = torch.ops.aten

class QuantizedExperts(torch.Tensor):
    """``[E, N, K]`` (or ``[E, K, N]`` when ``transposed``) expert weights held as one ``QuantizedWeight`` per
    expert; reads as the dequantized float tensor of dtype ``dtype`` (wrapped in an ``ActQuantWeight`` when
    ``activation``, a dynamic activation spec, says the experts' inputs are quantized too)."""

    experts: list[QuantizedWeight]
    transposed: bool
    activation: ActivationSpec | None

    @staticmethod
    def __new__(cls, experts: list[QuantizedWeight], transposed: bool, dtype: torch.dtype,
                activation: ActivationSpec | None = None):
        n, k = experts[0].shape
        shape = (len(experts), k, n) if transposed else (len(experts), n, k)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=experts[0].q.device,
                                                   requires_grad=False)

    def __init__(self, experts: list[QuantizedWeight], transposed: bool, dtype: torch.dtype,
                 activation: ActivationSpec | None = None):
        if activation is not None and not activation.dynamic:
            raise ValueError("fused experts quantize their inputs per token at run time only; got static "
                             f"activations {activation}")
        self.experts, self.transposed, self.activation = experts, transposed, activation

    def __repr__(self) -> str:
        act = "" if self.activation is None else f", activations {self.activation.dtype.value} per token"
        return (f"QuantizedExperts({len(self.experts)} x {self.experts[0].describe()}{act}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype})")

    def describe(self) -> str:
        """The format, as the report says it."""
        act = "" if self.activation is None else f", {self.activation.dtype.value} per-token activations (dynamic)"
        return f"{self.experts[0].describe()}{act}, {len(self.experts)} experts"

    def _read(self, dense: torch.Tensor) -> torch.Tensor:
        if self.activation is None:
            return dense
        with torch.inference_mode(self.is_inference()):    # what a select or index of this tensor may return
            return ActQuantWeight(dense, self.activation)

    def _expert_dense(self, e: int) -> torch.Tensor:
        w = self.experts[e].dequantize(self.dtype)
        return w.t() if self.transposed else w

    def expert(self, e: int) -> torch.Tensor:
        """Expert ``e``'s dequantized weight, in the layout of the float parameter's slice."""
        return self._read(self._expert_dense(e))

    def dequantize(self) -> torch.Tensor:
        """The whole dequantized float tensor (plain, without the activation quantization)."""
        return torch.stack([self._expert_dense(e) for e in range(len(self.experts))])

    def nbytes_quantized(self) -> int:
        return sum(qw.nbytes() for qw in self.experts)

    def _moved(self, device: torch.device | None, dtype: torch.dtype | None) -> "QuantizedExperts":
        experts = self.experts if device is None else [qw.to(device) for qw in self.experts]
        return QuantizedExperts(experts, self.transposed, dtype or self.dtype, self.activation)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        held = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, cls)), None)
        # a view of this tensor (a transpose for the grouped GEMM, an expert's select) is an inference tensor exactly
        # when this one is: autograd gives the view this tensor's version counter, which an inference tensor lacks
        with torch.inference_mode(held is not None and held.is_inference()):
            return cls._dispatch(func, args, kwargs or {})

    @classmethod
    def _dispatch(cls, func, args, kwargs):
        this = args[0] if args and isinstance(args[0], cls) else None
        if this is not None:
            count = len(this.experts)
            if func is _aten.select.int and args[1] in (0, -this.dim()):
                return this.expert(int(args[2]) % count)
            if func is _aten.index.Tensor and len(args[1]) == 1 and args[1][0] is not None \
                    and args[1][0].dtype in (torch.int64, torch.int32):
                index = args[1][0] % count
                used, where = index.unique(return_inverse=True)      # each expert dequantized once
                return this._read(torch.stack([this._expert_dense(int(e)) for e in used.tolist()])[where])
            if func in (_aten.detach.default, _aten.alias.default):
                return this
            if func is _aten._to_copy.default and set(kwargs) <= {"dtype", "device", "layout", "memory_format",
                                                                  "non_blocking"}:
                device = kwargs.get("device")
                return this._moved(None if device is None else torch.device(device), kwargs.get("dtype"))
        dense_args, dense_kwargs = tree_map_only(cls, lambda t: t._read(t.dequantize()), (args, kwargs))
        return func(*dense_args, **dense_kwargs)


def quantized_experts(model: torch.nn.Module) -> dict[str, QuantizedExperts]:
    """``{module fqn.name: QuantizedExperts}`` of ``model`` (what ``quantize_fused_experts`` put in place)."""
    return {f"{fqn}.{name}" if fqn else name: t for fqn, m in model.named_modules()
            for name, t in m._buffers.items() if isinstance(t, QuantizedExperts)}


def refuse_experts(model: torch.nn.Module, what: str) -> None:
    """``UnsupportedError`` naming ``model``'s quantized fused experts, which ``what`` cannot write yet."""
    from qcompiler.errors import UnsupportedError
    held = sorted(quantized_experts(model))
    if held:
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise UnsupportedError(f"{what}: the model holds quantized fused mixture-of-experts weights ({held[:3]}{more}), "
                               f"which {what} does not write yet: save with save_quantized (qcompiler's checkpoint), "
                               "or quantize with the experts kept in float (fallback.keep_op_kinds += ('experts',))")


def put_quantized_experts(module: torch.nn.Module, name: str, t: QuantizedExperts) -> None:
    """Replace ``module``'s parameter ``name`` by ``t`` (a non-persistent buffer: the state dict holds no
    subclass; ``save_quantized`` writes the codes itself)."""
    module._parameters.pop(name, None)
    module.register_buffer(name, t, persistent=False)


def quantize_fused_experts(model: torch.nn.Module, recipe, report, results: dict | None = None) -> int:
    """Quantize ``model``'s fused expert weights with ``recipe.weight`` (see the module docstring); each gets a
    ``report.tensors`` entry (kind ``experts``), and what stays in float a reason there and one warning.
    ``results``: ``{key: ([QuantizedWeight per expert], note)}`` from layer-by-layer calibration (per-expert
    GPTQ), taken as they are. Returns the tensors quantized."""
    import warnings

    from qcompiler.pipeline import TensorDecision
    found = list(fused_expert_weights(model))
    if not found or recipe.weight is None:
        return 0
    done, kept = 0, []
    for fqn, module, name, p in found:
        key = f"{fqn}.{name}" if fqn else name
        d = TensorDecision(key, "experts", bytes_fp=p.numel() * p.element_size())
        report.tensors[key] = d
        transposed = getattr(module, LAYOUT_ATTR, None)
        reason = float_reason(module, key, p, recipe)
        if reason:
            d.quantize, d.reason = False, reason
            kept.append(key)
            continue
        w = p.detach()
        done_here = (results or {}).get(key)
        if done_here is not None:
            experts, d.note = done_here
            experts = [qw.to(p.device) for qw in experts]
        else:
            experts = [quantize_weight(w[e].t() if transposed else w[e], recipe.weight) for e in range(w.shape[0])]
            algorithm = recipe.weight_algorithm
            d.note = "round to nearest from its weights, expert by expert" + (
                f" ({type(algorithm).__name__.removesuffix('Spec')} runs per expert for Hessian-based algorithms "
                "only)" if algorithm is not None else "")
        q = QuantizedExperts(experts, transposed, p.dtype, recipe.activation)
        put_quantized_experts(module, name, q)
        d.format = q.describe()
        if recipe.activation is not None and recipe.smoothquant is not None:
            d.note += "; inputs not smoothed (SmoothQuant folds into linear modules only)"
        d.bytes_q = q.nbytes_quantized()
        done += 1
    if kept:
        n_el = sum(math.prod(p.shape) for f, _, n, p in found if (f"{f}.{n}" if f else n) in kept)
        msg = (f"{len(kept)} weights of 3 or more dimensions ({n_el / 1e6:.2f} M values, e.g. {kept[0]}: fused "
               f"mixture-of-experts weights) stay in float: {report.tensors[kept[0]].reason}")
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)
    return done



# ---- checkpoints: save_quantized / load_quantized -------------------------------------------------

#: metadata key of the fused experts in a qcompiler checkpoint
META_KEY = "experts"


def experts_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors (``{key}.q`` stored codes, ``.scale``, ``.zero``, stacked over experts) and metadata of
    ``model``'s quantized fused experts, for ``save_quantized``."""
    tensors, meta = {}, {}
    for key, t in quantized_experts(model).items():
        first = t.experts[0]
        tensors[f"{key}.q"] = torch.stack([qw.storage() for qw in t.experts]).contiguous()
        tensors[f"{key}.scale"] = torch.stack([qw.scale for qw in t.experts]).contiguous()
        if first.zero is not None:
            tensors[f"{key}.zero"] = torch.stack([qw.zero for qw in t.experts]).contiguous()
        meta[key] = {"weight_dtype": first.dtype, "group_size": first.group_size, "reduce_range": first.reduce_range,
                     "in_features": first.shape[1], "transposed": t.transposed,
                     "dtype": str(t.dtype).removeprefix("torch."),
                     "activation_dtype": None if t.activation is None else t.activation.dtype.value}
    return tensors, meta


def restore_experts(model: torch.nn.Module, meta: dict[str, dict], tensors: dict[str, torch.Tensor],
                    where: str) -> set[str]:
    """Put ``meta``'s quantized fused experts (their tensors in ``tensors``) into ``model`` in place of its
    float parameters; returns the keys they replace. ``ValueError`` naming the tensor when the checkpoint and
    the model disagree."""
    def get_tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"{where}: the file lacks tensor {name!r}")
        return tensors[name]

    replaced = set()
    for key, spec in meta.items():
        fqn, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"{where}: fused experts {key!r}: the model has no module {fqn!r}") from None
        p = module._parameters.get(name)
        if p is None or p.dim() != 3:
            raise ValueError(f"{where}: fused experts {key!r}: the model has no 3-D parameter there")
        q, scale = get_tensor(f"{key}.q"), get_tensor(f"{key}.scale")
        zero = tensors.get(f"{key}.zero")
        try:
            experts = [QuantizedWeight.from_storage(q[e], scale[e], None if zero is None else zero[e],
                                                    spec["weight_dtype"], spec["group_size"], spec["in_features"])
                       for e in range(q.shape[0])]
            for qw in experts:
                qw.reduce_range = bool(spec.get("reduce_range", False))
            act = spec.get("activation_dtype")
            activation = None if act is None else ActivationSpec(QuantDtype(act), Granularity.PER_TOKEN)
            t = QuantizedExperts(experts, bool(spec["transposed"]), getattr(torch, spec["dtype"]), activation)
        except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
            raise ValueError(f"{where}: fused experts {key!r} do not read back: {type(e).__name__}: {e}") from None
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{where}: fused experts {key!r} hold {list(t.shape)}, the model's parameter is "
                             f"{list(p.shape)}")
        put_quantized_experts(module, name, t)
        replaced.add(key)
    return replaced
