"""Fallback rules and the sensitivity threshold, each fallback with its reason."""

from __future__ import annotations

import torch

import qcompiler
from qcompiler.recipes import FallbackSpec
from tiny_models import tiny_model, token_batches


def _compile(recipe):
    model = tiny_model("llama")
    qb = qcompiler.backend(recipe, calibration=token_batches(2, 16), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=qb)(token_batches(1, 8)[0])
    return qb.report


def test_head_is_kept_by_default_with_its_reason():
    rep = _compile(qcompiler.recipes.get("w8a16"))
    assert [d.fqn for d in rep.fallbacks] == ["lm_head"]
    assert "output_head" in rep.fallbacks[0].reason


def test_fallback_records_reason_for_globs():
    recipe = qcompiler.recipes.get("w8a16").replace(fallback=FallbackSpec(keep_modules=("*.self_attn.o_proj",)))
    rep = _compile(recipe)
    kept = {d.fqn: d.reason for d in rep.fallbacks}
    assert {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"} <= set(kept)
    assert "glob '*.self_attn.o_proj'" in kept["model.layers.0.self_attn.o_proj"]


def test_sensitivity_keeps_the_worst_layers_up_to_the_cap():
    base = qcompiler.recipes.get("w8a8-int8-naive")
    # a threshold every layer fails: the cap decides how many fall back, worst SQNR first
    recipe = base.replace(fallback=FallbackSpec(min_sqnr_db=200.0, max_fraction=0.25))
    rep = _compile(recipe)
    decoder = [d for d in rep.layers.values() if d.op_kind == "linear"]
    kept = [d for d in decoder if not d.quantize]
    assert len(kept) == int(0.25 * len(decoder))
    worst_quantized = min(d.sqnr_db for d in decoder if d.quantize)
    assert all(d.sqnr_db <= worst_quantized for d in kept)
    assert all("SQNR" in d.reason and "200 dB" in d.reason for d in kept)
    assert all("cap" in d.note for d in decoder if d.quantize)
