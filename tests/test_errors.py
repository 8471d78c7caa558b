"""Bad input gets a clear error and changes nothing: unknown presets and targets, missing or
malformed calibration, a failing user pass, and a model with nothing to quantize."""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler import CalibrationError, PassError, RecipeError, recipes
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model, token_batches

STATIC = "w8a8-int8-naive"   # static activations: needs calibration


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert not any(type(m).__name__ == "QuantizedLinear" for m in model.modules())


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def snap(llama):
    before = _snapshot(llama)
    yield before
    _assert_unchanged(llama, before)


# -- presets and targets ---------------------------------------------------------------------
def test_unknown_preset_in_backend():
    with pytest.raises(RecipeError, match="unknown recipe 'nope'") as info:
        qcompiler.backend("nope")
    for name in recipes.names():
        assert name in str(info.value)


def test_unknown_preset_in_quantize(llama, snap):
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        qcompiler.quantize(llama, "nope", calibration=token_batches(1, 8))


@pytest.mark.parametrize("bad", [5, None, {"name": "w8a16"}])
def test_recipe_of_wrong_type(bad, llama, snap):
    with pytest.raises(RecipeError, match="recipe must be a qcompiler.Recipe or a preset name"):
        qcompiler.backend(bad)
    with pytest.raises(RecipeError, match="recipe must be a qcompiler.Recipe or a preset name"):
        qcompiler.quantize(llama, bad)


def test_unknown_target():
    with pytest.raises(RecipeError, match="unknown target 'tpu'") as info:
        qcompiler.backend("w8a16", target="tpu")
    assert "reference" in str(info.value)


# -- calibration -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in recipes.names() if recipes.get(n).requires_calibration])
def test_recipe_needing_calibration_without_it(name, llama, snap):
    with pytest.raises(CalibrationError, match=f"recipe {name!r} needs calibration data"):
        qcompiler.backend(name)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        qcompiler.quantize(llama, name)


def test_missing_calibration_says_what_needs_it():
    with pytest.raises(CalibrationError, match="recipe 'w4a16-gptq' needs calibration data for GPTQ: "):
        qcompiler.backend("w4a16-gptq")
    with pytest.raises(CalibrationError, match="needs calibration data for static activation scales and SmoothQuant"):
        qcompiler.backend("w8a8-int8-sq")


def test_weight_only_needs_no_calibration():
    qb = qcompiler.backend("w8a16")
    assert qb.calibration is None


def test_sensitivity_fallback_without_calibration_warns_and_quantizes_all():
    """w8a16's sensitivity fallback reads calibration data; without it the rule is skipped, said
    in a warning and in the report, and every decoder linear is quantized."""
    llama = tiny_model("llama")
    recipe = recipes.get("w8a16").replace(fallback=recipes.FallbackSpec(min_sqnr_db=1e3, max_fraction=1.0))
    with pytest.warns(UserWarning, match=r"no calibration data, so the sensitivity fallback .* measured no layer"):
        qcompiler.quantize(llama, recipe, progress=False)
    rep = qcompiler.report(llama)
    assert any("sensitivity fallback" in w for w in rep.warnings)
    decoder = [d for d in rep.layers.values() if d.op_kind == "linear"]
    assert decoder and all(d.quantize for d in decoder)


def test_sensitivity_fallback_with_calibration_keeps_layers_in_float():
    llama = tiny_model("llama")
    recipe = recipes.get("w8a16").replace(fallback=recipes.FallbackSpec(min_sqnr_db=1e3, max_fraction=0.5))
    qcompiler.quantize(llama, recipe, calibration=token_batches(2, 16), progress=False)
    decoder = [d for d in qcompiler.report(llama).layers.values() if d.op_kind == "linear"]
    kept = [d for d in decoder if not d.quantize]
    assert len(kept) == len(decoder) // 2 and all("fallback.min_sqnr_db" in d.reason for d in kept)


# -- calibration-free formats: optional GPTQ -----------------------------------------------------
SKIPPED = r"no calibration data, so GPTQ \(gptq.optional=True\) was skipped and the weights are rounded to nearest"


def _rtn_twin(recipe: recipes.Recipe) -> recipes.Recipe:
    """The same format without GPTQ and the sensitivity rule: what skipping them must give."""
    return recipe.replace(weight_algorithm=None, layerwise=False, fallback=recipes.FallbackSpec())


