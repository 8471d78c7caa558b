"""Save and load eagerly quantized models as safetensors.

A saved model is a folder: ``model.safetensors`` (quantized tensors, scales and every float
tensor; the recipe JSON and per-layer formats in its metadata), ``recipe.json`` and
``report.json`` beside it, the model's ``config.json`` and its tokenizer. Loading rebuilds the
architecture from the config, swaps in ``QuantizedLinear`` modules as recorded, and loads the
tensors: no calibration, no float checkpoint needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .eager import QuantizedLinear
from .layer_quant import QuantizedWeight
from .pipeline import CompileReport
from .recipes import Recipe

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
    if not layers:
        raise ValueError("save_quantized: the model has no QuantizedLinear; run qcompiler.quantize(model, ...) first")
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "recipe": recipe.to_json(indent=None), "layers": json.dumps(layers),
            "source": source}
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
    """The metadata of a saved model (format, recipe JSON, layers JSON, source model name)."""
    with safetensors.safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        return dict(f.metadata() or {})


def load_quantized(path: str | Path) -> tuple[torch.nn.Module, Recipe]:
    """Rebuild a model saved by ``save_quantized``; returns ``(model, recipe)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: expected a folder written by `qcompiler quantize`")
    with safetensors.safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{weights} is not a qcompiler file (format {meta.get('format')!r}, expected {_FORMAT!r})")
        recipe = Recipe.from_json(meta["recipe"])
        layers = json.loads(meta["layers"])
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if k.rsplit(".", 1)[0] in layers}
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config).eval()
    for fqn, spec in layers.items():
        t = lambda name: tensors.get(f"{fqn}.{name}")  # noqa: E731
        qw = QuantizedWeight.from_storage(t("w_q"), t("w_scale"), t("w_zero"), spec["weight_dtype"],
                                          spec["group_size"] or None, spec["in_features"])
        act_scale = t("act_scale")
        new = QuantizedLinear(qw, t("bias"), spec["act_dtype"], spec["act_dynamic"],
                              None if act_scale is None else float(act_scale), t("inv_smooth"), fqn)
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the model rebuilt from config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model, recipe
