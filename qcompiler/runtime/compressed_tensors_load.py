"""Load a compressed-tensors checkpoint (llm-compressor's, vLLM's format; or qcompiler's own
``save_compressed_tensors``) into qcompiler's eager quantized modules, without recalibrating.

``load_compressed_tensors(path)`` reads ``config.json``'s ``quantization_config`` with
compressed-tensors' ``QuantizationConfig``, builds the architecture from the config (a float
skeleton, as ``load_quantized`` does), assigns each linear its scheme the way compressed-tensors
does (``config_groups`` targets, exact names before regexes before classes, minus ``ignore``), and
swaps in a ``QuantizedLinear`` holding the checkpoint's codes and scales:

- codes: ``pack-quantized`` int32 words unpacked by compressed-tensors' ``unpack_from_int32``
  (4 or 8 bits); ``int-quantized`` / ``naive-quantized`` int8 and ``float-quantized`` fp8 e4m3 as
  stored. compressed-tensors keeps integer codes signed; an asymmetric layer's codes and zero
  points are shifted up by 2^(bits-1) into qcompiler's unsigned uint8 / uint4, so
  ``(q - zero) * scale`` is unchanged;
- scales in float32: strategy ``tensor`` 0-d, ``channel`` [N, 1], ``group`` [N, ceil(K / g)]. A
  group size that divides the checkpoint's main group size, with scales repeated within each main
  group (how ``save_compressed_tensors`` writes a group not dividing K), is read as the main group;
- activations: a static per-tensor ``input_scale`` becomes ``act_scale``; dynamic per token becomes
  ``act_dynamic`` (qcompiler's rule: INT8 scale absmax / 127, where compressed-tensors uses
  absmax / 127.5; FP8 absmax / 448 in both);
- mixture-of-experts weights stored per expert (the per-expert linears of the architecture's checkpoints,
  ``qcompiler.runtime.checkpoint_names``) become the model's fused expert parameters as
  ``QuantizedExperts`` (weight-only, or dynamic per-token activations);
- ``kv_cache_scheme`` (8-bit, symmetric, static, strategy ``tensor`` or ``attn_head``) with each
  attention's ``k_scale`` / ``v_scale`` becomes ``Recipe.kv_cache`` and the model's KV calibration
  (``KV_STATS_ATTR``, and ``KV_PATHS_ATTR``): per KV head a range ``[-m, m]`` whose
  ``kv_format.static_scale`` is exactly the stored scale, so ``qcompiler.kv_cache(model)`` quantizes
  with the checkpoint's scales (and ``save_compressed_tensors`` writes them again);
- ``transform_config``: online ``input`` transforms of the Hadamard types (``hadamard``, ``random-hadamard``;
  ``head_dim`` blocks and ``inverse`` taken) become forward pre-hooks with the stored matrix
  (``<linear>.<scheme>_input.weight``, shared per scheme and size): qcompiler's own online Hadamard when the
  matrix is the one ``rotate(..., online=True)`` uses, a ``MatrixTransform`` otherwise. Weight locations
  are already in the weights (vLLM applies online ones only).

The returned ``Recipe`` describes the checkpoint: weights and activations of its most common scheme
(layers of other schemes carry their own formats), the float linears in ``fallback.keep_modules``,
the KV cache. Refused with ``UnsupportedError`` naming the layer or field: other formats (nvfp4,
mxfp4, marlin-24, sparse checkpoints, uncompressed ``frozen`` ones), transforms on outputs, attention or
the KV cache, of other types or permuted (``randomize``), integer weights
of other than 4 or 8 bits, block / tensor-group strategies, asymmetric or per-tensor dynamic
activations, dynamic ``actorder`` ('group': columns permuted across groups by ``weight_g_idx``) or
a ``weight_g_idx`` other than column // group_size, weight and activation pairs no qcompiler GEMM
runs, KV scales that are not absmax / qmax of any float32 absmax. A missing, misshapen or unreadable
tensor or config is a ``CheckpointError`` naming the tensor and what was expected.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import safetensors
import torch

from qcompiler.core import kv_format, numerics
from qcompiler.core.formats import find_gemm_format
from qcompiler.core.kv_format import KV_PATHS_ATTR, KV_STATS_ATTR
from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.errors import CheckpointError, RecipeError, UnsupportedError
from qcompiler.recipes import (ActivationSpec, FallbackSpec, Granularity, KVCacheSpec, QuantDtype, Recipe,
                               WeightSpec)
from qcompiler.runtime.checkpoint_names import CheckpointNames
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.runtime.loaded_report import attach_loaded_report

try:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.transform import TransformConfig
    from compressed_tensors.utils.match import match_named_modules, match_targets
    from pydantic import ValidationError
except ImportError as e:   # an optional dependency: `pip install qcompiler[serving]`
    raise ImportError("qcompiler.runtime.compressed_tensors_load needs the compressed-tensors package: "
                      "pip install 'qcompiler[serving]' (or compressed-tensors==0.20.1)") from e

__all__ = ["load_compressed_tensors", "QUANT_METHOD", "FORMATS"]

QUANT_METHOD = "compressed-tensors"
#: the compressed-tensors formats this loader reads
FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
_PACKED = "pack-quantized"
_STRATEGIES = {"tensor": Granularity.PER_TENSOR, "channel": Granularity.PER_CHANNEL, "group": Granularity.PER_GROUP}
_KV_STRATEGIES = {"tensor": Granularity.PER_TENSOR, "attn_head": Granularity.PER_HEAD}
_DYNAMIC_ORDER = ("group", "dynamic", True)     # actorder values that permute columns across groups
_KV_SEARCH_ULPS = 4


def load_compressed_tensors(path: str | Path) -> tuple[torch.nn.Module, Recipe]:
    """Rebuild the model of the compressed-tensors checkpoint folder ``path``; returns ``(model, recipe)``.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        CheckpointError: ``config.json`` or the weights are missing, unreadable or not compressed-tensors';
            a quantized layer lacks a tensor (``weight_scale``, ``input_scale``, ...), or one's shape or dtype
            does not fit the config; a tensor no module takes.
        UnsupportedError: a scheme or format qcompiler cannot run (module docstring).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_compressed_tensors: {folder} is not a folder")
    config, qconfig, tconfig = _read_config(folder)
    model = _skeleton(folder, config)
    names = CheckpointNames(model)
    _to_model_names(names, qconfig, tconfig)
    layers = _layer_schemes(folder, model, qconfig)
    transformed = _transform_targets(folder, model, tconfig)
    recipe = _recipe(folder, model, qconfig, layers)
    tensors = {names.model_key(k): t for k, t in _read_tensors(folder).items()}
    owned: dict[str, dict[str, torch.Tensor]] = {f: {} for f in layers}     # layer -> its tensors by local name
    floats = {}
    for name, t in tensors.items():
        parent, _, local = name.rpartition(".")
        if parent in owned:
            owned[parent][local] = t
        else:
            floats[name] = t
    for fqn, (scheme, fmt) in layers.items():
        where = f"{folder}: layer {fqn!r} ({fmt}, {_scheme_name(scheme.weights, scheme.input_activations)})"
        new = _quantized_linear(where, fqn, model.get_submodule(fqn), scheme, fmt, owned[fqn], recipe.weight.group_size)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    _load_experts(folder, model, qconfig, floats, recipe.weight.group_size if recipe.weight else None, names)
    kv = _kv_stats(folder, model, recipe.kv_cache, floats)        # takes the k_scale / v_scale tensors
    _attach_transforms(folder, model, transformed, floats)       # takes the <linear>.<scheme>_input tensors
    _load_float_tensors(folder, model, floats, set(layers))
    if kv is not None:
        model.__dict__[KV_STATS_ATTR] = (recipe.kv_cache, kv[0])     # read by qcompiler.kv_cache(model)
        model.__dict__[KV_PATHS_ATTR] = kv[1]                        # and by save_compressed_tensors
    attach_loaded_report(model, recipe, f"compressed-tensors checkpoint {folder}")
    return model.eval(), recipe


