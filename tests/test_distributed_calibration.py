"""Calibration on torch.distributed (``qcompiler.calibration.distributed``): the same statistics and the
same quantized weights at 1, 2 and 4 ranks, and a clear error when a rank dies.

Ranks are processes spawned here with the gloo backend on CPU (NCCL takes the same code path)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from qcompiler import recipes
from qcompiler.calibration import distributed as dd
from qcompiler.calibration.layerwise import LayerwiseCalibration
from qcompiler.calibration.statistics import CalibrationCache
from qcompiler.errors import CalibrationError
from qcompiler.tools import models
from tiny_models import tiny_model, token_batches

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


# --- pure helpers ---------------------------------------------------------------------------------------

def test_shards_are_contiguous_balanced_and_cover_every_batch_once():
    batches = list(range(37))
    for size in (1, 2, 3, 4, 8, 64):
        for unit in (1, 4, 8):
            got = []
            for rank in range(size):
                shard, start = dd.shard_batches(batches, dd.World(rank, size), unit)
                assert shard == batches[start:start + len(shard)]
                assert start % unit == 0
                got += shard
            assert got == batches, (size, unit)


def test_work_assignment_balances_cost_and_is_deterministic():
    costs = [9.0, 1.0, 1.0, 4.0, 4.0, 1.0]
    owners = dd.assign_by_cost(costs, dd.World(0, 2))
    assert owners == dd.assign_by_cost(costs, dd.World(1, 2))
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [10.0, 10.0]
    assert dd.assign_by_cost(costs, dd.World()) == [0] * len(costs)


def test_no_process_group_is_one_rank():
    assert dd.current_world() == dd.World(0, 1) and not dd.current_world().active


# --- spawned ranks --------------------------------------------------------------------------------------

def _model(source: str) -> torch.nn.Module:
    if source == "stories260K":
        return models.load_model("stories260K")[0]
    if source == "mixtral":        # fused 3-D experts, calibrated expert by expert
        from test_moe import _moe_model
        return _moe_model("mixtral")
    return tiny_model(source)


def _batches(source: str) -> list[torch.Tensor]:
    vocab = 512 if source == "stories260K" else 256
    return [b % vocab for b in token_batches(16, 48, seed=3)]


def _calibrate(source: str, preset: str, ckpt: str | None = None) -> dict:
    """Quantized weights (layer by layer) or statistics (one pass) of ``preset`` on ``source``."""
    recipe = recipes.resolve(preset.split(":")[0])
    options = preset.split(":")[1:]
    if "float-model" in options:     # fitted to the float model's output: X_q^T X_f all-reduced too
        recipe = recipe.replace(weight_algorithm=dataclasses.replace(recipe.weight_algorithm_spec, target="float-model"))
    if "true-sequential" in options:     # one calibration pass per dependency level of each block
        recipe = recipe.replace(weight_algorithm=dataclasses.replace(recipe.weight_algorithm_spec, true_sequential=True))
    model = _model(source)
    if preset.endswith(":one-pass"):     # the whole pipeline, GPTQ in the graph pass (no layer-by-layer)
        import qcompiler
        from qcompiler.algorithms import registry
        recipe = recipes.resolve(preset.split(":")[0]).replace(layerwise=False)
        real, computed = registry.quantize_linear, []
        registry.quantize_linear = lambda fqn, *a, **k: computed.append(fqn) or real(fqn, *a, **k)
        try:
            qcompiler.quantize(model, recipe, calibration=_batches(source), progress=False)
        finally:
            registry.quantize_linear = real
        if ckpt:     # where this process writes the linears it computed itself
            torch.save(computed, ckpt)
        from qcompiler.runtime.fused_experts import quantized_experts
        experts = {f"{key}[{e}]": (qw.q, qw.scale, qw.zero) for key, t in quantized_experts(model).items()
                   for e, qw in enumerate(t.experts)}
        return {n: (m.w_q, m.w_scale, m.w_zero) for n, m in model.named_modules() if hasattr(m, "w_q")} | experts
    if preset.startswith("kv-"):       # a quantization target's observer (the KV cache's key/value ranges)
        from qcompiler.calibration.statistics import observe_tensors
        from qcompiler.passes.kv_cache import KVObserver
        res = observe_tensors(model, _batches(source), {"kv_cache": KVObserver(model)}, progress=False)["kv_cache"]
        return {f"{path}/{role}": lohi for path, entry in res.items() for role, lohi in entry.items()}
    if preset.endswith(":traffic"):     # the tensor collectives of layer-by-layer calibration, as (op, shape, dtype)
        calls, dist = [], torch.distributed
        real = {name: getattr(dist, name) for name in ("all_reduce", "reduce")}

        def spy(name):
            return lambda t, *a, **k: calls.append((name, tuple(t.shape), str(t.dtype))) or real[name](t, *a, **k)
        dist.all_reduce, dist.reduce = spy("all_reduce"), spy("reduce")
        try:
            cal = LayerwiseCalibration(_batches(source), recipe, progress=False, replay_batch=4)
            group, computed, units = cal._quantize_group, [], []

            def quantize_group(fqns, weights, block_stats):   # what this rank quantizes, and from a Hessian?
                computed.extend((f, block_stats[f].hessian is not None, weights[f].shape[0]) for f in fqns)
                return group(fqns, weights, block_stats)
            cal._quantize_group = quantize_group
            real_units = cal._units
            cal._units = lambda *a: units.append(real_units(*a)) or units[-1]
            cal.collect(model)
        finally:
            dist.all_reduce, dist.reduce = real["all_reduce"], real["reduce"]
        return {"calls": calls, "computed": computed, "units": units, "quantized": sorted(cal.results),
                "weights": {f: (r.qweight.q, r.qweight.scale, r.qweight.zero) for f, r in cal.results.items()}}
    if recipe.layerwise:
        # rank 1 too short of memory to keep its float-stream inputs (the others have the default budget)
        small = "rank1-small-budget" in options and torch.distributed.is_initialized() and \
            torch.distributed.get_rank() == 1
        cal = LayerwiseCalibration(_batches(source), recipe, progress=False, replay_batch=4, checkpoint_dir=ckpt,
                                   **({"float_cache_bytes": 1} if small else {}))
        cal.collect(model)
        experts = {f"{key}[{e}]": (qw.q, qw.scale, qw.zero, note) for key, (qws, note) in cal.expert_results.items()
                   for e, qw in enumerate(qws)}
        # with a float-model target and levels: how many blocks kept their float-stream inputs (every rank the same)
        kept = {"blocks keeping float inputs": (cal.kept_float_blocks,)} if "true-sequential" in options else {}
        computed = {"experts computed here": cal.experts_computed} if experts else {}    # this rank's share
        return {f: (r.qweight.q, r.qweight.scale, r.qweight.zero, r.scale) for f, r in cal.results.items()} | \
            experts | kept | computed
    cal = CalibrationCache(_batches(source), recipe.samples_per_layer, progress=False, hessian=True)
    return {f: (s.absmax, s.samples, s.tokens, s.absmean, s.hessian) for f, s in cal.collect(model).items()}


def _rank_main(rank: int, size: int, store: str, source: str, preset: str, out: str, die: int,
               hang: bool = False, ckpt: str | None = None) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                                         timeout=datetime.timedelta(seconds=8 if hang else 60))
    try:
        if rank == die:
            from qcompiler.calibration.layerwise import LayerwiseCalibration as LC
            real = LC._observe

            def observe_then_die(self, block, prefix, *args, **kwargs):
                if prefix.endswith(".1"):
                    if hang:
                        time.sleep(25)   # a rank that hangs past the 8 s timeout in block 1
                    os._exit(3)          # a rank that dies in the middle of block 1
                return real(self, block, prefix, *args, **kwargs)
            LC._observe = observe_then_die
        try:
            # ckpt: the block-checkpoint folder, or for ":one-pass" where each rank lists the linears it computed
            result = _calibrate(source, preset, f"{ckpt}.{rank}" if ckpt and preset.endswith(":one-pass") else ckpt)
        except CalibrationError as e:
            torch.save({"error": str(e), "type": type(e).__name__}, f"{out}.{rank}")
            if isinstance(e, dd.DistributedCalibrationError):
                os._exit(0)   # as the CLI does: gloo can abort the teardown of a process whose peer died
            return
        torch.save(result, f"{out}.{rank}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_ranks(tmp_path: Path, size: int, source: str, preset: str, die: int = -1, hang: bool = False,
               ckpt: str | None = None) -> list:
    """Run ``size`` ranks to the end (each joined on its own: a dead rank does not kill the others);
    each rank's result, or None for a rank that wrote none."""
    store, out = tmp_path / f"store{size}", tmp_path / f"out{size}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, size, str(store), source, preset, str(out), die, hang, ckpt))
             for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
            pytest.fail(f"a rank did not finish in 300 s (preset {preset}, {size} ranks)")
    codes = [p.exitcode for p in procs]
    assert all(c == 0 for r, c in enumerate(codes) if r != die), codes
    return [torch.load(f"{out}.{r}", weights_only=False) if Path(f"{out}.{r}").exists() else None
            for r in range(size)]


