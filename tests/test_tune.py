"""passes/tune.py and passes/program_check.py: compile(tune="measure") with a fake timer (deterministic, fast), the
candidate programs it times, the cache, the whole-program check and what summary() says."""

import functools
import gc
import json

import pytest
import torch

import stfuse
from stfuse import config, zoo
from stfuse.errors import StfuseError
from stfuse.kernels import timing
from stfuse.kernels.bind import bind
from stfuse.passes import pipeline, program_check, tune
from stfuse.passes.lower import lower
from stfuse.passes.cost import MARGIN

from stfuse.tolerances import assert_close

from conftest import check_tenants, tenant_graph


class FakeTimer:
    """Stands in for timing.time_pair: runs both callables once (they must work), records
    what it was asked to time, and answers from ``prices(what) -> (fused us, apart us)``."""

    def __init__(self, prices):
        self.prices, self.calls = prices, []

    def __call__(self, first, second, device, what="", budget_ms=None, decide_at=1.0):
        with torch.no_grad():
            first(), second()
        self.calls.append(what)
        return self.prices(what)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """The machine counts as quiet, so measurements are cached whatever the load now."""
    monkeypatch.setattr(timing, "busy", lambda: None)


def _conv_loses(what):
    if what == "program":
        return 100.0, 200.0  # the whole fused program wins
    if what == "program-matched":
        return 200.0, 100.0  # and beats every group as matched (the conv groups too)
    return (80.0, 50.0) if what.startswith("conv2d") else (30.0, 50.0)


@pytest.fixture
def timer(monkeypatch, tmp_path):
    """A fresh cache directory and a fake timer where fused conv groups lose."""
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    fake = FakeTimer(_conv_loses)
    monkeypatch.setattr(timing, "time_pair", fake)
    return fake


def _tenants():
    torch.manual_seed(0)
    models = [zoo.mlp(16, 32, 4), zoo.mlp(16, 32, 4), zoo.cnn(4), zoo.cnn(4)]
    args = [(torch.randn(2, 16),), (torch.randn(2, 16),), (torch.randn(2, 3, 8, 8),), (torch.randn(2, 3, 8, 8),)]
    return models, args


def _compile(models, args, tune_mode="measure"):
    return stfuse.compile(models, [a[0] for a in args], tune=tune_mode)


def test_a_group_whose_fused_time_is_worse_is_dropped(timer):
    models, args = _tenants()
    fused = _compile(models, args)
    classes = {grp.op_class for grp in fused.plan.groups.values()}
    assert "linear" in classes and "conv2d" not in classes
    rows = fused.plan.stats["tuning"]["groups"]
    conv_rows = [r for r in rows.values() if r["fused_us"] == 80.0]
    assert conv_rows and all(r["decision"] == "apart" and r["source"] == "measured" for r in conv_rows)
    assert any(r["decision"] == "fused" for r in rows.values())
    check_tenants(fused, models, args)


def test_a_group_must_win_by_the_margin(monkeypatch, tmp_path):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    # fused saves half the margin: not enough
    monkeypatch.setattr(timing, "time_pair", FakeTimer(lambda what: (100.0, 100.0 / (1 - MARGIN / 2))))
    models, args = _tenants()
    fused = _compile(models, args)
    assert fused.plan.stats["fused_groups"] == 0
    assert all(r["decision"] == "apart" for r in fused.plan.stats["tuning"]["groups"].values())


def test_second_compile_of_the_same_shapes_times_nothing(timer):
    models, args = _tenants()
    first = _compile(models, args)
    assert timer.calls and "program" in timer.calls
    timer.calls.clear()
    torch.manual_seed(1)  # other weights, same shapes: the same measurements apply
    others = [zoo.mlp(16, 32, 4), zoo.mlp(16, 32, 4), zoo.cnn(4), zoo.cnn(4)]
    second = _compile(others, args)
    assert timer.calls == []
    assert set(second.plan.groups) == set(first.plan.groups)
    t = second.plan.stats["tuning"]
    assert {r["source"] for r in t["groups"].values()} == {"cached"}
    assert t["program"]["source"] == "cached"
    check_tenants(second, others, args)


def test_timings_taken_while_busy_are_used_but_not_kept(timer, monkeypatch):
    monkeypatch.setattr(timing, "busy", lambda: "load average 7.0 on 2 CPUs")
    models, args = _tenants()
    fused = _compile(models, args)
    assert "conv2d" not in {grp.op_class for grp in fused.plan.groups.values()}  # used
    assert fused.plan.stats["tuning"]["unsaved"] == "load average 7.0 on 2 CPUs"
    assert "timed while busy (load average 7.0 on 2 CPUs): not cached" in fused.plan.summary()
    assert not (config.cache_dir() / "tuning").exists()
    calls = len(timer.calls)
    monkeypatch.setattr(timing, "busy", lambda: None)
    _compile(models, args)
    assert len(timer.calls) == 2 * calls  # timed again, all of it


