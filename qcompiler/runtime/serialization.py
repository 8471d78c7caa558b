"""Save and load eagerly quantized models as safetensors.

A saved model is a folder: ``model.safetensors`` (quantized tensors, scales and every float
tensor; the recipe JSON and per-layer formats in its metadata), ``recipe.json`` and
``report.json`` beside it, the model's ``config.json`` and its tokenizer. Loading rebuilds the
architecture from the config, swaps in ``QuantizedLinear`` modules as recorded, and loads the
tensors: no calibration, no float checkpoint needed.

KV cache (``Recipe.kv_cache``): the calibration ``qcompiler.quantize`` leaves on the model
(``KV_STATS_ATTR``) is stored in the same ``model.safetensors``, per attention ``i`` in the order
the model runs them (the cache's layer order):

- ``kv_cache.{i}.key_min`` / ``key_max`` / ``value_min`` / ``value_max``: float32 [observed heads,
  head_dim], the keys' and values' ranges seen in calibration; what loading restores, so
  ``qcompiler.kv_cache(loaded_model)`` builds the same cache without calibrating;
- for a static key (value) granularity, the scales a serving engine reads, derived from those
  ranges by ``kv_format.static_scale`` on the model's KV heads (``config.num_key_value_heads``,
  else ``num_attention_heads``; the observed, repeated heads of grouped-query attention folded):
  ``kv_cache.{i}.k_scale`` (``v_scale``) float32, shaped ``[]`` per_tensor, ``[kv_heads]``
  per_head, ``[kv_heads, head_dim]`` per_channel; ``k_zero`` (``v_zero``) uint8 of the same shape
  for asymmetric integers. Dequantized value = (code - zero) * scale.

2:4 weights (a ``SparseGPTSpec(n=2, m=4)`` recipe, symmetric INT8 / FP8 / INT4 codes; INT4's kept codes packed
two per byte again): ``{fqn}.w_q_values`` [N, K/2] and
``{fqn}.w_q_meta`` in CUTLASS's sparse layout (``qcompiler.core.sparse24``) stand in for ``{fqn}.w_q``, and the
layer's spec says ``"sparse24": true``; loading decompresses them, bit for bit.

The metadata key ``kv_cache`` is JSON ``{"attentions": n, "kv_heads": H, "dtype": storage dtype
name, "key": granularity, "value": granularity}``. A recipe with static KV scales whose file lacks
these is a ``CheckpointError``; so are stored scales that disagree with the stored ranges. A
KV-cache-only recipe (``kv-int8``: every linear float) saves and loads with no ``QuantizedLinear``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from qcompiler.runtime import fused_experts
from qcompiler.runtime.eager import QuantizedEmbedding, QuantizedLinear
from qcompiler.runtime.loaded_report import attach_loaded_report
from qcompiler.core import kv_format
from qcompiler.core.kv_format import KV_STATS_ATTR
from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.core.packing import pack_int4, unpack_int4
from qcompiler.passes.kv_cache import kv_rotation
from qcompiler.pipeline import CompileReport
from qcompiler.errors import CheckpointError, RecipeError, UnsupportedError
from qcompiler.recipes import Granularity, KVCacheSpec, Recipe

__all__ = ["save_quantized", "load_quantized", "saved_metadata", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "qcompiler-1"


def save_quantized(model: torch.nn.Module, path: str | Path, recipe: Recipe, *, tokenizer=None,
                   report: CompileReport | None = None, source: str = "") -> Path:
    """Write ``model`` (after ``qcompiler.quantize``) to the folder ``path``; returns the weights file.

    With ``recipe.kv_cache`` the model's KV-cache calibration is written too (``kv_cache.*``, see the
    module docstring); ``ValueError`` when it is missing for static scales or belongs to another spec.
    """
    path = Path(path)
    layers = {}
    for fqn, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            layers[fqn] = {"weight_dtype": m.weight_dtype, "group_size": m.group_size, "act_dtype": m.act_dtype,
                           "act_dynamic": m.act_dynamic, "in_features": m.in_features, "out_features": m.out_features}
    embeddings = {fqn: {"weight_dtype": m.weight_dtype, "group_size": m.group_size, "num_embeddings": m.num_embeddings,
                        "embedding_dim": m.embedding_dim, "out_dtype": str(m.out_dtype).removeprefix("torch.")}
                  for fqn, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
    kv_stats = model.__dict__.get(KV_STATS_ATTR)
    kv_tensors, kv_meta = _kv_tensors(model, recipe, kv_stats)
    sparse_tensors, dense_codes = _sparse24_tensors(model, recipe, layers)
    experts_tensors, experts_meta = fused_experts.experts_tensors(model)
    if not layers and not experts_meta and not (recipe.kv_cache is not None and (kv_stats is not None or
                                                                                  _float_linears(recipe))):
        raise ValueError("save_quantized: the model has no QuantizedLinear; run qcompiler.quantize(model, ...) first")
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "recipe": recipe.to_json(indent=None), "layers": json.dumps(layers),
            "source": source}
    if embeddings:
        meta["embeddings"] = json.dumps(embeddings)
    online = _online_orders(model)
    if online:
        meta["online_hadamard"] = json.dumps(online)
    if kv_meta is not None:
        meta[_KV] = json.dumps(kv_meta)
    if experts_meta:
        meta[fused_experts.META_KEY] = json.dumps(experts_meta)
    weights = path / WEIGHTS_FILE
    _save_model(model, weights, meta, {**kv_tensors, **sparse_tensors, **experts_tensors}, drop=dense_codes)
    (path / "recipe.json").write_text(recipe.to_json())
    if report is not None:
        (path / "report.json").write_text(report.to_json())
    config = getattr(model, "config", None)
    if config is not None:
        config.to_json_file(str(path / "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return weights


def saved_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a saved model (format, recipe JSON, layers JSON, source model name); empty
    for a safetensors file without metadata. ``CheckpointError`` when the file is not safetensors."""
    weights = Path(path) / WEIGHTS_FILE
    with _open_weights(weights) as f:
        return dict(f.metadata() or {})


