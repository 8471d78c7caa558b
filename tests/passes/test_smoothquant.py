"""SmoothQuant folding keeps float outputs unchanged, and folds where the graph allows."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.passes import InsertQDQ, SmoothQuantFold, planning_passes
from qcompiler.passes.annotate import NodeInfo
from qcompiler.passes.smoothquant import FoldTarget, _agree_across_graphs, smoothing_scale
from qcompiler.pipeline import META_KEY, Analysis, PassResult
from qcompiler.recipes import KVCacheSpec, SmoothQuantSpec
from qcompiler.runtime.eager import QuantizedLinear
from numerics_util import rel_err
from tiny_models import ARCHS, calibration_batches, tiny_model, token_batches


#: per architecture, the linears (path inside a layer) whose input scale folds into a producer linear's
#: rows, and that producer (None: it stays explicit; GPT-2's MLP: GELU is not positively homogeneous)
PRODUCER_FOLDS = {
    **{a: {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}
       for a in ("llama", "qwen2", "mistral", "gemma")},
    "phi3": {"self_attn.o_proj": "self_attn.qkv_proj", "mlp.down_proj": "mlp.gate_up_proj"},   # fused producers
    "opt": {"self_attn.out_proj": "self_attn.v_proj", "fc2": "fc1"},                          # through ReLU
    "gpt2": {"attn.c_proj": "attn.c_attn", "mlp.c_proj": None},
}
LAYERS = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}


class KeepEverythingFloat:
    """Test pass: after planning, keep every linear in float, so only the folding changes the graph."""

    name = "keep_everything_float"
    requires = ("sensitivity_fallback",)

    def run(self, gm, ctx):
        for d in ctx.layer_plan.values():
            d.quantize, d.reason = False, "test"
        return PassResult(gm, False, {})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_folded_float_graph_matches_the_original(arch, alpha):
    model = tiny_model(arch)
    recipe = qcompiler.recipes.get("w8a8-int8-sq").replace(smoothquant=SmoothQuantSpec(alpha=alpha))
    qb = qcompiler.backend(recipe, calibration=token_batches(2, 16), progress=False)

    def be(gm, example_inputs):
        return qb.run_passes(gm, example_inputs, planning_passes() + [KeepEverythingFloat(), InsertQDQ()])

    x = token_batches(1, 12, seed=4)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x).logits
        ref = model(x).logits
    stats = next(p["stats"] for p in qb.report.passes if p["name"] == "smoothquant_fold")
    layers = model.config.num_hidden_layers
    assert stats["groups"] >= 2 * layers
    assert stats["folded_into_norm"] >= layers   # at least one norm per layer
    unfoldable = sum(p is None for p in PRODUCER_FOLDS[arch].values())
    assert stats["folded_into_linear"] == layers * (len(PRODUCER_FOLDS[arch]) - unfoldable)
    assert stats["explicit"] == layers * unfoldable
    assert rel_err(out, ref) < 1e-5


def test_gated_mlp_folds_into_the_up_projection():
    model = tiny_model("llama")
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=token_batches(2, 16), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=qb)(token_batches(1, 8)[0])
    plan = qb.report.layers
    for i in range(2):
        assert plan[f"model.layers.{i}.mlp.down_proj"].smoothing == f"linear:model.layers.{i}.mlp.up_proj"
        assert plan[f"model.layers.{i}.self_attn.q_proj"].smoothing == f"norm:model.layers.{i}.input_layernorm"
        assert plan[f"model.layers.{i}.self_attn.o_proj"].smoothing == f"linear:model.layers.{i}.self_attn.v_proj"


def test_smoothing_scale_formula():
    x = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scale(x, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0   # zero channels are clamped, never 0 or inf


# -- folds into producer linears: attention (value projection), ReLU MLPs, fused producers --------------
class NoProducerFolds(SmoothQuantFold):
    """Test pass: SmoothQuant folding only into norms; every other scale applied explicitly (untied)."""

    def _target(self, ctx, x, nodes, fqns):
        target = super()._target(ctx, x, nodes, fqns)
        return target if target.kind == "norm" else FoldTarget("explicit", reason="test")


def _backend(recipe, smoothquant=SmoothQuantFold):
    qb = qcompiler.backend(recipe, calibration=calibration_batches(), progress=False)
    if smoothquant is not SmoothQuantFold:
        defaults = type(qb).passes(qb)
        qb.passes = lambda: [smoothquant() if type(p) is SmoothQuantFold else p for p in defaults]
    return qb


def _run(model, qb, batches) -> list[torch.Tensor]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qb)
    with torch.no_grad():
        return [compiled(x).logits for x in batches]


def _err(outs, refs) -> float:
    return sum(rel_err(o, r) for o, r in zip(outs, refs)) / len(refs)


@pytest.mark.parametrize("preset", ["w8a8-int8-sq-dynamic", "w8a8-int8-sq"])
@pytest.mark.parametrize("arch", ARCHS)
def test_attention_and_mlp_outputs_fold_into_their_producers(arch, preset):
    model = tiny_model(arch)
    batches = token_batches(2, 32, seed=7)
    with torch.no_grad():
        refs = [model(x).logits for x in batches]
    qb = _backend(preset)
    folded = _run(model, qb, batches)
    explicit = _run(model, _backend(preset, NoProducerFolds), batches)
    layers, prefix = qb.report.layers, LAYERS.get(arch, "model.layers")
    for i in range(model.config.num_hidden_layers):
        for consumer, producer in PRODUCER_FOLDS[arch].items():
            want = "explicit" if producer is None else f"linear:{prefix}.{i}.{producer}"
            assert layers[f"{prefix}.{i}.{consumer}"].smoothing == want
    assert sum(d.smoothing == "explicit" for d in layers.values()) == \
        model.config.num_hidden_layers * sum(p is None for p in PRODUCER_FOLDS[arch].values())
    if arch in ("opt", "gpt2"):      # every head reads its own value rows: the same scale, folded
        assert _err(folded, explicit) < 1e-4
    else:
        # one scale per KV head and channel, shared by its query heads: a constraint, which on these
        # random models moves the error by -5% to +12% on this input (within 3% over three model seeds;
        # within 1% on stories260K), where the per-channel scale stays explicit
        assert _err(folded, refs) < 1.25 * _err(explicit, refs)


def _planned(model, recipe, x=None):
    """Compile and run ``model`` once; (backend, the last graph's context)."""
    qb = qcompiler.backend(recipe, calibration=calibration_batches(), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=qb)(token_batches(1, 8)[0] if x is None else x)
    return qb, qb.last_context


def test_query_heads_sharing_a_kv_head_share_one_scale():
    model = tiny_model("llama")       # 4 query heads, 2 KV heads of 16 channels
    _, ctx = _planned(model, "w8a8-int8-sq")
    s = ctx.analyses[Analysis.SMOOTHING]["model.layers.0.self_attn.o_proj"].view(4, 16)
    assert torch.equal(s[0], s[1]) and torch.equal(s[2], s[3])     # query head h reads KV head h // 2
    assert not torch.equal(s[0], s[2])
    rows = ctx.analyses[Analysis.ROW_SCALING]["model.layers.0.self_attn.v_proj"]
    assert torch.allclose(rows, 1.0 / s[::2].reshape(-1))


@pytest.mark.parametrize("arch, producer, value_rows", [("phi3", "model.layers.0.self_attn.qkv_proj", slice(96, 128)),
                                                        ("gpt2", "transformer.h.0.attn.c_attn", slice(128, 192))])
def test_a_fused_projection_scales_only_its_value_rows(arch, producer, value_rows):
    _, ctx = _planned(tiny_model(arch), "w8a8-int8-sq-dynamic")
    rows = ctx.analyses[Analysis.ROW_SCALING][producer]
    kept = torch.ones_like(rows, dtype=torch.bool)
    kept[value_rows] = False
    assert torch.equal(rows[kept], torch.ones_like(rows[kept]))                 # queries and keys untouched
    assert not torch.equal(rows[value_rows], torch.ones_like(rows[value_rows]))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_generation_reads_back_a_consistently_scaled_cache(arch):
    # prefill and decode steps are separate graphs: each folds the same scale into the value rows, so
    # the cache one writes and the next reads holds values scaled alike (float: outputs unchanged)
    model = tiny_model(arch)
    qb = qcompiler.backend(qcompiler.recipes.get("w8a8-int8-sq"), calibration=token_batches(2, 16), progress=False)
    x = token_batches(1, 8, seed=3)[0]
    with torch.no_grad():
        ref = model.generate(x, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=lambda gm, ex: qb.run_passes(
        gm, ex, planning_passes() + [KeepEverythingFloat(), InsertQDQ()]))
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    assert qb.report.graphs >= 2
    assert all(d.smoothing != "explicit" for d in qb.report.layers.values())
    assert torch.equal(out.sequences, ref.sequences)
    assert rel_err(torch.stack(out.logits), torch.stack(ref.logits)) < 1e-5


class _Attention(torch.nn.Module):
    """One pre-norm attention block written out: 4 query heads, 2 KV heads repeated by
    ``repeat_interleave``; ``variant`` changes the value path or the output layout."""

    def __init__(self, variant: str):
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        self.norm = torch.nn.LayerNorm(64)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(64, n) for n in (64, 32, 32, 64))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, t, 4, 16).transpose(1, 2)
        k = self.k(h).view(b, t, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        v_out = self.v(h)
        v = v_out.view(b, t, 2, 16).transpose(1, 2)
        if self.variant == "tanh values":
            v = torch.tanh(v)
        v = v.repeat_interleave(2, dim=1)
        if self.variant == "matmul attention":
            mask = torch.full((t, t), float("-inf")).triu(1)
            out = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.variant == "heads not transposed back":
            out = out.reshape(b, t, 64)      # mixes positions and heads: no channel reads one value row
        else:
            out = out.transpose(1, 2).reshape(b, t, 64)
        y = x + self.o(out)
        return y + v_out.mean(-1, keepdim=True) if self.variant == "values read twice" else y


@pytest.mark.parametrize("variant, smoothing, reason", [
    ("sdpa", "linear:v", ""),
    ("matmul attention", "linear:v", ""),
    ("tanh values", "explicit", r"stops at \w+ \(tanh\)"),
    ("values read twice", "explicit", r"rows it scales also reach \w+ \(mean\)"),
    ("heads not transposed back", "explicit", r"do not each read one producer row"),
])
def test_attention_output_folds_into_the_values_only_when_the_graph_proves_it(variant, smoothing, reason):
    model = _Attention(variant).eval()
    calib = [{"x": torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(9))
    qb = qcompiler.backend("w8a8-int8-sq", calibration=calib, progress=False)

    def be(gm, example_inputs):
        return qb.run_passes(gm, example_inputs, planning_passes() + [KeepEverythingFloat(), InsertQDQ()])

    torch._dynamo.reset()
    with torch.no_grad():
        out, ref = torch.compile(model, backend=be)(x), model(x)
    torch._dynamo.reset()
    d = qb.report.layers["o"]
    assert d.smoothing == smoothing
    assert re.search(reason, d.note) if reason else "explicitly" not in d.note
    assert rel_err(out, ref) < 1e-5


class _MLP(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc1, self.fc2, self.act = torch.nn.LayerNorm(32), torch.nn.Linear(32, 48), \
            torch.nn.Linear(48, 32), act

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize("act, smoothing", [(F.relu, "linear:fc1"), (lambda z: F.leaky_relu(z, 0.1), "linear:fc1"),
                                            (F.gelu, "explicit"), (F.silu, "explicit"), (torch.abs, "explicit")],
                         ids=["relu", "leaky_relu", "gelu", "silu", "abs"])
def test_mlp_output_folds_through_positively_homogeneous_activations_only(act, smoothing):
    model = _MLP(act).eval()
    calib = [{"x": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(9))
    qb = qcompiler.backend("w8a8-int8-sq-dynamic", calibration=calib, progress=False)

    def be(gm, example_inputs):
        return qb.run_passes(gm, example_inputs, planning_passes() + [KeepEverythingFloat(), InsertQDQ()])

    torch._dynamo.reset()
    with torch.no_grad():
        out, ref = torch.compile(model, backend=be)(x), model(x)
    torch._dynamo.reset()
    assert qb.report.layers["fc2"].smoothing == smoothing
    assert rel_err(out, ref) < 1e-5


def test_a_kv_cache_with_static_value_scales_keeps_the_attention_output_scale_explicit():
    # its value scales come from the float model's values (KVObserver): scaled rows would not match them
    recipe = qcompiler.recipes.get("w8a8-int8-sq").replace(kv_cache=KVCacheSpec())
    qb, _ = _planned(tiny_model("llama"), recipe)
    for i in range(2):
        d = qb.report.layers[f"model.layers.{i}.self_attn.o_proj"]
        assert d.smoothing == "explicit" and "recipe.kv_cache calibrates static value scales" in d.note
        assert qb.report.layers[f"model.layers.{i}.mlp.down_proj"].smoothing.startswith("linear:")


def test_an_untied_scale_stays_explicit_under_grouped_query_attention():
    # AWQ's scale is searched per channel: it cannot be one per KV head and channel, so it is not folded
    qb, _ = _planned(tiny_model("llama"), "w4a16-awq")
    d = qb.report.layers["model.layers.0.self_attn.o_proj"]
    assert d.smoothing == "explicit" and "not tied" in d.note
    qb, _ = _planned(tiny_model("opt"), "w4a16-awq")          # every head reads its own value rows
    assert qb.report.layers["model.decoder.layers.0.self_attn.out_proj"].smoothing == \
        "linear:model.decoder.layers.0.self_attn.v_proj"


def test_graphs_must_agree_on_a_fold_through_the_kv_cache():
    # a cache written by one graph (prefill) is read by the next (a decode step)
    group = ("smoothquant_fold", "attn.o")
    graph = torch.fx.Graph()
    v = graph.placeholder("v")
    v.meta[META_KEY] = NodeInfo("linear", "attn.v")
    ctx = SimpleNamespace(analyses={})
    folded = FoldTarget("linear", v, torch.arange(4), through_cache=True)
    assert _agree_across_graphs(ctx, group, folded) is folded
    assert _agree_across_graphs(ctx, group, folded) is folded
    with pytest.raises(RuntimeError, match=r"smoothquant_fold of \['attn.o'\]: an earlier graph folded the scale "
                                           r"into linear:attn.v through the KV cache"):
        _agree_across_graphs(ctx, group, FoldTarget("explicit", reason="test"))
    ctx = SimpleNamespace(analyses={})
    _agree_across_graphs(ctx, group, FoldTarget("explicit", reason="test"))
    later = _agree_across_graphs(ctx, group, folded)
    assert later.kind == "explicit" and "an earlier graph of this model chose 'explicit'" in later.reason


def test_eager_quantize_keeps_the_fold_in_the_producer():
    x = token_batches(1, 24, seed=7)[0]
    model = tiny_model("llama")
    with torch.no_grad():
        compiled = _run(model, _backend("w8a8-int8-sq-dynamic"), [x])[0]
    qcompiler.quantize(model, "w8a8-int8-sq-dynamic", calibration=calibration_batches(), progress=False)
    o, v = model.model.layers[0].self_attn.o_proj, model.model.layers[0].self_attn.v_proj
    assert isinstance(o, QuantizedLinear) and o.inv_smooth is None     # its scale lives in v_proj's rows
    assert isinstance(v, QuantizedLinear)
    with torch.no_grad():
        assert rel_err(model(x).logits, compiled) < 1e-5


class _CachedAttention(torch.nn.Module):
    """Attention over a KV cache the caller passes in and gets back (``cat([past, new], dim=-2)``); with
    ``peek`` the cached values are also read outside the attention."""

    def __init__(self, peek: bool):
        super().__init__()
        torch.manual_seed(0)
        self.peek = peek
        self.norm = torch.nn.LayerNorm(64)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(64, n) for n in (64, 64, 64, 64))

    def forward(self, x, past_k, past_v):
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).view(b, t, 4, 16).transpose(1, 2) for proj in (self.q, self.k, self.v))
        k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v)
        y = x + self.o(out.transpose(1, 2).reshape(b, t, 64))
        return (y + v[:, :, :1].mean() if self.peek else y), k, v


