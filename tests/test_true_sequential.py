"""``GPTQSpec.true_sequential``: each linear of a block calibrated on a pass where the linears it depends on are
already quantized (``qcompiler.calibration.sequential``, ``LayerwiseCalibration``).

The dependency levels come from the block (zeroing a group's weights and watching which inputs change), not from
layer names: every tiny architecture gives attention inputs, attention output, MLP input, MLP output; independent
branches share a level. Each level's codes are GPTQ's on the Hessian recomputed here from a model with the earlier
levels' results in place; the first level's equal those without ``true_sequential`` bit for bit. With the
float-model target the float stream keeps the float weights of the linears already quantized."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcompiler import recipes
from qcompiler.algorithms.gptq import gptq_quantize
from qcompiler.calibration.float_reference import float_target_weight
from qcompiler.calibration.layerwise import LayerwiseCalibration, find_decoder_blocks
from qcompiler.calibration.sequential import dependency_levels
from qcompiler.errors import RecipeError
from qcompiler.recipes import GPTQSpec, Granularity, QuantDtype, Recipe, WeightSpec
from tiny_models import ARCHS, calibration_batches, linear_inputs, tiny_model

SPEC = WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, group_size=16)


def _recipe(sequential: bool, target: str = "quantized-inputs", alpha: float = 1.0) -> Recipe:
    return Recipe(name="gptq", weight=SPEC, layerwise=True,
                  weight_algorithm=GPTQSpec(act_order=True, static_groups=True, min_samples=1, target=target,
                                            target_alpha=alpha, true_sequential=sequential))


def _block_call(model, batches):
    """Block 0's captured ``(args, kwargs)`` on the first calibration batch."""
    path, blocks = find_decoder_blocks(model)
    seen = []

    def grab(module, args, kwargs):
        seen.append((args, kwargs))
        raise StopIteration
    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=batches[0])
    except StopIteration:
        pass
    finally:
        h.remove()
    return path, blocks[0], seen[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_has_four_levels_attention_then_mlp(arch):
    model = tiny_model(arch)
    path, block, (args, kwargs) = _block_call(model, calibration_batches())
    prefix = f"{path}.0"
    linears = [(f"{prefix}.{n}", m.weight) for n, m in block.named_modules()
               if getattr(m, "weight", None) is not None and m.weight.dim() == 2]
    seen: dict[str, torch.Tensor] = {}

    def note(module, a, k, f):
        seen.setdefault(f, a[0] if a else next(iter(k.values())))
    hooks = [block.get_submodule(f[len(prefix) + 1:]).register_forward_pre_hook(
        lambda m, a, k, f=f: note(m, a, k, f), with_kwargs=True) for f, _ in linears]
    with torch.inference_mode():
        block(*args, **kwargs)
    for h in hooks:
        h.remove()
    groups: list[list] = []      # linears reading one tensor share a group (as calibration groups them)
    for f, w in sorted(linears, key=lambda fw: list(seen).index(fw[0])):
        same = next((g for g in groups if seen[g[0][0]] is seen[f]), None)
        (same.append((f, w)) if same is not None else groups.append([(f, w)]))
    levels = dependency_levels(block, prefix, groups, args, kwargs)
    assert [j for lv in levels for j in lv] == list(range(len(groups)))
    assert len(levels) == 4 and all(len(lv) == 1 for lv in levels), levels


class _Branches(torch.nn.Module):
    """Two independent branches (``a``, ``b``) merged by ``out``; ``rare`` runs only when asked."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name in ("a", "b", "c", "out", "rare"):
            lin = torch.nn.Linear(8, 8)
            lin.weight.data = torch.randn(8, 8, generator=g)
            setattr(self, name, lin)

    def forward(self, x, rare: bool = False):
        y = self.a(x) + self.b(torch.tanh(x))
        y = self.c(torch.relu(y)) if not rare else self.rare(y)
        return self.out(y)


def test_independent_branches_share_a_level_and_unreached_groups_wait_for_every_group_before_them():
    block = _Branches()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    groups = [[(f"m.{n}", getattr(block, n).weight)] for n in ("a", "b", "rare", "c", "out")]
    # rare (index 2) is not reached: it waits for a and b; c depends on a and b; out on c
    assert dependency_levels(block, "m", groups, (x,), {}) == [[0, 1], [2, 3], [4]]
    # called with rare=True, c is the unreached one: it waits for a, b and rare
    assert dependency_levels(block, "m", groups, (x,), {"rare": True}) == [[0, 1], [2], [3, 4]]


_LEVELS = {"llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                     ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
           "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]}


@pytest.mark.parametrize("target", ["quantized-inputs", "float-model"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_level_is_gptq_on_the_inputs_of_the_levels_before_it_quantized(arch, target):
    """Block 0: each linear's codes are GPTQ's (on ``W*`` for the float-model target, from the float model's
    inputs) for the Hessian of a model whose earlier levels hold calibration's results, recomputed here; the
    first level's codes are those without ``true_sequential``, and a later level's differ. The float-model
    target runs with GPTAQ's ``target_alpha=0.25``."""
    batches = calibration_batches()
    alpha = 0.25 if target == "float-model" else 1.0
    seq = LayerwiseCalibration(batches, _recipe(True, target, alpha), progress=False)
    seq.collect(tiny_model(arch))
    plain = LayerwiseCalibration(batches, _recipe(False, target, alpha), progress=False)
    plain.collect(tiny_model(arch))
    path, _ = find_decoder_blocks(tiny_model(arch))
    transposed = arch == "gpt2"           # Conv1D stores [K, N]
    model, ref = tiny_model(arch), tiny_model(arch)
    mods, refs = dict(model.named_modules()), dict(ref.named_modules())
    levels = [[f"{path}.0.{n}" for n in lv] for lv in _LEVELS[arch]]
    x_float = linear_inputs(ref, batches, [f for lv in levels for f in lv])
    for depth, level in enumerate(levels):
        x_quant = linear_inputs(model, batches, level)
        for f in level:
            xq = x_quant[f]
            n = xq.shape[0]
            h = 2 / n * xq.T @ xq
            w = refs[f].weight.detach().float()
            w = w.t() if transposed else w
            if target == "float-model":     # the float stream: every weight of the block float
                w = float_target_weight(w, h.float(), (2 / n * xq.T @ x_float[f]).float(), 0.01, f, alpha=alpha)
            qw, _ = gptq_quantize(w, h.float(), SPEC, n_samples=n, act_order=True, static_groups=True,
                                  min_samples=1)
            agree = float((qw.q == seq.results[f].qweight.q).float().mean())
            assert agree >= 0.99, (f, agree)     # float sums in another order may flip a rare code
            same = torch.equal(seq.results[f].qweight.q, plain.results[f].qweight.q)
            assert same if depth == 0 else not same, f
        for f in level:                     # this level as calibration left it, for the next levels' inputs
            w = seq.results[f].qweight.dequantize()
            mods[f].weight.data = (w.t() if transposed else w).contiguous()


def test_the_float_stream_skips_the_dynamic_activation_hooks_of_quantized_linears():
    """A dynamic-activation recipe fake-quantizes the quantized stream's linear inputs; the float stream
    (``_float_pass``) runs those linears on their float inputs."""
    recipe = recipes.get("fp8-dynamic")
    assert recipe.activation.dynamic
    cal = LayerwiseCalibration(calibration_batches(), recipe, progress=False)
    lin = torch.nn.Linear(16, 4)
    from qcompiler.calibration.layerwise import LayerResult
    from qcompiler.core.layer_quant import quantize_weight
    result = LayerResult(quantize_weight(lin.weight.detach(), recipe.weight), None, None, "test")
    swaps: list = []
    hooks = cal._install(lin, lin.weight, False, result, swaps)
    assert hooks
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        fake = lin(x)
        with cal._float_pass():
            plain = lin(x)
        direct = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.equal(plain, direct) and not torch.equal(fake, direct)
    for h in hooks:
        h.remove()


def test_true_sequential_is_validated_and_round_trips():
    with pytest.raises(RecipeError, match="true_sequential"):
        GPTQSpec(true_sequential="yes")
    with pytest.raises(RecipeError, match="layerwise"):
        dataclasses.replace(_recipe(True), layerwise=False)
    r = _recipe(True)
    assert Recipe.from_json(r.to_json()) == r and r.weight_algorithm_spec.true_sequential


def test_a_level_pass_stops_once_its_linears_have_run(monkeypatch):
    """The passes for ``o_proj`` and for ``gate/up`` never reach ``down_proj`` (each call stops after the level's
    linears have run: they are called once per block call); ``down_proj``'s own pass reaches it."""
    model = tiny_model("llama")
    path, blocks = find_decoder_blocks(model)
    down = blocks[0].mlp.down_proj
    real = LayerwiseCalibration._observe
    reached: list[tuple[str, int]] = []

    def observe(self, block, prefix, *a, only=None, **k):
        if only is None or block is not blocks[0]:
            return real(self, block, prefix, *a, only=only, **k)
        n = [0]
        h = down.register_forward_pre_hook(lambda m, args: n.__setitem__(0, n[0] + 1))
        try:
            return real(self, block, prefix, *a, only=only, **k)
        finally:
            h.remove()
            reached.append((",".join(sorted(f.rsplit(".", 1)[1] for f in only)), n[0]))
    monkeypatch.setattr(LayerwiseCalibration, "_observe", observe)
    LayerwiseCalibration(calibration_batches(), _recipe(True), progress=False).collect(model)
    assert [r[0] for r in reached] == ["o_proj", "gate_proj,up_proj", "down_proj"]
    assert reached[0][1] == reached[1][1] == 0 and reached[2][1] > 0


def _block_calls(model) -> list[int]:
    """A counter of block 0's forward calls while calibration runs (pre-hook; the caller removes nothing: the
    model is thrown away)."""
    _, blocks = find_decoder_blocks(model)
    n = [0]
    blocks[0].register_forward_pre_hook(lambda m, a: n.__setitem__(0, n[0] + 1))
    return n


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_float_inputs_give_the_same_bits_with_fewer_block_passes(arch):
    """With the float-model target, the float stream's linear inputs kept from one float-only pass (the default)
    give the same codes, scales and statistics as rerunning the float stream on every level's pass
    (``float_cache_bytes=0``), and block 0 runs fewer times; a budget below the block's inputs falls back to the
    rerunning path."""
    batches = calibration_batches()
    recipe = _recipe(True, "float-model", 0.25)
    runs = {}
    for budget in (4 << 30, 0, 1):
        model = tiny_model(arch)
        calls = _block_calls(model)
        cal = LayerwiseCalibration(batches, recipe, progress=False, float_cache_bytes=budget)
        stats = cal.collect(model)
        runs[budget] = (cal, stats, calls[0])
    (kept, kstats, kcalls), (rerun, rstats, rcalls), (_, _, small_calls) = runs.values()
    assert kept.results.keys() == rerun.results.keys() and kept.results
    for f, r in kept.results.items():
        o = rerun.results[f]
        assert torch.equal(r.qweight.q, o.qweight.q) and torch.equal(r.qweight.scale, o.qweight.scale), f
    assert list(kstats) == list(rstats)
    for f, st in kstats.items():
        for field in ("absmax", "samples", "absmean"):
            assert torch.equal(getattr(st, field), getattr(rstats[f], field)), (f, field)
        assert st.tokens == rstats[f].tokens
    assert kcalls < rcalls and small_calls == rcalls + 1    # the budget check ran one float call, then fell back


def test_structural_probes_run_on_the_first_sequence_of_a_merged_call():
    """``_one_sequence``: a merged call (batch-1 masks and positions broadcast over the hidden states' batch) is cut
    to its first sequence; a call whose other tensors carry the batch is left whole."""
    from qcompiler.calibration.layerwise import _one_sequence
    hidden = torch.randn(8, 5, 4)
    mask, pos = torch.zeros(1, 1, 5, 5), (torch.randn(1, 5, 2), torch.randn(1, 5, 2))
    args, kwargs = _one_sequence(((hidden,), {"attention_mask": mask, "position_embeddings": pos,
                                              "cache_position": torch.arange(5)}))
    assert torch.equal(args[0], hidden[:1]) and kwargs["attention_mask"] is mask
    args, kwargs = _one_sequence(((), {"hidden_states": hidden, "attention_mask": mask}))
    assert args == () and torch.equal(kwargs["hidden_states"], hidden[:1])
    whole = ((hidden,), {"attention_mask": torch.zeros(8, 1, 5, 5)})
    assert _one_sequence(whole) is whole
    single = ((hidden[:1],), {})
    assert _one_sequence(single) is single
