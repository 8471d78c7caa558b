"""qcompiler.rotate: a randomized Hadamard rotation of the residual stream folded into the weights,
found from the graph. The rotated float model computes the same logits (float64 model; RMSNorm's
float32 internals bound the agreement at ~1e-7), its weights change, LayerNorm models are refused
with the reason and left untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import qcompiler
from qcompiler.algorithms.hadamard import hadamard, has_hadamard, random_hadamard
from qcompiler.errors import UnsupportedError
from numerics_util import rel_err
from tiny_models import tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")
ROTATABLE = ("llama", "qwen2", "mistral", "gemma", "phi3")
IDS = token_batches(2, 16, seed=3)[0]


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 44, 48, 64, 576, 768, 2304])
def test_hadamard_rows_are_orthogonal(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_orders_without_a_construction_are_refused():
    assert not has_hadamard(28) and not has_hadamard(6) and not has_hadamard(172)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 172"):
        hadamard(172)


def test_random_hadamard_is_orthogonal_and_seeded():
    q = random_hadamard(576, seed=3)
    assert (q @ q.T - torch.eye(576, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(q, random_hadamard(576, seed=3)) and not torch.equal(q, random_hadamard(576, seed=4))
    assert q.abs().max() == pytest.approx(1 / math.sqrt(576))     # spreads one channel over all


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ROTATABLE)
def test_rotated_model_computes_the_same_logits(arch):
    model = tiny_model(arch).double()
    before = copy.deepcopy(model.state_dict())
    ref = _logits(model)
    result = qcompiler.rotate(model, seed=1)
    assert rel_err(_logits(model), ref) < 1e-5
    layers = model.config.num_hidden_layers
    assert len(result.embeddings) == 1 and len(result.writers) == 2 * layers
    assert len(result.norms_folded) == 2 * layers + 1
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("embed" in k for k in changed) and len(changed) >= len(result.readers) + len(result.writers)


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("arch", ROTATABLE)
def test_per_head_value_rotation_keeps_the_logits(arch, online):
    """``per_head=True``: each attention's value rows and its output linear's columns take a Hadamard of the head
    size (phi3: the value rows of the fused qkv_proj; qwen2: the value bias too), found from the graph; the
    float model computes the same logits, and the value projection differs from the stream rotation's alone."""
    model, plain = tiny_model(arch).double(), tiny_model(arch).double()
    ref = _logits(model)
    result = qcompiler.rotate(model, seed=1, online=online, per_head=True)
    qcompiler.rotate(plain, seed=1, online=online)
    assert rel_err(_logits(model), ref) < 1e-5
    layers, head_dim = model.config.num_hidden_layers, model.config.hidden_size // model.config.num_attention_heads
    assert len(result.value_heads) == layers and not result.value_heads_refused, result.value_heads_refused
    assert all(f"(head size {head_dim})" in v for v in result.value_heads)
    assert "per-head rotation of" in result.summary()
    value, out = result.value_heads[0].split(" (")[0].split(" -> ")
    ours, theirs = dict(model.named_parameters()), dict(plain.named_parameters())
    for module in (value, out):
        assert not torch.allclose(ours[module + ".weight"], theirs[module + ".weight"]), module


def test_per_head_rotation_spreads_a_value_outlier_within_its_head():
    """A value row with a large weight (an outlier value channel) is spread over its head's rows, not others'."""
    model = tiny_model("llama").double()
    layer = model.model.layers[0].self_attn
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        layer.v_proj.weight[head_dim + 3] *= 50.0          # head 1, channel 3
    before = layer.v_proj.weight.detach().abs().amax(1).clone()
    qcompiler.rotate(model, seed=0, per_head=True)
    after = layer.v_proj.weight.detach().abs().amax(1)
    head1 = slice(head_dim, 2 * head_dim)
    assert after[head1].max() < 0.5 * before[head1].max()                        # spread within head 1
    assert after[head1].min() > 2 * before[:head_dim].max()                         # over all of its rows
    assert after[:head_dim].max() < 0.5 * after[head1].min()                        # and no other head's


def test_per_head_rotation_must_match_the_recipe():
    model = tiny_model("llama")
    qcompiler.rotate(model, seed=0)
    with pytest.raises(UnsupportedError, match="per_head=True"):
        qcompiler.quantize(model, qcompiler.recipes.get("w8a16+rot").replace(
            rotation=qcompiler.recipes.RotationSpec(per_head=True)), progress=False)


