"""stfuse.serve.placement and place_sim: descriptions from the compiler's own passes, the
fusion model against the matcher, the planner's guarantees (deterministic, memory, SLO,
co-location, splitting hot tenants, clear errors), the fake-clock comparison with
round-robin, and ``stfuse place``."""

import json
import math
import random

import pytest
import torch

from stfuse import StfuseError, ir, zoo
from stfuse.cli import main
from stfuse.frontend import trace_tenant
from stfuse.passes import pipeline
from stfuse.passes.annotate import annotate
from stfuse.passes.match import match_groups
from stfuse.passes.normalize import normalize
from stfuse.serve import PlacementPlan, TenantDesc, describe, plan_placement
from stfuse.serve import place_sim
from stfuse.serve.placement import FusionModel, device_model, pressure

MB = 2**20
LAUNCH = device_model("cuda").launch_us * 1e-6


def _desc(name, arch, ops=4, fixed=100e-6, per_row=5e-6, mb=1.0, rate=100.0, slo_ms=5.0, cls="linear"):
    """A hand-made description: ``ops`` linear ops whose shapes are the architecture's own."""
    keys = tuple((cls, f"('{cls}', torch.float32, 'cuda')", f"{arch}:{i}") for i in range(ops))
    return TenantDesc(name, arch, keys, ops + 1, int(mb * MB), fixed, per_row, rate, slo_ms / 1e3)


def _population(archs=3, per_arch=4, rate=100.0, **kw):
    return [_desc(f"{chr(97 + a)}{i}", f"arch{a}", rate=rate, **kw) for a in range(archs) for i in range(per_arch)]


# ----------------------------------------------------------------------------- describe


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ms = {"mlp_a": zoo.mlp(16, 32, 4), "mlp_b": zoo.mlp(16, 32, 4), "wide": zoo.mlp(16, 48, 4), "cnn": zoo.cnn(4)}
    xs = {n: (torch.randn(1, 16),) for n in ("mlp_a", "mlp_b", "wide")}
    xs["cnn"] = (torch.randn(1, 3, 8, 8),)
    return ms, xs


@pytest.fixture(scope="module")
def described(models):
    return {d.name: d for d in describe(*models, device="cuda")}


def test_describe_keys_architectures_by_the_compilers_own_match_keys(models, described):
    ms, _ = models
    a, b, wide, cnn = (described[n] for n in ("mlp_a", "mlp_b", "wide", "cnn"))
    assert a.arch == b.arch and a.ops == b.ops  # other weights, same architecture
    assert wide.arch != a.arch and cnn.arch != a.arch
    assert [op[0] for op in a.ops] == ["linear", "pointwise", "linear", "pointwise", "linear"]
    assert a.param_bytes == sum(p.numel() * 4 for p in ms["mlp_a"].parameters())
    assert a.launches == 5 and a.fixed_s >= 5 * LAUNCH and a.per_row_s > 0
    assert wide.per_row_s > a.per_row_s  # more FLOPs per row


def test_describe_takes_a_compiled_program_and_a_measured_profile(models, described):
    from stfuse.runtime.profile import LatencyProfile

    ms, xs = models
    fused = __import__("stfuse").compile({"mlp_a": ms["mlp_a"], "cnn": ms["cnn"]}, {"mlp_a": xs["mlp_a"], "cnn": xs["cnn"]},
                                         tune="off")
    prof = LatencyProfile({"mlp_a": 1e-3}, {"mlp_a": 2e-5})
    got = {d.name: d for d in describe(fused, rates={"cnn": 7.0}, slo_ms={"cnn": 9.0}, profile=prof, device="cuda")}
    assert got["mlp_a"].ops == described["mlp_a"].ops and got["cnn"].arch == described["cnn"].arch
    assert (got["mlp_a"].fixed_s, got["mlp_a"].per_row_s) == (1e-3, 2e-5)  # measured where the profile has it
    assert got["cnn"].fixed_s == pytest.approx(described["cnn"].fixed_s)  # the cost model elsewhere
    assert (got["cnn"].rate, got["cnn"].slo_s, got["mlp_a"].slo_s) == (7.0, 0.009, math.inf)
    with pytest.raises(StfuseError, match=r"rates: unknown tenant\(s\) \['nope'\]"):
        describe(fused, rates={"nope": 1.0})
    plan = plan_placement(fused, 2, 8 * MB, rates={"mlp_a": 10.0}, slo_ms={"mlp_a": 50.0, "cnn": 50.0})
    assert sorted(plan.hosts) == ["cnn", "mlp_a"] and plan.tenants["mlp_a"].rate == 10.0


