"""PassManager: ordering by ``requires``, refusals, failure reporting, stats and recompiles;
and user passes added through ``qcompiler.backend(..., passes=[...])``."""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx import GraphModule, symbolic_trace

import qcompiler
from qcompiler import PassContext, PassError, PassManager, PassResult, recipes
from qcompiler.passes import default_passes
from qcompiler.pipeline import Analysis, Pass
from qcompiler.recipes import FallbackSpec
from tiny_models import tiny_model, token_batches


class _AddOne(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x + 1.0)


def _gm() -> GraphModule:
    return symbolic_trace(_AddOne())


def _ctx() -> PassContext:
    return PassContext(recipes.get("w8a16"))


class Probe:
    """A pass that records that it ran (in ``log``) and returns fixed stats."""

    def __init__(self, name, requires=(), log=None, stats=None, fail=None, modified=False):
        self.name, self.requires = name, tuple(requires)
        self.log = log if log is not None else []
        self.stats, self.fail, self.modified = stats or {}, fail, modified

    def run(self, gm, ctx):
        self.log.append(self.name)
        if self.fail is not None:
            raise self.fail
        return PassResult(gm, self.modified, self.stats)


def _order(passes):
    return [p.name for p in PassManager(passes).passes]


class Analyst(Probe):
    """A probe that declares the analyses it reads and writes, and writes ``really_writes``."""

    def __init__(self, name, reads=(), writes=(), really_writes=None, **kw):
        super().__init__(name, **kw)
        self.reads, self.writes = tuple(reads), tuple(writes)
        self.really_writes = self.writes if really_writes is None else tuple(really_writes)

    def run(self, gm, ctx):
        result = super().run(gm, ctx)
        for a in self.really_writes:
            ctx.analyses[a] = True
        return result


# -- analyses --------------------------------------------------------------------------------
def test_analyses_are_named_and_stay_plain_string_keys():
    ctx = _ctx()
    ctx.analyses[Analysis.OUTLIERS] = 1
    assert ctx.analyses["outliers"] == 1 and str(Analysis.OUTLIERS) == "outliers"


def test_a_pass_reading_an_analysis_nobody_writes_is_refused_before_anything_runs():
    log = []
    manager = PassManager([Analyst("a", log=log), Analyst("b", reads=[Analysis.OUTLIERS], log=log)])
    with pytest.raises(ValueError, match=r"pass 'b' reads analyses \['outliers'\]"):
        manager.run(_gm(), _ctx())
    assert log == []
    # written by an earlier pass, or present in the context: fine
    PassManager([Analyst("a", writes=[Analysis.OUTLIERS]), Analyst("b", reads=["outliers"])]).run(_gm(), _ctx())
    ctx = _ctx()
    ctx.analyses[Analysis.OUTLIERS] = {}
    PassManager([Analyst("b", reads=[Analysis.OUTLIERS])]).run(_gm(), ctx)


def test_a_pass_that_does_not_write_what_it_declares_fails_by_name():
    with pytest.raises(PassError, match="'a'.*declares it writes analyses \\['calibration'\\]"):
        PassManager([Analyst("a", writes=[Analysis.CALIBRATION], really_writes=[])]).run(_gm(), _ctx())


def test_default_passes_declare_consistent_analyses():
    provided = [Analysis.PARAM_NAMES, Analysis.MEMO]
    for target in ("reference", "inductor", "triton"):
        manager = PassManager(default_passes(target))
        manager.check_analyses(provided)
        declared = {str(a) for p in manager.passes for a in (*getattr(p, "reads", ()), *getattr(p, "writes", ()))}
        assert {"annotate", "calibration", "smoothing", "outliers", "quantized_weights"} <= declared
    manager.passes = [p for p in manager.passes if p.name != "annotate"]
    with pytest.raises(ValueError, match="reads analyses \\['annotate'\\]"):
        manager.check_analyses(provided)


# -- ordering --------------------------------------------------------------------------------
def test_given_order_kept_without_requirements():
    assert _order([Probe("c"), Probe("a"), Probe("b")]) == ["c", "a", "b"]


def test_requirements_move_a_pass_after_what_it_needs():
    assert _order([Probe("c", ["b"]), Probe("a"), Probe("b")]) == ["a", "b", "c"]
    assert _order([Probe("x", ["z"]), Probe("y"), Probe("z")]) == ["y", "z", "x"]
    # satisfied requirements change nothing
    assert _order([Probe("a"), Probe("b", ["a"]), Probe("c", ["a", "b"])]) == ["a", "b", "c"]