def test_fp8_dynamic_without_calibration_rounds_to_nearest_with_a_warning():
    x = token_batches(1, 12, seed=3)[0]
    twin = tiny_model("llama")
    qcompiler.quantize(twin, _rtn_twin(recipes.get("fp8-dynamic")), progress=False)
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=SKIPPED):
        qcompiler.quantize(model, "fp8-dynamic", progress=False)
    rep = qcompiler.report(model)
    assert any("GPTQ (gptq.optional=True) was skipped" in w for w in rep.warnings)
    assert any("sensitivity fallback" in w for w in rep.warnings)
    assert all("gptq" not in d.note for d in rep.quantized) and len(rep.quantized) == 14
    with torch.inference_mode():
        assert torch.equal(model(input_ids=x).logits, twin(input_ids=x).logits)


def test_fp8_dynamic_without_calibration_under_torch_compile():
    x = token_batches(1, 12, seed=3)[0]
    twin = tiny_model("llama")
    qcompiler.quantize(twin, _rtn_twin(recipes.get("fp8-dynamic")), progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model("llama"), backend=qcompiler.backend("fp8-dynamic", progress=False),
                             dynamic=False)
    try:
        with pytest.warns(UserWarning, match=SKIPPED), torch.inference_mode():
            out = compiled(input_ids=x).logits
    finally:
        torch._dynamo.reset()
    rep = qcompiler.report(compiled)
    assert sum("GPTQ (gptq.optional=True) was skipped" in w for w in rep.warnings) == 1
    assert rep.quantized
    with torch.inference_mode():
        ref = twin(input_ids=x).logits
    assert rel_err(out, ref) < 1e-5      # compiled graph vs eager modules: same ops, float rounding apart


@pytest.mark.parametrize("name,optional", [("fp8-dynamic", True), ("w4a16-gptq", False), ("w8a16-gptq", False)])
def test_too_little_calibration_for_gptq_says_rows_needed_and_got(name, optional, llama, snap):
    few = token_batches(2, 8)       # 16 rows; GPTQ's minimum is 128
    for make in (lambda: qcompiler.backend(name, calibration=few),
                 lambda: qcompiler.quantize(llama, name, calibration=few, progress=False)):
        with pytest.raises(CalibrationError, match=f"recipe {name!r}: GPTQ needs at least 128 calibration rows "
                                                   r"\(tokens\) per linear, got 16") as info:
            make()
        assert ("run without calibration data" in str(info.value)) is optional
        assert "gptq.min_samples" in str(info.value)


def test_gptq_minimum_rows_accepted():
    qb = qcompiler.backend("fp8-dynamic", calibration=calibration_batches(), progress=False)   # 4 x 32 = 128 rows
    assert qb.calibration is not None


def test_too_few_rows_reaching_one_layer_rounds_it_to_nearest_saying_so():
    """Rows are counted up front from the token ids (refused above); a linear that still sees fewer (an
    expert of a mixture few tokens were routed to) is rounded to nearest, and its note says why."""
    from qcompiler.calibration.statistics import LayerStats
    from qcompiler.algorithms.registry import quantize_linear
    from qcompiler.core.layer_quant import quantize_weight
    k = 64
    w = torch.randn(32, k)
    st = LayerStats(torch.ones(k), torch.ones(4, k), tokens=40, hessian=torch.eye(k))
    recipe = recipes.get("fp8-dynamic")
    qw, note = quantize_linear("experts.3.up", w, st, recipe)
    assert note == "round to nearest: only 40 calibration rows reached it (GPTQ needs gptq.min_samples=128)"
    assert torch.equal(qw.q, quantize_weight(w, recipe.weight).q)


GOOD = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))

