"""GPTQ: Hessian accumulation, closed-form cases, an unblocked reference transcription, errors."""

from __future__ import annotations

import pytest
import torch

from qcompiler.algorithms import gptq
from qcompiler.core import numerics
from qcompiler.errors import CalibrationError
from qcompiler.core.layer_quant import quantize_weight
from qcompiler.recipes import Granularity, WeightSpec
from numerics_util import rel_err

SPECS = [
    WeightSpec("int4", "per_group", 32),
    WeightSpec("int4", "per_group", 24, symmetric=False),      # K = 80: partial last group
    WeightSpec("int4", "per_channel", symmetric=False),
    WeightSpec("int8", "per_channel"),                          # w8a16-gptq
    WeightSpec("int4", "per_group", 16, calibrator="mse"),
]
IDS = ["int4-g32", "uint4-g24", "uint4-channel", "int8-channel", "int4-g16-mse"]


def _qdtype(spec: WeightSpec) -> str:
    return spec.dtype.value if spec.symmetric else {"int8": "uint8", "int4": "uint4"}[spec.dtype.value]


def _correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(rows, k, generator=g) @ mix
    return x * (1 + 4 * torch.rand(k, generator=g))       # uneven channel magnitudes


def _problem(n: int = 48, k: int = 80, rows: int = 256, seed: int = 0):
    x = _correlated_inputs(rows, k, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) / k ** 0.5
    acc = gptq.HessianAccumulator(k)
    acc.add_batch(x)
    return x, w, acc


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return h


