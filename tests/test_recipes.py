"""Recipes: JSON round trip of every preset, strict ``from_dict``, every ``__post_init__`` check,
the preset registry, enum coercion and immutability."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qcompiler import recipes
from qcompiler.errors import RecipeError
from qcompiler.recipes import (
    ActivationSpec,
    Calibrator,
    FallbackSpec,
    GPTQSpec,
    Granularity,
    QuantDtype,
    Recipe,
    SmoothQuantSpec,
    WeightSpec,
    register_recipe,
)

PRESETS = recipes.names()


def test_presets_exist():
    assert {"w8a16", "w8a8-int8-naive", "w8a8-int8-sq", "w8a8-int8-sq-dynamic", "fp8", "fp8-dynamic"} <= set(PRESETS)


# -- JSON round trip -------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_json(name):
    r = recipes.get(name)
    assert r.name == name
    text = r.to_json()
    assert Recipe.from_json(text) == r
    assert Recipe.from_dict(json.loads(text)) == r
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_json(r.to_json(indent=None)) == r


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_file(name, tmp_path):
    r = recipes.get(name)
    path = tmp_path / f"{name}.json"
    path.write_text(r.to_json())
    back = Recipe.from_json(path.read_text())
    assert back == r
    assert back.to_json() == r.to_json()
    # enums come back as enum members, tuples as tuples
    assert isinstance(back.weight.dtype, QuantDtype)
    assert isinstance(back.fallback.keep_op_kinds, tuple)
    if back.smoothquant is not None:
        assert isinstance(back.smoothquant.alpha_grid, tuple)


def test_custom_recipe_round_trips():
    r = Recipe(name="mine", weight=WeightSpec("int4", "per_group", 32, symmetric=False),
               activation=None, fallback=FallbackSpec(keep_op_kinds=("output_head",), keep_modules=("*.o_proj",),
                                                      min_sqnr_db=20.0, max_fraction=0.5),
               samples_per_layer=64)
    assert Recipe.from_json(r.to_json()) == r


def test_to_dict_is_plain_json():
    d = recipes.get("w8a8-int8-sq").to_dict()
    assert set(d) == {"type", "version", "data"}
    assert d["type"] == "Recipe" and d["version"] == Recipe.VERSION
    assert d["data"]["weight"]["dtype"] == "int8"
    assert d["data"]["activation"]["calibrator"] == "mse"
    assert isinstance(d["data"]["smoothquant"]["alpha_grid"], list)
    json.dumps(d)   # no enums or tuples left


# -- from_dict / from_json refusals --------------------------------------------------------------
def _plain():
    return recipes.get("w8a8-int8-sq").to_dict()


def test_from_dict_unknown_data_key_is_named():
    d = _plain()
    d["data"]["bogus_key"] = 1
    with pytest.raises(RecipeError, match="bogus_key"):
        Recipe.from_dict(d)


def test_from_dict_unknown_nested_key_is_named():
    d = _plain()
    d["data"]["weight"]["bits"] = 8
    with pytest.raises(RecipeError, match=r"recipe\.weight.*bits"):
        Recipe.from_dict(d)
    d = _plain()
    d["data"]["smoothquant"]["beta"] = 0.1
    with pytest.raises(RecipeError, match=r"recipe\.smoothquant.*beta"):
        Recipe.from_dict(d)


def test_from_dict_unknown_top_level_key_refused():
    d = _plain()
    d["extra"] = 1
    with pytest.raises(RecipeError, match="'type', 'version' and 'data'"):
        Recipe.from_dict(d)


def test_from_dict_unknown_top_level_key_is_named():
    d = _plain()
    d["extra_top_level"] = 1
    with pytest.raises(RecipeError, match="extra_top_level"):
        Recipe.from_dict(d)


def test_from_dict_missing_key_refused():
    d = _plain()
    del d["version"]
    with pytest.raises(RecipeError, match="version"):
        Recipe.from_dict(d)


def test_from_dict_other_version_refused():
    d = _plain()
    d["version"] = Recipe.VERSION + 1
    with pytest.raises(RecipeError, match=f"version {Recipe.VERSION + 1}"):
        Recipe.from_dict(d)


def test_from_dict_other_type_refused():
    d = _plain()
    d["type"] = "WeightSpec"
    with pytest.raises(RecipeError, match="'WeightSpec' is unknown"):
        Recipe.from_dict(d)


@pytest.mark.parametrize("bad", [[], "recipe", None, 3])
def test_from_dict_not_a_dict_refused(bad):
    with pytest.raises(RecipeError):
        Recipe.from_dict(bad)


def test_from_dict_wrong_value_types_refused():
    d = _plain()
    d["data"]["weight"] = "int8"
    with pytest.raises(RecipeError, match=r"recipe\.weight must be an object"):
        Recipe.from_dict(d)
    d = _plain()
    d["data"]["fallback"]["keep_modules"] = "*.down_proj"
    with pytest.raises(RecipeError, match=r"recipe\.fallback\.keep_modules must be a list"):
        Recipe.from_dict(d)
    d = _plain()
    d["data"]["weight"]["dtype"] = "int2"
    with pytest.raises(RecipeError, match=r"weight\.dtype='int2'"):
        Recipe.from_dict(d)


def test_from_dict_data_missing_fields_take_defaults():
    r = Recipe.from_dict({"type": "Recipe", "version": Recipe.VERSION, "data": {"name": "x"}})
    assert r == Recipe(name="x")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"])
def test_from_json_garbage_refused(text):
    with pytest.raises(RecipeError):
        Recipe.from_json(text)


# -- every __post_init__ check ---------------------------------------------------------------
INT8_STATIC = ActivationSpec("int8", "per_tensor")
FP8_DYNAMIC = ActivationSpec("fp8_e4m3", "per_token")

BAD_SPECS = [
    # WeightSpec
    ("weight.dtype", lambda: WeightSpec(dtype="int2")),
    ("weight.dtype", lambda: WeightSpec(dtype=8)),
    ("weight.granularity", lambda: WeightSpec(granularity="per_token")),
    ("weight.granularity", lambda: WeightSpec(granularity="per_row")),
    ("weight.group_size", lambda: WeightSpec(dtype="int4", granularity="per_group")),
    ("weight.group_size", lambda: WeightSpec(dtype="int4", granularity="per_group", group_size=0)),
    ("weight.group_size", lambda: WeightSpec(dtype="int4", granularity="per_group", group_size=-32)),
    ("weight.group_size", lambda: WeightSpec(dtype="int4", granularity="per_group", group_size=32.0)),
    ("weight.group_size", lambda: WeightSpec(dtype="int4", granularity="per_group", group_size=True)),
    ("weight.group_size", lambda: WeightSpec(granularity="per_channel", group_size=32)),
    ("weight.group_size", lambda: WeightSpec(granularity="per_tensor", group_size=128)),
    ("weight.symmetric", lambda: WeightSpec(dtype="fp8_e4m3", symmetric=False)),
    ("weight.symmetric='false' must be a bool", lambda: WeightSpec(symmetric="false")),
    ("weight.symmetric=0 must be a bool", lambda: WeightSpec(dtype="int4", granularity="per_group", group_size=32,
                                                             symmetric=0)),
    # ActivationSpec
    ("activation.dtype", lambda: ActivationSpec(dtype="int4")),
    ("activation.dtype", lambda: ActivationSpec(dtype="bf16")),
    ("activation.granularity", lambda: ActivationSpec(granularity="per_channel")),
    ("activation.granularity", lambda: ActivationSpec(granularity="per_group")),
    ("activation.calibrator", lambda: ActivationSpec(calibrator="entropy")),
    ("activation.percentile", lambda: ActivationSpec(percentile=0.0)),
    ("activation.percentile", lambda: ActivationSpec(percentile=-1.0)),
    ("activation.percentile", lambda: ActivationSpec(percentile=100.01)),
    ("activation.symmetric", lambda: ActivationSpec(symmetric=False)),
    ("activation.symmetric='true' must be a bool", lambda: ActivationSpec(symmetric="true")),
    # SmoothQuantSpec
    ("smoothquant.alpha", lambda: SmoothQuantSpec(alpha=-0.1)),
    ("smoothquant.alpha", lambda: SmoothQuantSpec(alpha=1.5)),
    ("smoothquant.alpha_grid", lambda: SmoothQuantSpec(alpha_grid=())),
    ("smoothquant.alpha_grid", lambda: SmoothQuantSpec(alpha_grid=(0.5, 1.2))),
    ("smoothquant.alpha_grid", lambda: SmoothQuantSpec(alpha_grid=(-0.1,))),
    ("smoothquant.search='yes' must be a bool", lambda: SmoothQuantSpec(search="yes")),
    # GPTQSpec
    ("gptq.optional='true' must be a bool", lambda: GPTQSpec(optional="true")),
    ("gptq.act_order=1 must be a bool", lambda: GPTQSpec(act_order=1)),
    # FallbackSpec
    ("fallback.keep_op_kinds", lambda: FallbackSpec(keep_op_kinds=("linear", "conv2d"))),
    ("fallback.max_fraction", lambda: FallbackSpec(max_fraction=1.5)),
    ("fallback.max_fraction", lambda: FallbackSpec(max_fraction=-0.1)),
    # Recipe
    ("recipe.weight", lambda: Recipe(weight="int8")),
    ("recipe.fallback", lambda: Recipe(fallback=("norm",))),
    ("recipe.activation", lambda: Recipe(activation="int8")),
    ("recipe.smoothquant", lambda: Recipe(activation=INT8_STATIC, smoothquant=0.5)),
    ("recipe.smoothquant", lambda: Recipe(smoothquant=SmoothQuantSpec())),
    ("weight.dtype='int8' with activation.dtype='fp8_e4m3'",
     lambda: Recipe(weight=WeightSpec("int8"), activation=FP8_DYNAMIC)),
    ("weight.dtype='fp8_e4m3' with activation.dtype='int8'",
     lambda: Recipe(weight=WeightSpec("fp8_e4m3"), activation=INT8_STATIC)),
    ("weight.granularity='per_group'",
     lambda: Recipe(weight=WeightSpec("int8", "per_group", 32), activation=INT8_STATIC)),
    ("weight.granularity='per_group'",
     lambda: Recipe(weight=WeightSpec("fp8_e4m3", "per_group", 32), activation=FP8_DYNAMIC)),
    ("recipe.layerwise=True with recipe.smoothquant",
     lambda: Recipe(activation=INT8_STATIC, smoothquant=SmoothQuantSpec(), weight_algorithm=GPTQSpec(), layerwise=True)),
    ("recipe.samples_per_layer", lambda: Recipe(samples_per_layer=15)),
    ("recipe.samples_per_layer", lambda: Recipe(samples_per_layer=0)),
    ("recipe.samples_per_layer", lambda: Recipe(samples_per_layer=512.0)),
    ("recipe.samples_per_layer", lambda: Recipe(samples_per_layer="1024")),
    ("recipe.name=5 must be a string", lambda: Recipe(name=5)),
    ("recipe.layerwise='false' must be a bool", lambda: Recipe(weight_algorithm=GPTQSpec(), layerwise="false")),
    ("recipe.gptq.optional=True", lambda: Recipe(weight=WeightSpec("fp8_e4m3"), activation=ActivationSpec(
        "fp8_e4m3", "per_tensor"), weight_algorithm=GPTQSpec(optional=True))),
    ("recipe.gptq.optional=True", lambda: Recipe(activation=ActivationSpec("int8", "per_token"),
                                                 smoothquant=SmoothQuantSpec(), weight_algorithm=GPTQSpec(optional=True))),
]


@pytest.mark.parametrize("field_name,make", BAD_SPECS, ids=[f"{i}-{f.split()[0]}" for i, (f, _) in enumerate(BAD_SPECS)])
def test_post_init_check_names_the_field(field_name, make):
    with pytest.raises(RecipeError) as info:
        make()
    assert field_name in str(info.value)


def test_recipe_error_is_a_value_error():
    with pytest.raises(ValueError):
        WeightSpec(dtype="int2")


GOOD_SPECS = [
    lambda: WeightSpec("int4", "per_group", 128),
    lambda: WeightSpec("int8", "per_tensor", symmetric=False),
    lambda: WeightSpec("int4", "per_group", 1, symmetric=False),
    lambda: ActivationSpec(percentile=100.0),
    lambda: ActivationSpec("fp8_e4m3", "per_tensor", "mse"),
    lambda: SmoothQuantSpec(alpha=0.0, alpha_grid=[0.0, 1.0]),
    lambda: SmoothQuantSpec(alpha=1.0),
    lambda: FallbackSpec(keep_op_kinds=(), max_fraction=0.0),
    lambda: FallbackSpec(keep_op_kinds=list(recipes.OP_KINDS), max_fraction=1.0),
    lambda: Recipe(weight=WeightSpec("int4", "per_group", 32), activation=FP8_DYNAMIC),
    lambda: Recipe(weight=WeightSpec("fp8_e4m3", "per_channel"), activation=FP8_DYNAMIC),
    lambda: Recipe(weight=WeightSpec("int8", "per_group", 64)),   # weight-only per-group int8 is fine
    lambda: Recipe(activation=INT8_STATIC, smoothquant=SmoothQuantSpec()),
    lambda: Recipe(samples_per_layer=16),
    lambda: Recipe(activation=INT8_STATIC, smoothquant=SmoothQuantSpec(), weight_algorithm=GPTQSpec()),   # whole-model Hessians
]


@pytest.mark.parametrize("make", GOOD_SPECS)
def test_boundary_values_accepted(make):
    make()


def test_keep_modules_bare_string_is_not_split_into_characters():
    try:
        spec = FallbackSpec(keep_modules="*.mlp.down_proj")
    except RecipeError:
        return
    assert spec.keep_modules == ("*.mlp.down_proj",)


NON_NUMERIC = [
    ("activation.percentile", lambda: ActivationSpec(percentile="high")),
    ("activation.percentile", lambda: ActivationSpec(percentile=None)),
    ("smoothquant.alpha", lambda: SmoothQuantSpec(alpha="half")),
    ("fallback.max_fraction", lambda: FallbackSpec(max_fraction=None)),
    ("fallback.min_sqnr_db", lambda: FallbackSpec(min_sqnr_db="high")),
]


@pytest.mark.parametrize("field_name,make", NON_NUMERIC, ids=[f for f, _ in NON_NUMERIC])
def test_non_numeric_field_names_the_field(field_name, make):
    with pytest.raises(RecipeError, match=field_name.replace(".", r"\.")):
        make()


# -- registry ----------------------------------------------------------------------------------
def test_unknown_preset_lists_known_names():
    with pytest.raises(RecipeError, match="unknown recipe 'nope'") as info:
        recipes.get("nope")
    for name in PRESETS:
        assert name in str(info.value)


def test_get_returns_a_fresh_equal_recipe():
    assert recipes.get("w8a16") == recipes.get("w8a16")


def test_register_recipe_refuses_duplicate(monkeypatch):
    monkeypatch.setattr(recipes.presets, "RECIPES", dict(recipes.presets.RECIPES))
    before = dict(recipes.presets.RECIPES)
    with pytest.raises(RecipeError, match="'w8a16' is already registered"):
        register_recipe("w8a16")(lambda: Recipe(name="other"))
    assert recipes.presets.RECIPES == before
    assert recipes.get("w8a16").name == "w8a16"


def test_register_recipe_adds_a_preset(monkeypatch):
    monkeypatch.setattr(recipes.presets, "RECIPES", dict(recipes.presets.RECIPES))

    @register_recipe("test-w4")
    def _w4():
        return Recipe(name="test-w4", weight=WeightSpec("int4", "per_group", 32))

    assert "test-w4" in recipes.names()
    assert recipes.get("test-w4").weight.dtype is QuantDtype.INT4
    with pytest.raises(RecipeError, match="already registered"):
        register_recipe("test-w4")(_w4)


def test_specs_do_not_depend_on_the_presets():
    """Specs are the vocabulary, presets one use of it: the specs module imports no preset."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(recipes.specs))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "presets" not in imported and not any(m and m.endswith(".presets") for m in imported)
    assert set(recipes.names()) == set(recipes.presets.RECIPES)