BAD_CALIBRATION = [
    ("string", "some text", r"calibration batch 0 must be a tensor of token ids .* got str"),
    ("float-tensor", torch.randn(1, 8), r"calibration batch 0: token ids must be an integer tensor, got torch.float32"),
    ("bool-tensor", torch.ones(1, 8, dtype=torch.bool), r"calibration batch 0: token ids must be an integer tensor"),
    ("3d-tensor", torch.zeros(1, 2, 8, dtype=torch.long), r"calibration batch 0: token ids must have shape .* \(1, 2, 8\)"),
    ("empty-tensor", torch.zeros(1, 0, dtype=torch.long), r"calibration batch 0: token ids must have shape"),
    ("empty-list", [], "calibration is empty"),
    ("dict-without-tensors", {"input_ids": None, "attention_mask": [[1, 1]]},
     "calibration batch 0 is a dict with no tensor values"),
    ("dict-with-3d-ids", {"input_ids": torch.zeros(1, 2, 8, dtype=torch.long)}, r"calibration batch 0: .*shape"),
    ("float-in-second-batch", [GOOD, torch.randn(1, 8)], r"calibration batch 1: token ids must be an integer"),
    ("list-in-third-batch", [GOOD, GOOD, [1, 2, 3]], r"calibration batch 2 must be a tensor .* got list"),
    ("not-iterable", 5, "calibration must be an iterable of batches, got int"),
]


@pytest.mark.parametrize("calib,match", [(c, m) for _, c, m in BAD_CALIBRATION], ids=[i for i, _, _ in BAD_CALIBRATION])
def test_bad_calibration_names_the_batch(calib, match, llama, snap):
    with pytest.raises(CalibrationError, match=match):
        qcompiler.backend(STATIC, calibration=calib)
    with pytest.raises(CalibrationError, match=match):
        qcompiler.quantize(llama, STATIC, calibration=calib)


def test_calibration_error_is_a_value_error():
    with pytest.raises(ValueError):
        qcompiler.backend(STATIC, calibration=[])


# -- failures inside the pipeline ----------------------------------------------------------------
class _Fails:
    name = "user_fails"
    requires = ("annotate",)

    def run(self, gm, ctx):
        raise RuntimeError("user pass broke")


def test_failing_user_pass_under_compile_names_it_and_changes_nothing(llama, snap):
    x = token_batches(1, 8, seed=4)[0]
    with torch.inference_mode():
        ref = llama(input_ids=x).logits
    torch._dynamo.reset()
    compiled = torch.compile(llama, backend=qcompiler.backend("w8a16", passes=[_Fails()], progress=False),
                             dynamic=False)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        with torch.inference_mode():
            compiled(input_ids=x)
    torch._dynamo.reset()
    inner = info.value.inner_exception
    assert isinstance(inner, PassError)
    assert inner.pass_name == "user_fails" and inner.before[-1] == "lower"
    assert "RuntimeError: user pass broke" in str(inner)
    with torch.inference_mode():
        assert torch.equal(llama(input_ids=x).logits, ref)


# -- nothing to quantize ----------------------------------------------------------------------
class _Elementwise(torch.nn.Module):
    """No linear at all: a 1-D gain and elementwise ops."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return torch.tanh(x * self.gain + 1.0) - torch.sigmoid(x) * 0.5


@pytest.mark.parametrize("recipe", ["w8a16", recipes.Recipe(name="w4", weight=recipes.WeightSpec("int4", "per_group", 8))],
                         ids=["w8a16", "w4-g8"])
def test_nothing_quantizable_warns_and_runs_in_float(recipe):
    torch.manual_seed(0)
    model = _Elementwise().eval()
    x = torch.randn(2, 5, 16)
    before = _snapshot(model)
    ref = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qcompiler.backend(recipe, progress=False), dynamic=False)
    with pytest.warns(UserWarning, match="nothing quantizable"):
        out = compiled(x)
    torch._dynamo.reset()
    assert torch.equal(out, ref)
    rep = qcompiler.report(compiled)
    assert rep.layers == {} and rep.quantized == [] and rep.fallbacks == []
    assert any("nothing quantizable" in w for w in rep.warnings)
    _assert_unchanged(model, before)


# -- token ids outside the vocabulary ----------------------------------------------------------
OUT_OF_VOCAB = [GOOD, torch.tensor([[1, 2, 500]])]   # tiny models have a 128-token vocabulary


def test_out_of_vocab_calibration_changes_nothing(llama, snap):
    with pytest.raises(CalibrationError, match=r"\[0, 128\)"):
        qcompiler.quantize(llama, STATIC, calibration=OUT_OF_VOCAB, progress=False)
    torch._dynamo.reset()


def test_out_of_vocab_calibration_is_a_calibration_error(llama, snap):
    try:
        with pytest.raises(CalibrationError, match="batch 1"):
            qcompiler.quantize(llama, STATIC, calibration=OUT_OF_VOCAB, progress=False)
    finally:
        torch._dynamo.reset()