def load_quantized(path: str | Path) -> tuple[torch.nn.Module, Recipe]:
    """Rebuild a model saved by ``save_quantized``; returns ``(model, recipe)``.

    Raises:
        FileNotFoundError: ``path`` holds no ``model.safetensors``.
        CheckpointError: the weights file is corrupt or not qcompiler's, its metadata lacks a key,
            a layer lacks a tensor, the recipe has static KV-cache scales and the file lacks its
            ``kv_cache.*`` tensors (or they disagree), or ``config.json`` is missing or unreadable.

    With ``recipe.kv_cache`` the model carries its KV-cache calibration again
    (``model.__dict__[KV_STATS_ATTR]``): ``qcompiler.kv_cache(model)`` builds the quantized cache.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: expected a folder written by `qcompiler quantize`")
    with _open_weights(weights) as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{weights} is not a qcompiler file (format {meta.get('format')!r}, "
                                  f"expected {_FORMAT!r}): save it with `qcompiler quantize` or save_quantized")
        missing_keys = [k for k in _META_KEYS if k not in meta]
        if missing_keys:
            raise CheckpointError(f"{weights}: metadata lacks {missing_keys} (has {sorted(meta)})")
        try:
            recipe = Recipe.from_json(meta["recipe"])
        except RecipeError as e:
            raise CheckpointError(f"{weights}: metadata 'recipe' is not a valid recipe: {e}") from None
        experts_meta = _json_meta(weights, meta, fused_experts.META_KEY)
        layers = _layer_specs(weights, meta["layers"], allow_empty=recipe.kv_cache is not None or bool(experts_meta))
        embeddings = _embedding_specs(weights, meta.get("embeddings", "{}"))
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if k.rsplit(".", 1)[0] in layers or k.rsplit(".", 1)[0] in embeddings}
        kv_stats = _kv_stats(weights, recipe, meta, {k: f.get_tensor(k) for k in keys if k.startswith(_KV + ".")})
        experts = {k: f.get_tensor(k) for k in keys if k.rpartition(".")[0] in experts_meta}
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: the model's architecture is read from it "
                              "(save_quantized writes it from model.config)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{config_file} is not a usable model config: {_one_line(e)}") from None
    model = AutoModelForCausalLM.from_config(config).eval()
    for fqn, spec in layers.items():
        new = _quantized_linear(weights, model, fqn, spec, tensors, recipe.weight.reduce_range)
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for fqn, spec in embeddings.items():
        new = _quantized_embedding(weights, model, fqn, spec, tensors)
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    try:
        fused_experts.restore_experts(model, experts_meta, experts, str(weights))
    except ValueError as e:
        raise CheckpointError(_one_line(e)) from None
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except RuntimeError as e:   # a float tensor whose shape differs from the config's
        raise CheckpointError(f"{weights} does not match the model rebuilt from {config_file}: {_one_line(e)}") from None
    sparse = {f"{fqn}.w_q" for fqn, spec in layers.items() if spec.get("sparse24")}    # stored compressed
    missing = [k for k in missing if not k.endswith("inv_freq") and k not in sparse]
    unexpected = [k for k in unexpected if k.rpartition(".")[0] + ".w_q" not in sparse
                  or not k.endswith((".w_q_values", ".w_q_meta"))]
    if recipe.kv_cache is not None:
        unexpected = [k for k in unexpected if not k.startswith(_KV + ".")]
    unexpected = [k for k in unexpected if k.rpartition(".")[0] not in experts_meta]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the model rebuilt from {config_file}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if kv_stats is not None:
        model.__dict__[KV_STATS_ATTR] = kv_stats      # read by qcompiler.kv_cache(model)
    _restore_online(model, weights, meta.get("online_hadamard"))
    attach_loaded_report(model, recipe, f"qcompiler checkpoint {path}")
    return model, recipe


def _online_orders(model: torch.nn.Module) -> dict[str, int]:
    """{module: order} of the online Hadamard transforms on ``model``'s inputs (``rotate(..., online=True)``)."""
    from qcompiler.core.online_rotation import MatrixTransform, OnlineHadamard, online_modules
    orders = {}
    for name in online_modules(model):
        hooks = model.get_submodule(name)._forward_pre_hooks.values()
        if any(isinstance(h, MatrixTransform) for h in hooks):
            raise UnsupportedError(f"save_quantized: {name} reads its input through a compressed-tensors transform "
                                   "matrix (a model from load_compressed_tensors); qcompiler's checkpoint records only "
                                   "its own online Hadamard transforms: save it with save_compressed_tensors")
        hooks = [h for h in hooks if isinstance(h, OnlineHadamard)]
        if len(hooks) != 1:
            raise ValueError(f"save_quantized: {name} has {len(hooks)} online Hadamard transforms; one is saved")
        m, scale = hooks[0].h_block.shape[0], hooks[0].scale
        orders[name] = round(scale ** -2)
        from qcompiler.algorithms.hadamard import online_hadamard
        block, _, _ = online_hadamard(orders[name])
        if block.shape[0] != m or not torch.equal(block, hooks[0].h_block.cpu().float()):
            raise ValueError(f"save_quantized: {name}'s online transform is not online_hadamard({orders[name]})")
    return orders


