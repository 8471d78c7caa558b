"""load_compressed_tensors: compressed-tensors checkpoints (qcompiler's own, and llm-compressor's) load into
QuantizedLinear modules holding the stored codes and scales, run, and bad input is one clear error.

Tolerances (relative L2 of logits, float64) between the model qcompiler quantized and the one loaded
back from its compressed-tensors checkpoint:

- the round trip of qcompiler's own checkpoints is bit-identical (``torch.equal`` logits) for every
  preset, SmoothQuant included: ``qcompiler.quantize`` folds the input scales into the norms, where the
  checkpoint holds them (before it applied them at the linears' inputs, and the read-back differed by
  float rounding: 1.7e-7 on tiny Llama, 3.1e-2 on SmolLM2's 30 layers with dynamic activations);
- ``EXACT`` = 1e-5 where the same codes run through another path (compiled, generate, shards).

llm-compressor's checkpoints (the peer, ``benchmarks/peers/llmcompressor_ct_checkpoint.py``): W4A16 gives
transformers' perplexity within ``PEER_W4A16`` = 0.1% (observed: equal); W8A8 dynamic differs because
compressed-tensors' per-token INT8 scale is absmax / 127.5 and qcompiler's absmax / 127 (observed
+0.056% on stories260K): asserted below 1%, and to 1e-6 against the same loaded codes run with the
127.5 rule, which isolates the cause. Its SpinQuant checkpoint (R4 an online transform): logits within 1e-5 of
transformers' with compressed-tensors applying the online transforms (observed 9.6e-7: float32 against its float64).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

pytest.importorskip("compressed_tensors")

import qcompiler  # noqa: E402
from qcompiler import recipes  # noqa: E402
from qcompiler.core import numerics  # noqa: E402
from qcompiler.core.layer_quant import QuantizedWeight  # noqa: E402
from qcompiler.errors import CheckpointError, UnsupportedError  # noqa: E402
from qcompiler.recipes import Granularity, Recipe  # noqa: E402
from qcompiler.runtime.eager import QuantizedLinear  # noqa: E402
from qcompiler.tools import models  # noqa: E402
from qcompiler.tools.models import shared_dir  # noqa: E402
from numerics_util import rel_err  # noqa: E402
from tiny_models import calibration_batches, tiny_model, token_batches  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:recipe '.*'. no calibration data:UserWarning")]
needs_shared = pytest.mark.skipif(shared_dir() is None, reason="../shared (models and text) not found; CI provides it")

EXACT, PEER_W4A16 = 1e-5, 1e-3
#: layers whose SmoothQuant scale no norm absorbs: kept in float, so save_compressed_tensors writes them
NOT_FOLDABLE = ("*o_proj", "*out_proj", "*fc2")
PEERS = models.cache_dir() / "peers" / "llmcompressor"
PEER_SCRIPT = "benchmarks/peers/llmcompressor_ct_checkpoint.py"


def _weight(recipe: Recipe, **changes) -> Recipe:
    return recipe.replace(weight=dataclasses.replace(recipe.weight, **changes))


def _keep(recipe: Recipe, *globs: str) -> Recipe:
    return recipe.replace(fallback=dataclasses.replace(recipe.fallback, keep_modules=globs))


VARIANTS = {
    "w8a16": lambda: recipes.get("w8a16"),
    "w4a16-rtn": lambda: recipes.get("w4a16-rtn"),
    "w4a16-gptq": lambda: recipes.get("w4a16-gptq"),
    "w4a16-gptq-g128": lambda: _weight(recipes.get("w4a16-gptq"), group_size=128),
    "fp8": lambda: recipes.get("fp8"),
    "fp8-dynamic": lambda: recipes.get("fp8-dynamic"),
    "w4a8-int8-sq-gptq": lambda: recipes.get("w4a8-int8-sq-gptq"),
    "w8a8-int8-sq": lambda: _keep(recipes.get("w8a8-int8-sq"), *NOT_FOLDABLE),
    "w8a8-int8-sq-dynamic": lambda: _keep(recipes.get("w8a8-int8-sq-dynamic"), *NOT_FOLDABLE),
    "w8a8-int8-asym": lambda: _weight(recipes.get("w8a8-int8-naive"), symmetric=False),
    "w4a16-rtn-asym-g32": lambda: _weight(recipes.get("w4a16-rtn"), symmetric=False, group_size=32),
    "w8a16-asym": lambda: _weight(recipes.get("w8a16"), symmetric=False),
}
CASES = [(arch, v) for arch in ("llama", "qwen2") for v in VARIANTS]
IDS = token_batches(1, 24, seed=7)[0]


@functools.lru_cache(maxsize=None)
def _quantized(arch: str, variant: str) -> tuple[torch.nn.Module, Recipe]:
    recipe = VARIANTS[variant]()
    model = tiny_model(arch)
    qcompiler.quantize(model, recipe, calibration=calibration_batches(), progress=False)
    return model, recipe


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``(arch, variant) -> (qcompiler model, recipe, compressed-tensors folder)``, each written once."""
    folders = {}

    def get(arch: str, variant: str):
        model, recipe = _quantized(arch, variant)
        if (arch, variant) not in folders:
            folders[arch, variant] = qcompiler.save_compressed_tensors(
                model, tmp_path_factory.mktemp("ct") / f"{arch}-{variant}", recipe)
        return model, recipe, folders[arch, variant]
    return get


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _linears(model) -> dict[str, QuantizedLinear]:
    return {f: m for f, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _qweight(m: QuantizedLinear) -> QuantizedWeight:
    return QuantizedWeight.from_storage(m.w_q, m.w_scale, m.w_zero, m.weight_dtype, m.group_size or None, m.in_features)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# -- round trip: qcompiler -> compressed-tensors -> qcompiler --------------------------------------
@pytest.mark.parametrize("arch, variant", CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_round_trip_holds_the_same_codes_and_scales(written, arch, variant):
    model, _, folder = written(arch, variant)
    loaded, _ = qcompiler.load_compressed_tensors(folder)
    ours, theirs = _linears(model), _linears(loaded)
    assert sorted(theirs) == sorted(ours)
    for fqn, m in ours.items():
        got = theirs[fqn]
        assert (got.weight_dtype, got.act_dtype, got.act_dynamic) == (m.weight_dtype, m.act_dtype, m.act_dynamic), fqn
        a, b = _qweight(m), _qweight(got)
        assert a.q.dtype == b.q.dtype and torch.equal(_bits(a.q), _bits(b.q)), fqn
        for name in ("scale", "zero"):     # per column: a group of 128 over K = 64 is written as one of 64
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), (fqn, name)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(numerics.expand_blocks(x, a.q, a.group_size).expand_as(a.q),
                                                          numerics.expand_blocks(y, b.q, b.group_size).expand_as(b.q))
        if m.group_size and m.in_features % m.group_size == 0 or not m.group_size:
            assert got.group_size == m.group_size and torch.equal(got.w_scale, m.w_scale), fqn     # the same layout
        assert (got.act_scale is None) == (m.act_scale is None) and (
            got.act_scale is None or torch.equal(got.act_scale, m.act_scale)), fqn
        assert got.inv_smooth is None      # SmoothQuant scales live in the norms of the checkpoint
    for fqn, p in model.state_dict().items():       # norms hold the SmoothQuant scales on both sides
        if fqn.endswith("norm.weight"):
            assert torch.equal(loaded.state_dict()[fqn], p), fqn
    assert torch.equal(_logits(loaded), _logits(model)), f"{arch} {variant}: logits differ"


def test_a_group_written_smaller_is_read_back_as_the_main_group(written):
    # tiny Llama's down_proj has K = 96: group 64 is written as groups of 32 with repeated scales
    model, _, folder = written("llama", "w4a16-rtn")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["group_size"] for g in config["config_groups"].values()) == [32, 64]
    loaded, recipe = qcompiler.load_compressed_tensors(folder)
    down = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert recipe.weight.group_size == 64 and down.group_size == 64 and down.w_scale.shape == (64, 2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recipe_describes_the_checkpoint(written, variant):
    model, recipe, folder = written("llama", variant)
    _, got = qcompiler.load_compressed_tensors(folder)
    want, have = recipe.weight, got.weight
    assert (have.dtype, have.symmetric) == (want.dtype, want.symmetric)
    # a per-tensor weight-only scale is written per channel; a group of 128 over K = 64 as groups of 64
    if want.granularity is Granularity.PER_GROUP:
        assert have.granularity is Granularity.PER_GROUP and want.group_size % have.group_size == 0
    else:
        assert have.granularity is want.granularity
    assert (got.activation is None) == (recipe.activation is None)
    if recipe.activation is not None:
        assert (got.activation.dtype, got.activation.granularity) == (recipe.activation.dtype,
                                                                       recipe.activation.granularity)
    floats = tuple(f for f, m in model.named_modules() if type(m) is torch.nn.Linear)
    assert got.fallback.keep_modules == floats and got.kv_cache is None
    assert Recipe.from_json(got.to_json()) == got


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("preset", ["w8a16+kv-fp8", "fp8+kv-int8"])
def test_kv_cache_scales_round_trip(arch, preset, tmp_path):
    """kv_cache_scheme + k_scale / v_scale become the recipe's KV cache and a KV calibration that gives
    qcompiler.kv_cache(model) exactly the written scales: decoding through the quantized cache matches
    the original model's, and save_compressed_tensors writes the same scales again."""
    recipe = recipes.get(preset)
    model = tiny_model(arch)
    qcompiler.quantize(model, recipe, calibration=calibration_batches(), progress=False)
    folder = qcompiler.save_compressed_tensors(model, tmp_path / "ct", recipe)
    loaded, got = qcompiler.load_compressed_tensors(folder)
    assert got.kv_cache == recipe.kv_cache
    tokens, logits = _generate(model, qcompiler.kv_cache(model))
    loaded_tokens, loaded_logits = _generate(loaded, qcompiler.kv_cache(loaded))
    assert torch.equal(loaded_tokens, tokens) and rel_err(loaded_logits, logits) <= EXACT
    from transformers import DynamicCache
    assert not torch.equal(_generate(loaded, DynamicCache())[1], loaded_logits)      # the cache is quantized
    again = qcompiler.save_compressed_tensors(loaded, tmp_path / "again", got)        # the loader's KV paths
    written = safetensors.torch.load_file(str(folder / "model.safetensors"))
    rewritten = safetensors.torch.load_file(str(again / "model.safetensors"))
    scales = [k for k in written if k.endswith(("k_scale", "v_scale"))]
    assert len(scales) == 2 * model.config.num_hidden_layers
    assert all(torch.equal(rewritten[k], written[k]) for k in scales)


def _generate(model, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of 5 tokens after a 10-token prompt through ``cache``: (tokens, logits per step)."""
    prompt = token_batches(1, 10, seed=3)[0]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, max_new_tokens=5,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


# -- torch.compile ---------------------------------------------------------------------------------
TARGET_CASES = [("w8a16", "reference"), ("w4a16-gptq", "reference"), ("fp8-dynamic", "reference"),
                ("w8a8-int8-sq", "reference"), ("w8a8-int8-sq", "inductor"), ("w8a8-int8-sq", "triton"),
                ("w8a8-int8-sq-dynamic", "reference"), ("w8a8-int8-sq-dynamic", "inductor"), ("fp8", "triton"),
                ("w4a8-int8-sq-gptq", "reference"), ("w4a8-int8-sq-gptq", "inductor")]


@pytest.mark.parametrize("variant, target", TARGET_CASES, ids=[f"{v}-{t}" for v, t in TARGET_CASES])
def test_loaded_model_compiles_with_its_recipe(written, variant, target):
    """The backend (quantized=True: no calibration, static scales included) lowers the loaded
    QuantizedLinear ops to ``target`` and quantizes nothing else."""
    _, _, folder = written("llama", variant)
    loaded, recipe = qcompiler.load_compressed_tensors(folder)
    eager = _logits(loaded)
    torch._dynamo.reset()
    compiled = torch.compile(loaded, backend=qcompiler.backend(recipe, target=target, progress=False, quantized=True))
    assert rel_err(_logits(compiled), eager) <= EXACT
    rep = qcompiler.report(compiled)
    assert rep.graphs == 1 and rep.target == target and not any(d.quantize for d in rep.layers.values())
    torch._dynamo.reset()


def test_quantized_backend_still_asks_calibration_for_float_linears():
    """quantized=True waives calibration only for what is already quantized: a float model is refused."""
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model("llama"), backend=qcompiler.backend("w8a8-int8-sq", quantized=True,
                                                                           progress=False))
    with pytest.raises(Exception, match=r"needs calibration data for static activation scales and SmoothQuant of the "
                                        r"float linears \['model.layers.0.self_attn.q_proj'"):
        _logits(compiled)
    torch._dynamo.reset()


def test_loaded_model_reports_what_the_checkpoint_holds(written):
    _, _, folder = written("llama", "w8a8-int8-sq")
    loaded, recipe = qcompiler.load_compressed_tensors(folder)
    rep = qcompiler.report(loaded)
    assert rep.recipe == recipe.name
    assert sorted(d.fqn for d in rep.quantized) == sorted(_linears(loaded))
    kept = {d.fqn: d for d in rep.fallbacks}
    assert set(kept) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "lm_head"}
    assert kept["lm_head"].op_kind == "output_head" and "kept in float by the checkpoint" in kept["lm_head"].reason
    assert all(d.act_format == "int8 per-tensor static" for d in rep.quantized)


@pytest.mark.parametrize("variant", ["w4a16-gptq", "w8a8-int8-sq"])
def test_loaded_checkpoint_exports_to_onnx(written, variant, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qcompiler.export import export_onnx, onnxruntime_session
    _, _, folder = written("llama", variant)
    loaded, recipe = qcompiler.load_compressed_tensors(folder)
    result = export_onnx(loaded, recipe, IDS, tmp_path / "m.onnx")
    assert result.report.recipe == recipe.name and result.quantized_weight_count == sum(
        m.in_features * m.out_features for m in _linears(loaded).values())
    if variant.startswith("w4a16"):      # INT4 weights dequantized to float: onnxruntime agrees to float rounding
        got = torch.from_numpy(onnxruntime_session(result.path).run(None, {"input_ids": IDS.numpy()})[0])
        assert rel_err(got, _logits(loaded)) <= EXACT


# -- what is accepted besides qcompiler's own layout -----------------------------------------------
def _copy(folder, tmp_path, config=None, tensors=None):
    """A copy of checkpoint ``folder`` with ``config(dict)`` / ``tensors(dict)`` applied in place."""
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        state = safetensors.torch.load_file(str(out / "model.safetensors"))
        tensors(state)
        safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _groups(cfg: dict) -> list[dict]:
    return list(cfg["quantization_config"]["config_groups"].values())


def _main_group(cfg: dict) -> dict:
    return next(g for g in _groups(cfg) if g["targets"] == ["Linear"])


Q_PROJ = "model.layers.0.self_attn.q_proj"
DOWN_PROJ = "model.layers.0.mlp.down_proj"


def _k_of(state: dict, fqn: str) -> int:
    return int(state[f"{fqn}.weight_shape"][1])


def _trivial_g_idx(state: dict) -> None:
    for key in [k for k in state if k.endswith(".weight_shape")]:
        fqn = key.removesuffix(".weight_shape")
        group = 64 if _k_of(state, fqn) % 64 == 0 else 32
        state[f"{fqn}.weight_g_idx"] = (torch.arange(_k_of(state, fqn)) // group).to(torch.int32)


def test_a_g_idx_in_column_order_loads(written, tmp_path):
    # actorder 'weight' (llm-compressor's 'static') keeps groups contiguous; a stored g_idx then says so
    model, _, folder = written("llama", "w4a16-rtn")
    loaded, _ = qcompiler.load_compressed_tensors(_copy(folder, tmp_path, _set("*.weights.actorder", "weight"),
                                                        _trivial_g_idx))
    assert torch.equal(_logits(loaded), _logits(model))


def test_symmetric_zero_points_of_zero_and_shards_load(written, tmp_path):
    model, _, folder = written("llama", "w8a8-int8-sq")

    def zeros_and_shards(state):
        state[f"{Q_PROJ}.weight_zero_point"] = torch.zeros(64, 1, dtype=torch.int8)
    out = _copy(folder, tmp_path, tensors=zeros_and_shards)
    state = safetensors.torch.load_file(str(out / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        safetensors.torch.save_file({k: state[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    loaded, _ = qcompiler.load_compressed_tensors(out)
    assert rel_err(_logits(loaded), _logits(model)) <= EXACT


# -- bad input: one error naming the tensor or field -----------------------------------------------
def _unreachable_scale(near: float, qmax: float) -> float:
    """The first float32 scale above ``near`` that no float32 absmax within 8 ulps of scale * qmax gives as
    absmax / qmax (qcompiler's rule); compressed-tensors' own scales need not be on that grid."""
    inf = torch.tensor(math.inf)
    s = torch.tensor(near, dtype=torch.float32)
    while True:
        s = torch.nextafter(s, inf)
        up = down = s * qmax
        candidates = [up]
        for _ in range(8):
            up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
            candidates += [up, down]
        if not any(bool(c / qmax == s) for c in candidates):
            return float(s)


def _set(path: str, value):
    """A config mutation: ``cfg[a][b]... = value`` along the dotted ``path`` ('*' = every config group)."""
    def apply(cfg):
        keys = path.split(".")
        targets = _groups(cfg) if keys[0] == "*" else [cfg]
        keys = keys[1:] if keys[0] == "*" else keys
        for t in targets:
            for k in keys[:-1]:
                t = t[k]
            t[keys[-1]] = value
    return apply


def _scheme(name: str, fmt: str):
    def apply(cfg):
        from compressed_tensors.quantization import preset_name_to_scheme
        scheme = preset_name_to_scheme(name, ["Linear"]).model_dump(mode="json")
        qc = cfg["quantization_config"]
        qc["config_groups"], qc["format"] = {"group_0": scheme | {"format": fmt}}, fmt
    return apply


def _transform(location: str = "input", **scheme):
    """A transform_config with one scheme ``u`` on q_proj's input (``scheme`` overrides its fields)."""
    apply = [{"targets": [Q_PROJ], "location": location}]
    return _set("quantization_config.transform_config",
                {"config_groups": {"u": {"type": "hadamard", "apply": apply} | scheme}})


def _drop(key: str):
    return lambda state: state.pop(key)


def _put(key: str, value: torch.Tensor):
    return lambda state: state.__setitem__(key, value)


BAD = {   # id: (checkpoint, config mutation, tensors mutation, error, message)
    "not-compressed-tensors": ("w4a16-rtn", lambda c: c.pop("quantization_config"), None, CheckpointError,
                               r"quant_method is None, not 'compressed-tensors'"),
    "unparseable-config": ("w4a16-rtn", _set("*.weights.strategy", "diagonal"), None, CheckpointError,
                           r"does not parse as compressed-tensors' QuantizationConfig"),
    "2-bit": ("w4a16-rtn", _set("*.weights.num_bits", 2), None, UnsupportedError,
              rf"{Q_PROJ}.*weights.num_bits=2"),
    "nvfp4": ("w4a16-rtn", _scheme("NVFP4A16", "nvfp4-pack-quantized"), None, UnsupportedError,
              rf"{Q_PROJ}' has format 'nvfp4-pack-quantized'"),
    "nvfp4-args": ("w4a16-rtn", _scheme("NVFP4A16", "pack-quantized"), None, UnsupportedError,
                   r"weights type 'float' with num_bits=4"),
    "fp8-block": ("fp8", _scheme("FP8_BLOCK", "float-quantized"), None, UnsupportedError,
                  r"weights.strategy='block'; qcompiler takes \['channel', 'group', 'tensor'\]"),
    "marlin-24": ("w4a16-rtn", _set("*.format", "marlin-24"), None, UnsupportedError, r"format 'marlin-24'"),
    "sparse-24": ("w4a16-rtn", _set("quantization_config.sparsity_config", {"format": "sparse-24-bitmask"}), None,
                  UnsupportedError, r"sparsity_config.format='sparse-24-bitmask'"),
    "transform-unparseable": ("w4a16-rtn", _set("quantization_config.transform_config", {"config_groups": {"u": {}}}),
                              None, CheckpointError, r"transform_config does not parse as compressed-tensors' "
                              r"TransformConfig"),
    "transform-matrix": ("w4a16-rtn", _transform(type="random-matrix"), None, UnsupportedError,
                         r"config_groups.u.type='random-matrix'; qcompiler applies \['hadamard', 'random-hadamard'\]"),
    "transform-randomized": ("w4a16-rtn", _transform(randomize=True), None, UnsupportedError,
                             r"config_groups.u.randomize=True permutes the stored matrix"),
    "transform-output": ("w4a16-rtn", _transform(location="output"), None, UnsupportedError,
                         rf"config_groups.u: location 'output' \(targets \['{Q_PROJ}'\]\)"),
    "transform-missing-matrix": ("w4a16-rtn", _transform(), None, CheckpointError,
                                 rf"no tensor holds the 64 x 64 matrix of transform scheme 'u' that '{Q_PROJ}' reads"),
    "transform-head-dim": ("w4a16-rtn", _transform(head_dim=48), _put(f"{Q_PROJ}.u_input.weight", torch.ones(48, 48)),
                           CheckpointError, rf"head_dim 48, which does not divide the 64 inputs of '{Q_PROJ}'"),
    "transform-matrix-shape": ("w4a16-rtn", _transform(), _put(f"{Q_PROJ}.u_input.weight", torch.ones(64, 32)),
                               CheckpointError, rf"{Q_PROJ}.u_input.weight is torch.float32 \[64, 32\]; expected a "
                               r"float 64 x 64 matrix"),
    "frozen": ("w4a16-rtn", _set("quantization_config.quantization_status", "frozen"), None, UnsupportedError,
               r"quantization_status='frozen'"),
    "actorder-group": ("w4a16-rtn", _set("*.weights.actorder", "group"), None, UnsupportedError,
                       r"config_groups.group_0.weights.actorder='group': dynamic activation order"),
    "g_idx-out-of-order": ("w4a16-rtn", _set("*.weights.actorder", "weight"),
                           lambda s: (_trivial_g_idx(s), s.__setitem__(f"{DOWN_PROJ}.weight_g_idx",
                                                                       (torch.arange(96) // 32).roll(1))),
                           UnsupportedError, rf"{DOWN_PROJ}.*weight_g_idx maps columns to groups out of order"),
    "weight_shape": ("w4a16-rtn", None, _put(f"{Q_PROJ}.weight_shape", torch.tensor([64, 63])), CheckpointError,
                     rf"{Q_PROJ}.*weight_shape is \[64, 63\], but config.json builds a Linear of \[64, 64\]"),
    "config-size": ("w4a16-rtn", _set("intermediate_size", 128), None, CheckpointError,
                    r"gate_proj.*weight_shape is \[96, 64\], but config.json builds a Linear of \[128, 64\]"),
    "weight_packed": ("w4a16-rtn", None, _put(f"{Q_PROJ}.weight_packed", torch.zeros(64, 4, dtype=torch.int32)),
                      CheckpointError, rf"{Q_PROJ}.*weight_packed is torch.int32 \[64, 4\]; expected torch.int32 "
                      r"\[64, 8\]"),
    "missing-scale": ("w4a16-rtn", None, _drop(f"{Q_PROJ}.weight_scale"), CheckpointError,
                      rf"lacks tensors \['{Q_PROJ}.weight_scale'\]"),
    "scale-shape": ("w4a16-rtn", None, _put(f"{Q_PROJ}.weight_scale", torch.ones(64, 2)), CheckpointError,
                    rf"{Q_PROJ}.*weight_scale is torch.float32 \[64, 2\]; strategy 'group' needs a float tensor "
                    r"of \[64, 1\]"),
    "missing-input_scale": ("w8a8-int8-sq", None, _drop(f"{Q_PROJ}.input_scale"), CheckpointError,
                            rf"lacks tensors \['{Q_PROJ}.input_scale'\]"),
    "int8-weight-dtype": ("w8a8-int8-sq", None, _put(f"{Q_PROJ}.weight", torch.zeros(64, 64)), CheckpointError,
                          rf"{Q_PROJ}.*weight is torch.float32 \[64, 64\]; expected torch.int8 \[64, 64\]"),
    "zero-point-of-symmetric": ("w8a8-int8-sq", None, _put(f"{Q_PROJ}.weight_zero_point",
                                                           torch.ones(64, 1, dtype=torch.int8)),
                                CheckpointError, rf"{Q_PROJ}.*weight_zero_point is non-zero"),
    "per-tensor-dynamic-activations": ("w8a8-int8-sq", _set("*.input_activations.dynamic", True), None,
                                       UnsupportedError, r"strategy='tensor', dynamic=True\)"),
    "w4a8-int-asym-activations": ("w4a16-rtn", _set("*.input_activations", {"num_bits": 8, "type": "int",
                                                                            "strategy": "token", "dynamic": True,
                                                                            "symmetric": False}), None,
                                  UnsupportedError, r"qcompiler takes symmetric 8-bit activations"),
    "embedding": ("w4a16-rtn", lambda c: _main_group(c)["targets"].append("Embedding"), None, UnsupportedError,
                  r"'model.embed_tokens' \(Embedding\) is quantized"),
    "unexpected-tensor": ("w4a16-rtn", None, _put(f"{Q_PROJ}.weight_global_scale", torch.ones(1)), CheckpointError,
                          rf"tensors its scheme does not use: \['{Q_PROJ}.weight_global_scale'\]"),
    "stray-tensor": ("w4a16-rtn", None, _put("model.extra.weight", torch.ones(1)), CheckpointError,
                     r"tensors \['model.extra.weight'\] belong to no float module"),
    "missing-float": ("w4a16-rtn", None, _drop("model.norm.weight"), CheckpointError,
                      r"lacks float tensors \['model.norm.weight'\]"),
    "float-shape": ("w4a16-rtn", None, _put("model.norm.weight", torch.ones(63)), CheckpointError,
                    r"wrong shape: \['model.norm.weight \[63\] \(config: \[64\]\)'\]"),
    "kv-missing-v_scale": ("w8a16+kv-fp8", None, _drop("model.layers.1.self_attn.v_scale"), CheckpointError,
                           r"attention 'model.layers.1.self_attn' lacks model.layers.1.self_attn.v_scale"),
    "kv-asymmetric": ("w8a16+kv-fp8", _set("quantization_config.kv_cache_scheme.symmetric", False), None,
                      UnsupportedError, r"kv_cache_scheme \(type='float', num_bits=8, symmetric=False"),
    "kv-scale-shape": ("w8a16+kv-fp8", None, _put("model.layers.0.self_attn.k_scale", torch.ones(2)),
                       CheckpointError, r"model.layers.0.self_attn.k_scale is torch.float32 \[2\]; kv_cache_scheme "
                       r"strategy tensor needs 1 float scale"),
    "kv-unreachable-scale": ("w8a16+kv-fp8", None, lambda s: s.__setitem__(
                             "model.layers.0.self_attn.k_scale",
                             torch.tensor([_unreachable_scale(float(s["model.layers.0.self_attn.k_scale"]), 448.0)])),
                             UnsupportedError, r"model.layers.0.self_attn.k_scale = \[.*\] is not absmax / 448"),
}


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory, written):
    """The unmodified checkpoints the bad-input cases start from."""
    out = {v: written("llama", v)[2] for v in ("w4a16-rtn", "w8a8-int8-sq", "fp8", "fp8-dynamic")}
    model = tiny_model("llama")
    qcompiler.quantize(model, "w8a16+kv-fp8", calibration=calibration_batches(), progress=False)
    out["w8a16+kv-fp8"] = qcompiler.save_compressed_tensors(model, tmp_path_factory.mktemp("kv") / "ct", "w8a16+kv-fp8")
    return out


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_clear_error(base_checkpoints, tmp_path, case):
    base, config, tensors, error, message = BAD[case]
    folder = _copy(base_checkpoints[base], tmp_path, config, tensors)
    with pytest.raises(error, match=message):
        qcompiler.load_compressed_tensors(folder)


def test_missing_or_unreadable_files(base_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        qcompiler.load_compressed_tensors(tmp_path / "absent")
    folder = _copy(base_checkpoints["w4a16-rtn"], tmp_path)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        qcompiler.load_compressed_tensors(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"neither model.safetensors nor model.safetensors.index.json"):
        qcompiler.load_compressed_tensors(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json not found"):
        qcompiler.load_compressed_tensors(folder)


def test_a_qcompiler_folder_is_not_taken_for_compressed_tensors(tmp_path):
    from qcompiler.runtime.serialization import save_quantized
    model, recipe = _quantized("llama", "w8a16")
    save_quantized(model, tmp_path, recipe)
    with pytest.raises(CheckpointError, match=r"quant_method is None.*load_quantized"):
        qcompiler.load_compressed_tensors(tmp_path)


def test_cli_eval_of_a_broken_compressed_tensors_folder_is_one_line(base_checkpoints, tmp_path, capsys):
    from qcompiler.tools.cli import main
    folder = _copy(base_checkpoints["w4a16-rtn"], tmp_path, tensors=_drop(f"{Q_PROJ}.weight_scale"))
    assert main(["eval", str(folder), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompiler: error: ") and f"{Q_PROJ}.weight_scale" in err[0]


# -- a real model: stories260K ---------------------------------------------------------------------
def _eval_ppl(capsys, argv: list[str]) -> float:
    from qcompiler.tools.cli import main
    assert main(["eval", *argv, "-q", "--eval-tokens", "4096"]) == 0
    out = capsys.readouterr().out
    return float(re.search(r"perplexity ([0-9.]+)", out).group(1))


@needs_shared
def test_cli_eval_of_a_compressed_tensors_folder_equals_qcompilers_own(tmp_path, capsys):
    from qcompiler.runtime.serialization import save_quantized
    from qcompiler.tools import data, texts
    model, tok = models.load_model("stories260K")
    ids = data.tokenize_text(tok, texts.text_path("tinystories-calib").read_text(encoding="utf-8"))
    calib = data.calibration_batches(ids, 16, 256, seed=0, bos_id=tok.bos_token_id)
    recipe = recipes.get("w4a16-gptq")
    qcompiler.quantize(model, recipe, calibration=calib, progress=False)
    save_quantized(model, tmp_path / "qc", recipe, tokenizer=tok, source="stories260K")
    qcompiler.save_compressed_tensors(model, tmp_path / "ct", recipe, tokenizer=tok)
    ours = _eval_ppl(capsys, [str(tmp_path / "qc")])
    theirs = _eval_ppl(capsys, [str(tmp_path / "ct"), "--model", "stories260K"])
    assert theirs == ours and 1.0 < ours < 100.0


# -- llm-compressor's own checkpoints (the peer) ---------------------------------------------------
def _peer(scheme: str):
    folder = PEERS / f"stories260K-{scheme}"
    if not (folder / "meta.json").is_file():
        pytest.skip(f"{folder} not found: create it with the llm-compressor venv "
                    f"(benchmarks/peers/llmcompressor_setup.sh, then its python on {PEER_SCRIPT})")
    if shared_dir() is None:
        pytest.skip("../shared (tinystories text) not found; CI provides it")
    return folder


def _peer_windows(folder) -> list[torch.Tensor]:
    from qcompiler.tools import data, texts
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = data.tokenize_text(tok, texts.text_path("tinystories-eval").read_text(encoding="utf-8"))
    return data.eval_windows(ids, 8192, 512, bos_id=tok.bos_token_id)


def _transformers(folder) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def test_llmcompressor_w4a16_perplexity_matches_transformers():
    from qcompiler.tools.evaluate import perplexity
    folder = _peer("w4a16")
    windows = _peer_windows(folder)
    loaded, recipe = qcompiler.load_compressed_tensors(folder)
    assert (recipe.weight.dtype.value, recipe.weight.group_size, recipe.weight.symmetric) == ("int4", 64, True)
    layers = _linears(loaded)
    assert len(layers) == 30 and all(m.weight_dtype == "int4" for m in layers.values())   # down_proj kept float
    reference = _transformers(folder)
    theirs = perplexity(reference, windows, progress=False)      # decompresses each layer on its first call
    for fqn, m in layers.items():
        assert torch.equal(_qweight(m).dequantize(), reference.get_submodule(fqn).weight.detach().float()), fqn
    ours = perplexity(loaded, windows, progress=False)
    assert abs(ours - theirs) / theirs <= PEER_W4A16, (ours, theirs)


def test_llmcompressor_spinquant_checkpoint_runs_its_online_transform():
    """llm-compressor's SpinQuant checkpoint: R1 / R2 fused into the weights (their ``weight_*`` entries are
    skipped), R4 an online transform on every down_proj's input, one stored matrix tied across the layers.
    qcompiler's model equals transformers' with only the online part of the config applied, as vLLM applies
    it (compressed-tensors computes it in float64, qcompiler in float32); without R4 it is another model."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from qcompiler.core.online_rotation import MatrixTransform, online_modules
    folder = _peer("w4a16-spinquant")
    loaded, _ = qcompiler.load_compressed_tensors(folder)
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
    assert sorted(online_modules(loaded)) == downs
    assert all(isinstance(h, MatrixTransform) for f in downs for h in loaded.get_submodule(f)._forward_pre_hooks.values())
    config = json.loads((folder / "config.json").read_text())["quantization_config"]["transform_config"]
    for scheme in config["config_groups"].values():
        scheme["apply"] = [a for a in scheme["apply"] if a["location"] == "input"]
    reference = _transformers(folder)
    window = _peer_windows(folder)[0][None]
    with torch.inference_mode():
        without = reference(input_ids=window).logits
        apply_transform_config(reference, TransformConfig.model_validate(config))
        stored = safetensors.torch.load_file(folder / "model.safetensors")
        assert [k for k in stored if "_input." in k] == ["model.layers.0.mlp.down_proj.R4_input.weight"]
        reference.load_state_dict({k: v for k, v in stored.items() if "_input." in k}, strict=False)
        theirs = reference(input_ids=window).logits
        ours = loaded(input_ids=window).logits
    print(f"qcompiler vs compressed-tensors: {rel_err(ours, theirs):.2e}; without R4: {rel_err(without, theirs):.2e}")
    assert rel_err(ours, theirs) < 1e-5 and rel_err(without, theirs) > 0.05


class _PerToken127_5(torch.nn.Module):
    """A loaded dynamic-INT8 layer run with compressed-tensors' per-token scale, absmax / 127.5."""

    def __init__(self, m: QuantizedLinear):
        super().__init__()
        self.w, self.b = _qweight(m).dequantize(), m.bias

    def forward(self, x):
        scale = x.abs().amax(-1, keepdim=True).float() / 127.5
        return F.linear(numerics.fake_quantize(x, scale, None, "int8"), self.w, self.b)


def test_llmcompressor_w8a8_dynamic_differs_only_by_the_scale_rule():
    from qcompiler.tools.evaluate import perplexity
    folder = _peer("w8a8")
    windows = _peer_windows(folder)
    loaded, recipe = qcompiler.load_compressed_tensors(folder)
    assert recipe.activation is not None and recipe.activation.dynamic and recipe.activation.dtype.value == "int8"
    theirs = perplexity(_transformers(folder), windows, progress=False)
    ours = perplexity(loaded, windows, progress=False)
    for fqn in _linears(loaded):
        parent, _, child = fqn.rpartition(".")
        setattr(loaded.get_submodule(parent), child, _PerToken127_5(loaded.get_submodule(fqn)))
    their_rule = perplexity(loaded, windows, progress=False)
    assert abs(their_rule - theirs) / theirs <= 1e-6, (their_rule, theirs)
    assert 1e-5 < abs(ours - theirs) / theirs < 1e-2, (ours, theirs)
