"""An independent fake-quant reference in plain torch: the float model with each planned linear's
output replaced (forward hook) by ``linear(fq_act(x / s), fq_w(W * s), b)``.

It reads only the plan (which linears, smoothing scale s, static activation scale) from the
compile; the quantization math is written here again, from the definitions. GPTQ / AWQ weights
(``ctx.analyses["weight_algorithm"]``) are taken as computed: their algorithms have their own tests.
"""

from __future__ import annotations

import torch

QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}


def _fq(x: torch.Tensor, absmax: torch.Tensor, dtype: str) -> torch.Tensor:
    scale = absmax.clamp(min=1e-12) / QMAX[dtype]
    if dtype == "fp8_e4m3":
        return (x / scale).to(torch.float8_e4m3fn).float() * scale
    lo = -128.0 if dtype == "int8" else -8.0
    return torch.clamp(torch.round(x / scale), lo, QMAX[dtype]) * scale


def fq_weight(w: torch.Tensor, spec) -> torch.Tensor:
    dtype, gran = spec.dtype.value, spec.granularity.value
    if gran == "per_tensor":
        return _fq(w, w.abs().amax(), dtype)
    if gran == "per_channel":
        return _fq(w, w.abs().amax(1, keepdim=True), dtype)
    n, k = w.shape
    g = spec.group_size
    pad = (-k) % g
    wp = torch.nn.functional.pad(w, (0, pad)).view(n, -1, g)
    return _fq(wp, wp.abs().amax(-1, keepdim=True), dtype).view(n, -1)[:, :k]


def fq_act(x: torch.Tensor, spec, static_scale: float | None) -> torch.Tensor:
    dtype = spec.dtype.value
    if spec.granularity.value == "per_token":
        return _fq(x, x.abs().amax(-1, keepdim=True), dtype)
    return _fq(x, torch.tensor(static_scale * QMAX[dtype]), dtype)


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ctx, input_ids: torch.Tensor) -> torch.Tensor:
    recipe, ann = ctx.recipe, ctx.analyses["annotate"]
    handles = []
    for fqn, d in ctx.layer_plan.items():
        if not d.quantize:
            continue
        module = model.get_submodule(fqn)
        transposed = ann.weights[fqn].transposed
        w = (module.weight.t() if transposed else module.weight).float()
        b = getattr(module, "bias", None)
        s = ctx.analyses["smoothing"].get(fqn, torch.ones(w.shape[1]))

        wq = fq_weight(w * s, recipe.weight)
        algo = ctx.analyses.get("weight_algorithm", {}).get(fqn)
        if algo is not None:
            # GPTQ / AWQ-clipped integers are the algorithm's (tested on their own in test_gptq/test_awq);
            # here only their scales' plumbing: rows a later scale was folded into are undone, as above.
            wq = algo.dequantize()
            r = ctx.analyses.get("row_scaling", {}).get(fqn)
            if r is not None:
                wq = wq / r.float()[:, None]

        def hook(mod, args, out, wq=wq, b=b, s=s, d=d):
            x = args[0].float() / s
            if recipe.activation is not None:
                x = fq_act(x, recipe.activation, d.act_scale)
            y = torch.nn.functional.linear(x, wq, None if b is None else b.float())
            return y.reshape(out.shape).to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    try:
        return model(input_ids).logits
    finally:
        for h in handles:
            h.remove()
