"""Write a model quantized by ``qcompiler.quantize`` as a compressed-tensors checkpoint: the serving
format vLLM reads and transformers loads (with the ``compressed-tensors`` package; the tests check
transformers 5.24 with compressed-tensors 0.20.1 on CPU).

``save_compressed_tensors(model, path, recipe, tokenizer=tok)`` writes ``config.json`` with a
``quantization_config`` (``quant_method: compressed-tensors``), ``model.safetensors``,
``recipe.json``, the generation config and the tokenizer. The layout is compressed-tensors' own: one
``QuantizationScheme`` per config group, the format its ``infer_module_format`` picks
(``pack-quantized`` for weight-only INT4 / INT8, ``int-quantized`` for W8A8 INT8 and for INT4
weights with INT8 activations — one 4-bit code per int8, unpacked — ``float-quantized`` for FP8) and that format's compressor, fed the dequantized weight and
qcompiler's scales so that it re-derives qcompiler's codes; they are checked code for code before
the folder is moved into place.

What a quantized layer becomes:

- codes in compressed-tensors' signed convention: asymmetric (uint8 / uint4) codes and zero points
  shifted down by 2^(bits-1), so ``(q - zero) * scale`` is unchanged; 7-bit (``reduce_range``)
  codes are ordinary 8-bit codes;
- float32 scales: ``[1]`` per tensor, ``[N, 1]`` per channel, ``[N, K / g]`` per group. A group
  size that does not divide K (compressed-tensors needs whole groups) is written as groups of
  gcd(g, K), each scale repeated: exact, but not a group size every vLLM kernel takes (logged).
  A per-tensor weight-only INT4 / INT8 scale is written per channel, repeated (vLLM's W4A16 /
  W8A16 schemes take channel or group scales only);
- activations: a static per-tensor ``input_scale`` [1], or dynamic per token. The loader
  computes dynamic scales itself: compressed-tensors' symmetric INT8 scale is absmax / 127.5
  (qcompiler's absmax / 127), its FP8 scale absmax / 448 like qcompiler's;
- a SmoothQuant / AWQ input scale that qcompiler folded into a norm (report ``smoothing``
  ``norm:<fqn>``; eager modules apply it as ``inv_smooth``) goes into that norm's weight and bias,
  checked on a probe input; a float linear reading the same norm gets the inverse on its columns;
- fused mixture-of-experts weights (``QuantizedExperts``) are written expert by expert as the per-expert linears
  of the architecture's published checkpoints (Mixtral's ``block_sparse_moe.experts.3.w1``; found from
  transformers' reverse conversion, ``qcompiler.runtime.checkpoint_names``), in the checkpoint's one
  scheme (transformers reads every expert with one); transformers 5.25 loads pack-quantized and FP8 experts
  (dequantized into its fused parameters), not int-quantized ones (saving warns);
- linears kept in float are listed in ``ignore`` by module name, as transformers builds the model;
- a KV cache (``Recipe.kv_cache``) with static symmetric 8-bit scales per tensor or per KV head and no
  residual window becomes the config's ``kv_cache_scheme`` (strategy ``tensor`` / ``attn_head``) and
  each attention module's ``k_scale`` / ``v_scale`` ([1] / [kv heads, 1, 1], from the model's KV
  calibration by ``kv_format.static_scale``): what transformers applies to the keys (after RoPE) and
  values entering its cache, and, for FP8 per tensor, vLLM's ``kv_cache_dtype=fp8`` scales;
- online Hadamard transforms (``rotate(..., online=True)``) become the config's ``transform_config``:
  location ``input`` on each transformed linear, type ``hadamard`` for Sylvester's matrix and
  ``random-hadamard`` for the others, each matrix stored once per scheme and size
  (``<linear>.<scheme>_input.weight``). vLLM and compressed-tensors' ``apply_transform_config`` apply it;
  transformers (5.25) ignores it and drops the matrices, so saving logs a warning.

Refused with ``UnsupportedError`` before anything is written: fused experts the architecture's checkpoints keep
fused (GPT-OSS) or that would need a scheme of their own, a KV cache the scheme cannot express
(INT4, asymmetric, per channel / per token / per group, a residual window, keys and values of
different granularities), quantized embeddings, an input scale no norm absorbed (report smoothing ``explicit``), a layer
transformers does not build as ``torch.nn.Linear`` (GPT-2's ``Conv1D``), a quantized weight that
transformers ties to another tensor.

Asymmetric weight-only integers are written by default as pack-quantized with their zero points packed
into int32 along the output channels (``[N * bits / 32, groups]``), compressed-tensors' own compressor's
layout and what llm-compressor writes and vLLM reads. transformers 5.24-5.25 with compressed-tensors
0.20.1 cannot load them (when it builds the empty compressed model, compressed-tensors' pack-quantized
compressor keeps the zero points unpacked, ``[N, groups]``, and transformers refuses the checkpoint's
shapes: llm-compressor issues #1618 / #1704), so saving logs a warning. ``asymmetric_format="int-quantized"``
writes them in the layout transformers loads: one code per int8 byte and unpacked int8 zero points (the
layout of W8A8's zero points), twice the weight bytes of INT4 packing and not a format vLLM's weight-only
schemes take. ``load_compressed_tensors`` reads both.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import safetensors.torch
import torch

from qcompiler import recipes
from qcompiler.core import kv_format
from qcompiler.core.kv_format import KV_PATHS_ATTR, KV_STATS_ATTR
from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.errors import UnsupportedError
from qcompiler.pipeline import CompileReport
from qcompiler.recipes import Granularity, QuantDtype, Recipe
from qcompiler.runtime.eager import QuantizedEmbedding, QuantizedLinear
from qcompiler.runtime.checkpoint_names import CheckpointNames, checkpoint_slices
from qcompiler.runtime.fused_experts import QuantizedExperts, quantized_experts
from qcompiler.runtime.norm_fold import folded_norm_params

try:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
except ImportError as e:   # an optional dependency: `pip install qcompiler[serving]`
    raise ImportError("qcompiler.export.compressed_tensors needs the compressed-tensors package: "
                      "pip install 'qcompiler[serving]' (or compressed-tensors==0.20.1)") from e

__all__ = ["save_compressed_tensors", "check_recipe", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"
_BITS = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "fp8_e4m3": 8}
_UNSIGNED = ("uint8", "uint4")
_PACKED = CompressionFormat.pack_quantized.value
_INT = CompressionFormat.int_quantized.value
#: how asymmetric weight-only integers may be written: vLLM's layout (default) or transformers'
ASYMMETRIC_FORMATS = (_PACKED, _INT)
#: KV-cache granularities kv_cache_scheme expresses, as its strategies
_KV_STRATEGIES = {Granularity.PER_TENSOR: "tensor", Granularity.PER_HEAD: "attn_head"}
#: transform_config scheme names and types: Sylvester's matrix (compressed-tensors' deterministic ``hadamard``,
#: which vLLM runs with its Hadamard kernel) and any other matrix (``random-hadamard``: vLLM multiplies by the
#: stored matrix)
_TRANSFORM_SCHEMES = {"hadamard": "online_sylvester", "random-hadamard": "online_hadamard"}


@dataclass
class _Layer:
    """One quantized linear as compressed-tensors writes it: a ``QuantizedLinear``, or rows of one expert of
    a fused experts weight (``QuantizedExperts``), written as the linear the checkpoint layout names."""

    fqn: str
    qw: QuantizedWeight              # its codes and scales
    weights: QuantizationArgs
    inputs: QuantizationArgs | None
    group_size: int | None           # the group size written (gcd(g, K) for a g not dividing K)
    bias: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None   # a static activation scale
    written_as: str | None = None    # its module name in the checkpoint (the architecture's published names)
    format: str = field(init=False)  # the compressed-tensors format its scheme gets

    def __post_init__(self):
        scheme = QuantizationScheme(targets=["Linear"], weights=self.weights, input_activations=self.inputs)
        self.format = CompressionFormat(infer_module_format(torch.nn.Linear, scheme)).value

    def key(self) -> str:
        dump = lambda a: None if a is None else a.model_dump()  # noqa: E731
        return json.dumps([dump(self.weights), dump(self.inputs), self.format], sort_keys=True)


@dataclass
class _Plan:
    """What ``save_compressed_tensors`` writes, decided (and every refusal raised) before writing."""

    layers: dict[str, _Layer]
    ignore: list[str]
    state_keys: list[str]                                        # float tensors, as transformers names them
    norm_params: dict[str, torch.Tensor] = field(default_factory=dict)     # norm tensors with a scale folded in
    column_scales: dict[str, torch.Tensor] = field(default_factory=dict)   # float linear fqn -> weight column factor
    kv_scheme: QuantizationArgs | None = None
    kv_tensors: dict[str, torch.Tensor] = field(default_factory=dict)      # attention fqn.k_scale / .v_scale
    transforms: TransformConfig | None = None                              # online input transforms
    transform_tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # fqn.<scheme>_input.weight
    names: CheckpointNames | None = None                                   # model names -> the checkpoint's


def save_compressed_tensors(model: torch.nn.Module, path: str | Path, recipe: Recipe | str, *, tokenizer=None,
                            overwrite: bool = False, report: CompileReport | None = None,
                            asymmetric_format: str = _PACKED) -> Path:
    """Write ``model`` (after ``qcompiler.quantize``) to the folder ``path`` as a compressed-tensors
    checkpoint that ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads; returns ``path``.

    The folder is written beside ``path`` under a temporary name and moved into place when complete;
    an existing non-empty ``path`` is replaced only with ``overwrite=True``. ``report``: the model's
    ``qcompiler.report(model)``, which says where a SmoothQuant / AWQ scale folds (the top-level
    ``qcompiler.save_compressed_tensors`` passes it); needed only when a layer carries such a scale.
    ``asymmetric_format``: the format of asymmetric weight-only integer layers, ``"pack-quantized"``
    (vLLM and llm-compressor's layout; transformers 5.25 cannot load it) or ``"int-quantized"`` (one code
    per byte, zero points unpacked: transformers loads it, vLLM's weight-only schemes do not).

    Raises:
        UnsupportedError: the model or recipe uses what the format cannot express (module docstring);
            the message names the layer or field. Nothing is written.
        ValueError: the model has no ``QuantizedLinear``.
        FileExistsError: ``path`` exists, is not empty, and ``overwrite`` is False.
    """
    if asymmetric_format not in ASYMMETRIC_FORMATS:
        raise ValueError(f"save_compressed_tensors: asymmetric_format={asymmetric_format!r}; expected one of "
                         f"{list(ASYMMETRIC_FORMATS)}")
    recipe = recipes.resolve(recipe)
    path = Path(path)
    plan = _plan(model, recipe, report, asymmetric_format)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"save_compressed_tensors: {path} exists and is not empty; pass overwrite=True "
                              "to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        _write(model, recipe, plan, tmp, tokenizer)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("save_compressed_tensors: %d quantized linears, %d ignored, written to %s",
             len(plan.layers), len(plan.ignore), path)
    return path


# ---- planning: every refusal happens here ------------------------------------------------------

def check_recipe(recipe: Recipe | str) -> None:
    """``UnsupportedError`` when ``recipe`` asks for what this export refuses whatever the model (a KV-cache
    spec, quantized embeddings): lets a caller refuse before quantizing."""
    recipe = recipes.resolve(recipe)
    _kv_scheme(recipe)
    if recipe.embedding is not None:
        raise UnsupportedError(f"save_compressed_tensors: recipe {recipe.name!r} quantizes embedding tables "
                               "(recipe.embedding); vLLM loads compressed-tensors quantization for linear layers, "
                               "not embeddings: keep them in float (recipe.embedding=None)")


def _plan(model: torch.nn.Module, recipe: Recipe, report: CompileReport | None,
          asymmetric_format: str = _PACKED) -> _Plan:
    check_recipe(recipe)
    embeddings = [f for f, m in model.named_modules() if isinstance(m, QuantizedEmbedding)]
    if embeddings:
        raise UnsupportedError(f"save_compressed_tensors: embeddings {embeddings} are quantized (recipe.embedding); "
                               "vLLM loads compressed-tensors quantization for linear layers, not embedding tables: "
                               "keep them in float (recipe.embedding=None)")
    quantized = {f: m for f, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    experts = quantized_experts(model)
    if not quantized and not experts and recipe.kv_cache is None:
        raise ValueError("save_compressed_tensors: the model has no QuantizedLinear; "
                         "run qcompiler.quantize(model, ...) first")
    skeleton = _skeleton(model)
    kv_scheme = _kv_scheme(recipe)
    kv_tensors = _kv_scales(model, skeleton, recipe) if kv_scheme is not None else {}
    not_linear = {f: type(skeleton.get_submodule(f)).__name__ for f in quantized
                  if not isinstance(skeleton.get_submodule(f), torch.nn.Linear)}
    if not_linear:
        raise UnsupportedError(f"save_compressed_tensors: transformers builds the quantized layers "
                               f"{_names(sorted(not_linear))} as {sorted(set(not_linear.values()))}, not torch.nn.Linear, and "
                               "compressed-tensors quantizes only torch.nn.Linear (and Embedding) modules (GPT-2's "
                               "Conv1D stores its weight transposed): keep them in float (fallback.keep_modules) or "
                               "save with save_quantized")
    tied = _tied_names(skeleton)
    tied_quantized = sorted(f"{f}.weight" for f in quantized if f"{f}.weight" in tied)
    if tied_quantized:
        raise UnsupportedError(f"save_compressed_tensors: the quantized weights {tied_quantized} are tied to "
                               f"{[tied[n] for n in tied_quantized]} in transformers (tie_word_embeddings), which "
                               "would overwrite them on load: keep the layer in float (fallback.keep_op_kinds)")
    layers = {f: _layer(f, m) for f, m in quantized.items()}
    layers.update(_expert_layers(skeleton, experts))
    if experts:
        _one_scheme_with_experts(layers)
        if next(iter(layers.values())).format == _INT:
            log.warning("save_compressed_tensors: the fused experts %s are written int-quantized (int8 codes); "
                        "transformers (5.25) cannot load such experts (its experts reader takes pack-quantized and "
                        "FP8 experts only); vLLM and qcompiler.load_compressed_tensors read them", _names(sorted(experts)))
    packed_zero = sorted(f for f, lay in layers.items() if not lay.weights.symmetric and lay.format == _PACKED)
    if packed_zero and asymmetric_format == _INT:
        for f in packed_zero:
            layers[f].format = _INT
    elif packed_zero:
        log.warning("save_compressed_tensors: layers %s have asymmetric weight-only integer weights; written as "
                    "pack-quantized with their zero points packed into int32 [N / %d, groups], the layout of "
                    "compressed-tensors' compressor, llm-compressor and vLLM. transformers (5.24-5.25, with "
                    "compressed-tensors 0.20.1) cannot load such checkpoints: it builds the zero points "
                    "unpacked and refuses the shapes (llm-compressor issues #1618 / #1704); "
                    "qcompiler.load_compressed_tensors and vLLM read them. For transformers, save with "
                    "asymmetric_format='int-quantized' (CLI: --ct-asymmetric-format int-quantized)",
                    _names(packed_zero), 32 // layers[packed_zero[0]].weights.num_bits)
    norm_params, column_scales = _smoothing_folds(model, quantized, report)
    tied_columns = sorted(f"{f}.weight" for f in column_scales if f"{f}.weight" in tied)
    if tied_columns:
        raise UnsupportedError(f"save_compressed_tensors: float layers {tied_columns} read a norm that absorbs a "
                               "SmoothQuant scale and would need their columns rescaled, but transformers ties them "
                               f"to {[tied[n] for n in tied_columns]}")
    ignore = [f for f, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and f not in quantized]
    owned = tuple(f + "." for f in quantized)
    state_keys = [k for k in skeleton.state_dict() if not k.startswith(owned) and k not in tied and k not in experts]
    live = model.state_dict()
    missing = [k for k in state_keys if k not in live]
    if missing:
        raise ValueError(f"save_compressed_tensors: the model lacks tensors that transformers builds from its config: "
                         f"{missing[:5]}")
    odd = [f for f, lay in layers.items() if lay.qw.group_size and lay.group_size != lay.qw.group_size]
    if odd:
        log.warning("save_compressed_tensors: group size %s does not divide the input size of %s; written as "
                    "smaller groups with repeated scales (exact in transformers; vLLM's kernels may not take them)",
                    layers[odd[0]].qw.group_size, odd)
    transforms, transform_tensors = _transform_config(model, skeleton)
    # every name written as the architecture's published checkpoints have it (what vLLM's model classes load)
    names = CheckpointNames(skeleton)
    for f, lay in layers.items():
        lay.written_as = lay.written_as or names.checkpoint_module(f)
    float_experts = _float_expert_linears(skeleton, state_keys)
    if float_experts:
        log.warning("save_compressed_tensors: fused experts kept in float are written per expert as %s..., listed in "
                    "ignore (the layout vLLM's model classes and llm-compressor use); transformers (5.25) cannot load "
                    "float experts in that layout from a compressed-tensors checkpoint (its experts reader expects them "
                    "quantized); qcompiler.load_compressed_tensors reads them", float_experts[0])
    ignore = [names.checkpoint_module(f) for f in ignore] + float_experts
    kv_tensors = {names.checkpoint_key(k): v for k, v in kv_tensors.items()}
    transform_tensors = {names.checkpoint_key(k): v for k, v in transform_tensors.items()}
    for scheme in (transforms.config_groups.values() if transforms is not None else ()):
        for args in scheme.apply:
            args.targets = [names.checkpoint_module(t) for t in args.targets]
    return _Plan(layers, ignore, state_keys, norm_params, column_scales, kv_scheme, kv_tensors, transforms,
                 transform_tensors, names)


def _transform_config(model: torch.nn.Module, skeleton: torch.nn.Module
                      ) -> tuple[TransformConfig | None, dict[str, torch.Tensor]]:
    """The model's online input transforms (``rotate(..., online=True)``, or a loaded checkpoint's) as a
    ``transform_config`` and its matrices: one scheme per type, each matrix ``V`` (the input becomes
    ``x V / sqrt(k)``, compressed-tensors' and vLLM's rule) stored once per scheme and size, under the first
    linear that reads it (``<linear>.<scheme>_input.weight``: compressed-tensors ties the others to it)."""
    from qcompiler.core.online_rotation import INPUT_TRANSFORMS, input_transform, online_modules, sylvester
    targets: dict[tuple[str, str, int | None], list[str]] = {}     # (scheme, type, head_dim) -> linears
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}
    for fqn in online_modules(model):
        module = model.get_submodule(fqn)
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, INPUT_TRANSFORMS)]
        k_in = getattr(module, "in_features", None)
        if not isinstance(skeleton.get_submodule(fqn), torch.nn.Linear) or k_in is None:
            raise UnsupportedError(f"save_compressed_tensors: {fqn} reads its input through an online transform, and "
                                   f"transformers builds it as a {type(skeleton.get_submodule(fqn)).__name__}; "
                                   "transform_config transforms torch.nn.Linear inputs")
        if len(hooks) != 1:
            raise UnsupportedError(f"save_compressed_tensors: {fqn} reads its input through {len(hooks)} online "
                                   "transforms; transform_config applies one per linear")
        matrix, scale = input_transform(hooks[0], k_in)
        k = matrix.shape[0]
        if k_in % k or not math.isclose(scale, 1 / math.sqrt(k), rel_tol=1e-6):
            raise UnsupportedError(f"save_compressed_tensors: {fqn}'s input transform ({k} x {k}, scale {scale:g}) is "
                                   "not an orthogonal Hadamard-type transform scaled by 1 / sqrt(size) in blocks "
                                   "dividing its input, which transform_config cannot express")
        kind = "hadamard" if k & (k - 1) == 0 and torch.equal(matrix, sylvester(k)) else "random-hadamard"
        name = _TRANSFORM_SCHEMES[kind] + ("" if k == k_in else f"_block{k}")
        first = stored.setdefault((name, k), (fqn, matrix))
        if first[0] == fqn:
            tensors[f"{fqn}.{name}_input.weight"] = matrix.contiguous()
        elif not torch.equal(first[1], matrix):
            raise UnsupportedError(f"save_compressed_tensors: {fqn} and {first[0]} read their inputs through different "
                                   f"{k} x {k} transforms; a transform_config scheme shares one matrix per size")
        targets.setdefault((name, kind, None if k == k_in else k), []).append(fqn)
    if not targets:
        return None, {}
    groups = {name: TransformScheme(type=kind, apply=[TransformArgs(targets=fqns, location="input")], head_dim=block,
                                    precision=torch.float32)
              for (name, kind, block), fqns in targets.items()}
    log.warning("save_compressed_tensors: %d linears read their input through an online Hadamard transform, written "
                "as quantization_config.transform_config with its matrices (%s); vLLM applies it, and so do "
                "qcompiler.load_compressed_tensors and compressed-tensors' apply_transform_config. transformers "
                "(5.25) does not: it drops those tensors with a warning and computes something else",
                sum(len(v) for v in targets.values()), ", ".join(sorted(tensors)))
    return TransformConfig(config_groups=groups), tensors


def _kv_scheme(recipe: Recipe) -> QuantizationArgs | None:
    """``recipe.kv_cache`` as compressed-tensors' ``kv_cache_scheme`` (None without one);
    ``UnsupportedError`` naming the field when the scheme cannot express it."""
    spec = recipe.kv_cache
    if spec is None:
        return None
    what = f"save_compressed_tensors: recipe {recipe.name!r} has kv_cache ({spec.describe()})"
    fix = "(e.g. 'kv-fp8': fp8_e4m3 per_tensor, vLLM's k_scale / v_scale), or save_quantized"
    if spec.dtype is QuantDtype.INT4:
        raise UnsupportedError(f"{what}: kv_cache.dtype='int4'; compressed-tensors' kv_cache_scheme is applied by "
                               f"vLLM and transformers as 8-bit keys and values: use int8 or fp8_e4m3 {fix}")
    if spec.residual_window:
        raise UnsupportedError(f"{what}: kv_cache.residual_window={spec.residual_window} keeps the last positions in "
                               f"full precision, a policy of qcompiler's cache that kv_cache_scheme cannot express: "
                               f"use residual_window=0 {fix}")
    if spec.rotate or spec.center:
        which = " and ".join(f"kv_cache.{f}=True" for f in ("rotate", "center") if getattr(spec, f))
        raise UnsupportedError(f"{what}: {which} stores the keys and values transformed (rotated per head / less a "
                               f"per-channel offset), which kv_cache_scheme cannot express (vLLM and transformers read "
                               f"plain scaled values): set them False {fix}")
    if not spec.symmetric:
        raise UnsupportedError(f"{what}: kv_cache.symmetric=False; kv_cache_scheme scales are symmetric (vLLM reads no "
                               f"zero point) {fix}")
    if spec.key is not spec.value:
        raise UnsupportedError(f"{what}: kv_cache.key='{spec.key.value}' and kv_cache.value='{spec.value.value}' "
                               f"differ; one kv_cache_scheme covers keys and values {fix}")
    if spec.key not in _KV_STRATEGIES:
        raise UnsupportedError(f"{what}: kv_cache.key / value '{spec.key.value}'; kv_cache_scheme takes static "
                               f"per_tensor or per_head scales {fix}")
    return QuantizationArgs(num_bits=8, type="float" if spec.dtype is QuantDtype.FP8_E4M3 else "int",
                            symmetric=True, strategy=_KV_STRATEGIES[spec.key], dynamic=False)


def _kv_scales(model: torch.nn.Module, skeleton: torch.nn.Module, recipe: Recipe) -> dict[str, torch.Tensor]:
    """``{attention fqn}.k_scale`` / ``.v_scale`` from the model's KV calibration, each attention named by
    the module that runs it (found in calibration, ``KV_PATHS_ATTR``)."""
    saved = model.__dict__.get(KV_STATS_ATTR)
    spec = recipe.kv_cache
    if saved is None or saved[0] != spec:
        raise ValueError(f"save_compressed_tensors: recipe {recipe.name!r} has kv_cache ({spec.describe()}), but the "
                         "model carries no KV-cache calibration for it: run qcompiler.quantize(model, recipe, "
                         "calibration=batches) first")
    stats, attentions = saved[1], model.__dict__.get(KV_PATHS_ATTR)
    if attentions is None or len(attentions) != len(stats):
        raise UnsupportedError("save_compressed_tensors: the model's KV-cache calibration does not name the modules "
                               "that run its attentions (a model from load_quantized): quantize it with "
                               "qcompiler.quantize(model, recipe, calibration=batches) to export its KV scales")
    modules = dict(skeleton.named_modules())
    odd = [f for f in attentions if f not in modules or f == ""]
    if odd:
        raise UnsupportedError(f"save_compressed_tensors: attentions {_names(odd, 3)} are not each run once by their own "
                               "module (a module calling attention twice, or the model's root), so no "
                               "<module>.k_scale / .v_scale name holds their scales")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    shape = (1,) if spec.key is Granularity.PER_TENSOR else (heads, 1, 1)
    out = {}
    for fqn, entry in zip(attentions, stats):
        for role, short in (("key", "k"), ("value", "v")):
            scale, _ = kv_format.static_scale(entry[role], heads, spec.key, spec)
            out[f"{fqn}.{short}_scale"] = scale.float().reshape(shape).contiguous()
    return out


def _skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """The model transformers builds from ``model.config`` before loading weights, on the meta device."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedError(f"save_compressed_tensors: {type(model).__name__} has no .config; a Hugging Face "
                               "model (PreTrainedModel) is needed to write config.json")
    with torch.device("meta"):
        return type(model)(copy.deepcopy(config)).eval()