def test_fusion_model_columns_are_the_matchers_groups(models, described):
    ms, xs = models
    names = ["mlp_a", "wide", "cnn"]
    tenants = {n: trace_tenant(n, ms[n], xs[n]) for n in names}
    g, _ = pipeline.run(ir.build(tenants), passes=[normalize, annotate, match_groups])
    fusion = FusionModel([described[n] for n in names], "cuda")
    cols = fusion.columns(tuple(sorted(described[n].arch for n in names)))
    assert sorted(len(c) for c in cols if len(c) > 1) == sorted(len(grp.members) for grp in g.graph["groups"].values())


def test_fusion_model_prices_shared_launches_as_the_cost_pass():
    a0, a1, b0 = _desc("a0", "A"), _desc("a1", "A"), _desc("b0", "B")
    cuda, cpu = FusionModel([a0, b0], "cuda"), FusionModel([a0, b0], "cpu")
    # same architecture: every fusable op joins one launch
    assert cuda.fused_fixed([a0, a1]) == pytest.approx(2 * a0.fixed_s - 4 * LAUNCH)
    assert cuda.fused_fixed([a0, a1, _desc("a2", "A")]) == pytest.approx(3 * a0.fixed_s - 8 * LAUNCH)
    # other shapes: a grouped launch saves on CUDA (member_us = 0); on CPU two members' loop costs more
    assert cuda.fused_fixed([a0, b0]) == pytest.approx(2 * a0.fixed_s - 4 * LAUNCH)
    assert cpu.fused_fixed([a0, b0]) == pytest.approx(2 * a0.fixed_s)
    assert cuda.fused_fixed([a0, _desc("c0", "C", cls="conv2d")]) == pytest.approx(2 * a0.fixed_s)  # nothing aligns


# ----------------------------------------------------------------------------- the planner


def test_plan_is_deterministic_and_independent_of_input_order():
    pop = [_desc(f"t{i}", f"arch{i % 5}", rate=50.0 * (1 + i % 7), mb=1 + i % 3) for i in range(40)]
    first = plan_placement(pop, 6, 16 * MB)
    shuffled = list(pop)
    random.Random(1).shuffle(shuffled)
    again = plan_placement(shuffled, 6, 16 * MB)
    assert first.hosts == again.hosts and first.table() == again.table()


def test_memory_budget_is_respected():
    pop = [_desc(f"t{i}", f"arch{i % 4}", mb=1 + i % 5) for i in range(30)]  # 88 MB of weights
    plan = plan_placement(pop, 8, 12 * MB)
    assert all(r.memory_bytes <= 12 * MB for r in plan.rows) and plan.over_budget == 0
    assert sorted(t for r in plan.rows for t in r.tenants) == sorted(d.name for d in pop)


def test_same_architecture_tenants_share_a_replica_when_load_allows():
    plan = plan_placement(_population(archs=3, per_arch=4), 3, 64 * MB)
    assert sorted(r.archs for r in plan.rows) == [("arch0",), ("arch1",), ("arch2",)]
    assert all(len(r.tenants) == 4 for r in plan.rows)
    assert all(r.fixed_fused_s < r.fixed_apart_s for r in plan.rows)
    assert plan.max_pressure <= 1.0


def test_load_spreads_an_architecture_that_one_replica_cannot_hold():
    # 8 tenants of one architecture at 3000 requests/s: 0.12 of the device each in rows
    plan = plan_placement([_desc(f"a{i}", "A", rate=3000.0) for i in range(8)], 4, 64 * MB)
    assert max(r.utilization for r in plan.rows) < 0.5 and plan.max_pressure <= 1.0
    assert sum(bool(r.tenants) for r in plan.rows) >= 2


def test_a_hot_tenant_is_split_over_distinct_replicas():
    hot = _desc("hot", "A", rate=150_000.0)  # 0.75 of a device in rows alone
    plan = plan_placement([hot] + _population(archs=2, per_arch=2), 4, 64 * MB)
    assert len(plan.hosts["hot"]) == len(set(plan.hosts["hot"])) >= 2
    assert plan.rate_on("hot") == pytest.approx(150_000.0 / len(plan.hosts["hot"]))
    assert "split over replicas: hot ->" in plan.table()