# ---- config ---------------------------------------------------------------------------------------

def _to_model_names(names: CheckpointNames, qconfig: QuantizationConfig, tconfig: TransformConfig | None) -> None:
    """The config's module names (``ignore``, targets that name modules) renamed as the model names them
    (checkpoints carry the architecture's published names: Mixtral's ``block_sparse_moe``, transformers 5's
    ``mlp``); class names and ``re:`` patterns are left as written."""
    def rename(targets: list[str]) -> list[str]:
        return [t if t.startswith("re:") or "." not in t else names.model_module(t) for t in targets]
    qconfig.ignore = rename(list(qconfig.ignore or []))
    for scheme in qconfig.config_groups.values():
        scheme.targets = rename(list(scheme.targets))
    for scheme in (tconfig.config_groups.values() if tconfig is not None else ()):
        for args in scheme.apply:
            args.targets = rename(list(args.targets))
            args.ignore = rename(list(args.ignore))


def _read_config(folder: Path):
    """``(transformers config without its quantization_config, QuantizationConfig, TransformConfig or None)``."""
    from transformers import AutoConfig

    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file} not found: the architecture and quantization_config are read from it")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not readable JSON: {_one_line(e)}") from None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CheckpointError(f"{file}: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}: not a "
                              "compressed-tensors checkpoint (a qcompiler folder loads with load_quantized)")
    _check_global_fields(file, qc)
    try:
        qconfig = QuantizationConfig.model_validate(qc)
    except (ValidationError, ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: quantization_config does not parse as compressed-tensors' QuantizationConfig: "
                              f"{_one_line(e)}") from None
    tconfig = None
    if qc.get("transform_config"):
        try:
            tconfig = TransformConfig.model_validate(qc["transform_config"])
        except (ValidationError, ValueError, TypeError) as e:
            raise CheckpointError(f"{file}: quantization_config.transform_config does not parse as compressed-tensors' "
                                  f"TransformConfig: {_one_line(e)}") from None
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file} is not a usable model config: {_one_line(e)}") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")     # the loaded model runs qcompiler's modules, not transformers'
    return config, qconfig, tconfig


def _check_global_fields(file: Path, qc: dict) -> None:
    """``UnsupportedError`` for what QuantizationConfig parses past: sparsity, an uncompressed status."""
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise UnsupportedError(f"{file}: quantization_config.sparsity_config.format={sparsity.get('format')!r}; "
                               "qcompiler loads dense compressed-tensors checkpoints only (no 2:4 sparsity)")
    for name, group in (qc.get("config_groups") or {}).items():
        order = ((group or {}).get("weights") or {}).get("actorder") if isinstance(group, dict) else None
        if order in _DYNAMIC_ORDER:
            raise UnsupportedError(f"{file}: config_groups.{name}.weights.actorder={order!r}: dynamic activation "
                                   "order permutes each layer's columns across groups (weight_g_idx); qcompiler's "
                                   "group scales cover contiguous columns (and compressed-tensors 0.20 no longer "
                                   "reads it): quantize with actorder='weight' (or 'static')")
    status = qc.get("quantization_status")
    if status != "compressed":
        raise UnsupportedError(f"{file}: quantization_config.quantization_status={status!r}; expected 'compressed' "
                               "(codes and scales on disk): save with save_pretrained(..., save_compressed=True)")


