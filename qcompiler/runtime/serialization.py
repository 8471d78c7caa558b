"""Save and load eagerly quantized models as safetensors.

A saved model is a folder: ``model.safetensors`` (quantized tensors, scales and every float
tensor; the recipe JSON and per-layer formats in its metadata), ``recipe.json`` and
``report.json`` beside it, the model's ``config.json`` and its tokenizer. Loading rebuilds the
architecture from the config, swaps in ``QuantizedLinear`` modules as recorded, and loads the
tensors: no calibration, no float checkpoint needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from qcompiler.runtime.eager import QuantizedEmbedding, QuantizedLinear
from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.pipeline import CompileReport
from qcompiler.errors import CheckpointError, RecipeError
from qcompiler.recipes import Recipe

__all__ = ["save_quantized", "load_quantized", "saved_metadata", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "qcompiler-1"


def save_quantized(model: torch.nn.Module, path: str | Path, recipe: Recipe, *, tokenizer=None,
                   report: CompileReport | None = None, source: str = "") -> Path:
    """Write ``model`` (after ``qcompiler.quantize``) to the folder ``path``; returns the weights file."""
    path = Path(path)
    layers = {}
    for fqn, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            layers[fqn] = {"weight_dtype": m.weight_dtype, "group_size": m.group_size, "act_dtype": m.act_dtype,
                           "act_dynamic": m.act_dynamic, "in_features": m.in_features, "out_features": m.out_features}
    embeddings = {fqn: {"weight_dtype": m.weight_dtype, "group_size": m.group_size, "num_embeddings": m.num_embeddings,
                        "embedding_dim": m.embedding_dim, "out_dtype": str(m.out_dtype).removeprefix("torch.")}
                  for fqn, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
    if not layers:
        raise ValueError("save_quantized: the model has no QuantizedLinear; run qcompiler.quantize(model, ...) first")
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "recipe": recipe.to_json(indent=None), "layers": json.dumps(layers),
            "source": source}
    if embeddings:
        meta["embeddings"] = json.dumps(embeddings)
    weights = path / WEIGHTS_FILE
    safetensors.torch.save_model(model, str(weights), metadata=meta)
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
            a layer lacks a tensor, or ``config.json`` is missing or unreadable.
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
        layers = _layer_specs(weights, meta["layers"])
        embeddings = _embedding_specs(weights, meta.get("embeddings", "{}"))
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if k.rsplit(".", 1)[0] in layers or k.rsplit(".", 1)[0] in embeddings}
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
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except RuntimeError as e:   # a float tensor whose shape differs from the config's
        raise CheckpointError(f"{weights} does not match the model rebuilt from {config_file}: {_one_line(e)}") from None
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the model rebuilt from {config_file}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model, recipe


_META_KEYS = ("format", "recipe", "layers")
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


def _layer_specs(weights: Path, text: str) -> dict[str, dict]:
    try:
        layers = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights}: metadata 'layers' is not JSON: {e}") from None
    if not isinstance(layers, dict) or not layers:
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
    needed = ["w_q", "w_scale"]
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
        qw = QuantizedWeight.from_storage(t("w_q"), t("w_scale"), t("w_zero"), spec["weight_dtype"],
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
