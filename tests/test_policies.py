"""Scheduling policies on a fake clock: decisions checked directly, and whole runs in `simulate`.

No threads, no sleeping: the simulated device's latencies come from a
LatencyProfile table, so every assertion here is exact and repeatable.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
from collections import deque
from types import SimpleNamespace

import pytest

from stfuse.errors import StfuseError
from stfuse.runtime.policies import POLICIES, Dispatch, Scheduler, Wait, make_scheduler
from stfuse.runtime.profile import LatencyProfile
from stfuse.runtime.simulate import SimRequest, simulate
from stfuse.runtime.stats import StatsRecorder, percentile

MS = 1e-3


def profile(tenants, fixed=1 * MS, per_row=0.1 * MS, fused_fixed=None, **extra) -> LatencyProfile:
    """Every tenant costs fixed + per_row * rows alone; fused_fixed prices the group of all of them."""
    fixed = fixed if isinstance(fixed, dict) else {t: fixed for t in tenants}
    per_row = per_row if isinstance(per_row, dict) else {t: per_row for t in tenants}
    table = {frozenset(tenants): fused_fixed} if fused_fixed is not None else {}
    return LatencyProfile(fixed, per_row, table, **extra)


def req(tenant, arrival, slo, rows=1) -> SimRequest:
    return SimRequest(tenant, arrival, arrival + slo, rows)


def queues(tenants, **pending) -> dict[str, deque]:
    return {t: deque(pending.get(t, [])) for t in tenants}


def scheduler(policy, tenants, prof=None, slice_s=2 * MS, max_batch=32, slo=None):
    if isinstance(slo, float):
        slo = {t: slo for t in tenants}
    return make_scheduler(policy, tenants, slice_s=slice_s, max_batch=max_batch,
                          profile=prof or profile(tenants), slo_s=slo)


def pop(qs, launch):
    for t, k in launch.take.items():
        for _ in range(k):
            qs[t].popleft()


# ------------------------------------------------------------------ profile


def test_profile_linear_model_and_fused_groups():
    prof = profile("abc", fixed=1 * MS, per_row=0.5 * MS, fused_fixed=1.5 * MS)
    assert prof.solo("a", 4) == pytest.approx(3 * MS)
    assert prof.estimate({"a": 4}) == pytest.approx(3 * MS)
    # the measured group: shared fixed cost plus every row
    assert prof.estimate({"a": 1, "b": 2, "c": 3}) == pytest.approx(1.5 * MS + 3 * MS)
    # a pair sits halfway between no sharing (ratio 1) and the triple's ratio 0.5
    assert prof.group_fixed(frozenset("ab")) == pytest.approx(2 * MS * 0.75)
    # no measurement at all: fused costs the sum of its members
    plain = profile("ab")
    assert plain.estimate({"a": 1, "b": 1}) == pytest.approx(plain.solo("a", 1) + plain.solo("b", 1))


def test_profile_pads_unequal_batches_only_where_that_is_cheaper():
    even = profile("ab", fixed=1 * MS, per_row=0.1 * MS, fused_fixed=1.5 * MS)
    assert even.pad_to({"a": 2, "b": 8}) is None  # no uneven cost measured: nothing to gain
    prof = profile("ab", fixed=1 * MS, per_row=0.1 * MS, fused_fixed=1.5 * MS, uneven_fixed={frozenset("ab"): 0.5 * MS})
    # uneven: 1.5 + 0.5 + 1.0 = 3.0 ms; padded to 8 + 8 rows: 1.5 + 1.6 = 3.1 ms
    assert prof.pad_to({"a": 2, "b": 8}) is None
    assert prof.estimate({"a": 2, "b": 8}) == pytest.approx(3.0 * MS)
    # uneven: 1.5 + 0.5 + 1.2 = 3.2 ms; padded: 1.5 + 1.6 = 3.1 ms
    assert prof.pad_to({"a": 4, "b": 8}) == 8
    assert prof.estimate({"a": 4, "b": 8}) == pytest.approx(3.1 * MS)
    assert prof.pad_to({"a": 8, "b": 8}) is None and prof.pad_to({"a": 3}) is None
    # never cheaper with more rows, which batch sizing by bisection relies on
    costs = [prof.estimate({"a": k, "b": 8}) for k in range(1, 17)]
    assert costs == sorted(costs)


def test_profile_scales_unmeasured_groups_from_the_largest_measured_one():
    # unequal sizes cost half the group's fixed cost
    prof = profile("abc", fixed=1 * MS, fused_fixed=1.5 * MS, uneven_fixed={frozenset("abc"): 0.75 * MS})
    assert prof.uneven_cost(frozenset("ab")) == pytest.approx(prof.group_fixed(frozenset("ab")) / 2)
    assert prof.uneven_cost(frozenset("a")) == 0.0


def test_profile_observe_converges_to_measured_latency():
    prof = profile("abc")
    model = prof.estimate({"a": 2})
    for _ in range(60):
        prof.observe({"a": 2}, 3 * model)
    assert prof.estimate({"a": 2}) == pytest.approx(3 * model, rel=1e-3)
    assert prof.estimate({"c": 2}) > 2 * model  # mostly the common scale: the machine is slower


def test_profile_corrections_tell_a_slow_set_from_a_slow_machine():
    prof = profile("abc")
    model = prof.estimate({"a": 2})
    for _ in range(300):  # a's launches take 3x the model, b's what the model says: a's own residual
        prof.observe({"a": 2}, 3 * model)
        prof.observe({"b": 2}, model)
    assert prof.estimate({"a": 2}) == pytest.approx(3 * model, rel=0.05)
    assert prof.estimate({"b": 2}) == pytest.approx(model, rel=0.05)
    for _ in range(20):  # then the machine gets twice as busy: b, never launched meanwhile, follows
        prof.observe({"a": 2}, 6 * model)
    assert prof.estimate({"a": 2}) == pytest.approx(6 * model, rel=0.1)
    assert prof.estimate({"b": 2}) == pytest.approx(2 * model, rel=0.15)


def test_profile_observe_is_robust_to_outliers_and_recovers_from_large_errors():
    prof = profile("a", fixed=80 * MS, per_row=0.0)  # a start-up profile taken under heavy contention
    prof.observe({"a": 1}, 80.0)  # one absurd outlier moves it by at most 4 ** 0.2 (scale) * 4 ** 0.025 (set)
    assert prof.estimate({"a": 1}) <= 80 * MS * 4 ** 0.225 + 1e-12
    for _ in range(80):
        prof.observe({"a": 1}, 0.05 * MS)
    assert prof.estimate({"a": 1}) == pytest.approx(0.05 * MS, rel=1e-2)


def test_profile_round_trips_through_json():
    prof = profile("abc", fixed={"a": 1 * MS, "b": 2 * MS, "c": 3 * MS}, fused_fixed=1.5 * MS,
                   uneven_fixed={frozenset("ab"): 0.5 * MS})
    back = LatencyProfile.from_json(json.loads(json.dumps(prof.to_json())))
    assert back == prof and back.estimate({"a": 2, "b": 5}) == prof.estimate({"a": 2, "b": 5})


def test_profile_tables_are_read_only_and_copies_keep_them():
    # a tenant set's costs are worked out once (LatencyProfile._terms): a table changed afterwards
    # would leave them stale, so the tables refuse changes; copies and pickles carry them
    prof = profile("ab", fused_fixed=1.5 * MS, uneven_fixed={frozenset("ab"): 0.5 * MS})
    before = prof.estimate({"a": 2, "b": 5})
    with pytest.raises(TypeError):
        prof.uneven_fixed[frozenset("ab")] = 0.0
    prof.observe({"a": 2, "b": 5}, 2 * before)
    for other in (copy.deepcopy(prof), pickle.loads(pickle.dumps(prof))):
        assert other == prof and other.estimate({"a": 2, "b": 5}) == prof.estimate({"a": 2, "b": 5}) > before


@pytest.mark.parametrize("bad", [dict(fixed={"a": -1e-3}), dict(per_row={"a": float("nan")}),
                                 dict(fixed={"a": True}), dict(fused_fixed={("a", "b"): 1e-3}),
                                 dict(uneven_fixed={frozenset("ab"): "1 ms"}), dict(fixed=[1e-3]),
                                 dict(fixed={1: 1e-3}), dict(concurrent_ratio=float("inf"))])
def test_a_profile_with_bad_tables_is_an_stfuse_error(bad):
    kwargs = {"fixed": {"a": 1e-3}, "per_row": {"a": 1e-4}, **bad}
    with pytest.raises(StfuseError, match="LatencyProfile: "):
        LatencyProfile(**kwargs)


def test_unknown_policy_is_an_stfuse_error():
    with pytest.raises(StfuseError, match="unknown policy 'fastest'"):
        make_scheduler("fastest", ["a"])


# ------------------------------------------------------------------ single decisions


def test_batch_policy_picks_earliest_deadline():
    s = scheduler("batch", "ab")
    qs = queues("ab", a=[req("a", 0.0, 50 * MS)], b=[req("b", 1 * MS, 19 * MS)])
    assert s.decide(qs, 10 * MS) == Dispatch({"b": 1})


def test_space_time_refuses_unprofitable_fusion_and_runs_earliest_deadline_alone():
    # fusing a and b costs 10x their fixed costs together: worse than two launches
    s = scheduler("space-time", "ab", profile("ab", fused_fixed=20 * MS))
    qs = queues("ab", a=[req("a", 0.0, 50 * MS)] * 2, b=[req("b", 1 * MS, 19 * MS)] * 3)
    assert s.decide(qs, 2 * MS) == Dispatch({"b": 3})


def test_space_time_fuses_every_tenant_when_profitable():
    s = scheduler("space-time", "abc", profile("abc", fused_fixed=1.2 * MS))
    qs = queues("abc", **{t: [req(t, i * MS, 50 * MS) for i in range(3)] for t in "abc"})
    assert s.decide(qs, 3 * MS) == Dispatch({"a": 3, "b": 3, "c": 3})


def test_space_time_leaves_out_a_tenant_that_would_make_the_urgent_one_miss():
    # c is expensive per row; a has 3 ms left, which a+b (1.7 ms) fits and a+b+c (6.7 ms) does not
    prof = profile("abc", per_row={"a": 0.1 * MS, "b": 0.1 * MS, "c": 5 * MS}, fused_fixed=1.5 * MS)
    s = scheduler("space-time", "abc", prof)
    now = 10 * MS
    qs = queues("abc", a=[req("a", 0.0, now + 3 * MS)], b=[req("b", 1 * MS, 40 * MS)],
                c=[req("c", 2 * MS, 40 * MS)])
    launch = s.decide(qs, now)
    assert launch == Dispatch({"a": 1, "b": 1})
    assert now + prof.estimate({"a": 1, "b": 1}) <= qs["a"][0].deadline
    pop(qs, launch)
    assert s.decide(qs, now + 2 * MS) == Dispatch({"c": 1})  # c runs next, alone


def test_space_time_trims_the_head_batch_to_its_deadline():
    s = scheduler("space-time", "a", profile("a", fixed=1 * MS, per_row=1 * MS))
    qs = queues("a", a=[req("a", 0.0, 5.5 * MS)] + [req("a", 0.1 * MS, 50 * MS)] * 19)
    # 1 ms + k ms <= 5.5 ms  ->  k = 4
    assert s.decide(qs, 0.0) == Dispatch({"a": 4})


def test_space_time_late_head_takes_a_full_batch_to_catch_up():
    s = scheduler("space-time", "a", profile("a", fixed=1 * MS, per_row=1 * MS), max_batch=8)
    qs = queues("a", a=[req("a", 0.0, 5 * MS)] * 20)
    assert s.decide(qs, 6 * MS) == Dispatch({"a": 8})


def test_space_time_trims_a_joining_tenant_to_keep_members_on_time():
    # a alone: 1.5 ms of its 5 ms. a + b(k): 1 ms shared + 0.5 ms * (1 + k) <= 5 ms -> k = 7
    prof = profile("ab", fixed=1 * MS, per_row=0.5 * MS, fused_fixed=1 * MS)
    s = scheduler("space-time", "ab", prof)
    qs = queues("ab", a=[req("a", 0.0, 5 * MS)], b=[req("b", 0.0, 80 * MS)] * 20)
    assert s.decide(qs, 0.0) == Dispatch({"a": 1, "b": 7})


def test_space_time_keeps_a_head_held_to_its_latest_start_on_time():
    """Held until deadline - work, the head's time left can round to just below its work
    (here 0.7 - (0.7 - 1.5 ms) = 1.5 ms - 5e-17 s): it is still on time, and b must not
    join and push it past its deadline (found by the placement simulation)."""
    prof = profile("ab", fixed=1 * MS, per_row=0.5 * MS, fused_fixed=1 * MS)
    s = scheduler("space-time", "ab", prof)
    deadline = 0.7
    now = deadline - prof.estimate({"a": 1})
    assert deadline - now < prof.estimate({"a": 1})  # the rounding this test is about
    qs = queues("ab", a=[req("a", 0.0, deadline)], b=[req("b", 0.0, deadline + 80 * MS)] * 20)
    assert s.decide(qs, now) == Dispatch({"a": 1})


def test_space_time_asks_for_padding_when_unequal_batches_cost_more():
    qs = queues("ab", a=[req("a", 0.0, 50 * MS)] * 5, b=[req("b", 0.0, 50 * MS)] * 2)
    for uneven, pad_to in ((1 * MS, 5), (0.0, None)):
        s = scheduler("space-time", "ab", profile("ab", fused_fixed=1.2 * MS, uneven_fixed={frozenset("ab"): uneven}))
        assert s.decide(qs, 0.0) == Dispatch({"a": 5, "b": 2}, pad_to=pad_to)


def test_space_time_weighs_fusion_at_the_batch_it_would_take():
    # unequal sizes cost 5 ms more (padding 31 rows costs 3.1 ms): a lone request of b is not worth
    # fusing with 32 rows of a, but 32 rows of b are (1.2 + 6.4 = 7.6 ms against 4.2 + 4.2 ms)
    prof = profile("ab", fixed=1 * MS, per_row=0.1 * MS, fused_fixed=1.2 * MS, uneven_fixed={frozenset("ab"): 5 * MS})
    s = scheduler("space-time", "ab", prof)
    full = queues("ab", a=[req("a", 0.0, 90 * MS)] * 40, b=[req("b", 0.0, 90 * MS)] * 40)
    assert s.decide(full, 0.0) == Dispatch({"a": 32, "b": 32})
    lone = queues("ab", a=[req("a", 0.0, 90 * MS)] * 40, b=[req("b", 0.0, 90 * MS)])
    assert s.decide(lone, 0.0) == Dispatch({"a": 32})
    # 32 rows of b beside 8 of a: 7.6 ms padded against 1.8 + 4.2 ms apart, not worth it;
    # 8 rows of b, the size of a's batch: 1.2 + 1.6 = 2.8 ms against 1.8 + 1.8 ms, worth it
    short = queues("ab", a=[req("a", 0.0, 90 * MS)] * 8, b=[req("b", 0.0, 90 * MS)] * 40)
    assert s.decide(short, 0.0) == Dispatch({"a": 8, "b": 8})


def test_space_time_counts_rows_not_requests_against_max_batch():
    s = scheduler("space-time", "a", profile("a"), max_batch=8)
    qs = queues("a", a=[req("a", 0.0, 50 * MS, rows=3)] * 5)
    assert s.decide(qs, 0.0) == Dispatch({"a": 2})  # 3 + 3 rows; a third request would make 9


def test_on_time_tenant_goes_before_a_late_backlog():
    prof = profile("ab", fused_fixed=20 * MS)  # no fusion, so the order is visible
    late = [req("a", 0.0, 5 * MS)] * 40
    for policy in ("batch", "space-time"):
        s = scheduler(policy, "ab", prof)
        qs = queues("ab", a=late, b=[req("b", 8 * MS, 25 * MS)])
        assert s.decide(qs, 12 * MS).take.keys() == {"b"}, policy


def test_space_time_holds_a_lone_request_one_slice_for_partners():
    s = scheduler("space-time", "abc")
    qs = queues("abc", a=[req("a", 0.0, 50 * MS)])
    assert s.decide(qs, 0.5 * MS) == Wait(2 * MS, frozenset("abc"))  # woken by a partner or more of a
    assert s.decide(qs, 2 * MS) == Dispatch({"a": 1})
    assert s.decide(qs, 0.5 * MS, flush=True) == Dispatch({"a": 1})  # closing: never hold


def test_space_time_does_not_hold_when_it_would_cost_the_deadline_or_nothing_can_join():
    s = scheduler("space-time", "abc")
    # latest start for a: deadline 1.5 ms minus 1.1 ms of work = 0.4 ms, already past
    assert s.decide(queues("abc", a=[req("a", 0.0, 1.5 * MS)]), 0.5 * MS) == Dispatch({"a": 1})
    full = queues("abc", a=[req("a", 0.0, 50 * MS)] * 32)  # a full batch is ready
    assert isinstance(s.decide(full, 0.5 * MS), Dispatch)
    busy = queues("abc", **{t: [req(t, 0.0, 50 * MS)] for t in "abc"})  # every tenant has work
    assert isinstance(s.decide(busy, 0.5 * MS), Dispatch)


def test_space_time_waits_to_fill_a_launch_over_every_tenant_only_under_load():
    s = scheduler("space-time", "ab")
    qs = queues("ab", a=[req("a", 0.0, 50 * MS)], b=[req("b", 0.2 * MS, 50 * MS)])
    assert s.decide(qs, 0.5 * MS) == Dispatch({"a": 1, "b": 1})  # an idle device: at once
    s.load = (s.FILL_FROM + s.FILL_FULL) / 2  # half of the way from FILL_FROM to FILL_FULL
    assert s.decide(qs, 0.5 * MS) == Wait(1 * MS, frozenset("a"))  # a half slice after the oldest
    assert s.decide(qs, 1 * MS) == Dispatch({"a": 1, "b": 1})
    assert s.decide(qs, 0.5 * MS, flush=True) == Dispatch({"a": 1, "b": 1})  # closing: never hold


def test_space_time_load_is_the_busy_share_of_the_time_between_launches():
    s = scheduler("space-time", "ab")
    qs = queues("ab", a=[req("a", 0.0, 1.0)] * 100, b=[req("b", 0.0, 1.0)] * 100)
    now = 0.0
    for _ in range(500):  # launches busy 0.3 ms of every 0.4 ms (full batches queued: no waiting)
        assert isinstance(s.decide(qs, now), Dispatch)
        s.charge({"a": 1}, 0.3 * MS)
        now += 0.4 * MS
    assert s.load == pytest.approx(0.75, abs=0.01)


def test_batch_policy_waits_one_slice_unless_a_batch_is_full():
    s = scheduler("batch", "ab", max_batch=4)
    qs = queues("ab", a=[req("a", 1 * MS, 50 * MS)] * 2, b=[req("b", 1.5 * MS, 50 * MS)])
    assert s.decide(qs, 1.5 * MS) == Wait(3 * MS, frozenset())  # woken only by a full batch
    assert s.decide(qs, 3 * MS) == Dispatch({"a": 2})
    qs["b"].extend([req("b", 1.6 * MS, 50 * MS)] * 3)  # b now fills max_batch
    assert s.decide(qs, 1.7 * MS) == Dispatch({"b": 4})


def test_time_policy_is_round_robin_one_request_per_slice():
    s = scheduler("time", "abc")
    qs = queues("abc", a=[req("a", 0.0, 9)] * 3, b=[req("b", 0.0, 9)], c=[req("c", 0.0, 9)] * 2)
    order = []
    while (launch := s.decide(qs, 0.0)) is not None:
        assert list(launch.take.values()) == [1] and launch.mode == "fused"
        order.append(*launch.take)
        pop(qs, launch)
    assert "".join(order) == "abcaca"


def test_space_policy_runs_every_busy_tenant_concurrently():
    s = scheduler("space", "abc")
    qs = queues("abc", a=[req("a", 0.0, 9)] * 3, c=[req("c", 0.0, 9)])
    assert s.decide(qs, 0.0) == Dispatch({"a": 1, "c": 1}, mode="concurrent")
    assert s.decide(queues("abc"), 0.0) is None


# ------------------------------------------------------------------ whole runs


def poisson(tenants, rate, duration, slo, seed=0, rows=(1, 1)):
    """Open-loop Poisson arrivals: `rate` requests/s per tenant (a number or {tenant: rate})."""
    rng = random.Random(seed)
    out = []
    for t in tenants:
        r = rate[t] if isinstance(rate, dict) else rate
        now = rng.expovariate(r)
        while now < duration:
            out.append(SimRequest(t, now, now + slo[t] if isinstance(slo, dict) else now + slo,
                                  rng.randint(*rows)))
            now += rng.expovariate(r)
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_simulation_serves_every_request_once_in_order_within_max_batch(policy):
    tenants = "abc"
    s = scheduler(policy, tenants, profile(tenants, fused_fixed=1.5 * MS), max_batch=8)
    reqs = poisson(tenants, 600, 0.5, 20 * MS, seed=1, rows=(1, 3))
    res = simulate(s, reqs, profile(tenants, fused_fixed=1.5 * MS))
    assert len(res.requests) == len(reqs) > 500
    assert all(r.finish is not None and r.finish >= r.start >= r.arrival for r in res.requests)
    for t in tenants:
        mine = [r for r in res.requests if r.tenant == t]  # in arrival order
        assert [r.launch for r in mine] == sorted(r.launch for r in mine)  # FIFO per tenant
    members = {}
    for r in res.requests:
        members.setdefault((r.launch, r.tenant), []).append(r)
    for (launch, t), rs in members.items():
        assert res.launches[launch][2][t] == sum(r.rows for r in rs)
        assert sum(r.rows for r in rs) <= 8 or len(rs) == 1
        if policy in ("time", "space"):
            assert len(rs) == 1
    assert sum(s["served"] for s in res.stats["tenants"].values()) == len(reqs)


def test_stats_recorder_percentiles_and_slo_misses():
    rec = StatsRecorder(["a", "b"], {"a": 95 * MS, "b": 1.0})
    for i in range(1, 101):  # latencies 1..100 ms, one per 1 ms of arrival
        rec.request("a", i * MS, i * MS + i * MS)
    rec.request("b", 0.0, 0.5, ok=False)
    rec.launch({"a": 3, "b": 1})
    rec.launch({"a": 1})
    snap = rec.snapshot()
    a = snap["tenants"]["a"]
    assert (a["p50_ms"], a["p90_ms"], a["p99_ms"]) == pytest.approx((50, 90, 99))
    assert a["slo_misses"] == 5 and a["slo_miss_rate"] == pytest.approx(0.05)
    assert a["launches"] == 2 and a["fused_launches"] == 1 and a["batch_sizes"] == {1: 1, 3: 1}
    assert snap["tenants"]["b"]["failed"] == 1 and snap["tenants"]["b"]["served"] == 0
    assert snap["mean_tenants_per_launch"] == 1.5
    assert percentile([], 50) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_simulated_slo_accounting_matches_finish_times(policy):
    slo = {"a": 3 * MS, "b": 30 * MS}
    s = scheduler(policy, "ab", profile("ab", fused_fixed=1.5 * MS), slo=slo)
    res = simulate(s, poisson("ab", 700, 0.3, slo, seed=2), profile("ab", fused_fixed=1.5 * MS), slo_s=slo)
    assert 0 < sum(t["slo_misses"] for t in res.stats["tenants"].values()) < len(res.requests)
    for t in "ab":
        ran = [r for r in res.requests if r.tenant == t and not r.shed]
        assert all(r.finish is not None for r in ran)
        misses = sum(r.finish - r.arrival > slo[t] for r in ran)
        assert res.stats["tenants"][t]["slo_misses"] == misses
        assert res.stats["tenants"][t]["shed"] == sum(r.shed for r in res.requests if r.tenant == t)


@pytest.mark.parametrize("policy", POLICIES)
def test_light_tenant_is_not_starved_by_a_heavy_neighbour(policy):
    # heavy offers 2x what it could get through alone, unbatched; its queue is bounded as submit() bounds it
    slo = {"heavy": 20 * MS, "light": 20 * MS}
    prof = profile(["heavy", "light"], fused_fixed=1.5 * MS)
    reqs = poisson(["heavy"], 1800, 1.0, slo, seed=3) + poisson(["light"], 50, 1.0, slo, seed=4)
    res = simulate(scheduler(policy, ["heavy", "light"], prof, slo=slo), reqs, prof, slo_s=slo, max_queue=64)
    light = res.stats["tenants"]["light"]
    assert light["rejected"] == 0 and light["served"] == sum(r.tenant == "light" for r in reqs)
    assert light["slo_misses"] == 0, light
    assert res.stats["tenants"]["heavy"]["served"] > 900


def test_space_time_beats_every_other_policy_where_fusion_pays():
    # the paper's regime: small launches dominated by fixed cost, which fusion shares
    tenants = ["t0", "t1", "t2", "t3"]
    prof = profile(tenants, fixed=1 * MS, per_row=0.05 * MS, fused_fixed=1.3 * MS)
    slo = 25 * MS
    results = {}
    for policy in POLICIES:
        reqs = poisson(tenants, 300, 2.0, slo, seed=5)  # 1200 req/s: more than 1 ms launches can serve
        results[policy] = simulate(scheduler(policy, tenants, prof, slo=slo), reqs, prof).stats
    st = results["space-time"]
    for policy in ("time", "space", "batch"):
        assert st["throughput_rps"] >= results[policy]["throughput_rps"], policy
        assert sum(t["slo_misses"] for t in st["tenants"].values()) <= sum(
            t["slo_misses"] for t in results[policy]["tenants"].values()), policy
    for policy in ("time", "space"):
        assert max(t["p99_ms"] for t in st["tenants"].values()) < min(
            t["p99_ms"] for t in results[policy]["tenants"].values()), policy
    assert st["mean_tenants_per_launch"] > 1.5


def test_space_time_fills_launches_under_load_and_changes_nothing_below_it():
    """Launches of four small tenants, each with work whenever the device is free. Launching
    at once keeps p50 low, but at 6000 requests/s each the device is busy 65% of the time
    with launches of a few rows. Waiting to fill makes fewer, larger launches: the device
    is less busy, and p99 no worse. At 2000/s, under FILL_FROM, the launches are the same."""
    tenants = ["t0", "t1", "t2", "t3"]
    prof = profile(tenants, fixed=0.1 * MS, per_row=0.01 * MS, fused_fixed=0.15 * MS)
    slo = 25 * MS

    def run(rate, fill):
        s = scheduler("space-time", tenants, prof, slo=slo)
        if not fill:
            s.FILL_FROM = 1.0  # never waits to fill
        res = simulate(s, poisson(tenants, rate, 0.5, slo, seed=5), prof)
        busy = sum(end - start for start, end, _, _ in res.launches) / (res.launches[-1][1] - res.launches[0][0])
        lat = sorted(r.finish - r.arrival for r in res.requests)
        assert sum(t["slo_misses"] for t in res.stats["tenants"].values()) == 0
        return res.launches, busy, percentile(lat, 99)

    assert run(2000, True) == run(2000, False)
    (launches, busy, p99), (at_once, at_once_busy, at_once_p99) = run(6000, True), run(6000, False)
    assert at_once_busy > 0.6
    assert len(launches) < 0.9 * len(at_once) and busy < at_once_busy
    assert p99 <= at_once_p99


def test_urgent_tenant_keeps_its_slo_beside_an_expensive_fusion_partner():
    # "bulk" rows are expensive; fusing all of them with the tight-SLO tenant would make it miss
    slo = {"tight": 3 * MS, "bulk": 200 * MS}
    prof = profile(["tight", "bulk"], fixed=0.5 * MS, per_row={"tight": 0.05 * MS, "bulk": 0.4 * MS},
                   fused_fixed=0.6 * MS)
    reqs = poisson(["tight"], 200, 1.0, slo, seed=6) + poisson(["bulk"], 1500, 1.0, slo, seed=7)
    res = simulate(scheduler("space-time", ["tight", "bulk"], prof, slo=slo), reqs, prof, slo_s=slo)
    assert res.stats["tenants"]["tight"]["slo_misses"] == 0
    assert res.stats["tenants"]["tight"]["fused_launches"] > 0  # it still fuses when that fits


def test_simulate_rejects_a_decision_that_takes_more_than_is_queued():
    class Greedy(type(scheduler("time", "a"))):
        def decide(self, queues, now, flush=False):
            return Dispatch({"a": 5}) if queues["a"] else None

    with pytest.raises(StfuseError, match="takes 5 of 1"):
        simulate(Greedy(["a"]), [req("a", 0.0, 1.0)], profile("a"))


def test_simulate_catches_a_wait_that_sleeps_through_an_arrival_that_changes_it():
    # the runtime's worker sleeps through arrivals outside Wait.wake, so a policy whose decision such
    # an arrival changes would launch late there: the simulator says so instead of hiding it
    class Impatient(Scheduler):
        name = "impatient"

        def decide(self, queues, now, flush=False):
            busy = self._busy(queues)
            if len(busy) == 2:
                return Dispatch({t: 1 for t in busy})
            return Wait(queues[busy[0]][0].arrival + self.slice_s, frozenset()) if busy else None

    reqs = [req("a", 0.0, 50 * MS), req("b", 0.5 * MS, 50 * MS)]
    with pytest.raises(StfuseError, match="does not wake for"):
        simulate(Impatient("ab", profile=profile("ab")), reqs, profile("ab"))
    fixed = Impatient("ab", profile=profile("ab"))
    fixed.decide = lambda q, now, flush=False: (lambda d: Wait(d.until) if isinstance(d, Wait) else d)(
        Impatient.decide(fixed, q, now, flush))  # woken by every arrival: launches at b's
    assert simulate(fixed, reqs, profile("ab")).launches[0][0] == pytest.approx(0.5 * MS)


def test_slice_policy_waits_one_slice_for_live_tenants_only():
    """The group's default policy on a fake clock: fuse what shares a slice, never hold a
    call longer than one slice, and do not wait for tenants that get no calls."""
    policy = make_scheduler("slice", ["a", "b", "idle"], slice_s=0.010)

    def call(t):
        return SimpleNamespace(arrival=t, deadline=t + 1.0, rows=1)

    queues = {"a": deque([call(0.0)]), "b": deque(), "idle": deque()}
    # nobody else was ever seen: a lone first call runs at once
    assert policy.decide(queues, 0.0) == Dispatch({"a": 1})
    queues = {"a": deque(), "b": deque([call(0.1)]), "idle": deque()}
    assert policy.decide(queues, 0.1) == Wait(0.1 + 0.010)  # a is live: b waits one slice for it
    assert policy.decide(queues, 0.1 + 0.010) == Dispatch({"b": 1})
    # both live: a's call waits for b's, at most one slice
    queues = {"a": deque([call(0.2)]), "b": deque(), "idle": deque()}
    assert policy.decide(queues, 0.2) == Wait(0.2 + 0.010)
    queues["b"].append(call(0.205))
    assert policy.decide(queues, 0.205) == Dispatch({"a": 1, "b": 1})  # fused; "idle" is not waited for
    queues = {"a": deque([call(0.3)]), "b": deque(), "idle": deque()}
    assert policy.decide(queues, 0.3) == Wait(0.3 + 0.010)
    assert policy.decide(queues, 0.3 + 0.010) == Dispatch({"a": 1})  # the slice expired: alone
    assert policy.decide(queues, 0.3, flush=True) == Dispatch({"a": 1})  # closing never waits


# ------------------------------------------------------------------ overload, shedding, fair share


def batch_capacity(prof, tenants, max_batch=32):
    """Requests/s of per-tenant batching kept saturated: a full batch of every tenant in turn."""
    return len(tenants) * max_batch / sum(prof.solo(t, max_batch) for t in tenants)


def outcomes(res, slo):
    """(requests within SLO, late, shed, rejected); fails unless every request ended exactly one way."""
    for r in res.requests:
        assert (r.finish is not None) + r.shed + r.rejected == 1, r
    ran = [r for r in res.requests if r.finish is not None]
    good = sum(r.finish - r.arrival <= slo + 1e-12 for r in ran)
    return good, len(ran) - good, sum(r.shed for r in res.requests), sum(r.rejected for r in res.requests)


def test_expired_sheds_what_cannot_make_its_deadline_and_only_with_shedding_on():
    prof = profile("ab", fixed=1 * MS, per_row=0.1 * MS)
    s = scheduler("space-time", "ab", prof, slo=10 * MS)
    qs = queues("ab", a=[req("a", 0.0, 10 * MS)] * 2 + [req("a", 5 * MS, 10 * MS)],
                b=[req("b", 0.0, 10 * MS)])
    # at 9 ms: a's first two (deadline 10 ms) cannot finish in 1.1 ms; the third (15 ms) can
    assert s.expired(qs, 9 * MS) == {"a": 2, "b": 1}
    assert s.expired(qs, 8.8 * MS) == {}
    assert scheduler("batch", "ab", prof, slo=10 * MS).expired(qs, 9 * MS) == {}  # off by default
    assert make_scheduler("batch", "ab", profile=prof, slo_s={"a": 0.01}, shed=True).expired(qs, 9 * MS) == {"a": 2}
    # a tenant that misses its SLO even on an idle device is served late, never shed
    assert scheduler("space-time", "ab", prof, slo=1 * MS).expired(qs, 9 * MS) == {}


def test_expired_sheds_an_overloaded_tenant_against_the_launch_it_will_get():
    # 40 queued: a whole batch of 8 rows costs 1.8 ms, so a request with 1.5 ms left is shed
    # although alone it would make it (1.1 ms); once fewer than 8 remain, alone counts again
    s = scheduler("space-time", "a", profile("a", fixed=1 * MS, per_row=0.1 * MS), max_batch=8, slo=10 * MS)
    qs = queues("a", a=[req("a", 0.0, 10 * MS)] * 3 + [req("a", 2 * MS, 10 * MS)] * 37)
    assert s.expired(qs, 8.5 * MS) == {"a": 3}
    short = queues("a", a=[req("a", 0.0, 10 * MS)] * 3)
    assert s.expired(short, 8.5 * MS) == {}


def test_space_time_fills_the_batch_of_an_overloaded_head():
    s = scheduler("space-time", "a", profile("a", fixed=1 * MS, per_row=1 * MS), max_batch=8)
    # the head has 5.5 ms: alone it would take 4 requests; with a whole batch queued it takes 8
    qs = queues("a", a=[req("a", 0.0, 5.5 * MS)] + [req("a", 0.1 * MS, 50 * MS)] * 19)
    assert s.decide(qs, 0.0) == Dispatch({"a": 8})


def test_a_tenant_over_its_share_ranks_after_one_within_it():
    s = scheduler("batch", "ab", slice_s=2 * MS)  # a share's quantum: one slice of device time
    qs = queues("ab", a=[req("a", 0.0, 20 * MS)] * 5, b=[req("b", 3 * MS, 20 * MS)])
    now = 6 * MS
    assert s.decide(qs, now).take.keys() == {"a"}  # earliest deadline
    s.charge({"a": 5}, 1 * MS)  # half a slice ahead: within its share still
    assert s.decide(qs, now).take.keys() == {"a"}
    s.charge({"a": 5}, 5 * MS)
    assert s.decide(qs, now).take.keys() == {"b"}  # over it: b first, whatever the deadlines
    s.charge({"b": 1}, 6 * MS)
    assert s.decide(qs, now).take.keys() == {"a"}  # level again


@pytest.mark.parametrize("load", [0.5, 1.0, 1.5, 2.0])
def test_space_time_is_at_least_as_good_as_batching_at_every_load(load):
    """The overload regime of issue 13: space-time keeps batch's throughput, misses no more SLOs,
    and, by shedding, keeps p99 of what it serves within the SLO."""
    tenants = ["t0", "t1", "t2", "t3"]
    prof = profile(tenants, fused_fixed=1.5 * MS)
    slo = 25 * MS
    got = {}
    for policy in ("batch", "space-time"):
        reqs = poisson(tenants, load * batch_capacity(prof, tenants) / 4, 1.0, slo, seed=11)
        res = simulate(scheduler(policy, tenants, prof, slo=slo), reqs, prof, slo_s={t: slo for t in tenants},
                       max_queue=256)
        lat = sorted(r.finish - r.arrival for r in res.requests if r.finish is not None)
        got[policy] = (res.stats["throughput_rps"], outcomes(res, slo), percentile(lat, 99))
    (st_rps, (st_good, st_late, _, _), st_p99), (b_rps, (b_good, _, _, _), _) = got["space-time"], got["batch"]
    assert st_rps >= 0.99 * b_rps  # the same when both serve everything: only the last launch differs
    assert st_good >= b_good
    assert st_late == 0 and st_p99 <= slo


@pytest.mark.parametrize("fused_fixed", [1.5, 20.0], ids=["fusion-pays", "fusion-loses"])
@pytest.mark.parametrize("flood", [2, 6, 20])
@pytest.mark.parametrize("policy", ["batch", "space-time"])
def test_a_flooding_tenant_never_pushes_quiet_ones_past_their_deadline(policy, flood, fused_fixed):
    """Issue 18's noisy neighbour: three quiet tenants at 3% of capacity each, a fourth
    flooding at `flood` times their combined rate. Without fair shares, EDF serves the flood's
    on-time backlog first and quiet requests miss (30 of 715 for space-time at 20x, fusion-loses)."""
    quiet, tenants = ["q0", "q1", "q2"], ["q0", "q1", "q2", "flood"]
    prof = profile(tenants, fused_fixed=fused_fixed * MS)
    slo = 25 * MS
    rate = 0.03 * batch_capacity(prof, tenants)
    reqs = poisson(quiet, rate, 1.0, slo, seed=3) + poisson(["flood"], flood * 3 * rate, 1.0, slo, seed=4)
    res = simulate(scheduler(policy, tenants, prof, slo=slo), reqs, prof, slo_s={t: slo for t in tenants},
                   max_queue=256)
    outcomes(res, slo)
    per = res.stats["tenants"]
    for t in quiet:
        assert per[t]["served"] == sum(r.tenant == t for r in reqs) and per[t]["slo_misses"] == 0, per[t]
    # the flood still gets what the quiet tenants leave: at least a third of the device
    assert per["flood"]["served"] >= min(sum(r.tenant == "flood" for r in reqs), batch_capacity(prof, tenants) / 3)


def test_weights_split_the_device_between_two_saturating_tenants():
    prof = profile("ab", fused_fixed=20 * MS)  # never fused: each launch is one tenant's
    slo = 25 * MS
    s = make_scheduler("space-time", "ab", slice_s=2 * MS, profile=prof, slo_s={"a": slo, "b": slo},
                       weights={"a": 3, "b": 1})
    res = simulate(s, poisson("ab", 20_000, 1.0, slo, seed=8), prof, max_queue=256)
    outcomes(res, slo)
    a, b = res.stats["tenants"]["a"]["served"], res.stats["tenants"]["b"]["served"]
    assert 2.7 <= a / b <= 3.3, (a, b)


def test_rate_limit_refuses_arrivals_beyond_the_bucket():
    s = make_scheduler("batch", "ab", profile=profile("ab"), rate_limits={"a": (100, 10)})
    res = simulate(s, poisson("ab", 1000, 1.0, 50 * MS, seed=9), profile("ab"))
    outcomes(res, 50 * MS)
    a = res.stats["tenants"]["a"]
    assert 100 <= a["served"] <= 111 and a["rejected"] > 800  # 10 banked + 100/s over one second
    assert res.stats["tenants"]["b"]["rejected"] == 0
    with pytest.raises(StfuseError, match=r"weights\['a'\] must be a finite number > 0"):
        make_scheduler("batch", "ab", weights={"a": -1})