def _skeleton(folder: Path, config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config).eval()
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: transformers cannot build a causal LM from it: "
                              f"{_one_line(e)}") from None


def _layer_schemes(folder: Path, model: torch.nn.Module, qconfig: QuantizationConfig
                   ) -> dict[str, tuple[QuantizationScheme, str]]:
    """``fqn -> (scheme, format)`` of every module a config group quantizes, matched as compressed-tensors'
    ``apply_quantization_config`` does; ``UnsupportedError`` for a scheme or module qcompiler cannot run."""
    target_to_scheme: OrderedDict[str, QuantizationScheme] = OrderedDict()
    for scheme in qconfig.config_groups.values():
        for target in scheme.targets:
            target_to_scheme[target] = scheme
    layers = {}
    for fqn, module in match_named_modules(model, target_to_scheme, qconfig.ignore):
        scheme = target_to_scheme[match_targets(fqn, module, target_to_scheme)[0]]
        if type(module) is not torch.nn.Linear:
            raise UnsupportedError(f"{folder}: module {fqn!r} ({type(module).__name__}) is "
                                   f"quantized by targets {scheme.targets}; qcompiler loads quantized torch.nn.Linear "
                                   "layers only")
        fmt = scheme.format or qconfig.format
        _check_scheme(f"{folder}: layer {fqn!r}", scheme, fmt)
        layers[fqn] = (scheme, fmt)
    return layers


def _check_scheme(where: str, scheme: QuantizationScheme, fmt: str) -> None:
    """``UnsupportedError`` (message starting ``where``) for a scheme no QuantizedLinear can hold."""
    if fmt not in FORMATS:
        raise UnsupportedError(f"{where} has format {fmt!r}; qcompiler loads {list(FORMATS)}")
    if scheme.output_activations is not None:
        raise UnsupportedError(f"{where}: output_activations are quantized; qcompiler quantizes linear inputs only")
    w = scheme.weights
    if w is None:
        raise UnsupportedError(f"{where}: the scheme has no weights args (activation-only quantization)")
    if w.type == "int" and w.num_bits not in (4, 8):
        raise UnsupportedError(f"{where}: weights.num_bits={w.num_bits}; qcompiler runs 4- and 8-bit integer weights")
    if w.type == "float" and (w.num_bits != 8 or not w.symmetric):
        raise UnsupportedError(f"{where}: weights type 'float' with num_bits={w.num_bits}, symmetric={w.symmetric} "
                               "(e.g. nvfp4 / mxfp4); qcompiler runs symmetric fp8 e4m3 weights")
    if w.strategy not in _STRATEGIES:
        raise UnsupportedError(f"{where}: weights.strategy={w.strategy!r}; qcompiler takes {sorted(_STRATEGIES)}")
    if w.dynamic:
        raise UnsupportedError(f"{where}: weights.dynamic={w.dynamic!r}; weights need scales on disk")
    if fmt == _PACKED and w.type != "int":
        raise UnsupportedError(f"{where}: format {fmt!r} with weights type {w.type!r}")
    a = scheme.input_activations
    if a is not None:
        static = a.strategy == "tensor" and a.dynamic is False
        per_token = a.strategy == "token" and a.dynamic is True
        if a.num_bits != 8 or not a.symmetric or not (static or per_token):
            raise UnsupportedError(f"{where}: input_activations (type={a.type!r}, num_bits={a.num_bits}, "
                                   f"symmetric={a.symmetric}, strategy={a.strategy!r}, dynamic={a.dynamic!r}); "
                                   "qcompiler takes symmetric 8-bit activations, static per tensor or dynamic per "
                                   "token")
    act, dtype = _act_dtype(a), _weight_dtype(w)
    if find_gemm_format(dtype, act) is None:
        raise UnsupportedError(f"{where}: {dtype} weights with {act or 'float'} activations; no qcompiler GEMM runs "
                               "that pair")
    if act is not None and w.strategy == "group" and dtype not in ("int4", "uint4"):
        raise UnsupportedError(f"{where}: {dtype} weights.strategy='group' with {act} activations; qcompiler's "
                               "quantized-activation GEMMs take group scales for int4 weights only")


def _weight_dtype(w: QuantizationArgs) -> str:
    """qcompiler's storage dtype of ``w``'s codes."""
    if w.type == "float":
        return "fp8_e4m3"
    name = f"int{w.num_bits}"
    return name if w.symmetric else numerics.UNSIGNED[name]


def _act_dtype(a: QuantizationArgs | None) -> str | None:
    return None if a is None else ("fp8_e4m3" if a.type == "float" else "int8")


# ---- transforms -----------------------------------------------------------------------------------

#: transform_config types read: Hadamard matrices (orthogonal: an inverse is the transpose), each stored in the
#: checkpoint (``<linear>.<scheme>_input.weight``, shared per scheme and size)
_TRANSFORM_TYPES = ("hadamard", "random-hadamard")
_FUSED_LOCATIONS = ("weight_input", "weight_output")