# -- enums and immutability --------------------------------------------------------------------
def test_enums_accept_their_string_values():
    w = WeightSpec(dtype="int4", granularity="per_group", group_size=32)
    assert w.dtype is QuantDtype.INT4 and w.granularity is Granularity.PER_GROUP
    a = ActivationSpec(dtype="fp8_e4m3", granularity="per_tensor", calibrator="percentile")
    assert a.dtype is QuantDtype.FP8_E4M3 and a.granularity is Granularity.PER_TENSOR
    assert a.calibrator is Calibrator.PERCENTILE and not a.dynamic
    assert w == WeightSpec(QuantDtype.INT4, Granularity.PER_GROUP, 32)
    assert a == ActivationSpec(QuantDtype.FP8_E4M3, Granularity.PER_TENSOR, Calibrator.PERCENTILE)
    for e in (QuantDtype, Granularity, Calibrator):
        for member in e:
            assert e(member.value) is member


def test_recipes_are_frozen():
    r = recipes.get("w8a8-int8-sq")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.weight.dtype = QuantDtype.INT4
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.activation.percentile = 50.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.smoothquant.alpha = 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.fallback.keep_modules = ("*",)
    assert isinstance(r.fallback.keep_op_kinds, tuple) and isinstance(r.smoothquant.alpha_grid, tuple)
    assert hash(r.weight) == hash(WeightSpec())   # frozen specs hash by value