def _names(fqns: list[str], most: int = 8) -> str:
    """A list of module names for a message, the first ``most`` of a long one."""
    return str(fqns) if len(fqns) <= most else f"{fqns[:most]} and {len(fqns) - most} more"


def _tied_names(skeleton: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> the name it is tied to (its first name), for every later name of a tied parameter."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _layer(fqn: str, m: QuantizedLinear) -> _Layer:
    qw = QuantizedWeight.from_storage(m.w_q, m.w_scale, m.w_zero, m.weight_dtype, m.group_size or None, m.in_features)
    return _quantized_layer(fqn, qw, m.act_dtype, bool(m.act_dynamic), m.bias,
                            None if m.act_dtype is None or m.act_dynamic else m.act_scale)


def _quantized_layer(fqn: str, qw: QuantizedWeight, act_dtype: str | None, act_dynamic: bool,
                     bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> _Layer:
    dtype = qw.dtype
    if dtype not in _BITS:
        raise UnsupportedError(f"save_compressed_tensors: layer {fqn!r} has weight dtype {dtype!r}; "
                               f"compressed-tensors export takes {sorted(_BITS)}")
    is_float = dtype == "fp8_e4m3"
    kind = "float" if is_float else "int"
    group_size = None
    if qw.scale.dim() == 0:
        # per-tensor weight-only integers as per-channel (the scale repeated): vLLM's WNA16 takes no tensor strategy
        strategy = "channel" if act_dtype is None and not is_float else "tensor"
    elif qw.group_size:
        strategy, group_size = "group", math.gcd(qw.group_size, qw.shape[1])
    else:
        strategy = "channel"
    weights = QuantizationArgs(num_bits=_BITS[dtype], type=kind, symmetric=qw.zero is None, strategy=strategy,
                               group_size=group_size)
    inputs = None
    if act_dtype is not None:
        if act_dtype not in ("int8", "fp8_e4m3"):
            raise UnsupportedError(f"save_compressed_tensors: layer {fqn!r} quantizes its input to {act_dtype!r}; "
                                   "compressed-tensors export takes int8 or fp8_e4m3 activations")
        inputs = QuantizationArgs(num_bits=8, type="float" if act_dtype == "fp8_e4m3" else "int", symmetric=True,
                                  strategy="token" if act_dynamic else "tensor", dynamic=act_dynamic)
    return _Layer(fqn, qw, weights, inputs, group_size, bias, input_scale)


def _expert_layers(skeleton: torch.nn.Module, experts: dict[str, QuantizedExperts]) -> dict[str, _Layer]:
    """The quantized fused experts as the per-expert linears of the architecture's checkpoint layout
    (``checkpoint_names``: Mixtral's ``block_sparse_moe.experts.3.w1``, Qwen2-MoE's
    ``mlp.experts.3.gate_proj``), which vLLM and transformers' compressed-tensors loading read."""
    layers = {}
    for key, t in experts.items():
        try:
            slices = checkpoint_slices(skeleton, key, tuple(t.shape), t.transposed)
        except UnsupportedError as e:
            raise UnsupportedError(f"save_compressed_tensors: {e}; save with save_quantized, or keep the experts "
                                   "in float (fallback.keep_op_kinds += ('experts',))") from None
        act = None if t.activation is None else t.activation.dtype.value
        for piece in slices:
            qw = _rows(t.experts[piece.expert], piece.start, piece.stop)
            layers[piece.name] = _quantized_layer(piece.name, qw, act, act is not None)
            layers[piece.name].written_as = piece.name       # already the checkpoint's name
    return layers


def _float_expert_linears(skeleton: torch.nn.Module, state_keys: list[str]) -> list[str]:
    """The per-expert linears (checkpoint names) of the fused experts written in float: listed in ``ignore``, since
    the checkpoint stores them per expert like the quantized ones and a ``Linear`` target would claim them."""
    from qcompiler.calibration.expert_inputs import LAYOUT_ATTR, fused_expert_weights
    keep = set(state_keys)
    out = []
    for fqn, module, name, p in fused_expert_weights(skeleton):
        key = f"{fqn}.{name}" if fqn else name
        transposed = getattr(module, LAYOUT_ATTR, None)
        if key not in keep or p.dim() != 3 or not isinstance(transposed, bool):
            continue
        try:
            out += [piece.name for piece in checkpoint_slices(skeleton, key, tuple(p.shape), transposed)]
        except UnsupportedError:       # written fused: no linear to claim
            pass
    return out


def _one_scheme_with_experts(layers: dict[str, _Layer]) -> None:
    """``UnsupportedError`` unless every quantized layer takes one scheme: transformers (5.25) reads a checkpoint's
    experts with a single scheme (the config group whose targets are classes) and vLLM's fused MoE takes one per
    layer's experts, so experts in a group of their own, or split over two, would load with the wrong scales."""
    members: dict[str, list[str]] = {}
    for f, lay in layers.items():
        members.setdefault(lay.key(), []).append(f)
    if len(members) < 2:
        return
    def say(names: list[str]) -> str:
        w, a = layers[names[0]].weights, layers[names[0]].inputs
        fmt = f"{w.num_bits}-bit {w.type} {w.strategy}" + (f" {w.group_size}" if w.group_size else "")
        fmt += "" if a is None else f", {a.num_bits}-bit {a.type} {a.strategy} activations"
        return f"{fmt}: {len(names)} layers, e.g. {names[0]!r}"
    raise UnsupportedError("save_compressed_tensors: the model's fused experts and linears would need "
                           f"{len(members)} compressed-tensors schemes ({'; '.join(say(n) for n in members.values())}); "
                           "with mixture-of-experts weights every quantized layer must take one (transformers reads "
                           "all experts with one scheme). A group size that does not divide a layer's input size is "
                           "written as a smaller group: pick a group size dividing every input size, keep the odd "
                           "layers in float, or save with save_quantized")


def _rows(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """Rows ``[start, stop)`` of ``qw`` (scales and zero points are per row, or one per tensor)."""
    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or t.dim() == 0 else t[start:stop]
    if (start, stop) == (0, qw.shape[0]):
        return qw
    return replace(qw, q=qw.q[start:stop], scale=rows(qw.scale), zero=rows(qw.zero))


def _smoothing_folds(model: torch.nn.Module, quantized: dict[str, QuantizedLinear], report: CompileReport | None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The norm tensors with the layers' ``inv_smooth`` folded in, and the column factors of float
    linears that read those norms; ``UnsupportedError`` for a scale no norm absorbs."""
    smoothed = {f: m.inv_smooth for f, m in quantized.items() if m.inv_smooth is not None}
    if not smoothed:
        return {}, {}
    if report is None:
        raise UnsupportedError(f"save_compressed_tensors: layers {_names(sorted(smoothed))} scale their input "
                               "(inv_smooth) and no qcompiler report says which norm absorbs the scale: pass "
                               "report=qcompiler.report(model) (a model from load_quantized has none)")
    decisions = report.layers
    explicit = sorted(f for f in smoothed if not decisions.get(f) or not decisions[f].smoothing.startswith("norm:"))
    if explicit:
        globs = tuple(sorted({"*." + f.rpartition(".")[2] for f in explicit}))
        raise UnsupportedError(f"save_compressed_tensors: layers {_names(explicit)} multiply their input by a SmoothQuant / "
                               "AWQ scale (inv_smooth) that no preceding norm or linear absorbed (report smoothing "
                               "'explicit'); compressed-tensors has no per-input-channel scale to hold it: keep these "
                               f"layers in float (e.g. fallback.keep_modules={globs!r}) and quantize again")
    by_norm: dict[str, dict[str, torch.Tensor]] = {}
    for f, inv in smoothed.items():
        by_norm.setdefault(decisions[f].smoothing.removeprefix("norm:"), {})[f] = inv
    params, columns = {}, {}
    for norm_fqn, members in by_norm.items():
        first, inv = next(iter(members.items()))
        inv = inv.float()
        differ = sorted(f for f, v in members.items() if not torch.equal(v.float(), inv))
        if differ:
            raise UnsupportedError(f"save_compressed_tensors: the layers reading norm {norm_fqn!r} scale their input "
                                   f"differently ({_names(differ)} vs {first!r}); one norm can absorb one scale")
        for name, t in _fold_norm(model.get_submodule(norm_fqn), inv, norm_fqn).items():
            params[f"{norm_fqn}.{name}"] = t
        for f, d in decisions.items():          # float linears reading the same norm keep their outputs
            if d.smoothing == f"norm:{norm_fqn}" and f not in quantized:
                if not isinstance(model.get_submodule(f), torch.nn.Linear):
                    raise UnsupportedError(f"save_compressed_tensors: float layer {f!r} reads norm {norm_fqn!r}, whose "
                                           f"weights absorb a SmoothQuant scale, and is not a torch.nn.Linear whose "
                                           "columns could absorb the inverse")
                columns[f] = 1.0 / inv
    return params, columns


def _fold_norm(norm: torch.nn.Module, inv: torch.Tensor, fqn: str) -> dict[str, torch.Tensor]:
    """``norm``'s parameters such that its output is multiplied by ``inv`` (``norm_fold.folded_norm_params``)."""
    folded = folded_norm_params(norm, inv)
    if isinstance(folded, str):
        raise UnsupportedError(f"save_compressed_tensors: norm {fqn!r} cannot absorb its readers' SmoothQuant / AWQ "
                               f"scale: {folded}")
    log.debug("save_compressed_tensors: folded a scale into %s", fqn)
    return folded


# ---- writing -----------------------------------------------------------------------------------

def _write(model: torch.nn.Module, recipe: Recipe, plan: _Plan, folder: Path, tokenizer) -> None:
    live = model.state_dict()
    tensors = {k: plan.norm_params.get(k, live[k]) for k in plan.state_keys}
    for f, col in plan.column_scales.items():
        w = tensors[f"{f}.weight"]
        tensors[f"{f}.weight"] = (w.float() * col[None, :]).to(w.dtype)
    tensors = plan.names.checkpoint_state(tensors)
    groups = _config_groups(plan.layers)
    for lay in plan.layers.values():
        scheme = groups[lay.key()]
        for name, t in _compress(lay, scheme).items():
            tensors[f"{lay.written_as}.{name}"] = t
    tensors.update(plan.kv_tensors)
    tensors.update(plan.transform_tensors)
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    hf_config = copy.deepcopy(model.config)
    if not getattr(hf_config, "architectures", None):     # set by save_pretrained; vLLM picks its model class by it
        hf_config.architectures = [type(model).__name__]
    hf_config.to_json_file(str(folder / "config.json"))
    formats = {lay.format for lay in plan.layers.values()} or {CompressionFormat.dense.value}
    config = QuantizationConfig(config_groups={f"group_{i}": s for i, s in enumerate(groups.values())},
                                format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
                                ignore=plan.ignore, kv_cache_scheme=plan.kv_scheme,
                                quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=config, transform_config=plan.transforms).update_config(str(folder))
    (folder / "recipe.json").write_text(recipe.to_json())
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _config_groups(layers: dict[str, _Layer]) -> dict[str, QuantizationScheme]:
    """One scheme per distinct (weights, inputs): the most common one targets ``Linear``, the others
    name their layers and come first (an exact name outranks a class in compressed-tensors' and vLLM's
    matching; compressed-tensors tries targets in order)."""
    members: dict[str, list[str]] = {}
    for f, lay in layers.items():
        members.setdefault(lay.key(), []).append(f)
    if not members:                    # a KV-cache-only recipe: every linear in float
        return {}
    main = max(members, key=lambda k: len(members[k]))
    groups = {}
    for key in sorted(members, key=lambda k: k == main):
        lay = layers[members[key][0]]
        targets = ["Linear"] if key == main else [layers[f].written_as for f in members[key]]
        groups[key] = QuantizationScheme(targets=targets, weights=lay.weights, input_activations=lay.inputs,
                                         format=lay.format)
    return groups


def _compress(lay: _Layer, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """The layer's tensors as ``scheme``'s compressor writes them, its codes checked against qcompiler's."""
    qw = lay.qw
    offset = 2 ** (_BITS[qw.dtype] - 1) if qw.dtype in _UNSIGNED else 0
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": _layout(qw.scale.float(), lay)}
    if qw.zero is not None:
        state["weight_zero_point"] = _layout(qw.zero.to(torch.int16) - offset, lay).to(torch.int8)
    if lay.bias is not None:
        state["bias"] = lay.bias
    if lay.input_scale is not None:
        state["input_scale"] = lay.input_scale.detach().float().reshape(1)
    compressor = BaseCompressor.get_value_from_registry(lay.format)
    out = compressor.compress(state, scheme)
    codes = qw.q if qw.dtype == "fp8_e4m3" else (qw.q.to(torch.int16) - offset).to(torch.int8)
    _check_codes(lay, out, codes, state.get("weight_zero_point"))
    return out


def _layout(t: torch.Tensor, lay: _Layer) -> torch.Tensor:
    """A scale or zero point of qcompiler's layout in the written strategy's: ``[1]``, ``[N, 1]`` or
    ``[N, K / group]`` (qcompiler's groups repeated when the written group is smaller)."""
    n, k = lay.qw.shape
    strategy = lay.weights.strategy
    if strategy == "tensor":
        return t.reshape(1)
    if strategy == "channel":
        return t.reshape(-1, 1).expand(n, 1).contiguous() if t.dim() == 0 else t.reshape(n, 1)
    index = torch.arange(0, k, lay.group_size, device=t.device) // lay.qw.group_size
    return t.index_select(1, index).contiguous()


def _check_codes(lay: _Layer, out: dict[str, torch.Tensor], codes: torch.Tensor, zero: torch.Tensor | None) -> None:
    """compressed-tensors re-derived the codes from the dequantized weight: they must be qcompiler's."""
    bits = lay.weights.num_bits
    if "weight_packed" in out:
        written = unpack_from_int32(out["weight_packed"], bits, tuple(codes.shape))
    else:
        written = out["weight"]
    same = written.dtype == codes.dtype and torch.equal(written.view(torch.uint8), codes.view(torch.uint8))
    if same and zero is not None:
        z = out.get("weight_zero_point")
        if z is not None and z.dtype == torch.int32:   # packed along the output channels
            z = unpack_from_int32(z, bits, tuple(zero.shape), packed_dim=0)
        same = z is not None and torch.equal(z, zero)
    if not same:
        raise RuntimeError(f"save_compressed_tensors: internal error: compressed-tensors wrote codes for layer "
                           f"{lay.fqn!r} that differ from qcompiler's")


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing ``path`` is moved aside first and
    removed once the new folder is in place (restored if the rename fails)."""
    if not path.exists():
        tmp.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    old.rmdir()
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