def _transform_targets(folder: Path, model: torch.nn.Module, tconfig: TransformConfig | None
                       ) -> dict[str, tuple[str, object, bool]]:
    """``{linear: (scheme name, scheme, inverse)}`` of the online input transforms of ``tconfig``, matched on the
    float skeleton as compressed-tensors and vLLM match them. Weight locations were fused into the weights when
    the checkpoint was written and are skipped (vLLM applies online ones only); other online locations, types
    other than Hadamard ones and randomized (permuted) schemes are refused."""
    if tconfig is None:
        return {}
    where = f"{folder / 'config.json'}: quantization_config.transform_config.config_groups"
    out: dict[str, tuple[str, object, bool]] = {}
    for name, scheme in tconfig.config_groups.items():
        if scheme.type not in _TRANSFORM_TYPES:
            raise UnsupportedError(f"{where}.{name}.type={scheme.type!r}; qcompiler applies {list(_TRANSFORM_TYPES)} "
                                   "transforms (orthogonal matrices stored in the checkpoint)")
        if scheme.randomize:
            raise UnsupportedError(f"{where}.{name}.randomize=True permutes the stored matrix, which vLLM does not "
                                   "read either; qcompiler applies unpermuted transforms")
        for args in scheme.apply:
            location = getattr(args.location, "value", args.location)
            if location in _FUSED_LOCATIONS:
                continue
            if location != "input":
                raise UnsupportedError(f"{where}.{name}: location {location!r} (targets {args.targets}); qcompiler "
                                       "applies online transforms on linear inputs only")
            for fqn, module in match_named_modules(model, args.targets, args.ignore):
                if not isinstance(module, torch.nn.Linear):
                    raise UnsupportedError(f"{where}.{name}: target {fqn!r} is a {type(module).__name__}; qcompiler "
                                           "applies input transforms to torch.nn.Linear layers")
                if fqn in out:
                    raise UnsupportedError(f"{where}: {fqn!r} takes input transforms from {out[fqn][0]!r} and "
                                           f"{name!r}; one per linear")
                out[fqn] = (name, scheme, bool(args.inverse))
    return out


def _attach_transforms(folder: Path, model: torch.nn.Module, transformed: dict[str, tuple[str, object, bool]],
                       floats: dict[str, torch.Tensor]) -> None:
    """Put each transformed linear's input transform on it as a forward pre-hook, taking its matrix out of
    ``floats``: qcompiler's own online Hadamard (``OnlineHadamard``, the model as it was saved) when the
    matrix is the one ``rotate(..., online=True)`` uses for that size, a ``MatrixTransform`` otherwise."""
    from qcompiler.algorithms.hadamard import online_factors, online_hadamard
    from qcompiler.core.online_rotation import MatrixTransform, OnlineHadamard, input_transform
    sizes = {fqn: scheme.head_dim or model.get_submodule(fqn).in_features
             for fqn, (_, scheme, _) in transformed.items()}
    own = {fqn: floats.pop(f"{fqn}.{name}_input.weight", None) for fqn, (name, _, _) in transformed.items()}
    shared: dict[tuple[str, int], torch.Tensor] = {}
    for fqn, t in own.items():
        if t is not None:
            shared.setdefault((transformed[fqn][0], sizes[fqn]), t)
    ours: dict[int, OnlineHadamard] = {}
    for fqn, (name, scheme, inverse) in transformed.items():
        k = sizes[fqn]
        if model.get_submodule(fqn).in_features % k:
            raise CheckpointError(f"{folder}: transform scheme {name!r} has head_dim {k}, which does not divide the "
                                  f"{model.get_submodule(fqn).in_features} inputs of {fqn!r}")
        stored = own[fqn] if own[fqn] is not None else shared.get((name, k))
        if stored is None:
            raise CheckpointError(f"{folder}: no tensor holds the {k} x {k} matrix of transform scheme {name!r} that "
                                  f"{fqn!r} reads (expected {fqn}.{name}_input.weight or another of its linears')")
        if tuple(stored.shape) != (k, k) or not stored.is_floating_point():
            raise CheckpointError(f"{folder}: {fqn}.{name}_input.weight is {stored.dtype} {list(stored.shape)}; "
                                  f"expected a float {k} x {k} matrix")
        stored = (stored.T if inverse else stored).float().contiguous()
        hook = MatrixTransform(stored, 1.0 / math.sqrt(k))
        if scheme.head_dim is None and online_factors(k) is not None:
            if k not in ours:          # qcompiler's transform of order k and its matrix, built once per size
                block, _, scale = online_hadamard(k)
                ours[k] = OnlineHadamard(block, scale)
                ours[k].stored = input_transform(ours[k], k)[0]
            if torch.equal(ours[k].stored, stored):
                hook = OnlineHadamard(ours[k].h_block, ours[k].scale)
        model.get_submodule(fqn).register_forward_pre_hook(hook)


# ---- recipe ---------------------------------------------------------------------------------------

def _recipe(folder: Path, model: torch.nn.Module, qconfig: QuantizationConfig, layers: dict) -> Recipe:
    """The ``Recipe`` describing the checkpoint: its most common scheme, its float linears, its KV cache."""
    kv = _kv_spec(folder, qconfig.kv_cache_scheme)
    floats = tuple(f for f, m in model.named_modules() if type(m) is torch.nn.Linear and f not in layers)
    if not layers:
        if kv is None:
            raise CheckpointError(f"{folder}: quantization_config.config_groups quantize no linear layer and there "
                                  "is no kv_cache_scheme")
        return Recipe(name="compressed-tensors kv", fallback=FallbackSpec(keep_op_kinds=(
            "embedding", "norm", "output_head", "router", "linear")), kv_cache=kv)
    counts: dict[int, list] = {}
    for scheme, _ in layers.values():
        counts.setdefault(id(scheme), [scheme, 0])[1] += 1
    main = max(counts.values(), key=lambda c: c[1])[0]
    w, a = main.weights, main.input_activations
    weight = WeightSpec(QuantDtype.FP8_E4M3 if w.type == "float" else QuantDtype(f"int{w.num_bits}"),
                        _STRATEGIES[w.strategy], w.group_size if w.strategy == "group" else None, w.symmetric)
    act = None if a is None else ActivationSpec(
        QuantDtype(_act_dtype(a)), Granularity.PER_TENSOR if a.strategy == "tensor" else Granularity.PER_TOKEN)
    name = "compressed-tensors " + _scheme_name(w, a) + ("" if kv is None else f" kv-{kv.dtype.value}")
    try:
        return Recipe(name=name, weight=weight, activation=act, fallback=FallbackSpec(keep_modules=floats),
                      kv_cache=kv)
    except RecipeError as e:
        raise UnsupportedError(f"{folder}: the checkpoint's scheme {name!r} is no qcompiler recipe: "
                               f"{e}") from None


