"""KV-cache Q/DQ in the ONNX export (``Recipe.kv_cache``).

What TensorRT can take: INT8 or FP8 E4M3 keys and values, symmetric, one static per-tensor scale
each (TensorRT activations take one per-tensor scale, zero-point 0: rules 'activation-per-tensor'
and 'zero-point'). Refused before any work, naming ``recipe.kv_cache`` and why
(``check_kv_exportable``): INT4 keys or values (TensorRT's INT4 is for weights only), per_token
scales (computed as each token is written: no static Q/DQ), per_head / per_channel scales (a
per-axis activation scale), asymmetric integers (zero-points), rotated or centered caches (not
written: they need MatMul / Add nodes around the Q/DQ), and a full-precision
``residual_window`` (a cache policy no Q/DQ graph expresses).

How: the attention of the quantized copy runs through ``qcompiler_kv_qdq``, a transformers
attention function (``AttentionInterface``, with the eager masks) that computes
``softmax((q * scaling) @ QDQ(K^T) + mask) @ QDQ(V)``: K and V as the attention receives them
(after RoPE, before grouped-query repetition), their Q/DQ right in front of the two batched
matmuls, so each DequantizeLinear feeds a MatMul input (rule 'activation-placement'; per tensor,
Q/DQ commute with the repetition and the transpose). The scales are buffers of each attention
module, ``kv_key_scale`` / ``kv_value_scale`` (ONNX initializers ``<module path>.kv_key_scale``),
from the recipe's calibration (``kv_format.static_scale`` per tensor, the scale the KV-cache pass
writes into the compiled graph). Attentions are matched to the calibration by call order, found
by a probe forward; a model whose attention does not go through transformers' attention
interface, or that runs another number of attentions than calibration saw, is refused.

The quantized scores need Q and the softmax output quantized too for TensorRT to run a fused
INT8 / FP8 attention kernel; the recipe quantizes only what the cache stores, so TensorRT runs
the two batched matmuls on the dequantized K / V (``KV_NOTE``).
"""

from __future__ import annotations

import torch

from qcompiler.core import kv_format
from qcompiler.errors import CalibrationError, RecipeError, UnsupportedError
from qcompiler.recipes import Granularity, KVCacheSpec, QuantDtype, Recipe

__all__ = ["ATTENTION", "KEY_SCALE", "VALUE_SCALE", "KV_NOTE", "check_kv_exportable", "install_kv_qdq"]

#: the attention implementation name the export registers with transformers
ATTENTION = "qcompiler_kv_qdq"
KEY_SCALE, VALUE_SCALE = "kv_key_scale", "kv_value_scale"
KV_NOTE = ("KV cache: keys and values go through one static per-tensor Q/DQ each, in front of each attention's "
           "batched matmuls (K^T and V); TensorRT fuses an INT8 / FP8 attention only when the query and the softmax "
           "output are quantized too, which the recipe does not do: there the two matmuls run on the dequantized "
           "K / V, and the Q/DQ say what a quantized cache stores")


def check_kv_exportable(recipe: Recipe) -> None:
    """Refuse a ``recipe.kv_cache`` TensorRT's Q/DQ cannot express, saying why (no-op without one)."""
    spec = recipe.kv_cache
    if spec is None:
        return
    what = f"recipe {recipe.name!r}: recipe.kv_cache ({spec.describe()})"
    if spec.dtype is QuantDtype.INT4:
        raise UnsupportedError(f"{what} has INT4 keys / values; TensorRT's INT4 is for weights only (rule "
                               "'quantized-type'): export with kv_cache=None, or an int8 / fp8_e4m3 per_tensor "
                               "kv_cache such as 'kv-fp8'")
    roles = [r for r in ("key", "value") if getattr(spec, r) is not Granularity.PER_TENSOR]
    if roles:
        fix = " and ".join(f"kv_cache.{r}='per_tensor'" for r in roles)
        dynamic = [r for r in roles if not spec.is_static(r)]
        has = " and ".join(f"{getattr(spec, r).value} {r}" for r in roles)
        why = ("per_token / per_group scales are computed as the cache is written, and TensorRT Q/DQ take static scales"
               if dynamic else "TensorRT activation Q/DQ (keys and values included) take one static per-tensor scale")
        raise UnsupportedError(f"{what} has {has} scales; {why} (rule 'activation-per-tensor'): export with {fix} "
                               "(e.g. 'kv-fp8', or KVCacheSpec('int8', 'per_tensor', 'per_tensor')), or kv_cache=None")
    if spec.rotate or spec.center:
        which = " and ".join(f"kv_cache.{f}=True" for f in ("rotate", "center") if getattr(spec, f))
        raise UnsupportedError(f"{what}: {which} quantizes the keys and values rotated per head / less a per-channel "
                               "offset, which the KV Q/DQ export does not write (it places one Q/DQ pair on K and on "
                               "V): export with them False")
    if not spec.symmetric:
        raise UnsupportedError(f"{what} is asymmetric; TensorRT needs zero-points 0 (rule 'zero-point'): export with "
                               "kv_cache.symmetric=True")
    if spec.residual_window:
        raise UnsupportedError(f"{what} keeps the last {spec.residual_window} tokens in full precision, a policy of "
                               "the cache that a Q/DQ graph cannot express: export with kv_cache.residual_window=0")


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // x.shape[1]
    if rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)


