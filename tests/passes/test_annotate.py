"""Annotation finds linears, norms, the output head and parameter names from the graph alone."""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler.passes import Annotate
from qcompiler.pipeline import META_KEY
from tiny_models import tiny_model, token_batches

EXPECTED = {  # arch -> (decoder linears per layer, norms per layer that feed linears)
    "llama": 7, "gpt2": 4, "opt": 6, "phi3": 4, "gemma": 7,
}


def _annotate(arch: str):
    model = tiny_model(arch)
    qb = qcompiler.backend("w8a16")

    def be(gm, example_inputs):
        return qb.run_passes(gm, example_inputs, [Annotate()])

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=be)(token_batches(1, 8)[0])
    return qb.last_context, qb.graphs[-1], model


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_annotate_finds_every_linear_and_the_head(arch):
    ctx, gm, model = _annotate(arch)
    plan = ctx.layer_plan
    heads = [d for d in plan.values() if d.op_kind == "output_head"]
    assert len(heads) == 1 and heads[0].out_features == model.config.vocab_size
    decoder = [d for d in plan.values() if d.op_kind == "linear"]
    assert len(decoder) == EXPECTED[arch] * model.config.num_hidden_layers
    for d in decoder:   # every planned path is a real module with those shapes
        module = model.get_submodule(d.fqn)
        w = module.weight
        assert sorted(w.shape) == sorted((d.in_features, d.out_features))


def test_annotate_maps_lifted_parameters_to_source_names():
    ctx, gm, model = _annotate("llama")
    ann = ctx.analyses["annotate"]
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    assert set(ann.param_fqn.values()) <= set(names) | {"lm_head.weight"}
    for node_name, fqn in ann.param_fqn.items():
        assert ann.values[node_name] is names.get(fqn, ann.values[node_name])
    kinds = [n.meta[META_KEY].kind for n in gm.graph.nodes if META_KEY in n.meta]
    assert kinds.count("norm") == 2 * 2 + 1      # two RMSNorms per layer and the final one
    assert kinds.count("attention") == 2
    assert kinds.count("embedding") == 1


def test_gpt2_conv1d_weights_are_read_transposed():
    ctx, _, model = _annotate("gpt2")
    ann = ctx.analyses["annotate"]
    c_attn = "transformer.h.0.attn.c_attn"
    lw = ann.weights[c_attn]
    assert lw.transposed
    assert torch.equal(lw.w, model.get_submodule(c_attn).weight.t())
    assert ctx.layer_plan[c_attn].in_features == model.config.n_embd


@pytest.mark.parametrize("root", ["L['self']", "L['args'][0]", "L['fn']"])
def test_module_path_from_stack_drops_the_dynamo_root(root):
    """Dynamo names the root module L['self'], or L['args'][0] when a decorator on forward passes
    it positionally (transformers 5.24); either way the path starts at the first child."""
    from types import SimpleNamespace
    from qcompiler.passes.annotate import _module_path_from_stack
    node = SimpleNamespace(meta={"nn_module_stack": {
        "a": (f"{root}.model", object), "b": (f"{root}.model.layers[3].input_layernorm", object)}})
    assert _module_path_from_stack(node) == "model.layers.3.input_layernorm"