def _cached_attention_backend(model):
    empty = torch.zeros(1, 4, 0, 16)
    calib = [{"x": torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i)), "past_k": empty,
              "past_v": empty} for i in range(2)]
    qb = qcompiler.backend("w8a8-int8-sq", calibration=calib, progress=False)

    def be(gm, example_inputs):
        return qb.run_passes(gm, example_inputs, planning_passes() + [KeepEverythingFloat(), InsertQDQ()])

    torch._dynamo.reset()
    return qb, torch.compile(model, backend=be, dynamic=False)


def test_the_kv_cache_carries_the_scaled_values_from_graph_to_graph():
    model = _CachedAttention(peek=False).eval()
    qb, compiled = _cached_attention_backend(model)
    empty = torch.zeros(1, 4, 0, 16)
    x1, x2 = (torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(s)) for s in (7, 8))
    with torch.no_grad():
        (y1, k1, v1), (r1, rk1, rv1) = compiled(x1, empty, empty), model(x1, empty, empty)
        y2, r2 = compiled(x2, k1, v1)[0], model(x2, rk1, rv1)[0]     # a second graph reads the cache back
    torch._dynamo.reset()
    assert qb.report.graphs == 2 and qb.report.layers["o"].smoothing == "linear:v"
    assert rel_err(v1, rv1) > 1e-2                      # the cache holds the values divided by the scale
    assert rel_err(y1, r1) < 1e-5 and rel_err(y2, r2) < 1e-5


def test_cached_values_read_beside_the_attention_keep_the_scale_explicit():
    model = _CachedAttention(peek=True).eval()           # reads the cache's earlier entries only
    qb, compiled = _cached_attention_backend(model)
    with torch.no_grad():
        _, past_k, past_v = model(torch.randn(1, 5, 64), torch.zeros(1, 4, 0, 16), torch.zeros(1, 4, 0, 16))
        x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(8))
        out, ref = compiled(x, past_k, past_v)[0], model(x, past_k, past_v)[0]
    torch._dynamo.reset()
    d = qb.report.layers["o"]
    assert d.smoothing == "explicit" and re.search(r"rows it scales also reach \w+ \(getitem\)", d.note)
    assert rel_err(out, ref) < 1e-5