def test_replace_runs_the_checks():
    r = recipes.get("w8a16")
    assert r.replace(name="mine").name == "mine" and r.name == "w8a16"
    with pytest.raises(RecipeError, match="samples_per_layer"):
        r.replace(samples_per_layer=1)
    with pytest.raises(RecipeError, match="recipe.smoothquant"):
        r.replace(smoothquant=SmoothQuantSpec())


@pytest.mark.parametrize("name", PRESETS)
def test_needs_calibration_matches_the_preset(name):
    r = recipes.get(name)
    static = r.activation is not None and not r.activation.dynamic
    gptq_required = r.gptq is not None and not r.gptq.optional
    other_algorithm = r.weight_algorithm is not None and r.gptq is None and r.awq is None    # SignRound
    linears = static or r.smoothquant is not None or gptq_required or r.awq is not None or other_algorithm
    required = linears or (r.kv_cache is not None and r.kv_cache.static)
    assert r.requires_calibration == required == bool(r.calibration_required_by)
    assert r.linears_require_calibration == linears
    assert r.needs_calibration == (linears or r.gptq is not None or r.fallback.min_sqnr_db is not None)
    if name == "w8a16":      # calibration only feeds its sensitivity fallback: it runs without data
        assert r.needs_calibration and not r.requires_calibration
    if name == "w8a8-int8-naive":
        assert r.requires_calibration