def _assert_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for fqn in a:
        for x, y in zip(a[fqn], b[fqn]):
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), fqn
            else:
                assert x == y, fqn


@pytest.mark.parametrize("source,preset,sizes", [
    ("llama", "w4a16-gptq", (2, 4)),           # Hessians reduced, GPTQ groups spread over ranks
    ("llama", "w4a16-awq", (2,)),              # sampled rows gathered in batch order, AWQ scale search
    ("gpt2", "w4a16-gptq", (2,)),              # Conv1D weights stored [K, N]
    ("llama", "w8a8-int8-sq", (2,)),           # one calibration pass (no layer-by-layer): statistics
    ("qwen2", "kv-int8", (2,)),                # a quantization target's observer, merged over the shards
    ("llama", "w4a16-gptq:one-pass", (2,)),    # GPTQ in the graph pass, linears spread over the ranks
    ("mixtral", "w4a16-gptq", (2,)),           # fused experts: per-expert Hessians all-reduced, experts spread
    ("mixtral", "w4a16-gptq:one-pass", (2,)),  # the same in the one calibration pass of the float model
    ("llama", "w4a16-gptq:float-model", (2,)),  # the float stream beside the quantized one, X_q^T X_f all-reduced
    # levels found on the first rank with inputs and broadcast; each level's Hessians reduced and spread again; the
    # float stream's linear inputs kept on every rank (the ranks agree on it)
    ("llama", "w4a16-gptq:float-model:true-sequential", (2,)),
])
def test_results_are_bit_identical_at_any_number_of_ranks(tmp_path, source, preset, sizes):
    torch.set_num_threads(1)
    one_pass = preset.endswith(":one-pass")
    single = _calibrate(source, preset, str(tmp_path / "computed") if one_pass else None)
    if preset.endswith(":true-sequential"):      # both blocks keep the float stream's inputs, at any rank count
        assert single["blocks keeping float inputs"] == (2,)
    if source == "mixtral" and one_pass:      # 2 layers x 2 fused weights x 4 experts, each by GPTQ on one rank
        assert sum(f.endswith("]") for f in single) == 16
        assert sum(f.endswith("]") for f in torch.load(tmp_path / "computed")) == 16
    elif source == "mixtral":
        notes = [v[3] for f, v in single.items() if f.endswith("]")]   # 2 layers x 2 fused weights x 4 experts
        assert len(notes) == 16 and all(n.startswith("per expert, from its routed tokens: gptq damp") for n in notes)
        assert single.pop("experts computed here") == 16
    for size in sizes:
        ranks = _run_ranks(tmp_path, size, source, preset, ckpt=str(tmp_path / "computed") if one_pass else None)
        if source == "mixtral" and not one_pass:      # each expert quantized on one rank, shared by broadcast
            shares = [got.pop("experts computed here") for got in ranks]
            assert sum(shares) == 16 and all(shares), shares
        for r, got in enumerate(ranks):
            _assert_identical(single, got)
        if one_pass:       # each linear's GPTQ ran on one rank only
            alone = torch.load(tmp_path / "computed")
            shares = [torch.load(f"{tmp_path / 'computed'}.{r}") for r in range(size)]
            assert sorted(sum(shares, [])) == sorted(alone) and all(0 < len(x) < len(alone) for x in shares)