def _scheme_name(w: QuantizationArgs, a: QuantizationArgs | None) -> str:
    weights = "fp8" if w.type == "float" else f"w{w.num_bits}"
    weights += f"-g{w.group_size}" if w.strategy == "group" else f"-{w.strategy}"
    weights += "" if w.symmetric else "-asym"
    if a is None:
        return weights + " a16"
    return f"{weights} a8-{_act_dtype(a)}-{'static' if a.strategy == 'tensor' else 'dynamic'}"


def _kv_spec(folder: Path, args: QuantizationArgs | None) -> KVCacheSpec | None:
    if args is None:
        return None
    if args.num_bits != 8 or not args.symmetric or args.dynamic or args.strategy not in _KV_STRATEGIES:
        raise UnsupportedError(f"{folder}: quantization_config.kv_cache_scheme (type={args.type!r}, "
                               f"num_bits={args.num_bits}, symmetric={args.symmetric}, strategy={args.strategy!r}, "
                               f"dynamic={args.dynamic!r}); qcompiler's cache takes symmetric 8-bit static scales per "
                               f"tensor or per attention head ({sorted(_KV_STRATEGIES)})")
    g = _KV_STRATEGIES[args.strategy]
    return KVCacheSpec(QuantDtype.FP8_E4M3 if args.type == "float" else QuantDtype.INT8, g, g)


# ---- tensors --------------------------------------------------------------------------------------

def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards ``model.safetensors.index.json`` lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} has no readable weight_map: {_one_line(e)}") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found")
    tensors = {}
    for name in files:
        try:
            with safetensors.safe_open(str(folder / name), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"{folder / name} is not a readable safetensors file: {_one_line(e)}") from None
    return tensors


def _quantized_linear(where: str, fqn: str, module: torch.nn.Linear, scheme: QuantizationScheme, fmt: str,
                      t: dict[str, torch.Tensor], main_group: int | None) -> QuantizedLinear:
    """The ``QuantizedLinear`` holding layer ``fqn``'s codes and scales as stored (``t``: its tensors by local name)."""
    a = scheme.input_activations
    qw, act_scale = _quantized_weight(where, fqn, module.out_features, module.in_features, module.bias is not None,
                                      scheme, fmt, t, main_group)
    bias = None if module.bias is None else _float_like(where, "bias", t["bias"], module.bias)
    return QuantizedLinear(qw, bias, _act_dtype(a), bool(a is not None and a.dynamic),
                           None if act_scale is None else float(act_scale), None, fqn)


def _quantized_weight(where: str, fqn: str, n: int, k: int, has_bias: bool, scheme: QuantizationScheme, fmt: str,
                      t: dict[str, torch.Tensor], main_group: int | None
                      ) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """The ``[n, k]`` weight of layer ``fqn`` as stored (``t``: its tensors by local name), and its static input
    scale (None for weight-only or dynamic activations)."""
    w, a = scheme.weights, scheme.input_activations
    needed = (["weight_packed", "weight_shape"] if fmt == _PACKED else ["weight"]) + ["weight_scale"]
    needed += [] if w.symmetric else ["weight_zero_point"]
    needed += ["input_scale"] if a is not None and not a.dynamic else []
    needed += ["bias"] if has_bias else []
    lacking = [f"{fqn}.{name}" for name in needed if name not in t]
    if lacking:
        raise CheckpointError(f"{where} lacks tensors {lacking}")
    codes = _codes(where, w, fmt, t, n, k)
    scale = _scale(where, "weight_scale", t["weight_scale"], w, n, k)
    zero = _zero(where, w, fmt, t, scale.shape, n) if not w.symmetric else _no_zero(where, t)
    _check_g_idx(where, w, t.get("weight_g_idx"), k)
    group = w.group_size if w.strategy == "group" else None
    if group and main_group and main_group > group and main_group % group == 0:
        scale, zero, group = _coarser_groups(scale, zero, group, main_group, k)
    dtype = _weight_dtype(w)
    if not w.symmetric:      # signed codes with an offset -> qcompiler's unsigned codes
        offset = 1 << (w.num_bits - 1)
        codes = (codes.to(torch.int16) + offset).to(torch.uint8)
        zero = (zero.to(torch.int16) + offset).to(torch.uint8)
    act_scale = None
    if a is not None and not a.dynamic:
        act_scale = _scale(where, "input_scale", t["input_scale"], QuantizationArgs(strategy="tensor"), n, k)
    unexpected = sorted(set(t) - set(needed) - {"weight_zero_point", "weight_g_idx"})
    if unexpected:
        raise CheckpointError(f"{where} has tensors its scheme does not use: {[f'{fqn}.{u}' for u in unexpected]}")
    return QuantizedWeight(codes, scale, zero, dtype, group), act_scale