def test_calibration_free_presets():
    """The format decides: dynamic or no activation quantization, no SmoothQuant / AWQ. GPTQ is
    optional only in fp8-dynamic (llm-compressor's FP8_DYNAMIC needs no data); the GPTQ presets
    keep it required, their round-to-nearest forms being presets of their own."""
    free = {n for n in PRESETS if not recipes.get(n).requires_calibration}
    assert free == {"w8a16", "w4a16-rtn", "fp8-dynamic", "kv-int4", "kv-int8-dynamic"}   # per-block, per-token scales
    assert recipes.get("fp8-dynamic").gptq.optional and recipes.get("fp8-dynamic").needs_calibration
    assert recipes.get("w4a16-gptq").calibration_required_by == ("GPTQ",)
    assert recipes.get("w8a16-gptq").calibration_required_by == ("GPTQ",)
    assert recipes.get("fp8").calibration_required_by == ("static activation scales", "GPTQ")
    assert recipes.get("w8a8-int8-sq-dynamic").calibration_required_by == ("SmoothQuant",)


def test_optional_gptq_round_trips_and_defaults_to_required():
    r = recipes.get("w8a16-gptq").replace(weight_algorithm=GPTQSpec(optional=True))
    assert not r.requires_calibration and r.needs_calibration
    assert Recipe.from_json(r.to_json()) == r
    d = recipes.get("w8a16-gptq").to_dict()
    del d["data"]["weight_algorithm"]["data"]["optional"]          # JSON written before the field existed
    assert Recipe.from_dict(d).gptq.optional is False