def _restore_online(model: torch.nn.Module, weights: Path, text: str | None) -> None:
    """Put back the online transforms the checkpoint records (metadata ``online_hadamard``)."""
    if not text:
        return
    from qcompiler.algorithms.hadamard import online_hadamard
    from qcompiler.core.online_rotation import OnlineHadamard
    try:
        orders = json.loads(text)
        for name, n in orders.items():
            module = model.get_submodule(name)
            block, _, scale = online_hadamard(int(n))
            module.register_forward_pre_hook(OnlineHadamard(block, scale))
    except (ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{weights}: metadata 'online_hadamard' cannot be applied: {_one_line(e)}") from None


_META_KEYS = ("format", "recipe", "layers")


def _json_meta(weights: Path, meta: dict[str, str], key: str) -> dict:
    """``meta[key]`` parsed as a JSON object ({} when absent); ``CheckpointError`` when it does not parse."""
    try:
        value = json.loads(meta.get(key) or "{}")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights}: metadata {key!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{weights}: metadata {key!r} is not a JSON object")
    return value
_LAYER_KEYS = ("weight_dtype", "group_size", "act_dtype", "act_dynamic", "in_features", "out_features")


@contextlib.contextmanager
def _open_weights(weights: Path):
    """``safetensors.safe_open`` that turns a corrupt or non-safetensors file into ``CheckpointError``."""
    try:
        f = safetensors.safe_open(str(weights), framework="pt")
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {_one_line(e)}") from None
    with f:
        yield f


def _layer_specs(weights: Path, text: str, allow_empty: bool = False) -> dict[str, dict]:
    try:
        layers = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights}: metadata 'layers' is not JSON: {e}") from None
    if not isinstance(layers, dict) or not (layers or allow_empty):
        raise CheckpointError(f"{weights}: metadata 'layers' must be a non-empty object of layer specs")
    for fqn, spec in layers.items():
        lacking = [k for k in _LAYER_KEYS if not isinstance(spec, dict) or k not in spec]
        if lacking:
            raise CheckpointError(f"{weights}: metadata of layer {fqn!r} lacks {lacking}")
    return layers