def reference_gptq(w, h, spec, damp=0.01, act_order=False, static_groups=False):
    """Unblocked GPTQ written from the paper's OBS form: one column at a time, explicit H^-1
    updated by removing each quantized column (no Cholesky, no lazy batches), float64."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n, k = w.shape
    qdtype = _qdtype(spec)
    grouped = spec.granularity is Granularity.PER_GROUP
    g = spec.group_size if grouped else k
    if not grouped or static_groups:
        rtn = quantize_weight(w.float(), spec)
        params = {j: (rtn.scale if not grouped else rtn.scale[:, j:j + 1],
                      None if rtn.zero is None else (rtn.zero if not grouped else rtn.zero[:, j:j + 1]))
                  for j in range(-(-k // g))}
    else:
        params = {}
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    position = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    hinv = torch.linalg.inv(h)
    channel = WeightSpec(spec.dtype, "per_channel", None, spec.symmetric, spec.calibrator)
    q = torch.zeros_like(w)
    for i in range(k):
        j = int(perm[i]) // g if grouped else 0
        if j not in params:
            cols = position[j * g:(j + 1) * g].sort().values
            qw = quantize_weight(w[:, cols].float(), channel)
            params[j] = (qw.scale, qw.zero)
        s, z = params[j]
        col = w[:, i:i + 1].float()
        qi = numerics.dequantize(numerics.quantize(col, s, z, qdtype), s, z).double()
        d = hinv[i, i]
        w[:, i:] -= (w[:, i:i + 1] - qi) / d * hinv[i:i + 1, i:]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / d
        q[:, i:i + 1] = qi
    return q[:, position]


def test_hessian_accumulator_is_the_running_average_of_2_xtx():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 12, generator=g), torch.randn(7, 12, generator=g), torch.randn(1, 12, generator=g)]
    acc = gptq.HessianAccumulator(12)
    for b in batches:
        acc.add_batch(b)
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert acc.n_samples == 18
    assert rel_err(acc.hessian, 2 / 18 * x.T @ x) < 1e-6
    with pytest.raises(CalibrationError, match="12 features"):
        acc.add_batch(torch.randn(3, 11))
    with pytest.raises(CalibrationError, match="NaN"):
        acc.add_batch(torch.full((2, 12), float("nan")))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS + [WeightSpec("int8", "per_tensor"), WeightSpec("fp8_e4m3", "per_channel")],
                         ids=IDS + ["int8-tensor", "fp8-channel"])
def test_identity_hessian_gives_round_to_nearest_exactly(spec, act_order):
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(2))
    qw, info = gptq.gptq_quantize(w, torch.eye(80), spec, n_samples=1000, block_size=32, act_order=act_order)
    rtn = quantize_weight(w, spec)
    assert torch.equal(qw.q, rtn.q) and torch.equal(qw.scale, rtn.scale)
    assert (qw.zero is None and rtn.zero is None) or torch.equal(qw.zero, rtn.zero)
    assert (qw.dtype, qw.group_size) == (rtn.dtype, rtn.group_size)
    assert info.dampening == 0.01 and info.dead_columns == 0


def test_linears_sharing_an_input_can_be_quantized_as_one_stacked_weight():
    """Rows are independent given H (per-channel / per-group scales): q, k, v in one call."""
    _, w, acc = _problem(n=48, seed=8)
    spec = WeightSpec("int4", "per_group", 32)
    threads = torch.get_num_threads()
    stacked, _ = gptq.gptq_quantize(w, acc, spec, act_order=True)
    parts = [gptq.gptq_quantize(part, acc, spec, act_order=True)[0] for part in w.split([24, 16, 8])]
    assert torch.equal(stacked.q, torch.cat([p.q for p in parts]))
    assert rel_err(stacked.scale, torch.cat([p.scale for p in parts])) < 1e-6
    assert torch.get_num_threads() == threads            # the single-thread section restored it


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gptq_output_error_is_lower_than_rtn_on_correlated_inputs(spec):
    x, w, acc = _problem()
    qw, _ = gptq.gptq_quantize(w, acc, spec)
    ref = x @ w.T
    err_gptq = rel_err(x @ qw.dequantize().T, ref)
    err_rtn = rel_err(x @ quantize_weight(w, spec).dequantize().T, ref)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_stored_weight_dequantizes_to_exactly_what_gptq_used(spec, act_order, static_groups):
    _, w, acc = _problem(seed=3)
    qw, info = gptq.gptq_quantize(w, acc, spec, block_size=32, act_order=act_order, static_groups=static_groups)
    # The sweep's own float values (same code path, original column order) ...
    h = acc.hessian.double()
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    hp = h if perm is None else h[perm][:, perm]
    u, _ = gptq._inverse_hessian_factor(hp, 0.01, 1.0, "t")
    inner = gptq._gptq_columns(w.clone(), u, spec, perm, 32, static_groups, torch.diagonal(hp).float())
    assert torch.equal(qw.dequantize(), inner.dequantized)
    # ... and GPTQ's objective recomputed from the stored weight equals the sweep's sum err^2.
    delta = (w.double() - qw.dequantize().double())
    objective = float(torch.einsum("nk,kl,nl->", delta, _damped(h, info.dampening), delta))
    assert objective == pytest.approx(info.loss, rel=1e-4)
    assert qw.scale.shape == quantize_weight(w, spec).scale.shape and qw.q.shape == w.shape


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[3]], ids=[IDS[0], IDS[1], IDS[3]])
def test_blocked_gptq_matches_unblocked_obs_transcription(spec, act_order, static_groups):
    # groups of 24 straddle blocks of 32; blocks of 5 are smaller than the groups
    _, w, acc = _problem(n=16, k=80, seed=4)
    expected = reference_gptq(w, acc.hessian, spec, act_order=act_order, static_groups=static_groups)
    h = acc.hessian.double()
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    hd = _damped(h if perm is None else h[perm][:, perm], 0.01)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    for block_size in (5, 32, 128):
        # the sweep in float64: the same arithmetic up to ~1e-16, hence the same roundings
        inner = gptq._gptq_columns(w.double(), u, spec, perm, block_size, static_groups,
                                   torch.diagonal(h if perm is None else h[perm][:, perm]).float())
        assert torch.equal(inner.dequantized.double(), expected)
        # the float32 public path: equal but for rows where a value within float32 rounding
        # of a rounding tie went the other way (each such row then differs from there on)
        qw, info = gptq.gptq_quantize(w, acc, spec, block_size=block_size, act_order=act_order,
                                      static_groups=static_groups)
        same_rows = (qw.q == inner.qweight.q).all(1)
        assert same_rows.float().mean() >= 0.9
        assert rel_err(qw.scale[same_rows], inner.qweight.scale[same_rows]) < 1e-6
        assert info.loss == pytest.approx(inner.loss, rel=1e-2)


def test_act_order_uses_one_scale_per_original_group():
    x, w, acc = _problem(seed=5)
    spec = WeightSpec("int4", "per_group", 16)
    qw, _ = gptq.gptq_quantize(w, acc, spec, act_order=True)
    plain, _ = gptq.gptq_quantize(w, acc, spec)
    assert not torch.equal(qw.q, plain.q)                 # the order changed the result
    assert qw.scale.shape == (48, 5) and qw.group_size == 16 and qw.q.shape == (48, 80)
    assert rel_err(x @ qw.dequantize().T, x @ w.T) < rel_err(x @ quantize_weight(w, spec).dequantize().T, x @ w.T)


def test_dead_columns_are_zero_and_counted():
    x, w, _ = _problem()
    x[:, [3, 40, 79]] = 0.0
    acc = gptq.HessianAccumulator(80)
    acc.add_batch(x)
    qw, info = gptq.gptq_quantize(w, acc, WeightSpec("int4", "per_group", 32), act_order=True)
    assert info.dead_columns == 3
    assert torch.equal(qw.dequantize()[:, [3, 40, 79]], torch.zeros(48, 3))
    assert torch.isfinite(qw.scale).all()


def _indefinite_hessian(k: int, negative: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(6)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.5, 1.5, k, dtype=torch.float64)
    eig[0] = -negative                                    # mean(diag) stays ~1
    return (basis * eig) @ basis.T


def test_non_positive_definite_hessian_is_retried_with_more_dampening():
    h = _indefinite_hessian(40, 0.05)                     # 0.01 * mean(diag) is not enough, 0.1 is
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(7))
    qw, info = gptq.gptq_quantize(w, h, WeightSpec("int4", "per_group", 8), n_samples=100)
    assert info.dampening == pytest.approx(0.1)
    assert torch.isfinite(qw.dequantize()).all()
    with pytest.raises(CalibrationError, match="layers.3.mlp.up_proj.*not positive definite"):
        gptq.gptq_quantize(w, _indefinite_hessian(40, 5.0), WeightSpec("int4", "per_group", 8),
                           n_samples=100, layer_name="layers.3.mlp.up_proj")


def test_too_few_samples_names_the_layer_and_count():
    acc = gptq.HessianAccumulator(64)
    acc.add_batch(torch.randn(3, 64))
    with pytest.raises(CalibrationError, match=r"layers.0.attn.q_proj.*at least 8 .*got 3"):
        gptq.gptq_quantize(torch.randn(4, 64), acc, WeightSpec("int4", "per_group", 32),
                           layer_name="layers.0.attn.q_proj")
    with pytest.raises(CalibrationError, match="at least 1 .*got 0"):
        gptq.gptq_quantize(torch.randn(4, 64), gptq.HessianAccumulator(64), WeightSpec("int8"), min_samples=0)
    qw, info = gptq.gptq_quantize(torch.randn(4, 64), acc, WeightSpec("int8"), min_samples=3)
    assert info.n_samples == 3


def test_bad_arguments_are_refused():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="n_samples"):
        gptq.gptq_quantize(w, torch.eye(16), WeightSpec("int8"))
    with pytest.raises(ValueError, match=r"expected \(16, 16\)"):
        gptq.gptq_quantize(w, torch.eye(8), WeightSpec("int8"), n_samples=100)
    with pytest.raises(CalibrationError, match="NaN"):
        gptq.gptq_quantize(w, torch.full((16, 16), float("inf")), WeightSpec("int8"), n_samples=100)


def test_mse_scales_are_weighted_by_the_hessian_diagonal():
    """With a diagonal H there is no error to compensate: GPTQ with the mse calibrator equals
    round-to-nearest whose clipping search weights each column's error by H_ii."""
    torch.manual_seed(3)
    spec = WeightSpec("int4", "per_group", 32, calibrator="mse")
    w = torch.randn(24, 96)
    d = torch.logspace(-3, 1, 96)[torch.randperm(96)]
    qw, _ = gptq.gptq_quantize(w, torch.diag(d), spec, n_samples=1000, static_groups=True)
    expected = quantize_weight(w, spec, importance=d)
    assert torch.equal(qw.scale, expected.scale)
    assert torch.equal(qw.dequantize(), expected.dequantize())

    def weighted_err(q):
        return float(((q.dequantize() - w).pow(2) * d).sum())
    plain = quantize_weight(w, spec)   # unweighted mse search
    minmax = quantize_weight(w, WeightSpec("int4", "per_group", 32))
    assert weighted_err(expected) < weighted_err(plain) <= weighted_err(minmax)
    with pytest.raises(ValueError, match="importance must have shape"):
        quantize_weight(w, spec, importance=d[:10])