def test_other_shapes_are_timed_again(timer):
    models, args = _tenants()
    _compile(models, args)
    timer.calls.clear()
    torch.manual_seed(0)
    wider = [zoo.mlp(16, 48, 4), zoo.mlp(16, 48, 4)]
    _compile(wider, [(torch.randn(2, 16),), (torch.randn(2, 16),)])
    assert any(w.startswith("linear") for w in timer.calls)


@pytest.mark.parametrize("garbage", ["{not json", json.dumps({"version": 1, "entries": {"k": {"fused_us": "x"}}}),
                                     json.dumps([1, 2, 3])])
def test_a_corrupt_cache_file_is_ignored(timer, garbage):
    models, args = _tenants()
    _compile(models, args)
    files = list((config.cache_dir() / "tuning").glob("*.json"))
    assert len(files) == 1
    files[0].write_text(garbage)
    timer.calls.clear()
    fused = _compile(models, args)
    assert timer.calls  # measured again
    check_tenants(fused, models, args)
    data = json.loads(files[0].read_text())  # and the file is whole again
    assert data["version"] == timing.CACHE_VERSION and data["entries"]


def test_whole_program_fallback_runs_the_tenants_apart(monkeypatch, tmp_path):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    fake = FakeTimer(lambda what: (300.0, 200.0) if what.startswith("program") else (30.0, 50.0))
    monkeypatch.setattr(timing, "time_pair", fake)
    models, args = _tenants()
    fused = _compile(models, args)
    assert fused.plan.stats["fused_groups"] == 0 and not fused.plan.groups
    assert "stfuse" not in fused.canonical_program.code  # only the tenants' own ops
    assert fused.plan.stats["tuning"]["program"] == {"fused_us": 300.0, "apart_us": 200.0, "matched_us": 300.0,
                                                     "decision": "apart", "source": "measured"}
    check_tenants(fused, models, args)
    outs = fused.run({"2": args[2][0]})  # subsets lower from the unfused plan too
    assert outs["2"].shape == (2, 10)
    text = fused.plan.summary()
    assert ("whole program: fused 300 us, apart 200 us, every group as matched 300 us: fused is not faster: "
            "every tenant runs apart") in text
    fake.calls.clear()
    again = _compile(models, args)  # cached, the matched plan's loss too: nothing timed, the same plan
    assert not fake.calls and again.plan.stats["tuning"]["program"] == {
        "fused_us": 300.0, "apart_us": 200.0, "matched_us": 300.0, "decision": "apart", "source": "cached"}


@pytest.mark.parametrize("plan_us", [(100.0, 200.0), (300.0, 200.0)])
def test_every_group_as_matched_wins_where_the_dropped_groups_paid_together(monkeypatch, tmp_path, plan_us):
    # the conv groups lose their own timings, and the program without them is then slower than
    # every group as matched (chains of groups lose less apart than together): check_program
    # keeps the matched plan, whether the measured one kept its linear groups or ran apart
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))

    def prices(what):
        if what == "program":
            return plan_us
        if what == "program-matched":
            return 80.0, min(plan_us)  # against the winner of the first pair, by more than the margin
        return (80.0, 50.0) if what.startswith("conv2d") else (30.0, 50.0)

    fake = FakeTimer(prices)
    monkeypatch.setattr(timing, "time_pair", fake)
    bound = []
    monkeypatch.setattr(program_check, "bind", _counting(program_check.bind, bound, lambda gm, *_: gm))
    models, args = _tenants()
    fused = _compile(models, args)
    assert "program-matched" in fake.calls
    assert len({id(gm) for gm in bound}) == len(bound)  # no program bound twice (the plan is in both pairs)
    assert {grp.op_class for grp in fused.plan.groups.values()} >= {"linear", "conv2d"}
    program = fused.plan.stats["tuning"]["program"]
    assert program["decision"] == "matched" and program["matched_us"] == 80.0
    assert "every group as matched" in fused.plan.summary()
    check_tenants(fused, models, args)
    fake.calls.clear()
    lowered = []
    monkeypatch.setattr(pipeline, "PASSES", [_counting(p, lowered) if p is lower else p for p in pipeline.PASSES])
    monkeypatch.setattr(program_check, "lower", _counting(lower, lowered))
    again = _compile(models, args)  # cached: nothing timed, the same plan, lowered once (program_check.chosen_before)
    assert not fake.calls and again.plan.stats["tuning"]["program"]["decision"] == "matched"
    assert again.plan.stats["tuning"]["program"]["source"] == "cached"
    assert len(lowered) == 1
    assert _group_members(again) == _group_members(fused)
    check_tenants(again, models, args)


