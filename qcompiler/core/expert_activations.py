"""Dynamic per-token activation quantization for weights read outside a linear module (fused experts).

A fused mixture-of-experts weight is read by the experts implementation's own code (``F.linear`` on one expert,
a grouped GEMM on the transposed tensor, a batched GEMM on the experts indexed per token), so no quantized linear
module sees its input. ``ActQuantWeight`` wraps the (dequantized) weight instead: views of it (a transpose, an
index, a select, a reshape) stay wrapped, and every matrix product that takes it quantizes its other operand, the
activations, per token with the recipe's dynamic activation spec (symmetric, one scale per row of the reduced
dimension; round half to even and saturation as ONNX QuantizeLinear) before multiplying, as a quantized linear
with dynamic activations does. Per-token scales depend on each row alone, so the grouped, batched and looped
implementations quantize the same values.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only
from torch.utils._python_dispatch import return_and_correct_aliasing

from qcompiler.core.layer_quant import fake_quant_act
from qcompiler.recipes import ActivationSpec

__all__ = ["ActQuantWeight", "quantize_rows"]

_aten = torch.ops.aten

#: ops whose result is a view or copy of the weight: the result stays wrapped
_VIEWS = {_aten.t.default, _aten.transpose.int, _aten.permute.default, _aten.view.default, _aten._unsafe_view.default,
          _aten.expand.default, _aten.select.int, _aten.index.Tensor, _aten.slice.Tensor, _aten.alias.default,
          _aten.detach.default, _aten.clone.default, _aten._to_copy.default, _aten.unsqueeze.default,
          _aten.squeeze.dim, _aten.squeeze.default}

#: matrix products: {op: (index of the first factor, index of the second, the second's reduced dimension)}; the
#: first's is its last (``linear(x, W)`` reduces both factors' last dimensions)
_PRODUCTS = {_aten.linear.default: (0, 1, -1), _aten.matmul.default: (0, 1, -2), _aten.mm.default: (0, 1, -2),
             _aten.bmm.default: (0, 1, -2), _aten.addmm.default: (1, 2, -2), _aten.baddbmm.default: (1, 2, -2),
             _aten._grouped_mm.default: (0, 1, -2), _aten.mv.default: (0, 1, -1)}


def quantize_rows(x: torch.Tensor, spec: ActivationSpec, dim: int = -1) -> torch.Tensor:
    """``x`` quantized and dequantized with one dynamic scale per slice along ``dim`` (the reduced dimension of
    the product it enters), computed in float32 and returned in ``x``'s dtype."""
    if dim not in (-1, x.dim() - 1):
        return quantize_rows(x.transpose(dim, -1), spec).transpose(dim, -1)
    return fake_quant_act(x.float(), spec, None).to(x.dtype)


class ActQuantWeight(torch.Tensor):
    """A float weight whose matrix products quantize their other operand per token with ``activation`` (dynamic);
    reads as the float tensor otherwise."""

    dense: torch.Tensor
    activation: ActivationSpec

    @staticmethod
    def __new__(cls, dense: torch.Tensor, activation: ActivationSpec):
        return torch.Tensor._make_wrapper_subclass(cls, dense.shape, strides=dense.stride(), dtype=dense.dtype,
                                                   device=dense.device, requires_grad=False)

    def __init__(self, dense: torch.Tensor, activation: ActivationSpec):
        if not activation.dynamic:
            raise ValueError(f"ActQuantWeight quantizes activations per token at run time; {activation} has a "
                             "static scale")
        self.dense, self.activation = dense, activation

    def __repr__(self) -> str:
        return (f"ActQuantWeight(shape={tuple(self.shape)}, dtype={self.dtype}, activations "
                f"{self.activation.dtype.value} per token)")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            first, second, reduced = _PRODUCTS[func]
            a, b = args[first], args[second]
            if isinstance(b, cls) and not isinstance(a, cls):     # x @ W: x's rows are the tokens
                args = (*args[:first], quantize_rows(a, b.activation, -1), *args[first + 1:])
            elif isinstance(a, cls) and not isinstance(b, cls):   # W @ x: x's columns are (its rows, for linear)
                dim = reduced if b.dim() > 1 else -1                # a vector: one token
                args = (*args[:second], quantize_rows(b, a.activation, dim), *args[second + 1:])
        this = args[0] if args and isinstance(args[0], cls) else None
        plain_args, plain_kwargs = tree_map_only(cls, lambda t: t.dense, (args, kwargs))
        out = func(*plain_args, **plain_kwargs)
        if this is not None and func in _VIEWS and isinstance(out, torch.Tensor):
            # a view of the wrapper aliases it (autograd's and inference mode's version counters need that), and
            # is an inference tensor exactly when the wrapper is one
            with torch.inference_mode(this.is_inference()):
                view = ActQuantWeight(out, this.activation)
            return return_and_correct_aliasing(func, args, kwargs, view)
        return out