def _load_experts(folder: Path, model: torch.nn.Module, qconfig: QuantizationConfig, floats: dict[str, torch.Tensor],
                  main_group: int | None, names: CheckpointNames) -> None:
    """Experts stored per expert (the architecture's checkpoint layout: Mixtral's ``block_sparse_moe.experts.3.w1``;
    ``checkpoint_names``) become the model's fused expert parameters: quantized ones a ``QuantizedExperts``, one
    ``QuantizedWeight`` per expert; float ones (listed in ``ignore``) the float parameter again. Their tensors are
    taken out of ``floats`` (model names). Experts stored fused stay in ``floats``."""
    from qcompiler.runtime.checkpoint_names import checkpoint_slices
    from qcompiler.runtime.fused_experts import QuantizedExperts, fused_expert_weights, put_quantized_experts

    targets: OrderedDict[str, QuantizationScheme] = OrderedDict()
    for scheme in qconfig.config_groups.values():
        for target in scheme.targets:
            targets[target] = scheme
    for fqn, module, name, p in list(fused_expert_weights(model)):
        key = f"{fqn}.{name}" if fqn else name
        transposed = getattr(module, "is_transposed", None)
        if key in floats or p.dim() != 3 or not isinstance(transposed, bool):
            continue                           # stored fused (float), or no per-expert layout to read
        try:
            slices = checkpoint_slices(model, key, tuple(p.shape), transposed)
        except UnsupportedError:
            continue
        stored = {sl: names.model_module(sl.name) for sl in slices}
        if not any(k.startswith(f + ".") for f in stored.values() for k in floats):
            continue
        k_in = p.shape[1] if transposed else p.shape[2]
        pieces: dict[int, list] = {}
        plain: dict[int, list] = {}
        act = None
        for sl, local in stored.items():
            where = f"{folder}: expert {sl.expert} of {key!r}, stored as {sl.name!r}"
            t = {k.removeprefix(local + "."): floats.pop(k) for k in list(floats) if k.startswith(local + ".")}
            if not t:
                raise CheckpointError(f"{where}: the checkpoint lacks its tensors (other experts of {key!r} are there)")
            probe = torch.nn.Linear(k_in, sl.stop - sl.start, bias=False, device="meta")
            matched = [] if local in qconfig.ignore else match_targets(local, probe, targets)
            if not matched:                      # a float expert
                if set(t) != {"weight"}:
                    raise CheckpointError(f"{where}: no quantization_config group quantizes it, but it holds "
                                          f"{sorted(t)}; a float expert holds 'weight' only")
                plain.setdefault(sl.expert, []).append(_float_like(where, "weight", t["weight"],
                                                                   torch.empty(sl.stop - sl.start, k_in, dtype=p.dtype)))
                continue
            scheme = targets[matched[0]]
            fmt = scheme.format or qconfig.format
            _check_scheme(where, scheme, fmt)
            a = scheme.input_activations
            if a is not None and not a.dynamic:
                raise UnsupportedError(f"{where}: static input scales on experts; qcompiler quantizes the inputs of "
                                       "fused experts per token (dynamic) only")
            here = None if a is None else _act_dtype(a)
            if pieces and here != act:
                raise UnsupportedError(f"{where}: its activations ({here}) differ from the other experts' ({act})")
            act = here
            qw, _ = _quantized_weight(where, sl.name, sl.stop - sl.start, k_in, False, scheme, fmt, t, main_group)
            pieces.setdefault(sl.expert, []).append(qw)
        if pieces and plain:
            raise UnsupportedError(f"{folder}: the experts of {key!r} are stored partly quantized, partly in float; "
                                   "qcompiler holds one fused weight in one form")
        if plain:
            dense = torch.stack([torch.cat(plain[e]) for e in sorted(plain)])
            with torch.no_grad():
                p.copy_(dense.transpose(1, 2) if transposed else dense)
            floats[key] = p.detach().clone()     # loaded as the float tensor it is, with the other floats
            continue
        experts = [_joined_rows(f"{folder}: {key!r} expert {e}", pieces[e]) for e in sorted(pieces)]
        activation = None if act is None else ActivationSpec(QuantDtype(act), Granularity.PER_TOKEN)
        q = QuantizedExperts(experts, transposed, p.dtype, activation)
        if tuple(q.shape) != tuple(p.shape):
            raise CheckpointError(f"{folder}: experts of {key!r} read back as {list(q.shape)}, the model's parameter "
                                  f"is {list(p.shape)}")
        put_quantized_experts(module, name, q)