_EMBEDDING_KEYS = ("weight_dtype", "group_size", "num_embeddings", "embedding_dim", "out_dtype")


def _embedding_specs(weights: Path, text: str) -> dict[str, dict]:
    try:
        embeddings = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights}: metadata 'embeddings' is not JSON: {e}") from None
    if not isinstance(embeddings, dict):
        raise CheckpointError(f"{weights}: metadata 'embeddings' must be an object of embedding specs")
    for fqn, spec in embeddings.items():
        lacking = [k for k in _EMBEDDING_KEYS if not isinstance(spec, dict) or k not in spec]
        if lacking:
            raise CheckpointError(f"{weights}: metadata of embedding {fqn!r} lacks {lacking}")
        if not isinstance(getattr(torch, str(spec["out_dtype"]), None), torch.dtype):
            raise CheckpointError(f"{weights}: embedding {fqn!r} has an unknown out_dtype {spec['out_dtype']!r}")
    return embeddings


def _quantized_embedding(weights: Path, model: torch.nn.Module, fqn: str, spec: dict,
                         tensors: dict) -> QuantizedEmbedding:
    """The ``QuantizedEmbedding`` for ``fqn`` from its stored tensors; ``CheckpointError`` when one is missing
    or does not fit."""
    try:
        model.get_submodule(fqn)
    except AttributeError:
        raise CheckpointError(f"{weights}: embedding {fqn!r} is not a module of the model built from config.json") from None
    needed = ["w_q", "w_scale"] + (["w_zero"] if str(spec["weight_dtype"]).startswith("u") else [])
    lacking = [f"{fqn}.{n}" for n in needed if f"{fqn}.{n}" not in tensors]
    if lacking:
        raise CheckpointError(f"{weights}: embedding {fqn!r} lacks tensors {lacking}")
    try:
        qw = QuantizedWeight.from_storage(tensors[f"{fqn}.w_q"], tensors[f"{fqn}.w_scale"], tensors.get(f"{fqn}.w_zero"),
                                          spec["weight_dtype"], spec["group_size"] or None, spec["embedding_dim"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: embedding {fqn!r} has unreadable tensors: {_one_line(e)}") from None
    if qw.shape != (spec["num_embeddings"], spec["embedding_dim"]):
        raise CheckpointError(f"{weights}: embedding {fqn!r} table has shape {qw.shape}, expected "
                              f"({spec['num_embeddings']}, {spec['embedding_dim']})")
    return QuantizedEmbedding(qw, getattr(torch, spec["out_dtype"]), fqn)


def _quantized_linear(weights: Path, model: torch.nn.Module, fqn: str, spec: dict, tensors: dict,
                      reduce_range: bool = False) -> QuantizedLinear:
    """The ``QuantizedLinear`` for layer ``fqn`` from its stored tensors; ``CheckpointError`` when a
    tensor it needs is missing or its shape does not fit the module it replaces."""
    try:
        module = model.get_submodule(fqn)
    except AttributeError:
        raise CheckpointError(f"{weights}: layer {fqn!r} is not a module of the model built from config.json") from None
    sparse = bool(spec.get("sparse24"))
    needed = ["w_q_values", "w_q_meta", "w_scale"] if sparse else ["w_q", "w_scale"]
    if str(spec["weight_dtype"]).startswith("u"):    # uint8 / uint4: asymmetric, with zero-points
        needed.append("w_zero")
    if spec["act_dtype"] is not None and not spec["act_dynamic"]:
        needed.append("act_scale")
    if getattr(module, "bias", None) is not None:
        needed.append("bias")
    lacking = [f"{fqn}.{n}" for n in needed if f"{fqn}.{n}" not in tensors]
    if lacking:
        raise CheckpointError(f"{weights}: layer {fqn!r} lacks tensors {lacking}")
    t = lambda name: tensors.get(f"{fqn}.{name}")  # noqa: E731
    try:
        stored = t("w_q")
        if sparse:
            from qcompiler.core import sparse24
            values, int4 = t("w_q_values"), spec["weight_dtype"] in ("int4", "uint4")
            if int4:
                values = unpack_int4(values, spec["in_features"] // 2, signed=spec["weight_dtype"] == "int4")
            if t("w_zero") is None:
                stored = sparse24.decompress(values, t("w_q_meta"))
            else:                                    # asymmetric: the pruned positions hold their zero points
                fill = _zero_fill(t("w_zero"), (spec["out_features"], spec["in_features"]), spec["group_size"])
                stored = sparse24.decompress_around(values, t("w_q_meta"), fill)
            if int4:
                stored = pack_int4(stored)
        qw = QuantizedWeight.from_storage(stored, t("w_scale"), t("w_zero"), spec["weight_dtype"],
                                          spec["group_size"] or None, spec["in_features"])
        qw.reduce_range = reduce_range   # 7-bit int8 weights (the recipe's WeightSpec.reduce_range)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: layer {fqn!r} has unreadable weight tensors: {_one_line(e)}") from None
    if qw.shape != (spec["out_features"], spec["in_features"]):
        raise CheckpointError(f"{weights}: layer {fqn!r} weight has shape {qw.shape}, expected "
                              f"({spec['out_features']}, {spec['in_features']})")
    act_scale = t("act_scale")
    return QuantizedLinear(qw, t("bias"), spec["act_dtype"], spec["act_dynamic"],
                           None if act_scale is None else float(act_scale), t("inv_smooth"), fqn)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# -- KV cache ------------------------------------------------------------------------------------------

_KV = "kv_cache"
_ROLES = (("key", "k"), ("value", "v"))


def _float_linears(recipe: Recipe) -> bool:
    return "linear" in recipe.fallback.keep_op_kinds


def _granularity(spec: KVCacheSpec, role: str) -> Granularity:
    return spec.key if role == "key" else spec.value


def _kv_heads(model: torch.nn.Module, observed: int) -> int:
    """The model's KV heads (config), which the observed heads fold onto; the observed heads when the
    config does not say or does not divide them."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    return heads if isinstance(heads, int) and heads > 0 and observed % heads == 0 else observed


def _kv_ranges(spec: KVCacheSpec, role: str) -> tuple[str, ...]:
    """The calibration ranges stored for ``role``: its own, and under ``rotate`` the rotated one."""
    return (role, role + kv_format.ROTATED) if spec.rotate else (role,)


def _serving_center(stats, heads: int) -> torch.Tensor:
    """``kv_format.static_center`` as [H, D] (``KVCacheSpec.center``)."""
    return kv_format.static_center(stats, heads).reshape(heads, -1).contiguous()


def _serving_scale(entry: dict, role: str, heads: int, granularity: Granularity, spec: KVCacheSpec):
    """``kv_format.static_scale`` of the stored values' range (``kv_format.stored_stats``) without its
    broadcast dimensions: [], [H] or [H, D]."""
    stats = entry[role]
    if spec.rotate or spec.center:
        rotation = kv_rotation(stats[0].shape[-1]) if spec.rotate else None
        stats = kv_format.stored_stats(entry, role, heads, spec, rotation)
    scale, zero = kv_format.static_scale(stats, heads, granularity, spec)
    shape = {Granularity.PER_TENSOR: (), Granularity.PER_HEAD: (heads,)}.get(granularity, (heads, -1))
    return scale.float().reshape(shape).contiguous(), None if zero is None else zero.reshape(shape).contiguous()


def _kv_tensors(model: torch.nn.Module, recipe: Recipe, saved) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The ``kv_cache.*`` tensors and the ``kv_cache`` metadata of the model's KV calibration;
    ``ValueError`` when it does not belong to ``recipe`` or a static spec has none."""
    spec = recipe.kv_cache
    if spec is None:
        if saved is not None:
            raise ValueError(f"save_quantized: the model carries a KV-cache calibration (kv_cache "
                             f"{saved[0].describe()}), but recipe {recipe.name!r} has no kv_cache: save it with the "
                             "recipe it was quantized with")
        return {}, None
    if saved is None:
        if spec.static:
            raise ValueError(f"save_quantized: recipe {recipe.name!r} has static KV-cache scales (kv_cache "
                             f"{spec.describe()}), but the model carries no KV-cache calibration: run "
                             "qcompiler.quantize(model, recipe, calibration=batches) first")
        return {}, {"attentions": 0, "kv_heads": 0, "dtype": kv_format.storage_name(spec), "key": spec.key.value,
                    "value": spec.value.value}
    saved_spec, stats = saved
    if saved_spec != spec:
        raise ValueError(f"save_quantized: the model's KV-cache calibration is for kv_cache ({saved_spec.describe()}); "
                         f"recipe {recipe.name!r} has kv_cache ({spec.describe()})")
    heads = _kv_heads(model, math.gcd(*(s[r][0].shape[0] for s in stats for r, _ in _ROLES))) if stats else 0
    out: dict[str, torch.Tensor] = {}
    for i, s in enumerate(stats):
        s = {name: tuple(t.detach().float().cpu().contiguous() for t in pair) for name, pair in s.items()}
        for role, short in _ROLES:
            for name in _kv_ranges(spec, role):
                out[f"{_KV}.{i}.{name}_min"], out[f"{_KV}.{i}.{name}_max"] = s[name]
            if spec.center:
                out[f"{_KV}.{i}.{short}_center"] = _serving_center(s[role], heads)
            g = _granularity(spec, role)
            if g not in KVCacheSpec.DYNAMIC:
                scale, zero = _serving_scale(s, role, heads, g, spec)
                out[f"{_KV}.{i}.{short}_scale"] = scale
                if zero is not None:
                    out[f"{_KV}.{i}.{short}_zero"] = zero
    clash = sorted(k for k in model.state_dict() if k.startswith(_KV + "."))
    if clash:
        raise ValueError(f"save_quantized: the model's own tensors {clash[:3]} use the {_KV!r} prefix of the KV-cache "
                         "calibration tensors")
    return out, {"attentions": len(stats), "kv_heads": heads, "dtype": kv_format.storage_name(spec),
                 "key": spec.key.value, "value": spec.value.value}


def _sparse24_tensors(model: torch.nn.Module, recipe: Recipe, layers: dict[str, dict]
                      ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A 2:4 recipe's (``SparseGPTSpec(n=2, m=4)``) weight codes compressed (``qcompiler.core.sparse24``;
    asymmetric ones around their zero points, ``compress_around``): ``({fqn.w_q_values / fqn.w_q_meta:
    tensor}, the dense ``fqn.w_q`` keys they replace)``; each such layer's spec gets ``"sparse24": true``.
    A layer that does not compress (a shape the layout does not take) stays dense, logged with the reason."""
    from qcompiler.core import sparse24
    from qcompiler.recipes import SparseGPTSpec
    spec = recipe.weight_algorithm
    if not (isinstance(spec, SparseGPTSpec) and (spec.n, spec.m) == (2, 4)):
        return {}, set()
    tensors, replaced, dense = {}, set(), []
    for fqn, m in model.named_modules():
        if not isinstance(m, QuantizedLinear) or fqn not in layers:
            continue
        int4 = m.weight_dtype in ("int4", "uint4")
        codes = unpack_int4(m.w_q, m.in_features, signed=m.weight_dtype == "int4") if int4 else m.w_q
        fill = None if m.w_zero is None else _zero_fill(m.w_zero, codes.shape, m.group_size)
        try:
            values, meta = sparse24.compress(codes) if fill is None else sparse24.compress_around(codes, fill)
        except ValueError as e:
            dense.append(f"{fqn} ({str(e).removeprefix('2:4 compression: ')})")
            continue
        # INT4: the kept codes packed two per byte again (qcompiler's packing of CUTLASS's int8 values)
        tensors[f"{fqn}.w_q_values"], tensors[f"{fqn}.w_q_meta"] = (pack_int4(values) if int4 else values), meta
        replaced.add(f"{fqn}.w_q")
        layers[fqn]["sparse24"] = True
    if dense:
        log.info("save_quantized: %d of %d 2:4 layers stored dense: %s", len(dense), len(dense) + len(replaced),
                 "; ".join(dense[:4]) + (" ..." if len(dense) > 4 else ""))
    return tensors, replaced


def _zero_fill(zero: torch.Tensor, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """Each weight position's zero point [N, K] (the code a pruned weight holds), from per-channel [N, 1]
    or per-group [N, ceil(K / group)] zero points."""
    n, k = shape
    z = zero.reshape(n, -1)
    if group_size and z.shape[1] > 1:
        z = z.repeat_interleave(group_size, dim=1)[:, :k]
    return z.expand(n, k).contiguous()


def _save_model(model: torch.nn.Module, weights: Path, meta: dict[str, str], extra: dict[str, torch.Tensor],
                drop: set[str] = frozenset()) -> None:
    """``safetensors.torch.save_model`` plus the ``extra`` tensors in the same file, less the ``drop`` keys
    (shared tensors dropped as save_model drops them, so load_model finds them again)."""
    if not extra and not drop:
        safetensors.torch.save_model(model, str(weights), metadata=meta)
        return
    from safetensors.torch import _remove_duplicate_names
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            meta.setdefault(name, kept)
            del state[name]
    state = {k: v.contiguous() for k, v in state.items()}
    state.update(extra)
    safetensors.torch.save_file(state, str(weights), metadata=meta)


def _kv_stats(weights: Path, recipe: Recipe, meta: dict[str, str], tensors: dict[str, torch.Tensor]):
    """``(spec, [per attention {"key": (min, max), "value": (min, max)}])`` from the file, for
    ``KV_STATS_ATTR``; None without a kv_cache in the recipe. ``CheckpointError`` when a static spec's
    tensors are missing, misshapen, or disagree with their scales."""
    spec = recipe.kv_cache
    if spec is None:
        return None
    static = "static KV-cache scales" if spec.static else "a KV cache"
    if _KV not in meta:
        if spec.static:
            raise CheckpointError(f"{weights}: recipe {recipe.name!r} has static KV-cache scales (kv_cache "
                                  f"{spec.describe()}), but the metadata lacks {_KV!r} and the file its kv_cache.* "
                                  "tensors: save the model with save_quantized after qcompiler.quantize with "
                                  "calibration")
        return spec, []
    try:
        info = json.loads(meta[_KV])
        n, heads = int(info["attentions"]), int(info["kv_heads"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{weights}: metadata {_KV!r} must be JSON with 'attentions' and 'kv_heads' "
                              f"(got {meta[_KV][:80]!r})") from None
    if spec.static and n <= 0:
        raise CheckpointError(f"{weights}: recipe {recipe.name!r} has {static}, but metadata {_KV!r} records no "
                              "attention")
    needed = []
    for i in range(n):
        for role, short in _ROLES:
            needed += [f"{_KV}.{i}.{name}_{end}" for name in _kv_ranges(spec, role) for end in ("min", "max")]
            if spec.center:
                needed.append(f"{_KV}.{i}.{short}_center")
            if spec.is_static(role):
                needed.append(f"{_KV}.{i}.{short}_scale")
                if not spec.symmetric:
                    needed.append(f"{_KV}.{i}.{short}_zero")
    lacking = [k for k in needed if k not in tensors]
    if lacking:
        raise CheckpointError(f"{weights}: recipe {recipe.name!r} has {static} (kv_cache {spec.describe()}) for {n} "
                              f"attentions, but the file lacks tensors {lacking[:4]}"
                              f"{f' and {len(lacking) - 4} more' if len(lacking) > 4 else ''}")
    stats = []
    for i in range(n):
        entry = {}
        for role, _ in _ROLES:
            for name in _kv_ranges(spec, role):
                lo, hi = tensors[f"{_KV}.{i}.{name}_min"].float(), tensors[f"{_KV}.{i}.{name}_max"].float()
                if lo.dim() != 2 or lo.shape != hi.shape or heads <= 0 or lo.shape[0] % heads:
                    raise CheckpointError(f"{weights}: {_KV}.{i}.{name}_min / _max have shapes {list(lo.shape)} / "
                                          f"{list(hi.shape)}; expected equal [observed heads, head_dim] with the heads "
                                          f"a multiple of kv_heads {heads}")
                entry[name] = (lo.contiguous(), hi.contiguous())
        for role, short in _ROLES:
            if spec.center and not torch.allclose(tensors[f"{_KV}.{i}.{short}_center"].float(),
                                                  _serving_center(entry[role], heads), rtol=1e-6, atol=0):
                raise CheckpointError(f"{weights}: {_KV}.{i}.{short}_center is not the mid-range of the stored {role} "
                                      "range: the file was changed after save_quantized wrote it")
            g = _granularity(spec, role)
            if g not in KVCacheSpec.DYNAMIC:
                want, want_zero = _serving_scale(entry, role, heads, g, spec)
                got, got_zero = tensors[f"{_KV}.{i}.{short}_scale"], tensors.get(f"{_KV}.{i}.{short}_zero")
                if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=1e-6, atol=0) or \
                        (want_zero is not None and (got_zero is None or not torch.equal(got_zero, want_zero))):
                    raise CheckpointError(f"{weights}: {_KV}.{i}.{short}_scale (shape {list(got.shape)}) is not the "
                                          f"scale of the stored {role} range ({list(want.shape)}): the file was "
                                          "changed after save_quantized wrote it")
        stats.append(entry)
    return spec, stats
