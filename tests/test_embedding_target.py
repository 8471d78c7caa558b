"""The embedding quantization target (``Recipe.embedding``, ``passes/embedding.py``): a tensor that is not
a GEMM weight, found from the graph, stored quantized, in the report, in eager mode and in saved files."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompiler
from qcompiler.errors import RecipeError
from qcompiler.core.layer_quant import gather_rows, quantize_weight
from qcompiler.recipes import FallbackSpec, Granularity, QuantDtype, Recipe, WeightSpec
from qcompiler.runtime.serialization import load_quantized, save_quantized
from qcompiler.targets import QuantTarget, register_target
from tiny_models import ARCHS, VOCAB, tiny_model, token_batches

SPECS = {
    "int8-row": WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL),
    "uint8-row-asym": WeightSpec(QuantDtype.INT8, Granularity.PER_CHANNEL, symmetric=False),
    "int4-g16": WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=16),
    "uint4-g24-asym": WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=24, symmetric=False),
    "fp8-row": WeightSpec(QuantDtype.FP8_E4M3, Granularity.PER_CHANNEL),
    "int8-tensor": WeightSpec(QuantDtype.INT8, Granularity.PER_TENSOR),
}
#: the linears in float, so that only the embedding changes the model
_ONLY_EMBEDDING = FallbackSpec(keep_op_kinds=("linear", "output_head"))


def _recipe(spec: WeightSpec, **fallback) -> Recipe:
    fb = FallbackSpec(keep_op_kinds=("linear", "output_head"), **fallback)
    return Recipe(name="embedding-only", weight=WeightSpec(), embedding=spec, fallback=fb)


def _compiled(model, recipe, target="reference"):
    torch._dynamo.reset()
    return torch.compile(model, backend=qcompiler.backend(recipe, target=target, progress=False))


@pytest.mark.parametrize("name", SPECS)
def test_gathered_rows_are_the_rows_of_the_dequantized_table(name):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 48, generator=g) * torch.rand(50, 1, generator=g) * 3
    qw = quantize_weight(table, SPECS[name])
    ids = torch.randint(0, 50, (3, 7), generator=g)
    got = gather_rows(ids, qw.storage(), qw.scale, qw.zero, qw.dtype, qw.group_size or 0, 48, torch.float32)
    assert torch.equal(got, torch.nn.functional.embedding(ids, qw.dequantize()))
    assert got.shape == (3, 7, 48)


@pytest.mark.parametrize("target", ["reference", "inductor"])
@pytest.mark.parametrize("name", ["int8-row", "int4-g16", "fp8-row"])
def test_compiled_model_runs_on_the_dequantized_table(name, target):
    model, ids = tiny_model("llama"), token_batches(1, 12)[0]
    spec = SPECS[name]
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        expected_model.model.embed_tokens.weight.copy_(quantize_weight(model.model.embed_tokens.weight, spec).dequantize())
        expected = expected_model(ids).logits
        float_logits = model(ids).logits
    compiled = _compiled(model, _recipe(spec), target)
    with torch.no_grad():
        got = compiled(ids).logits
    tol = 0 if target == "reference" else 1e-5
    assert ((got - expected).norm() / expected.norm()).item() <= tol
    assert not torch.equal(got, float_logits)           # the table did change
    report = qcompiler.report(compiled)
    d = report.tensors["model.embed_tokens"]
    assert d.kind == "embedding" and d.quantize and d.format == quantize_weight(
        model.model.embed_tokens.weight, spec).describe()
    assert d.bytes_q < d.bytes_fp / 3
    assert "model.embed_tokens" in report.summary() and report.to_dict()["tensors"]["model.embed_tokens"]["bytes_q"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gets_its_token_tables_from_the_graph(arch):
    model, ids = tiny_model(arch), token_batches(1, 10)[0]
    with torch.no_grad():
        ref = model(ids).logits
    compiled = _compiled(model, _recipe(SPECS["int8-row"]))
    with torch.no_grad():
        got = compiled(ids).logits
    tables = {fqn: d for fqn, d in qcompiler.report(compiled).tensors.items() if d.kind == "embedding"}
    vocab_tables = [fqn for fqn in tables
                    if model.get_submodule(fqn).weight.shape[0] == VOCAB]
    assert vocab_tables, f"{arch}: no token-embedding table found in {sorted(tables)}"
    assert all(d.quantize for d in tables.values())
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, f"{arch}: relative error {rel}"


def test_keep_modules_keeps_a_table_in_float_and_says_why():
    model, ids = tiny_model("llama"), token_batches(1, 8)[0]
    with torch.no_grad():
        ref = model(ids).logits
    compiled = _compiled(model, _recipe(SPECS["int8-row"], keep_modules=("*embed_tokens",)))
    with torch.no_grad():
        assert torch.equal(compiled(ids).logits, ref)
    d = qcompiler.report(compiled).tensors["model.embed_tokens"]
    assert not d.quantize and "keep_modules" in d.reason


def test_a_table_tied_to_the_output_head_is_named_in_the_note():
    torch.manual_seed(0)
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compiled = _compiled(model, _recipe(SPECS["int8-row"]))
    with torch.no_grad():
        compiled(token_batches(1, 8)[0])
    assert "lm_head" in qcompiler.report(compiled).tensors["model.embed_tokens"].note


def test_eager_quantize_and_a_saved_model_match_the_compiled_graph(tmp_path):
    model, ids = tiny_model("llama"), token_batches(1, 12)[0]
    recipe = qcompiler.recipes.get("w8a16").replace(embedding=SPECS["int4-g16"], fallback=FallbackSpec())
    compiled = _compiled(copy.deepcopy(model), recipe)
    with torch.no_grad():
        want = compiled(ids).logits
    eager = qcompiler.quantize(model, recipe, progress=False)
    assert isinstance(eager.model.embed_tokens, qcompiler.runtime.eager.QuantizedEmbedding)
    with torch.no_grad():
        got = eager(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    save_quantized(eager, tmp_path, recipe)
    loaded, loaded_recipe = load_quantized(tmp_path)
    assert loaded_recipe == recipe and isinstance(loaded.model.embed_tokens, qcompiler.runtime.eager.QuantizedEmbedding)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)


def test_eager_mode_keeps_embedding_subclasses_in_float_and_says_why():
    model = tiny_model("opt")     # OPT's positional table is an nn.Embedding subclass with its own forward
    recipe = _recipe(SPECS["int8-row"])
    qcompiler.quantize(model, recipe, progress=False)
    kept = {fqn: d.reason for fqn, d in qcompiler.report(model).tensors.items() if not d.quantize}
    assert kept and all("torch.nn.Embedding" in why for why in kept.values())
    assert isinstance(model.model.decoder.embed_tokens, qcompiler.runtime.eager.QuantizedEmbedding)


def test_recipe_json_round_trip_and_a_bad_spec():
    recipe = _recipe(SPECS["uint4-g24-asym"])
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(RecipeError, match="recipe.embedding must be a WeightSpec"):
        Recipe(embedding="int8")


def test_a_target_name_registers_once():
    with pytest.raises(RecipeError, match="already registered"):
        register_target(QuantTarget("embedding", spec=lambda r: None, find=lambda gm, ann: [], apply=None))


def test_the_tensorrt_export_refuses_quantized_tables_by_name():
    from qcompiler.errors import UnsupportedError
    from qcompiler.export.exporter import check_exportable
    with pytest.raises(UnsupportedError, match="recipe.embedding"):
        check_exportable(qcompiler.recipes.get("w8a8-int8-sq").replace(embedding=SPECS["int8-row"]))