def test_chain_of_requirements():
    ps = [Probe("d", ["c"]), Probe("c", ["b"]), Probe("b", ["a"]), Probe("a"), Probe("e")]
    order = _order(ps)
    assert order.index("a") < order.index("b") < order.index("c") < order.index("d")
    assert order == ["a", "b", "c", "d", "e"]


def test_default_pipeline_order_and_user_pass_appended():
    names = [p.name for p in default_passes()]
    assert _order(default_passes()) == names
    assert names[0] == "annotate" and names[-1] == "lower"
    user = Probe("mine", ["annotate"])
    assert _order(default_passes() + [user]) == names + ["mine"]


def test_missing_requirement_refused():
    with pytest.raises(ValueError, match="'b' requires 'zz', which is not in the pipeline"):
        PassManager([Probe("a"), Probe("b", ["zz"])])


@pytest.mark.parametrize("passes", [
    [Probe("a", ["b"]), Probe("b", ["a"])],
    [Probe("a", ["c"]), Probe("b", ["a"]), Probe("c", ["b"])],
    [Probe("a", ["a"])],
], ids=["two", "three", "self"])
def test_cycle_refused(passes):
    with pytest.raises(ValueError, match="cycle"):
        PassManager(passes)


def test_duplicate_names_refused():
    with pytest.raises(ValueError, match="unique"):
        PassManager([Probe("a"), Probe("a")])


def test_probe_satisfies_the_pass_protocol():
    assert isinstance(Probe("a"), Pass)
    assert all(isinstance(p, Pass) for p in default_passes())


# -- running -----------------------------------------------------------------------------------
def test_passes_run_in_order_and_stats_land_in_report():
    log: list[str] = []
    stats = {"things": 3, "ratio": 0.5}
    ps = [Probe("b", ["a"], log, stats), Probe("a", (), log, {"n": 1})]
    ctx = _ctx()
    gm = PassManager(ps).run(_gm(), ctx)
    assert isinstance(gm, GraphModule)
    assert log == ["a", "b"]
    assert [p["name"] for p in ctx.report.passes] == ["a", "b"]
    a, b = ctx.report.passes
    assert a["stats"] == {"n": 1} and b["stats"] == stats
    assert b["stats"] is not stats            # copied, not aliased
    assert a["modified"] is False
    for p in ctx.report.passes:
        assert isinstance(p["wall_s"], float) and p["wall_s"] >= 0.0
    assert "things=3" in ctx.report.summary()


def test_failing_pass_names_itself_and_those_before_and_stops():
    log: list[str] = []
    boom = RuntimeError("boom")
    ps = [Probe("a", (), log), Probe("b", ["a"], log), Probe("c", ["b"], log, fail=boom), Probe("d", ["c"], log),
          Probe("e", (), log)]
    ctx = _ctx()
    with pytest.raises(PassError) as info:
        PassManager(ps).run(_gm(), ctx)
    err = info.value
    assert err.pass_name == "c"
    assert err.before == ("a", "b")
    assert err.__cause__ is boom
    msg = str(err)
    assert "pass 'c' failed" in msg and "a, b" in msg and "RuntimeError: boom" in msg
    assert log == ["a", "b", "c"]               # nothing after the failure ran
    assert [p["name"] for p in ctx.report.passes] == ["a", "b"]


def test_first_pass_failing_says_none_ran_before():
    with pytest.raises(PassError, match=r"pass 'a' failed \(passes run before it: none\): KeyError"):
        PassManager([Probe("a", fail=KeyError("x")), Probe("b")]).run(_gm(), _ctx())


def test_pass_error_from_a_pass_is_not_rewrapped():
    inner = PassError("inner", ("x",), ValueError("v"))
    with pytest.raises(PassError) as info:
        PassManager([Probe("a"), Probe("b", fail=inner)]).run(_gm(), _ctx())
    assert info.value is inner


class _AddToMul:
    """Turns ``x + 1`` into ``x * 1`` by editing the graph only (no recompile)."""

    name = "add_to_mul"
    requires = ()

    def __init__(self, modified: bool):
        self.modified = modified

    def run(self, gm, ctx):
        n = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is operator.add:
                node.target = operator.mul
                n += 1
        return PassResult(gm, self.modified, {"rewritten": n})


def test_modified_pass_gets_its_graph_recompiled():
    x = torch.tensor([-3.0, 0.5, 2.0])
    gm = PassManager([_AddToMul(modified=True)]).run(_gm(), _ctx())
    assert "x * 1.0" in gm.code and "x + 1.0" not in gm.code
    assert torch.equal(gm(x), torch.relu(x * 1.0))