def _counting(fn, calls: list, what=None):
    """fn, appending to ``calls`` its name (or ``what(*args)``) at every call."""
    @functools.wraps(fn)
    def counted(*a, **kw):
        calls.append(fn.__name__ if what is None else what(*a))
        return fn(*a, **kw)
    return counted


def _group_members(fused) -> list:
    return sorted(tuple(grp.members) for grp in fused.plan.groups.values())


@pytest.mark.parametrize("decision", ["fused", "matched", "apart"])
def test_the_program_timed_is_the_program_run_not_bound_again(monkeypatch, tmp_path, decision):
    # the check bound the plan it chose to time it; the FusedProgram takes that one (its
    # packed weights too) rather than binding it again; a plan it did not time (the
    # tenants apart, lowered anew) is bound as usual
    from stfuse import program as program_module

    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    program = {"fused": (100.0, 200.0), "matched": (100.0, 200.0), "apart": (300.0, 200.0)}[decision]
    matched = (50.0, 100.0) if decision == "matched" else (200.0, 100.0)
    prices = {"program": program, "program-matched": matched}
    monkeypatch.setattr(timing, "time_pair", FakeTimer(lambda what: prices.get(what) or _conv_loses(what)))
    checked, run = [], []
    monkeypatch.setattr(program_check, "bind", _counting(program_check.bind, checked, lambda gm, *_: gm))
    monkeypatch.setattr(program_module, "bind", _counting(program_module.bind, run, lambda gm, *_: gm))
    models, args = _tenants()
    fused = _compile(models, args)
    assert fused.plan.stats["tuning"]["program"]["decision"] == decision
    assert (fused.canonical_program in checked) == (decision != "apart")
    assert run == ([fused.canonical_program] if decision == "apart" else [])
    assert "bound" not in fused.graph.graph  # taken: a rebind (set_codegen) lets it go
    check_tenants(fused, models, args)


def test_the_self_checks_ungrouped_tenants_are_not_offered_again():
    # selfcheck's fallback takes failing tenants out of every group (passes/ungroup.py): the
    # matched groups check_program could otherwise bring back go with them
    import networkx as nx

    from stfuse.passes.ungroup import ungroup

    g = nx.DiGraph()
    g.graph.update(groups={}, matched=nx.DiGraph(), matched_key="k", matched_chosen=True)
    out = ungroup({"a"})(g).graph
    assert not {"matched", "matched_key", "matched_chosen"} & out.keys() and "matched" in g.graph


@pytest.mark.parametrize("program_wins", [True, False])
def test_every_pass_output_verifies_in_measure_mode(monkeypatch, tmp_path, program_wins):
    from stfuse.api import compile_tenants
    from stfuse.frontend import trace_tenant

    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    prices = (100.0, 200.0) if program_wins else (300.0, 200.0)
    monkeypatch.setattr(timing, "time_pair", FakeTimer(lambda what: prices if what.startswith("program") else (30.0, 50.0)))
    models, args = _tenants()
    fused = compile_tenants({str(i): trace_tenant(str(i), m, a) for i, (m, a) in enumerate(zip(models, args))},
                            verify=True, tune="measure")
    assert (fused.plan.stats["fused_groups"] > 0) == program_wins
    check_tenants(fused, models, args)


@pytest.mark.parametrize("collecting", [True, False])
def test_the_program_check_pauses_the_collector_and_leaves_it_as_it_was(timer, monkeypatch, collecting):
    enabled = []  # gc.isenabled() at each timing: the candidates' (not paused) and the program's
    fake = timer.prices
    monkeypatch.setattr(timer, "prices", lambda what: enabled.append((what, gc.isenabled())) or fake(what))
    models, args = _tenants()
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        _compile(models, args)
        after = gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    assert after == collecting
    assert [on for what, on in enabled if what.startswith("program")] == [False, False]
    assert collecting in {on for what, on in enabled if not what.startswith("program")}


def test_a_program_check_that_fails_leaves_the_collector_on(monkeypatch, tmp_path):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))

    def prices(what):
        if what.startswith("program"):
            raise RuntimeError("the device went away")
        return 30.0, 50.0

    monkeypatch.setattr(timing, "time_pair", FakeTimer(prices))
    models, args = _tenants()
    assert gc.isenabled()
    with pytest.raises(stfuse.PassError, match="check_program failed.*the device went away"):
        _compile(models, args)
    assert gc.isenabled()


