"""N:M sparsity: SparseGPT's closed-form cases, an unblocked OBS transcription, composition with every
weight format, float ``sparsify``, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qcompiler
from qcompiler import recipes
from qcompiler.algorithms import gptq, sparsegpt
from qcompiler.calibration.statistics import LayerStats
from qcompiler.core import numerics
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.errors import CalibrationError, RecipeError, UnsupportedError
from qcompiler.recipes import Granularity, Recipe, SparseGPTSpec, WeightSpec
from qcompiler.runtime.eager import QuantizedLinear
from numerics_util import rel_err
from tiny_models import calibration_batches, tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [
    None,                                                       # float pruning
    WeightSpec("int4", "per_group", 16),
    WeightSpec("int4", "per_group", 24, symmetric=False),       # K = 80: a partial last group; groups straddle blocks
    WeightSpec("int8", "per_channel"),
    WeightSpec("int8", "per_tensor"),
    WeightSpec("fp8_e4m3", "per_channel"),
    WeightSpec("int4", "per_group", 16, calibrator="mse"),
]
IDS = ["float", "int4-g16", "uint4-g24", "int8-channel", "int8-tensor", "fp8-channel", "int4-g16-mse"]


def _problem(n: int = 48, k: int = 80, rows: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5
    x = (torch.randn(rows, k, generator=g) @ mix) * (1 + 4 * torch.rand(k, generator=g))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) / k ** 0.5
    acc = gptq.HessianAccumulator(k)
    acc.add_batch(x)
    return x, w, acc


def _runs(w: torch.Tensor, m: int = 4) -> torch.Tensor:
    return (w != 0).reshape(w.shape[0], -1, m).sum(-1)


def test_nm_mask_prunes_the_smallest_of_each_run_earlier_first_on_ties():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    assert sparsegpt.nm_prune_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    assert sparsegpt.nm_prune_mask(scores, 1, 4).tolist() == [[False, True, True, True, True, True, True, False]]
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    pruned, mask = sparsegpt.magnitude_prune(w)
    assert sparsegpt.is_semi_structured(pruned) and int(mask.sum()) == w.numel() // 2
    kept = w.abs().masked_fill(mask, float("inf")).reshape(6, 8, 4).amin(-1)
    dropped = w.abs().masked_fill(~mask, 0.0).reshape(6, 8, 4).amax(-1)
    assert (kept >= dropped).all()          # every kept |w| at least every pruned one of its run
    assert not sparsegpt.is_semi_structured(w) and not sparsegpt.is_semi_structured(pruned[:, :30])
    with pytest.raises(ValueError, match="multiple of m=4"):
        sparsegpt.nm_prune_mask(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_identity_hessian_is_magnitude_pruning_then_round_to_nearest_exactly(spec):
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(2))
    r = sparsegpt.sparsegpt_prune(w, torch.eye(80), spec, n_samples=1000, block_size=32)
    pruned, mask = sparsegpt.magnitude_prune(w)
    assert torch.equal(r.mask, mask) and r.info.zeros == pytest.approx(0.5, abs=0.01)
    if spec is None:
        assert r.qweight is None and torch.equal(r.weight, pruned)
        return
    rtn = quantize_weight(pruned, spec)
    assert torch.equal(r.qweight.q, rtn.q) and torch.equal(r.qweight.scale, rtn.scale)
    assert (r.qweight.zero is None and rtn.zero is None) or torch.equal(r.qweight.zero, rtn.zero)
    assert torch.equal(r.weight, rtn.dequantize())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_run_of_four_keeps_at_most_two_and_the_stored_form_dequantizes_to_the_sweep(spec):
    _, w, acc = _problem(seed=3)
    r = sparsegpt.sparsegpt_prune(w, acc.hessian, spec, n_samples=acc.n_samples, block_size=32)
    assert (_runs(r.weight) <= 2).all() and torch.equal(r.weight == 0, r.mask | (r.weight == 0))
    assert not (r.weight[r.mask] != 0).any()
    if spec is not None:
        assert torch.equal(r.qweight.dequantize(), r.weight)          # pruned weights decode to exactly 0
        assert sparsegpt.is_semi_structured(r.qweight.dequantize())


def _reference_sparsegpt(w, h, spec, n=2, m=4, damp=0.01):
    """Unblocked SparseGPT in float64 from the OBS form: an explicit H^-1 of the columns not yet reached,
    updated by removing each column; a run's mask from w_j^2 / [H_Fj^-1]_jj (the inverse of the trailing
    block H[j:, j:], what the Cholesky factor's squared diagonal holds), scales on the masked weights."""
    w = w.double().clone()
    h = h.double().clone()
    k = w.shape[1]
    importance = torch.diagonal(h).float()
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    d = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(k)])
    hinv = torch.linalg.inv(h)
    grouped = spec is not None and spec.granularity is Granularity.PER_GROUP
    g = spec.group_size if grouped else k
    qdtype = None if spec is None else (spec.dtype.value if spec.symmetric else numerics.UNSIGNED[spec.dtype.value])
    channel = None if spec is None else WeightSpec(spec.dtype, "per_channel", None, spec.symmetric, spec.calibrator)
    params = {}
    if spec is not None and not grouped:
        pre = sparsegpt.nm_prune_mask(w.pow(2) / d, n, m)
        rtn = quantize_weight(w.masked_fill(pre, 0.0).float(), spec, importance)
        params[0] = (rtn.scale, rtn.zero)
    mask = torch.zeros_like(w, dtype=torch.bool)
    out = torch.zeros_like(w)
    for i in range(k):
        if i % m == 0:
            mask[:, i:i + m] = sparsegpt.nm_prune_mask(w[:, i:i + m].pow(2) / d[i:i + m], n, m)
        if grouped and i % g == 0:
            cols = slice(i, min(i + g, k))
            cur = w[:, cols].masked_fill(sparsegpt.nm_prune_mask(w[:, cols].pow(2) / d[cols], n, m), 0.0)
            qw = quantize_weight(cur.float(), channel, importance[cols])
            params[i // g] = (qw.scale, qw.zero)
        target = w[:, i:i + 1].masked_fill(mask[:, i:i + 1], 0.0)
        if spec is None:
            qi = target
        else:
            s, z = params[i // g if grouped else 0]
            qi = numerics.dequantize(numerics.quantize(target.float(), s, z, qdtype), s, z).double()
        di = hinv[i, i]
        w[:, i:] -= (w[:, i:i + 1] - qi) / di * hinv[i:i + 1, i:]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / di
        out[:, i:i + 1] = qi
    return out, mask


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[2], SPECS[3]], ids=IDS[:4])
def test_blocked_sparsegpt_matches_the_unblocked_obs_transcription(spec):
    _, w, acc = _problem(n=16, k=80, seed=4)
    expected, expected_mask = _reference_sparsegpt(w, acc.hessian, spec)
    hd = acc.hessian.double().clone()
    hd.diagonal().add_(0.01 * torch.diagonal(hd).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    for block_size in (4, 32, 128):     # blocks smaller than, straddled by and larger than the groups
        weight, _, mask, _ = sparsegpt._sweep(w.double(), u, spec, 2, 4, block_size,
                                              torch.diagonal(acc.hessian).float())
        assert torch.equal(mask, expected_mask)
        if spec is None:
            assert rel_err(weight, expected) < 1e-12
        else:
            assert torch.equal(weight.double(), expected)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_sparsegpt_output_error_is_below_magnitude_pruning_on_correlated_inputs(spec):
    x, w, acc = _problem(seed=5)
    r = sparsegpt.sparsegpt_prune(w, acc.hessian, spec, n_samples=acc.n_samples)
    pruned, _ = sparsegpt.magnitude_prune(w)
    baseline = pruned if spec is None else quantize_weight(pruned, spec).dequantize()
    ref = x @ w.T
    err, err_magnitude = rel_err(x @ r.weight.T, ref), rel_err(x @ baseline.T, ref)
    assert err < 0.75 * err_magnitude, (err, err_magnitude)


def test_bad_input_is_refused_with_the_field_named():
    with pytest.raises(RecipeError, match="sparsegpt.n=4 must be smaller than sparsegpt.m=4"):
        SparseGPTSpec(n=4)
    with pytest.raises(RecipeError, match="block_size=126 must be a multiple of sparsegpt.m=4"):
        SparseGPTSpec(block_size=126)
    with pytest.raises(RecipeError, match="'sparsegpt' or 'magnitude'"):
        SparseGPTSpec(method="wanda")
    with pytest.raises(RecipeError, match="group_size=18 must be a multiple of sparsegpt.m=4"):
        Recipe(weight=WeightSpec("int4", "per_group", 18), weight_algorithm=SparseGPTSpec(), layerwise=True)
    st = LayerStats(torch.ones(6), torch.zeros(2, 6), 512, torch.ones(6), torch.eye(6))
    with pytest.raises(UnsupportedError, match="proj: 2:4 sparsity .* K=6 .* keep it dense with fallback.keep_modules"):
        sparsegpt.prune_linear("proj", torch.randn(3, 6), st, SparseGPTSpec(), None)
    with pytest.raises(CalibrationError, match="proj: SparseGPT needs the Hessian"):
        sparsegpt.prune_linear("proj", torch.randn(3, 8), None, SparseGPTSpec(), None)
    with pytest.raises(CalibrationError, match="at least 10 calibration rows"):
        sparsegpt.sparsegpt_prune(torch.randn(3, 8), torch.eye(8), n_samples=5, min_samples=10)


def test_an_expert_with_too_few_rows_falls_back_to_magnitude_and_says_so():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    st = LayerStats(torch.ones(8), torch.zeros(2, 8), 3, torch.ones(8), torch.eye(8))
    weight, qw, note = sparsegpt.prune_linear("e0", w, st, SparseGPTSpec(), WeightSpec())
    assert note.startswith("magnitude 2:4: only 3 calibration rows reached it")
    assert torch.equal(qw.dequantize(), quantize_weight(sparsegpt.magnitude_prune(w)[0], WeightSpec()).dequantize())


@pytest.mark.parametrize("preset", ["sparse24-fp8-dynamic", "sparse24-w8a8-int8-dynamic", "sparse24-w4a16"])
def test_sparse_presets_quantize_every_decoder_linear_to_two_of_four(preset):
    recipe = recipes.get(preset)
    assert Recipe.from_json(recipe.to_json()) == recipe
    model = tiny_model("llama")
    batches = calibration_batches()
    ids = token_batches(1, 16, seed=7)[0]
    with torch.no_grad():
        ref = model(ids).logits
    qcompiler.quantize(model, recipe, batches, progress=False)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 14                # 2 layers x (q, k, v, o, gate, up, down)
    for m in linears:
        w = numerics.dequantize(m.w_q if m.weight_dtype not in ("int4", "uint4") else
                                qcompiler.core.packing.unpack_int4(m.w_q, m.in_features, m.weight_dtype == "int4"),
                                m.w_scale, m.w_zero, block_size=m.group_size or None)
        assert sparsegpt.is_semi_structured(w), m.fqn
    notes = [d.note for d in qcompiler.report(model).quantized]
    assert len(notes) == 14 and all("sparsegpt 2:4 damp 0.01" in n for n in notes)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1.0


def test_sparsify_prunes_block_linears_in_float_better_than_magnitude():
    batches = token_batches(8, 32, seed=3)
    held_out = token_batches(2, 32, seed=11)
    model = tiny_model("llama")
    with torch.no_grad():
        ref = [model(b).logits for b in held_out]
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        m = tiny_model("llama")
        rep = qcompiler.sparsify(m, batches, SparseGPTSpec(method=method), progress=False)
        assert len(rep.pruned) == 14 and rep.zeros == pytest.approx(0.5, abs=0.01)
        assert all(note.startswith(f"{method} 2:4") for note in rep.pruned.values())
        for name, p in m.named_parameters():
            if name.startswith("model.layers.") and p.dim() == 2:
                assert sparsegpt.is_semi_structured(p.detach()), name
        assert not sparsegpt.is_semi_structured(m.lm_head.weight.detach())          # the head stays dense
        with torch.no_grad():
            errors[method] = sum(rel_err(m(b).logits, r) for b, r in zip(held_out, ref))
    assert errors["sparsegpt"] < 0.9 * errors["magnitude"], errors     # 0.87x on this random model
    assert "linears pruned" in rep.describe()
    with pytest.raises(CalibrationError, match="sparsify needs calibration batches"):
        qcompiler.sparsify(tiny_model("llama"), None)


@pytest.mark.skipif(__import__("qcompiler.tools.models", fromlist=["shared_dir"]).shared_dir() is None,
                    reason="../shared (models and text) not found; CI provides it")
def test_stories260k_sparsegpt_loses_at_most_half_of_what_magnitude_pruning_loses():
    import copy
    from qcompiler.tools import data, evaluate, models, texts
    model, tok = models.load_model("stories260K")
    ids = data.tokenize_text(tok, texts.text_path("tinystories-eval").read_text(encoding="utf-8"))
    windows = data.eval_windows(ids, 8 * 511, 512, bos_id=tok.bos_token_id)
    calib_ids = data.tokenize_text(tok, texts.text_path("tinystories-calib").read_text(encoding="utf-8"))
    calib = data.calibration_batches(calib_ids, 32, 256, seed=0, bos_id=tok.bos_token_id)     # disjoint stories
    fp = evaluate.perplexity(model, windows, progress=False)
    delta = {}
    for method in ("magnitude", "sparsegpt"):
        pruned = copy.deepcopy(model)
        rep = qcompiler.sparsify(pruned, calib, SparseGPTSpec(method=method), progress=False)
        assert len(rep.pruned) == 35                  # 7 linears in each of 5 blocks
        delta[method] = evaluate.perplexity(pruned, windows, progress=False) / fp - 1
    # a 260K-parameter model loses much to 2:4 (magnitude ~30x perplexity): the bound is the ratio
    assert 0 < delta["sparsegpt"] <= 0.5 * delta["magnitude"], delta


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float16, torch.bfloat16])
def test_compressed_storage_round_trips_bit_for_bit_in_cutlass_layout(dtype):
    from qcompiler.core import sparse24
    w, _ = sparsegpt.magnitude_prune(torch.randn(64, 192, generator=torch.Generator().manual_seed(0)))
    q = (w * 40).round().clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else w.to(dtype)
    values, meta = sparse24.compress(q)
    assert values.shape == (64, 96) and values.dtype == dtype
    back = sparse24.decompress(values, meta)
    as_bits = (lambda t: t.view(torch.uint8)) if q.element_size() == 1 else (lambda t: t.view(torch.int16))
    assert back.dtype == dtype and torch.equal(as_bits(back), as_bits(q))
    ratio = sparse24.compressed_nbytes(values, meta) / (q.numel() * q.element_size())
    assert ratio == (0.625 if q.element_size() == 1 else 0.5625)
    assert "more than 2 non-zero" in sparse24.why_not_compressible(torch.ones(16, 64, dtype=torch.int8))
    assert "rows must be a multiple of 16 and K of 64" in sparse24.why_not_compressible(q[:, :96].to(torch.int8))
    assert "dtype float32" in sparse24.why_not_compressible(torch.zeros(32, 64))
    with pytest.raises(ValueError, match="2:4 compression: .*more than 2"):
        sparse24.compress(torch.ones(16, 64, dtype=torch.int8))