def test_unmodified_pass_is_not_recompiled():
    x = torch.tensor([-3.0, 0.5, 2.0])
    gm = PassManager([_AddToMul(modified=False)]).run(_gm(), _ctx())
    assert "x + 1.0" in gm.code
    assert torch.equal(gm(x), torch.relu(x + 1.0))   # the stale code still runs: the manager only recompiles on modified


class _BreakGraph:
    """Makes the graph invalid: the relu reads a node defined after it."""

    name = "break_graph"
    requires = ()

    def run(self, gm, ctx):
        nodes = list(gm.graph.nodes)
        relu = next(n for n in nodes if n.op == "call_function" and n.target is torch.relu)
        out = nodes[-1]
        with gm.graph.inserting_before(out):
            late = gm.graph.call_function(operator.neg, (relu,))
        relu.args = (late,)
        return PassResult(gm, True, {})


def test_modified_graph_is_linted():
    log: list[str] = []
    ctx = _ctx()
    with pytest.raises(PassError, match="pass 'break_graph' failed") as info:
        PassManager([Probe("a", (), log), _BreakGraph(), Probe("after", (), log)]).run(_gm(), ctx)
    assert info.value.before == ("a",)
    assert log == ["a"]


# -- user passes through qcompiler.backend -----------------------------------------------------
class CountLinears:
    """An analysis pass: counts the planned linears and how many get quantized."""

    name = "count_linears"
    requires = ("annotate",)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        plan = ctx.layer_plan.values()
        kinds = {d.op_kind for d in plan}
        stats = {"linears": len(plan), "quantized": sum(d.quantize for d in plan),
                 "output_heads": sum(d.op_kind == "output_head" for d in plan), "kinds": len(kinds)}
        return PassResult(gm, False, stats)


def _compile_and_run(recipe, passes=()):
    torch._dynamo.reset()
    model = tiny_model("llama")
    qb = qcompiler.backend(recipe, passes=passes, progress=False)
    compiled = torch.compile(model, backend=qb, dynamic=False)
    with torch.inference_mode():
        logits = compiled(input_ids=token_batches(1, 12, seed=3)[0]).logits
    torch._dynamo.reset()
    return compiled, logits


def test_custom_pass_runs_under_torch_compile():
    compiled, logits = _compile_and_run("w8a16", passes=[CountLinears()])
    rep = qcompiler.report(compiled)
    names = [p["name"] for p in rep.passes]
    assert names == [p.name for p in default_passes()] + ["count_linears"]
    mine = rep.passes[-1]
    # tiny llama: 2 layers x 7 linears + lm_head; the head stays float by default
    assert mine["stats"] == {"linears": 15, "quantized": 14, "output_heads": 1, "kinds": 2}
    assert mine["modified"] is False
    assert len(rep.quantized) == 14
    # an analysis pass changes nothing in the result
    _, plain = _compile_and_run("w8a16")
    assert torch.equal(logits, plain)


def test_keep_modules_glob_keeps_down_proj_in_float():
    recipe = recipes.get("w8a16").replace(name="w8a16-keep-down",
                                          fallback=FallbackSpec(keep_modules=("*.mlp.down_proj",)))
    compiled, logits = _compile_and_run(recipe, passes=[CountLinears()])
    rep = qcompiler.report(compiled)
    assert rep.recipe == "w8a16-keep-down"
    down = {f: d for f, d in rep.layers.items() if f.endswith(".mlp.down_proj")}
    assert sorted(down) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    for d in down.values():
        assert not d.quantize
        assert d.reason == "module path matches fallback.keep_modules glob '*.mlp.down_proj'"
    others = [d for f, d in rep.layers.items() if f not in down and d.op_kind == "linear"]
    assert len(others) == 12 and all(d.quantize for d in others)
    stats = {p["name"]: p["stats"] for p in rep.passes}
    assert stats["fallback_rules"]["kept_by_rules"] == 3        # 2 down_proj + lm_head
    assert stats["fuse"]["weight_only_gemm"] == 12
    assert stats["count_linears"]["quantized"] == 12
    assert "keep_modules glob '*.mlp.down_proj'" in rep.summary()
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("target", ["reference", "inductor", "triton"])
def test_every_default_pass_declares_the_analyses_it_reads_and_writes(target):
    from qcompiler.passes import default_passes
    for p in default_passes(target):
        assert isinstance(getattr(p, "reads", None), tuple) and isinstance(getattr(p, "writes", None), tuple), p.name