def test_the_program_check_takes_examples_of_other_batch_sizes(timer):
    """Tenants compiled at batch 2 and 3 (the README's first example, as users write it):
    the stacked program takes one batch, so the program check times the examples resized
    to one; it crashed the compile (a PassError from torch.stack) before."""
    torch.manual_seed(0)
    models = [zoo.mlp(16, 32, 4), zoo.mlp(16, 32, 4)]
    args = [(torch.randn(2, 16),), (torch.randn(3, 16),)]
    fused = _compile(models, args)
    assert "program" in timer.calls and fused.plan.stats["fused_groups"] > 0
    check_tenants(fused, models, args)


def test_the_program_check_takes_examples_of_other_lengths(timer):
    """Two BERTs sharing a declared "seq", compiled at lengths 8 and 5: timed at one
    length; codegen="auto" times the same call."""
    from conftest import bert_call, float64_call_reference

    models = {"a": zoo.hf_model("bert", 0)[0], "b": zoo.hf_model("bert", 1)[0]}
    calls = {"a": bert_call(2, 8), "b": bert_call(2, 5, seed=1)}
    seq = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    fused = stfuse.compile(models, calls, dynamic={"a": seq, "b": seq}, tune="measure", codegen="auto")
    assert "program" in timer.calls and fused.plan.stats["codegen"]["source"] == "measured"
    outs = fused.run(calls)
    for name, call in calls.items():
        assert_close(outs[name], float64_call_reference(models[name], call), msg=f"tenant {name}")


def test_no_program_check_where_fixed_batches_differ():
    """Tenants whose batch is fixed (a model that branches on it) at 2 and 3: no one call
    fits the stacked program, so there is nothing to time it on."""
    torch.manual_seed(0)
    g = tenant_graph([zoo.mlp(16, 32, 4), zoo.mlp(16, 32, 4)], [(torch.randn(2, 16),), (torch.randn(3, 16),)])
    assert program_check._flat_examples(g) is not None  # dynamic batches: resized to one
    for tg, batch in zip(g.graph["tenants"].values(), (2, 3)):
        tg.dynamic, tg.batch = False, batch
    assert program_check._flat_examples(g) is None


def test_summary_says_what_was_timed_and_decided(timer):
    models, args = _tenants()
    text = _compile(models, args).plan.summary()
    lines = text.splitlines()
    assert lines[0].endswith("us fused/apart")
    assert any(ln.split()[-1] == "30/50" for ln in lines[1:] if ln.startswith(("g", "h")))
    tune_line = next(ln for ln in lines if ln.startswith("tune measure:"))
    assert "0 from cache" in tune_line and "0 by the cost model" in tune_line
    assert f"saves over {MARGIN:.0%}" in tune_line and "run apart" in tune_line
    assert any(ln.startswith("  run apart (us fused/apart):") and "80/50" in ln for ln in lines)
    assert "whole program: fused 100 us, apart 200 us, every group as matched 200 us: fused kept (2.00x)" in text
    again = _compile(models, args).plan.summary()
    assert "whole program (cached)" in again and "0 timed" in again


def test_off_keeps_every_group_the_matcher_forms(timer):
    models, args = _tenants()
    off = _compile(models, args, "off")
    assert timer.calls == []
    measured = _compile(models, args)
    assert off.plan.stats["coverage"] == 1.0  # same-architecture pairs: every fusable op
    assert measured.plan.stats["fused_ops"] < off.plan.stats["fused_ops"]
    assert {r["decision"] for r in off.plan.stats["tuning"]["groups"].values()} == {"fused"}
    assert "tune off: every group the matcher formed is kept" in off.plan.summary()
    check_tenants(off, models, args)


def test_model_mode_times_nothing(timer):
    models, args = _tenants()
    fused = _compile(models, args, "model")
    assert timer.calls == []
    t = fused.plan.stats["tuning"]
    assert t["mode"] == "model" and t["program"] is None
    assert {r["source"] for r in t["groups"].values()} == {"model"}


def test_tune_mode_is_checked_and_read_from_the_environment(monkeypatch, timer):
    models, args = _tenants()
    with pytest.raises(StfuseError, match="tune must be one of"):
        _compile(models, args, "fast")
    monkeypatch.setenv("STFUSE_TUNE", "off")
    assert config.tune_mode() == "off"
    assert stfuse.compile(models[:2], [a[0] for a in args[:2]]).plan.stats["tuning"]["mode"] == "off"
    monkeypatch.setenv("STFUSE_TUNE", "sometimes")
    with pytest.raises(StfuseError, match="STFUSE_TUNE must be one of"):
        config.tune_mode()