def test_tied_head_is_untied():
    model = tiny_model("gemma").double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = _logits(model)
    result = qcompiler.rotate(model, seed=2)
    assert sorted(result.untied) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert rel_err(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_layernorm_models_are_refused_untouched(arch):
    model = tiny_model(arch)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedError, match=r"\(layer_norm\) reads the residual stream: it subtracts the mean"):
        qcompiler.rotate(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rotation_spreads_an_outlier_channel():
    """One embedding channel 50x the others: after the rotation no channel of the table stands out."""
    model = tiny_model("llama").double()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50
    table = model.model.embed_tokens.weight
    ratio_before = float(table.abs().amax(0).max() / table.abs().amax(0).median())
    qcompiler.rotate(model, seed=0)
    table = model.model.embed_tokens.weight
    ratio_after = float(table.abs().amax(0).max() / table.abs().amax(0).median())
    assert ratio_before > 20 and ratio_after < 2


# -- a rotation in the recipe -------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["w8a16+rot", "w8a8-int8-sq-dynamic+rot", "w4a16-gptq+rot+kv-int8"])
def test_recipe_rotation_is_applied_by_quantize_once_and_reported(preset):
    """The rotation composes with the passes after it (SmoothQuant folds into the unit gains the rotation
    leaves, GPTQ's Hessians are of the rotated inputs, the KV cache is found as before)."""
    from qcompiler.recipes import RotationSpec, get
    from qcompiler.rotation import rotation_of
    from tiny_models import calibration_batches
    recipe = get(preset)
    assert recipe.rotation == RotationSpec(seed=0) and recipe.name == preset
    model, plain = tiny_model("llama"), tiny_model("llama")
    qcompiler.rotate(plain, seed=0)
    qcompiler.quantize(model, recipe, calibration=calibration_batches(), progress=False)
    assert rotation_of(model).seed == 0
    with torch.no_grad():    # the embedding table is rotated exactly as qcompiler.rotate does it
        assert torch.equal(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    report = qcompiler.report(model)
    assert "rotated the residual stream" in str(report) and report.quantized
    with torch.inference_mode():   # rotated and quantized, the model still computes the float model's logits
        out, base = model(input_ids=IDS).logits, tiny_model("llama")(input_ids=IDS).logits
    assert rel_err(out.double(), base.double()) < 0.15      # measured: 0.009 (w8a8), 0.09 (w4a16, as unrotated)


def test_backend_refuses_an_unrotated_model_and_takes_a_rotated_one():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=qcompiler.backend("w8a16+rot", progress=False), dynamic=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"qcompiler.rotate\(model, seed=0\) before torch.compile"):
        with torch.inference_mode():
            compiled(input_ids=IDS)
    torch._dynamo.reset()
    qcompiler.rotate(model, seed=0)
    compiled = torch.compile(model, backend=qcompiler.backend("w8a16+rot", progress=False), dynamic=False)
    with torch.inference_mode():
        compiled(input_ids=IDS)
    assert "rotated the residual stream" in str(qcompiler.report(model))
    torch._dynamo.reset()
    with pytest.raises(UnsupportedError, match="rotated with seed 0"):
        from qcompiler.recipes import RotationSpec, get
        qcompiler.quantize(model, get("w8a16").replace(rotation=RotationSpec(seed=1)), progress=False)


def test_recipe_rotation_on_a_layernorm_model_is_refused_before_quantizing():
    model = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedError, match="qcompiler.rotate"):
        qcompiler.quantize(model, "w8a16+rot", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- rotated checkpoints -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma"])     # gemma: tied head untied by the rotation
def test_rotated_quantized_model_saves_and_reloads(arch, tmp_path):
    """qcompiler's checkpoint and a compressed-tensors folder hold the rotated weights, embedding, unit gains
    and untied head; reloaded (qcompiler, and transformers for compressed-tensors) they give the in-memory
    rotated model's logits, without the rotation being applied again."""
    from transformers import AutoModelForCausalLM
    from qcompiler.recipes import get
    from qcompiler.runtime.serialization import load_quantized, save_quantized
    from tiny_models import calibration_batches
    recipe = get("w8a16+rot")
    model = tiny_model(arch)
    qcompiler.quantize(model, recipe, calibration=calibration_batches(), progress=False)
    with torch.inference_mode():
        ref = model(input_ids=IDS).logits
    save_quantized(model, tmp_path / "q", recipe)
    loaded, loaded_recipe = load_quantized(tmp_path / "q")
    assert loaded_recipe == recipe
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=IDS).logits, ref)
    folder = qcompiler.save_compressed_tensors(model, tmp_path / "ct", recipe)
    ct = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        assert rel_err(ct(input_ids=IDS).logits.double(), ref.double()) < 1e-4


class _ToyAttention(torch.nn.Module):
    """An attention whose output reaches the output linear through ``between`` (nothing, a relu, a per-channel
    factor): only the first lets a per-head rotation of the values fold."""

    def __init__(self, between: str, heads: int = 2, head_dim: int = 8):
        super().__init__()
        hidden = heads * head_dim
        self.heads, self.between = heads, between
        self.embed = torch.nn.Embedding(32, hidden)
        self.q_proj, self.v_proj = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, hidden)
        self.o_proj, self.head = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 32)
        self.factor = torch.nn.Parameter(torch.linspace(0.5, 2.0, hidden))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, -1).transpose(1, 2)   # noqa: E731
        q, v = split(self.q_proj(x)), split(self.v_proj(x))
        a = torch.nn.functional.scaled_dot_product_attention(q, q, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        if self.between == "relu":
            a = torch.relu(a)
        elif self.between == "factor":
            a = a * self.factor
        return self.head(x + self.o_proj(a))


@pytest.mark.parametrize("between", ["none", "relu", "factor"])
def test_value_paths_are_found_from_the_graph_or_refused_with_the_reason(between):
    from qcompiler.passes.value_heads import find_value_heads
    from qcompiler.rotation import _capture
    gm, ann, _ = _capture(_ToyAttention(between), {"input_ids": torch.arange(6)[None]})
    found, refused = find_value_heads(gm, ann)
    if between == "none":
        assert [(p.producer.meta["qcompiler"].fqn, p.consumer.meta["qcompiler"].fqn, p.head_dim, p.blocks)
                for p in found] == [("v_proj", "o_proj", 8, [0, 8])] and not refused
    else:
        assert not found and "do not commute with a rotation" in refused["o_proj"], refused