@pytest.mark.parametrize("preset", ["w4a16-gptq", "w4a16-awq", "w8a16"])
def test_version_1_recipes_with_gptq_or_awq_fields_still_load(preset):
    """Version 1 (checkpoints written before the one weight-algorithm slot) kept GPTQ / AWQ in
    fields of their own; they load as the same recipe."""
    r = recipes.get(preset)
    d = r.to_dict()
    spec = d["data"].pop("weight_algorithm")
    d["version"] = 1
    d["data"]["gptq"] = spec["data"] if spec and spec["type"] == "GPTQSpec" else None
    d["data"]["awq"] = spec["data"] if spec and spec["type"] == "AWQSpec" else None
    assert Recipe.from_dict(d) == r
    if spec:
        d["data"]["gptq"] = d["data"]["awq"] = spec["data"]
        with pytest.raises(RecipeError, match="one weight algorithm per recipe"):
            Recipe.from_dict(d)


# -- JSON value types -------------------------------------------------------------------------
def _with(preset: str, path: tuple[str, ...], value):
    d = recipes.get(preset).to_dict()
    node = d["data"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


WRONG_TYPES = [
    ("w8a16", ("weight", "symmetric"), "false", 'recipe.weight.symmetric="false" must be a bool'),
    ("w8a16", ("weight", "symmetric"), 0, "recipe.weight.symmetric=0 must be a bool"),
    ("w8a16", ("weight", "symmetric"), None, "recipe.weight.symmetric=null must be a bool"),
    ("w8a8-int8-sq", ("activation", "symmetric"), "true", 'recipe.activation.symmetric="true" must be a bool'),
    ("w8a8-int8-sq", ("smoothquant", "search"), 1, "recipe.smoothquant.search=1 must be a bool"),
    ("w4a16-gptq", ("weight_algorithm", "data", "act_order"), "true", 'recipe.weight_algorithm.act_order="true" must be a bool'),
    ("fp8-dynamic", ("weight_algorithm", "data", "optional"), "false", 'recipe.weight_algorithm.optional="false" must be a bool'),
    ("w4a16-awq", ("weight_algorithm", "data", "clip_search"), "no", 'recipe.weight_algorithm.clip_search="no" must be a bool'),
    ("w4a16-gptq", ("layerwise",), "true", 'recipe.layerwise="true" must be a bool'),
    ("w4a16-rtn", ("weight", "group_size"), "64", 'recipe.weight.group_size="64" must be an integer'),
    ("w4a16-rtn", ("weight", "group_size"), 64.0, "recipe.weight.group_size=64.0 must be an integer"),
    ("w4a16-rtn", ("weight", "group_size"), True, "recipe.weight.group_size=true must be an integer"),
    ("w4a16-gptq", ("weight_algorithm", "data", "min_samples"), "128", 'recipe.weight_algorithm.min_samples="128" must be an integer'),
    ("w4a16-gptq", ("weight_algorithm", "data", "block_size"), False, "recipe.weight_algorithm.block_size=false must be an integer"),
    ("w8a16", ("samples_per_layer",), "1024", 'recipe.samples_per_layer="1024" must be an integer'),
    ("w8a16", ("fallback", "min_sqnr_db"), "36", 'recipe.fallback.min_sqnr_db="36" must be a number'),
    ("w8a16", ("fallback", "max_fraction"), True, "recipe.fallback.max_fraction=true must be a number"),
    ("w8a16", ("fallback", "keep_modules"), ["*.o_proj", 3], r"recipe.fallback.keep_modules\[1\]=3 must be a string"),
    ("w8a8-int8-sq", ("smoothquant", "alpha_grid"), [0.5, "0.6"],
     r'recipe.smoothquant.alpha_grid\[1\]="0.6" must be a number'),
    ("w8a16", ("name",), 7, "recipe.name=7 must be a string"),
]


@pytest.mark.parametrize("preset,path,value,match", WRONG_TYPES, ids=[f"{'.'.join(p)}={v!r}" for _, p, v, _ in WRONG_TYPES])
def test_json_value_of_the_wrong_type_names_the_field(preset, path, value, match):
    d = _with(preset, path, value)
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(d)
    with pytest.raises(RecipeError, match=match):
        Recipe.from_json(json.dumps(d))


@pytest.mark.parametrize("preset,path,value", [
    ("w8a16", ("fallback", "max_fraction"), 1),          # an integer is a number
    ("w8a8-int8-sq", ("smoothquant", "alpha"), 1),
    ("w8a16", ("fallback", "min_sqnr_db"), None),        # optional
    ("w4a16-gptq", ("weight_algorithm", "data", "optional"), False),
], ids=lambda v: repr(v))
def test_json_values_of_the_right_type_accepted(preset, path, value):
    Recipe.from_dict(_with(preset, path, value))


def test_reduce_range_round_trips_defaults_off_and_is_int8_only():
    seven = recipes.get("w8a8-int8-sq").replace(weight=WeightSpec(reduce_range=True))
    d = json.loads(seven.to_json())
    assert d["data"]["weight"]["reduce_range"] is True
    assert Recipe.from_json(seven.to_json()) == seven and Recipe.from_json(seven.to_json()).weight.reduce_range
    assert all(not recipes.get(n).weight.reduce_range for n in PRESETS)
    old = recipes.get("w8a8-int8-sq").to_dict()
    del old["data"]["weight"]["reduce_range"]                  # a recipe written before the field existed
    assert Recipe.from_dict(old) == recipes.get("w8a8-int8-sq")
    for dtype, extra in (("int4", {"granularity": "per_group", "group_size": 32}), ("fp8_e4m3", {})):
        with pytest.raises(RecipeError, match=f"weight.reduce_range=True is only valid with dtype 'int8', not '{dtype}'"):
            WeightSpec(dtype, reduce_range=True, **extra)
    with pytest.raises(RecipeError, match="recipe.weight.reduce_range=1 must be a bool"):
        Recipe.from_dict(_with("w8a8-int8-sq", ("weight", "reduce_range"), 1))