# ---------------------------------------------------------------------------- candidate programs


def _matched(models, args):
    g = tenant_graph(models, args)
    for p in pipeline.PASSES[:pipeline.PASSES.index(pipeline.drop_unprofitable)]:
        g = p(g)
    return g


def _flat(out):
    return [t for y in out for t in (y.unbind(0) if len(out) == 1 else (y,))]


@pytest.mark.parametrize("packed", [False, True])
def test_candidate_programs_compute_what_the_members_compute(packed):
    models, args = _tenants()
    g = _matched(models, args)
    assert {grp.op_class for grp in g.graph["groups"].values()} >= {"linear", "conv2d", "pointwise"}
    cpu = torch.device("cpu")
    for grp in g.graph["groups"].values():
        fused, apart, specs = tune.candidate_programs(g, grp.members, packed=packed)
        inputs = tune._inputs(specs, cpu)
        with torch.no_grad():
            want = torch.fx.GraphModule(apart[1], apart[0])(*inputs)
            got = _flat(torch.fx.GraphModule(fused[1], fused[0])(*inputs))
            # what measure_group times: each (graph, root) pair bound, and consumed, by bind
            bound = [bind(program, cpu) for program in tune.candidate_programs(g, grp.members, packed=packed)[:2]]
            got_bound, want_bound = _flat(bound[0].forward(*inputs)), bound[1].forward(*inputs)
        assert len(got) == len(want) == len(got_bound) == len(want_bound) == len(grp.members)
        for a, b, c, d in zip(got, want, got_bound, want_bound):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(d, b, rtol=1e-4, atol=1e-4)


def test_keys_ignore_names_and_weight_values_but_not_shapes():
    models, args = _tenants()
    g = _matched(models, args)
    keys = {gid: tune.candidate_key(g, grp.members) for gid, grp in g.graph["groups"].items()}
    linear = [k for gid, k in keys.items() if g.graph["groups"][gid].op_class == "linear"]
    assert len(set(linear)) == len(linear) >= 3  # 16->32, 32->32, 32->4 differ
    torch.manual_seed(5)  # other weights, same shapes
    other = _matched([zoo.mlp(16, 32, 4), zoo.mlp(16, 32, 4), zoo.cnn(4), zoo.cnn(4)], args)
    assert {tune.candidate_key(other, grp.members) for grp in other.graph["groups"].values()} == set(keys.values())
    # the program key: the same program text under other node names and weights
    programs = []
    for g_ in (g, other):
        for p in pipeline.PASSES[pipeline.PASSES.index(pipeline.drop_unprofitable):-1]:
            g_ = p(g_)
        gm = g_.graph["program"][0]
        programs.append(tune.program_key([(gm.graph, gm)], []))
    assert programs[0] == programs[1]
    wide = _matched([zoo.mlp(16, 48, 4), zoo.mlp(16, 48, 4)], args[:2])
    assert not {tune.candidate_key(wide, grp.members) for grp in wide.graph["groups"].values()} & set(keys.values())


def test_a_candidate_that_cannot_be_built_is_priced_by_the_model(monkeypatch, timer):
    monkeypatch.setattr(tune, "candidate_programs", lambda g, members, packed=False: None)
    models, args = _tenants()
    fused = _compile(models, args)
    assert [w for w in timer.calls if not w.startswith("program")] == []
    assert {r["source"] for r in fused.plan.stats["tuning"]["groups"].values()} == {"model"}
    check_tenants(fused, models, args)


def test_measure_profile_is_measured_once_per_device(monkeypatch, tmp_path):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "busy", lambda: None)  # cached whatever else runs on the machine
    calls = []

    def fake_median(fn, device, budget_ms=None):
        fn()
        calls.append(fn)
        return [6.0, 10.0, 45.0, 1340.0, 800.0][len(calls) - 1]  # launch, 1, 8 members, gemm, copy

    monkeypatch.setattr(timing, "median_us", fake_median)
    prof = tune.measure_profile(torch.device("cpu"))
    assert prof == pytest.approx({"launch_us": 6.0, "member_us": 5.0, "gflops": 2 * 128 * 512 * 512 / 1340e3,
                                  "gbps": 8 * 2 ** 20 / 800e3})
    assert tune.measure_profile(torch.device("cpu")) == prof and len(calls) == 5