@pytest.mark.parametrize("change, message", [
    (dict(memory=0.5 * MB), r"tenant 'a0' needs 1.00 MB, more than the memory budget of 0.50 MB"),
    (dict(memory=3 * MB), r"weights take 12.0 MB against 2 x 3.0 MB"),
    (dict(slo_ms={"b1": 0.1}), r"tenant 'b1': SLO 0.100 ms is below twice its latency alone"),
    (dict(rates={"a0": 10**7}), r"tenant 'a0': 10000000.0 requests/s need more than 2 replicas"),
    (dict(rates={"zz": 1.0}), r"rates: unknown tenant\(s\) \['zz'\]"),
    (dict(replicas=0), r"replicas must be a positive integer, got 0"),
])
def test_infeasible_inputs_raise_clear_errors(change, message):
    kw = dict(replicas=2, memory=64 * MB, rates=None, slo_ms=None)
    kw.update(change)
    with pytest.raises(StfuseError, match=message):
        plan_placement(_population(archs=3, per_arch=4), kw["replicas"], kw["memory"], rates=kw["rates"],
                       slo_ms=kw["slo_ms"])


def test_too_much_load_for_the_replicas_is_refused():
    # every tenant fits alone, but 12 of them at 0.3 of a device each do not fit on 2 replicas
    with pytest.raises(StfuseError, match="no placement of 12 tenants on 2 replicas keeps every SLO"):
        plan_placement(_population(archs=3, per_arch=4, rate=60_000.0), 2, 64 * MB)


def test_pressure_is_the_queueing_bound():
    assert pressure(1e-3, 0.5, 8e-3) == pytest.approx(0.5)  # cycle 2 ms, latency within 4 ms of 8
    assert pressure(1e-3, 0.6, math.inf) == 0.6 and pressure(1e-3, 1.0, 1.0) == math.inf


def test_table_explains_every_replica_and_json_round_trips():
    plan = plan_placement(_population(archs=2, per_arch=3), 3, 64 * MB)
    lines = plan.table().splitlines()
    assert lines[0].startswith("placement planner: 6 tenants on 3 replicas")
    assert "pressure" in lines[1] and len(lines) == 2 + 3 + 1
    assert lines[-1].startswith("fused fixed ") and "max pressure" in lines[-1]
    data = json.loads(json.dumps(plan.to_json()))
    assert {t: tuple(h) for t, h in data["hosts"].items()} == plan.hosts
    d = _desc("x", "A", slo_ms=math.inf)
    assert TenantDesc.from_json(json.loads(json.dumps(d.to_json()))) == d
    with pytest.raises(StfuseError, match="tenant description 'y'"):
        TenantDesc.from_json({"name": "y"})


# ----------------------------------------------------------------------------- the simulation


def test_zipf_population_spreads_architectures_and_rates():
    archs = [_desc("rep", f"arch{a}") for a in range(4)]
    pop = place_sim.zipf_population(archs, 40, 1000.0, seed=3)
    assert sum(d.rate for d in pop) == pytest.approx(1000.0)
    assert sorted(sum(d.arch == f"arch{a}" for d in pop) for a in range(4)) == [10] * 4
    rates = sorted((d.rate for d in pop), reverse=True)
    assert rates[0] / rates[1] == pytest.approx(2.0) and rates[0] / rates[-1] == pytest.approx(40.0)


def test_planner_is_no_worse_than_round_robin_on_the_fake_clock():
    # 4 architectures x 6 tenants on 4 replicas, launch-bound (20 ops, 100 of 110 us in launches), tight
    # SLOs; no op of one architecture aligns with another's, so a mixed replica fuses little
    classes = ["linear", "conv2d", "layer_norm", "group_norm"]
    pop = [_desc(f"{chr(97 + a)}{i}", f"arch{a}", ops=20, fixed=110e-6, per_row=10e-6, rate=3000.0, slo_ms=1.0,
                 cls=classes[a]) for a in range(4) for i in range(6)]
    plan = plan_placement(pop, 4, 64 * MB)
    fusion = FusionModel(pop, "cuda")
    rr = place_sim.round_robin(pop, 4, 64 * MB, fusion)
    assert rr.summary()["archs_per_replica"] > plan.summary()["archs_per_replica"] == 1.0
    got = place_sim.simulate_plan(plan, fusion, duration_s=0.2, seed=1)
    base = place_sim.simulate_plan(rr, fusion, duration_s=0.2, seed=1)
    assert got.sent == base.sent > 0  # the same arrivals
    assert got.attainment >= base.attainment and got.attainment >= place_sim.ATTAINMENT
    assert base.attainment < 1.0  # round-robin's replicas miss some SLOs here