def _joined_rows(where: str, parts: list[QuantizedWeight]) -> QuantizedWeight:
    """One expert's weight from its row slices (gate and up halves), in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    same = all(qw.dtype == first.dtype and qw.group_size == first.group_size
               and qw.scale.dim() == first.scale.dim() and (qw.zero is None) == (first.zero is None) for qw in parts)
    if not same:
        raise UnsupportedError(f"{where}: its stored parts have different formats")
    if first.scale.dim() == 0:
        if not all(torch.equal(qw.scale, first.scale) for qw in parts):
            raise UnsupportedError(f"{where}: its parts have different per-tensor scales; one fused expert takes one")
        scale = first.scale
        zero = first.zero
    else:
        scale = torch.cat([qw.scale for qw in parts])
        zero = None if first.zero is None else torch.cat([qw.zero for qw in parts])
    return QuantizedWeight(torch.cat([qw.q for qw in parts]), scale, zero, first.dtype, first.group_size)


def _codes(where: str, w: QuantizationArgs, fmt: str, t: dict, n: int, k: int) -> torch.Tensor:
    """The [N, K] codes, signed (compressed-tensors' convention): int8, or float8_e4m3fn."""
    if fmt == _PACKED:
        shape = t["weight_shape"].tolist()
        if shape != [n, k]:
            raise CheckpointError(f"{where}: weight_shape is {shape}, but config.json builds a Linear of [{n}, {k}]")
        packed = t["weight_packed"]
        words = math.ceil(k * w.num_bits / 32)
        if packed.dtype != torch.int32 or tuple(packed.shape) != (n, words):
            raise CheckpointError(f"{where}: weight_packed is {packed.dtype} {list(packed.shape)}; expected "
                                  f"torch.int32 [{n}, {words}] ({w.num_bits}-bit codes of [{n}, {k}] in int32 words)")
        return unpack_from_int32(packed, w.num_bits, torch.Size([n, k]))
    q = t["weight"]
    want = torch.float8_e4m3fn if w.type == "float" else torch.int8
    if q.dtype != want or tuple(q.shape) != (n, k):
        raise CheckpointError(f"{where}: weight is {q.dtype} {list(q.shape)}; expected {want} [{n}, {k}]")
    if w.type == "int" and w.num_bits < 8:
        lo, hi = -(1 << (w.num_bits - 1)), (1 << (w.num_bits - 1)) - 1
        if q.min() < lo or q.max() > hi:
            raise CheckpointError(f"{where}: weight holds codes in [{int(q.min())}, {int(q.max())}], outside the "
                                  f"{w.num_bits}-bit range [{lo}, {hi}]")
    return q


def _scale_shape(w: QuantizationArgs, n: int, k: int) -> tuple[int, ...]:
    if w.strategy == "tensor":
        return ()
    return (n, 1) if w.strategy == "channel" else (n, -(-k // w.group_size))


def _scale(where: str, name: str, s: torch.Tensor, w: QuantizationArgs, n: int, k: int) -> torch.Tensor:
    """``s`` in float32 and qcompiler's layout: 0-d, [N, 1] or [N, ceil(K / g)]."""
    shape = _scale_shape(w, n, k)
    fits = s.numel() == 1 if not shape else tuple(s.shape) == shape or (shape[1] == 1 and tuple(s.shape) == (n,))
    if not fits or not s.is_floating_point():
        raise CheckpointError(f"{where}: {name} is {s.dtype} {list(s.shape)}; strategy {w.strategy!r} needs a float "
                              f"tensor of {list(shape) or [1]}")
    s = s.float().reshape(shape)
    if not torch.isfinite(s).all():
        raise CheckpointError(f"{where}: {name} holds non-finite values")
    return s


def _zero(where: str, w: QuantizationArgs, fmt: str, t: dict, shape: torch.Size, n: int) -> torch.Tensor:
    """The signed int8 zero points in the scale's layout (unpacked from int32 along N for pack-quantized)."""
    z = t["weight_zero_point"]
    if z.dtype == torch.int32 and fmt == _PACKED and w.strategy in ("group", "channel"):
        rows = math.ceil(n * w.num_bits / 32)
        if z.dim() != 2 or tuple(z.shape) != (rows, shape[1]):
            raise CheckpointError(f"{where}: weight_zero_point is int32 {list(z.shape)}; expected [{rows}, {shape[1]}] "
                                  f"({w.num_bits}-bit zero points of {list(shape)} packed along the output channels)")
        z = unpack_from_int32(z, w.num_bits, torch.Size(shape), packed_dim=0)
    if z.numel() != max(1, math.prod(shape)) or z.is_floating_point():
        raise CheckpointError(f"{where}: weight_zero_point is {z.dtype} {list(z.shape)}; expected integers of "
                              f"{list(shape) or [1]}")
    lo, hi = -(1 << (w.num_bits - 1)), (1 << (w.num_bits - 1)) - 1
    if z.min() < lo or z.max() > hi:
        raise CheckpointError(f"{where}: weight_zero_point holds values outside [{lo}, {hi}]")
    return z.to(torch.int8).reshape(shape)


def _no_zero(where: str, t: dict) -> None:
    """A symmetric layer's zero point: absent, or all zeros (some writers keep it)."""
    z = t.get("weight_zero_point")
    if z is not None and bool((z != 0).any()):
        raise CheckpointError(f"{where}: weight_zero_point is non-zero, but the scheme says weights.symmetric=True")
    return None


def _check_g_idx(where: str, w: QuantizationArgs, g_idx: torch.Tensor | None, k: int) -> None:
    """A ``weight_g_idx`` is taken only when it maps column c to group c // group_size."""
    if g_idx is None:
        return
    if w.strategy != "group":
        raise CheckpointError(f"{where}: weight_g_idx is stored, but weights.strategy is {w.strategy!r}, not 'group'")
    if tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
        raise CheckpointError(f"{where}: weight_g_idx is {g_idx.dtype} {list(g_idx.shape)}; expected integers of [{k}]")
    if not torch.equal(g_idx.long(), torch.arange(k) // w.group_size):
        raise UnsupportedError(f"{where}: weight_g_idx maps columns to groups out of order (weights.actorder="
                               f"{w.actorder!r}); qcompiler's group scales cover contiguous columns (group c // "
                               f"{w.group_size})")


def _coarser_groups(scale: torch.Tensor, zero: torch.Tensor | None, group: int, main: int, k: int):
    """Scales of ``group`` columns read as groups of ``main`` when each main group repeats one value
    (how ``save_compressed_tensors`` writes a group not dividing K); else unchanged."""
    fine_of_coarse = torch.arange(0, k, main) // group           # the first fine group of each coarse group
    coarse_of_fine = torch.arange(0, k, group) // main
    coarse_scale = scale[:, fine_of_coarse]
    if not torch.equal(coarse_scale[:, coarse_of_fine], scale):
        return scale, zero, group
    if zero is not None:
        coarse_zero = zero[:, fine_of_coarse]
        if not torch.equal(coarse_zero[:, coarse_of_fine], zero):
            return scale, zero, group
        zero = coarse_zero.contiguous()
    return coarse_scale.contiguous(), zero, main


def _float_like(where: str, name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tuple(value.shape) != tuple(like.shape) or not value.is_floating_point():
        raise CheckpointError(f"{where}: {name} is {value.dtype} {list(value.shape)}; expected a float tensor of "
                              f"{list(like.shape)}")
    return value.to(like.dtype)


def _load_float_tensors(folder: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                        quantized: set[str]) -> None:
    """Load every other tensor into the model; ``CheckpointError`` naming what is missing, left over or misshapen."""
    state = model.state_dict()
    owned = tuple(f + "." for f in quantized)
    tied = _tied_names(model)
    unexpected = sorted(k for k in tensors if k not in state or k.startswith(owned))
    if unexpected:
        raise CheckpointError(f"{folder}: tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} belong to no "
                              "float module of the model config.json builds, nor to a layer its quantization_config "
                              "quantizes")
    missing = sorted(k for k in state if k not in tensors and not k.startswith(owned) and k not in tied)
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint lacks float tensors {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} of the model config.json builds")
    wrong = [f"{k} {list(v.shape)} (config: {list(state[k].shape)})" for k, v in tensors.items()
             if tuple(v.shape) != tuple(state[k].shape)]
    if wrong:
        raise CheckpointError(f"{folder}: float tensors of the wrong shape: {wrong[:3]}")
    model.load_state_dict(tensors, strict=False)


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another name of an earlier parameter (tied embeddings)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


# ---- KV cache -------------------------------------------------------------------------------------

def _kv_stats(folder: Path, model: torch.nn.Module, spec: KVCacheSpec | None,
              tensors: dict[str, torch.Tensor]) -> tuple[list[dict], list[str]] | None:
    """Per attention (the model's order), ``{"key": (min, max), "value": (min, max)}`` [kv heads, head_dim]
    whose ``kv_format.static_scale`` is the stored ``k_scale`` / ``v_scale`` (taken out of ``tensors``),
    and the attention modules' paths; None without a KV scheme."""
    if spec is None:
        return None
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    modules = dict(model.named_modules())
    attentions = [f for f in modules if f and (f"{f}.k_scale" in tensors or f"{f}.v_scale" in tensors)]
    layers = getattr(config, "num_hidden_layers", None)
    if not attentions or (layers is not None and len(attentions) != layers):
        raise CheckpointError(f"{folder}: quantization_config.kv_cache_scheme is set, but the checkpoint holds "
                              f"k_scale / v_scale for {len(attentions)} attention modules and the model has "
                              f"{layers} layers")
    stats = []
    for fqn in attentions:
        entry = {}
        for role, short in (("key", "k"), ("value", "v")):
            name = f"{fqn}.{short}_scale"
            if name not in tensors:
                raise CheckpointError(f"{folder}: kv_cache_scheme: attention {fqn!r} lacks {name}")
            entry[role] = _kv_range(folder, name, tensors.pop(name), heads, head_dim, spec)
        stats.append(entry)
    return stats, attentions


def _kv_range(folder: Path, name: str, scale: torch.Tensor, heads: int, head_dim: int,
              spec: KVCacheSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` [heads, head_dim] = ``(-m, m)`` with ``static_scale`` giving back ``scale`` bit for bit."""
    per_head = spec.key is Granularity.PER_HEAD
    count = heads if per_head else 1
    if scale.numel() != count or not scale.is_floating_point():
        raise CheckpointError(f"{folder}: {name} is {scale.dtype} {list(scale.shape)}; kv_cache_scheme strategy "
                              f"{'attn_head' if per_head else 'tensor'} needs {count} float scale(s)")
    s = scale.float().reshape(count)
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise CheckpointError(f"{folder}: {name} holds non-finite or non-positive scales")
    qmax = numerics.QRANGE[kv_format.storage_name(spec)][1]
    m = _absmax_for(s, qmax)
    hi = m.reshape(count, 1).expand(heads, head_dim).contiguous()
    got, _ = kv_format.static_scale((-hi, hi), heads, spec.key, spec)
    if m.isnan().any() or not torch.equal(got.reshape(-1), s.expand(got.numel())):
        raise UnsupportedError(f"{folder}: {name} = {s.tolist()} is not absmax / {qmax:g} for any float32 absmax, "
                               f"the rule of qcompiler's static KV scales (kv_format.static_scale), so its cache "
                               "cannot quantize with exactly this scale")
    return -hi, hi


def _absmax_for(s: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per entry a float32 m with ``m / qmax == s`` (searched within a few ulps of ``s * qmax``); NaN where none."""
    base = s * qmax
    found = torch.full_like(s, float("nan"))
    for steps in range(_KV_SEARCH_ULPS + 1):
        for direction in (float("inf"), float("-inf")):
            m = base
            for _ in range(steps):
                m = torch.nextafter(m, torch.full_like(m, direction))
            hit = found.isnan() & ((m / qmax) == s)
            found = torch.where(hit, m, found)
    return found


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