def _qdq(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    ops = torch.ops.qcompiler
    return ops.dequantize(ops.quantize(x, scale, None, dtype), scale, None, x.dtype)


def _kv_qdq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                      **kwargs):
    """transformers' attention-function signature: ``softmax((q * scaling) @ QDQ(K^T) + mask) @ QDQ(V)``;
    returns ``(output [B, T, H, D], None)``. A module the export did not prepare is an error."""
    probe = getattr(module, "_qcompiler_kv_probe", None)
    if probe is not None:                      # the probe forward: record the call order
        probe.append(module)
    k_scale, v_scale = getattr(module, KEY_SCALE, None), getattr(module, VALUE_SCALE, None)
    dtype = getattr(module, "_qcompiler_kv_dtype", None)
    if probe is None and (k_scale is None or v_scale is None or dtype is None):
        raise UnsupportedError(f"{type(module).__name__} runs the {ATTENTION!r} attention without KV scales: the "
                               "export prepares each attention of the model it calibrated")
    if kwargs.get("s_aux") is not None:
        raise UnsupportedError(f"{type(module).__name__} has attention sinks (s_aux), which the KV-cache Q/DQ "
                               "export does not compute: export with kv_cache=None")
    heads = query.shape[1]
    if heads % key.shape[1]:
        raise UnsupportedError(f"{type(module).__name__}: {heads} query heads, {key.shape[1]} key heads")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    k_t = _repeat_kv(key, heads).transpose(2, 3)
    v = _repeat_kv(value, heads)
    if probe is None:
        k_t, v = _qdq(k_t, k_scale, dtype), _qdq(v, v_scale, dtype)
    scores = torch.matmul(query * scaling, k_t)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k_t.shape[-1]]
    elif query.shape[2] > 1 and getattr(module, "is_causal", True):     # as SDPA's is_causal would
        tq, tk = query.shape[2], k_t.shape[-1]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(ATTENTION, _kv_qdq_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def _set_attention(model: torch.nn.Module, name: str) -> None:
    model.config._attn_implementation = name
    for m in model.modules():             # modules holding their own reference to a config
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def install_kv_qdq(model: torch.nn.Module, recipe: Recipe, stats, run) -> list[str]:
    """Prepare the quantized copy ``model`` (changed in place) to export K / V Q/DQ: switch its attention to
    ``qcompiler_kv_qdq``, find its attentions in call order with ``run()`` (one forward), and give
    each the static per-tensor scales of the calibration ``stats`` (``(spec, [per attention])``,
    ``KV_STATS_ATTR``). Returns the attention modules' paths, in call order."""
    spec: KVCacheSpec = recipe.kv_cache
    if stats is None:
        raise CalibrationError(f"recipe {recipe.name!r}: recipe.kv_cache has static scales and the model carries no "
                               "KV-cache calibration: pass calibration= (or a model quantized with qcompiler.quantize "
                               "under this recipe, with calibration)")
    saved_spec, per_attention = stats
    if saved_spec != spec:
        raise RecipeError(f"the model's KV-cache calibration is for kv_cache ({saved_spec.describe()}), recipe "
                          f"{recipe.name!r} has kv_cache ({spec.describe()})")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise UnsupportedError(f"recipe {recipe.name!r}: recipe.kv_cache export needs a transformers model (its "
                               f"attention runs through transformers' attention interface); {type(model).__name__} "
                               "has no config: export with kv_cache=None")
    _register()
    paths = {id(m): name for name, m in model.named_modules()}
    _set_attention(model, ATTENTION)
    calls: list[torch.nn.Module] = []
    for m in model.modules():
        m.__dict__["_qcompiler_kv_probe"] = calls
    try:
        with torch.no_grad():
            run()
    finally:
        for m in model.modules():
            m.__dict__.pop("_qcompiler_kv_probe", None)
    if len(calls) != len(per_attention) or len({id(m) for m in calls}) != len(calls):
        raise UnsupportedError(
            f"recipe {recipe.name!r}: calibration observed {len(per_attention)} attention calls per forward; through "
            f"transformers' attention interface the model runs {len(calls)} ({len({id(m) for m in calls})} modules), "
            "so the keys and values cannot be matched to their scales (a model whose attention calls "
            "scaled_dot_product_attention itself, or runs a module twice): export with kv_cache=None")
    dtype = spec.dtype.value
    for module, s in zip(calls, per_attention):
        device = next(module.parameters(), torch.empty(0)).device
        scales = []
        for role in ("key", "value"):
            lo, hi = s[role]
            scale, _ = kv_format.static_scale((lo, hi), lo.shape[0], Granularity.PER_TENSOR, spec)
            scales.append(scale.float().reshape(()).to(device))
        module.register_buffer(KEY_SCALE, scales[0])
        module.register_buffer(VALUE_SCALE, scales[1])
        module.__dict__["_qcompiler_kv_dtype"] = dtype
    return [paths[id(m)] for m in calls]