@pytest.mark.skipif(models.shared_dir() is None, reason="../shared (stories260K) not found; CI provides it")
def test_each_groups_hessian_goes_once_to_the_rank_that_quantizes_it(tmp_path):
    """Layer by layer on 2 ranks: no Hessian is all-reduced; each group of linears sharing an input (q/k/v,
    o, gate/up, down in each of the 2 blocks) sends one K x K float64 sum, to its owner only."""
    torch.set_num_threads(1)
    ranks = _run_ranks(tmp_path, 2, "llama", "w4a16-gptq:traffic")
    for r in ranks:
        square = [c for c in r["calls"] if len(c[1]) == 2 and c[1][0] == c[1][1] and c[2] == "torch.float64"]
        assert [c[0] for c in square] == ["reduce"] * 8, square
        assert sorted(c[1][0] for c in square) == sorted([64, 64, 64, 64, 96, 96, 64, 64])
    # each rank quantizes its share, every one of those from a Hessian; together, every linear once
    for r in ranks:
        assert r["computed"] and all(has for _, has, _ in r["computed"])
    done = sorted(f for r in ranks for f, _, _ in r["computed"])
    assert done == ranks[0]["quantized"] == ranks[1]["quantized"]


def test_a_group_heavier_than_a_ranks_share_is_split_by_output_rows(tmp_path):
    """4 ranks on the tiny Llama: gate/up (K 64, 192 rows) outweighs a quarter of a block's GPTQ work, so its
    rows go to 2 ranks (its Hessian all-reduced to both); down_proj (K 96, 64 rows: the factorization
    dominates) stays whole. The joined slices equal one process's weights bit for bit."""
    torch.set_num_threads(1)
    ranks = _run_ranks(tmp_path, 4, "llama", "w4a16-gptq:traffic")
    units = ranks[0]["units"]
    assert len(units) == 2 and all(u == ranks[1]["units"][b] for b, u in enumerate(units))
    for block in units:
        split = {j: n for j, i, n in block if n > 1}
        assert list(split.values()) == [2], block                      # one group, in two slices
    rows = [(f, n) for r in ranks for f, _, n in r["computed"] if "gate_proj" in f or "up_proj" in f]
    assert sorted(n for _, n in rows) == [48] * 8                       # 96 rows each, as 2 x 48
    square = [c for c in ranks[0]["calls"] if len(c[1]) == 2 and c[1][0] == c[1][1] and c[2] == "torch.float64"]
    assert [c[0] for c in square].count("all_reduce") == 2             # the split group's Hessian, per block
    _assert_identical(ranks[0]["weights"], _calibrate("llama", "w4a16-gptq"))