def test_compare_runs_every_placement_at_every_scale():
    pop = _population(archs=2, per_arch=4, rate=200.0)
    results = place_sim.compare(pop, 2, 64 * MB, [1.0, 300.0], duration_s=0.05)
    assert sorted(results) == ["planner", "random", "round-robin"]
    for name, entries in results.items():
        (s1, p1, o1), (s2, p2, o2) = entries
        assert (s1, s2) == (1.0, 300.0) and isinstance(p1, PlacementPlan) and o1.sent > 0
        if name == "planner":
            assert p2 is None and o2 is None  # no feasible plan at 300 times the load
        else:  # the baselines place it anyway, and miss
            assert isinstance(p2, PlacementPlan) and o2.attainment < place_sim.ATTAINMENT
    assert place_sim.throughput_at_slo([o for _, _, o in results["planner"]]) == pytest.approx(
        results["planner"][0][2].goodput_rps)


def test_random_placement_keeps_a_split_tenants_replicas_distinct():
    pop = [_desc("hot", "A", rate=150_000.0)] + _population(archs=2, per_arch=3)
    plan = plan_placement(pop, 4, 64 * MB)
    fusion = FusionModel(pop, "cuda")
    for seed in range(5):
        hosts = place_sim.random_placement(pop, 4, 64 * MB, fusion, seed).hosts
        assert len(set(hosts["hot"])) == len(plan.hosts["hot"])


# ----------------------------------------------------------------------------- stfuse place


def test_cli_place_from_descriptions(tmp_path, capsys):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps([d.to_json() for d in _population(archs=2, per_arch=2, rate=0.0)]))
    out = tmp_path / "plan.json"
    assert main(["place", str(path), "--replicas", "2", "--memory-mb", "64", "--rate", "50", "--rate", "a0=500",
                 "--slo-ms", "10", "--json", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "placement planner: 4 tenants on 2 replicas" in text
    plan = json.loads(out.read_text())
    assert sorted(plan["hosts"]) == ["a0", "a1", "b0", "b1"]
    assert [r["slo_s"] for r in plan["replicas"]] == [0.01, 0.01]


def test_cli_place_traces_factories(tmp_path, capsys):
    saved = tmp_path / "desc.json"
    assert main(["place", "stfuse.demo:tenants", "--replicas", "2", "--memory-mb", "4", "--rate", "100",
                 "--slo-ms", "20", "--save-descriptions", str(saved), "-q"]) == 0
    text = capsys.readouterr().out
    archs = {d["name"]: d["arch"] for d in json.loads(saved.read_text())}
    assert archs["mlp_a"] == archs["mlp_b"] != archs["cnn_a"] == archs["cnn_b"]
    rows = [ln for ln in text.splitlines()[2:4]]
    assert all(ln.split()[1:3] == ["2", "1"] for ln in rows), text  # two tenants, one architecture each


@pytest.mark.parametrize("args, message", [
    (["--memory-mb", "0.1"], "needs 1.00 MB, more than the memory budget of 0.10 MB"),
    (["--memory-mb", "64", "--rate", "zz=5"], r"rates: unknown tenant\(s\) \['zz'\]"),
    (["--memory-mb", "64", "--slo-ms", "-3"], r"--slo-ms '-3': expected \[NAME=\]NUMBER, a finite number > 0"),
    (["--memory-mb", "64", "--rate", "inf"], r"--rate 'inf': expected \[NAME=\]NUMBER, a finite number >= 0"),
    (["--memory-mb", "64", "--rate", "t0=nan"], r"--rate 't0=nan': expected"),
])
def test_cli_place_errors_are_one_line(tmp_path, capsys, args, message):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps([d.to_json() for d in _population(archs=1, per_arch=2)]))
    assert main(["place", str(path), "--replicas", "2", "-q", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stfuse place: error:") and len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_cli_place_refuses_an_artifact_with_a_reason(tmp_path, capsys):
    (tmp_path / "art").mkdir()
    assert main(["place", str(tmp_path / "art"), "--replicas", "1", "--memory-mb", "1"]) == 1
    assert "keeps no per-op graph" in capsys.readouterr().err


def test_descriptions_are_copies_not_shared_state():
    d = _desc("a", "A")
    plan = plan_placement([d], 1, 8 * MB, rates={"a": 5.0})
    assert d.rate == 100.0 and plan.tenants["a"].rate == 5.0


def test_cli_place_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["place", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: stfuse place") and "--memory-mb" in text and "--slo-ms" in text