@pytest.mark.parametrize("preset", ["sparse24-w8a8-int8-dynamic", "sparse24-w4a16", "sparse24-w4a16+asym",
                                    "sparse24-w8a8-int8-dynamic+asym"])
def test_sparse_checkpoints_store_compressed_codes_and_reload_exactly(tmp_path, preset):
    """Symmetric codes compress as they are; asymmetric ones around their zero points (a pruned weight's code)."""
    import safetensors
    from qcompiler.runtime.serialization import load_quantized, save_quantized, saved_metadata
    model, batches = tiny_model("llama"), calibration_batches()
    preset, asym = preset.removesuffix("+asym"), preset.endswith("+asym")
    recipe = recipes.get(preset)
    if asym:
        recipe = recipe.replace(name=f"{preset}-asym", weight=dataclasses.replace(recipe.weight, symmetric=False))
    qcompiler.quantize(model, recipe, batches, progress=False)
    weights = save_quantized(model, tmp_path / "ck", recipe)
    import json
    layers = json.loads(saved_metadata(tmp_path / "ck")["layers"])
    with safetensors.safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    q = "model.layers.0.self_attn.q_proj"
    assert layers[q]["sparse24"] and f"{q}.w_q_values" in keys and f"{q}.w_q_meta" in keys and f"{q}.w_q" not in keys
    with safetensors.safe_open(str(weights), "pt") as f:      # INT4: the kept codes two per byte
        assert f.get_slice(f"{q}.w_q_values").get_shape() == [64, 64 // 4 if preset.endswith("w4a16") else 64 // 2]
    down = "model.layers.0.mlp.down_proj"           # K = 96: not a multiple of 64, stored dense
    assert "sparse24" not in layers[down] and f"{down}.w_q" in keys
    assert sum(bool(s.get("sparse24")) for s in layers.values()) == 12
    loaded, _ = load_quantized(tmp_path / "ck")
    ids = token_batches(1, 16, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for a, b in zip(_quantized(loaded), _quantized(model)):
        assert a.fqn == b.fqn and torch.equal(a.w_q, b.w_q)
    if asym:                                        # the zero points are what the pruned positions hold
        m = next(m for m in _quantized(model) if m.fqn == q)
        assert m.w_zero is not None and bool((m.w_zero != 0).any())


def test_asymmetric_codes_compress_around_their_zero_points():
    """Kept codes equal to 0 or to the zero point, and runs of 4 that look fully pruned, come back bit for bit."""
    from qcompiler.core import sparse24
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(32, 128, generator=g).reshape(32, 32, 4).argsort(-1).argsort(-1).reshape(32, 128) < 2
    zero = torch.randint(0, 256, (32, 1), generator=g).to(torch.uint8).expand(32, 128).contiguous()
    codes = torch.randint(0, 256, (32, 128), generator=g).to(torch.uint8)
    codes[:, ::7] = 0
    codes = torch.where(keep, codes, zero)
    codes[0, :8] = zero[0, :8]
    values, meta = sparse24.compress_around(codes, zero)
    assert values.shape == (32, 64) and torch.equal(sparse24.decompress_around(values, meta, zero), codes)
    signed = torch.where(keep, torch.randint(-127, 128, (32, 128), generator=g, dtype=torch.int8), 0)
    assert all(torch.equal(a, b) for a, b in zip(sparse24.compress_around(signed, torch.zeros_like(signed)),
                                                 sparse24.compress(signed)))     # CUTLASS's own values and metadata
    with pytest.raises(ValueError, match="more than 2"):
        sparse24.compress_around(codes, zero.flip(0))


def _quantized(model):
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def test_magnitude_pruning_needs_no_calibration_and_sparsegpt_says_it_does():
    sparse = recipes.get("sparse24-fp8-dynamic")
    assert sparse.calibration_required_by == ("SparseGPTSpec",)
    magnitude = sparse.replace(weight_algorithm=SparseGPTSpec(method="magnitude"))
    assert magnitude.calibration_required_by == ()
    model = tiny_model("llama")
    qcompiler.quantize(model, magnitude, None, progress=False)
    linears = _quantized(model)
    assert len(linears) == 14
    for m in linears:
        assert sparsegpt.is_semi_structured(m.w_q.float()), m.fqn
    with pytest.raises(CalibrationError, match="needs calibration data for SparseGPTSpec"):
        qcompiler.quantize(tiny_model("llama"), sparse, None, progress=False)