def test_stories260k_gptq_is_bit_identical_on_two_ranks(tmp_path):
    torch.set_num_threads(1)
    single = _calibrate("stories260K", "w4a16-gptq")
    rank0, rank1 = _run_ranks(tmp_path, 2, "stories260K", "w4a16-gptq")
    _assert_identical(single, rank0)
    _assert_identical(single, rank1)


@pytest.mark.parametrize("hang", [False, True], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_others_with_an_error_naming_the_layer(tmp_path, hang):
    ranks = _run_ranks(tmp_path, 2, "llama", "w4a16-gptq", die=1, hang=hang)
    assert ranks[1] is None                          # the dead rank wrote nothing
    err = ranks[0]["error"]
    assert ranks[0]["type"] == "DistributedCalibrationError"
    assert "rank 0 of 2" in err and "block model.layers.1" in err and "Nothing was written" in err, err


def test_two_ranks_resume_a_single_process_run_stopped_after_block_0(tmp_path):
    """Block results saved by one process (stopped when block 1 started) are taken by 2 ranks, which
    compute the rest: the result equals one uninterrupted process's."""
    torch.set_num_threads(1)
    single = _calibrate("llama", "w4a16-gptq")
    real = LayerwiseCalibration._observe

    def stop_at_block_1(self, block, prefix, *args, **kwargs):
        if prefix.endswith(".1"):
            raise KeyboardInterrupt
        return real(self, block, prefix, *args, **kwargs)
    folder = tmp_path / "blocks"
    LayerwiseCalibration._observe = stop_at_block_1
    try:
        with pytest.raises(KeyboardInterrupt):
            _calibrate("llama", "w4a16-gptq", str(folder))
    finally:
        LayerwiseCalibration._observe = real
    assert [p.name for p in folder.glob("block-*")] == ["block-00000.safetensors"]
    for got in _run_ranks(tmp_path, 2, "llama", "w4a16-gptq", ckpt=str(folder)):
        _assert_identical(single, got)
    assert len(list(folder.glob("block-*"))) == 2    # the tiny llama's 2 blocks, the second by rank 0


def test_ranks_rerun_the_float_stream_together_when_one_cannot_keep_its_inputs(tmp_path):
    """Rank 1's budget is below its kept inputs: the ranks agree on the largest estimate, so every rank reruns
    the float stream per level (no rank waits in a collective the other skipped), with the same bits."""
    preset = "w4a16-gptq:float-model:true-sequential"
    single = _calibrate("llama", preset)
    assert single.pop("blocks keeping float inputs") == (2,)
    for got in _run_ranks(tmp_path, 2, "llama", preset + ":rank1-small-budget"):
        assert got.pop("blocks keeping float inputs", got.get("error")) == (0,)
        _assert_identical(single, got)


def test_block_tuning_is_refused_under_a_process_group(tmp_path):
    for r in _run_ranks(tmp_path, 2, "llama", "w4a16-signround"):
        assert r["type"] == "CalibrationError" and "does not run under torch.distributed" in r["error"], r


@pytest.mark.skipif(models.shared_dir() is None, reason="../shared (stories260K) not found; CI provides it")
def test_torchrun_quantize_writes_the_single_process_checkpoint(tmp_path):
    """``torchrun --nproc-per-node 2 -m qcompiler quantize``: rank 0 writes a checkpoint whose tensors equal
    those of the same command in one process."""
    import subprocess
    import sys
    from safetensors.torch import load_file
    from qcompiler.runtime.serialization import WEIGHTS_FILE
    common = ["-m", "qcompiler", "quantize", "--model", "stories260K", "--recipe", "w4a16-gptq",
              "--calib-samples", "16", "--calib-seq", "128", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("saved ") == 1 and "(calibrated on 2 ranks)" in two.stdout, two.stdout[-2000:]
    a, b = load_file(tmp_path / "one" / WEIGHTS_FILE), load_file(tmp_path / "two" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and any("layers.4" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
