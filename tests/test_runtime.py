"""The runtime on real threads: results, fault isolation, cancellation, close, back-pressure.

Most tests drive a FakeProgram (the FusedProgram contract, running each model
eagerly and recording every call) with a gate that holds the device busy, so
that what gets queued, fused and batched is decided by the test rather than
by thread timing. The real-execution tests also run on `stfuse.compile`.
No assertion depends on how long anything takes; waits are bounded only so
that a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import wait
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import stfuse
from stfuse import zoo
from stfuse.errors import InputError, StfuseError
from stfuse.runtime import DeadlineExceededError, QueueFullError, Runtime, RuntimeClosedError, measure_profile
from stfuse.runtime.policies import POLICIES, Scheduler
from stfuse.runtime.profile import LatencyProfile
from stfuse.tolerances import assert_close

from conftest import BranchOnBatch, Center, float64_call_reference, float64_reference

TIMEOUT = 60  # seconds; only a guard against hangs


# ------------------------------------------------------------------ tenants and a fake program


class Pair(nn.Module):
    """Two inputs, dict output: the runtime must concatenate and split every leaf."""

    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(6, 3), nn.Linear(2, 3)

    def forward(self, x, y):
        a = self.f(x)
        return {"sum": a + self.g(y), "x": a}


class Twin(nn.Module):
    """Tuple output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, y.relu().sum(-1)


class Picky(nn.Module):
    """Raises on any input containing 666: a tenant that fails on some requests."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        if (x == 666).any():
            raise ValueError("picky tenant refuses 666")
        return self.lin(x)


class Scalar(nn.Module):
    """Output with a 0-d leaf, which a batch cannot be split into."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, y.sum()


def fake_models(seed=0):
    torch.manual_seed(seed)
    models = {"mlp": zoo.mlp(8, 16, 4), "cnn": zoo.cnn(4, 5), "pair": Pair(), "twin": Twin()}
    return {k: m.eval() for k, m in models.items()}


def make_args(name, rows, rng=None):
    shapes = {"mlp": [(8,)], "picky": [(8,)], "scalar": [(8,)], "cnn": [(3, 6, 6)],
              "pair": [(6,), (2,)], "twin": [(5,)], "m0": [(16,)], "m1": [(16,)],
              "c0": [(3, 8, 8)], "c1": [(3, 8, 8)]}[name]
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30)) if rng else None
    return tuple(torch.randn(rows, *s, generator=gen) for s in shapes)


class FakeProgram:
    """The FusedProgram contract (tenants, run, __call__), eager per model, recording each call.

    hold() makes the next calls block inside run() until release(): the
    device is busy, so the test can queue exactly what it wants.
    """

    def __init__(self, models):
        self.models = models
        self.calls: list[dict[str, int]] = []  # {tenant: rows} per run() call, in order
        self.entered = threading.Event()
        self.barrier: threading.Barrier | None = None
        self.held: str | None = None
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()

    @property
    def tenants(self):
        return list(self.models)

    def hold(self, tenant=None):
        """Block the next calls (only those including `tenant`, if given) until release()."""
        self.held = tenant
        self.entered.clear()
        self._gate.clear()

    def release(self):
        self._gate.set()

    def run(self, inputs):
        if not isinstance(inputs, dict) or not inputs or set(inputs) - set(self.models):
            raise InputError(f"bad run() inputs {list(inputs)}")
        with self._lock:
            self.calls.append({t: a[0].shape[0] for t, a in inputs.items()})
        if self.barrier is not None:
            self.barrier.wait()
        if self.held is None or self.held in inputs:
            self.entered.set()
            assert self._gate.wait(TIMEOUT), "test gate never released"
        with torch.no_grad():
            return {t: self.models[t](*a) for t, a in inputs.items()}

    def __call__(self, *args):
        return list(self.run(dict(zip(self.models, args))).values())

    def rows_run(self, tenant):
        return sum(c.get(tenant, 0) for c in self.calls)


def cheap_fusion(tenants):
    """A profile where fusing is clearly worth it (so space-time fuses whatever is queued)."""
    return LatencyProfile({t: 1e-3 for t in tenants}, {t: 1e-5 for t in tenants},
                          {frozenset(tenants): 1.2e-3})


def runtime(prog, policy="space-time", **kw):
    kw.setdefault("profile", cheap_fusion(prog.tenants))
    kw.setdefault("slice_ms", 1.0)
    # Whether a request outlives its SLO depends here on how long a test holds the gate,
    # so shedding is off unless a test asks for it (and then makes the outcome certain).
    kw.setdefault("shed", False)
    return Runtime(prog, policy, **kw)


def settle(futures):
    done, pending = wait(futures, timeout=TIMEOUT)
    assert not pending, f"{len(pending)} futures never resolved"
    return done


def busy(rt, prog, tenant="mlp"):
    """Put one request in flight and block the device on it; returns its future."""
    prog.hold(None if rt.policy != "space" else tenant)
    fut = rt.submit(tenant, make_args(tenant, 1))
    assert prog.entered.wait(TIMEOUT)
    return fut


def check(models, tenant, args, out):
    with torch.no_grad():
        expected = models[tenant](*args)
    assert_close(out, expected, msg=f"tenant {tenant}")


# ------------------------------------------------------------------ real execution


def compiled_tenants():
    torch.manual_seed(1)
    models = {"m0": zoo.mlp(16, 32, 4), "m1": zoo.mlp(16, 32, 4), "c0": zoo.cnn(4, 5), "c1": zoo.cnn(4, 5)}
    return {k: m.eval() for k, m in models.items()}


@pytest.fixture(scope="module")
def compiled():
    models = compiled_tenants()
    examples = {k: make_args(k, 2) for k in models}
    return stfuse.compile(models, examples), models, examples


def hammer(rt, tenants, threads=4, per_thread=60, seed=0):
    """Submit from several threads at once; returns [(tenant, args, future)]."""
    out, lock = [], threading.Lock()

    def client(i):
        rng = random.Random(seed * 100 + i)
        for _ in range(per_thread):
            t = rng.choice(tenants)
            args = make_args(t, rng.randint(1, 3), rng)
            fut = rt.submit(t, args, block=True, timeout=TIMEOUT)
            with lock:
                out.append((t, args, fut))

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(TIMEOUT)
    assert len(out) == threads * per_thread
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_fake_program_results_equal_eager_from_many_threads(policy):
    models = fake_models()
    prog = FakeProgram(models)
    with runtime(prog, policy, max_batch=8, max_queue=32) as rt:
        sent = hammer(rt, list(models))
        settle([f for _, _, f in sent])
    for t, args, fut in sent:
        check(models, t, args, fut.result())
    stats = rt.stats()
    assert stats["served"] == len(sent)
    for t in models:  # every request ran exactly once
        assert prog.rows_run(t) == sum(a[0].shape[0] for tt, a, _ in sent if tt == t)
    assert all(s["failed"] == 0 and s["cancelled"] == 0 for s in stats["tenants"].values())


@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_program_results_equal_eager_from_many_threads(policy, compiled):
    fused, models, examples = compiled
    with Runtime(fused, policy, slice_ms=1.0, max_batch=8, example_inputs=examples, profile_reps=1,
                 shed=False) as rt:  # every request must run, however slow the machine is today
        sent = hammer(rt, fused.tenants, threads=4, per_thread=50, seed=1)
        settle([f for _, _, f in sent])
    for t, args, fut in sent:
        assert_close(fut.result(), float64_reference(models[t], args), msg=f"tenant {t}")
    assert rt.stats()["served"] == len(sent)


class Gate:
    """Wraps a program's ``run``: every launch waits until ``open`` is set; ``calls`` records
    each launch's rows per tenant."""

    def __init__(self, run):
        self.inner, self.calls = run, []
        self.entered, self.open = threading.Event(), threading.Event()

    def __call__(self, inputs):
        self.calls.append({t: torch.utils._pytree.tree_leaves(a)[0].shape[0] for t, a in inputs.items()})
        self.entered.set()
        assert self.open.wait(TIMEOUT)
        return self.inner(inputs)


def queue_behind_one_launch(rt, gate: Gate, first, sent) -> list:
    """Submit ``first`` and wait until its launch holds the device, queue every request of
    ``sent`` behind it, then open the gate; returns the futures of ``sent`` once all are done."""
    held = rt.submit(*first)
    assert gate.entered.wait(TIMEOUT)
    futs = [rt.submit(t, a) for t, a in sent]
    gate.open.set()
    settle(futs + [held])
    return futs


def test_compiled_program_fuses_queued_tenants(compiled):
    fused, models, examples = compiled
    gate = Gate(fused.run)
    prog = SimpleNamespace(tenants=fused.tenants, run=gate)  # the compiled program behind a gate
    with Runtime(prog, "space-time", profile=cheap_fusion(fused.tenants), shed=False) as rt:
        sent = [(t, make_args(t, 2)) for t in fused.tenants for _ in range(3)]
        futs = queue_behind_one_launch(rt, gate, ("m0", make_args("m0", 1)), sent)
    assert sorted(gate.calls[1]) == sorted(fused.tenants)  # all four tenants in one fused call
    for (t, a), f in zip(sent, futs):
        assert_close(f.result(), float64_reference(models[t], a), msg=f"tenant {t}")


def test_measure_profile_times_each_tenant_and_the_fused_group():
    prog = FakeProgram(fake_models())
    examples = {t: make_args(t, 2) for t in prog.tenants}
    prof = measure_profile(prog, examples, max_batch=4, reps=2, warmup=1)
    # (the values come from wall-clock timings: the next tests check them on a fake clock)
    assert set(prof.fixed) == set(prog.tenants) == set(prof.per_row)
    assert set(prof.fused_fixed) == set(prof.uneven_fixed) == {frozenset(prog.tenants)}
    # (1 warm-up + 2 timed) per setting: each tenant at 2 and 4 rows, all fused at 2 rows and at
    # unequal sizes 2, 3, 4, 4 (max_batch caps them)
    assert len(prog.calls) == 3 * (2 * 4 + 2)
    assert {2, 4} == {c["mlp"] for c in prog.calls if list(c) == ["mlp"]}
    assert {"mlp": 2, "cnn": 3, "pair": 4, "twin": 4} in prog.calls


class ClockProgram:
    """Launches that take exactly what a known linear model says, on a fake clock: a tenant
    alone costs FIXED[t] + PER_ROW[t] * rows; all tenants together FUSED + their rows' work,
    plus UNEVEN when their batch sizes differ."""

    FIXED = {"a": 3e-3, "b": 5e-3}
    PER_ROW = {"a": 1e-4, "b": 4e-4}
    FUSED, UNEVEN = 6e-3, 2e-3

    def __init__(self, per_row=None):
        self.now = 0.0
        self.per_row = per_row or self.PER_ROW
        self.tenants = list(self.per_row)

    def perf_counter(self):
        return self.now

    def run(self, inputs):
        rows = {t: a[0].shape[0] for t, a in inputs.items()}
        work = sum(self.per_row[t] * b for t, b in rows.items())
        if len(rows) == 1:
            (t,) = rows
            self.now += self.FIXED[t] + work
        else:
            self.now += self.FUSED + work + (self.UNEVEN if len(set(rows.values())) > 1 else 0.0)
        return {t: a[0] for t, a in inputs.items()}


def test_measure_profile_recovers_the_launch_cost_model(monkeypatch):
    from stfuse.runtime import batching

    prog = ClockProgram()
    monkeypatch.setattr(batching, "time", prog)  # measure_profile reads time.perf_counter()
    prof = measure_profile(prog, {t: (torch.randn(2, 3),) for t in prog.tenants}, max_batch=8, reps=2, warmup=1)
    assert prof.fixed == pytest.approx(ClockProgram.FIXED)
    assert prof.per_row == pytest.approx(ClockProgram.PER_ROW)
    assert prof.fused_fixed == pytest.approx({frozenset("ab"): ClockProgram.FUSED})
    assert prof.uneven_fixed == pytest.approx({frozenset("ab"): ClockProgram.UNEVEN})


def test_measure_profile_reads_a_faster_big_batch_as_no_per_row_cost(monkeypatch):
    """Noise can make max_batch rows time faster than two: per-row cost 0, and the fixed
    cost is then the two-row time, not that time minus a negative slope."""
    from stfuse.runtime import batching

    prog = ClockProgram(per_row={"a": -1e-4})
    monkeypatch.setattr(batching, "time", prog)
    prof = measure_profile(prog, {"a": (torch.randn(2, 3),)}, max_batch=8, reps=2, warmup=1)
    assert prof.per_row == {"a": 0.0}
    assert prof.fixed == pytest.approx({"a": ClockProgram.FIXED["a"] - 2e-4})


def test_stats_of_a_launch_match_its_requests_one_by_one():
    """StatsRecorder.served (one call per launch and tenant) records what request() does per request."""
    from stfuse.runtime.stats import StatsRecorder

    arrivals, finish = [0.0, 0.004, 0.009, 0.0095], 0.012  # SLO 5 ms: the first two miss it
    one, batched = (StatsRecorder(["a", "b"], {"a": 5e-3, "b": 1.0}) for _ in range(2))
    for a in arrivals:
        one.request("a", a, finish)
    batched.served("a", arrivals, finish)
    batched.served("b", [], finish)
    assert batched.snapshot() == one.snapshot()
    assert one.snapshot()["tenants"]["a"]["slo_misses"] == 2


@pytest.mark.parametrize("sizes,rows", [([1], None), ([2, 1], None), ([2, 1], 3), ([2, 1], 5), ([1], 4), ([3], 2)])
def test_concat_pads_with_the_last_row_in_one_cat(sizes, rows):
    from stfuse.runtime.batching import concat

    reqs = [(torch.randn(n, 3), torch.randn(n, 2, 2)) for n in sizes]
    out = concat(reqs, rows)
    for i, got in enumerate(out):
        want = torch.cat([r[i] for r in reqs])
        if rows is not None and rows > want.shape[0]:
            want = torch.cat([want] + [want[-1:]] * (rows - want.shape[0]))
        assert torch.equal(got, want)


@pytest.mark.parametrize("sizes", [[1], [2, 1, 3], [1, 1]])
def test_split_of_a_plain_tensor_matches_the_pytree_split(sizes):
    from stfuse.runtime.batching import Unsplittable, split

    out = torch.randn(sum(sizes), 3)
    fast, tree = split(out, sizes), [t for (t,) in split((out,), sizes)]
    assert len(fast) == len(sizes)
    assert all(f.shape == t.shape and torch.equal(f, t) for f, t in zip(fast, tree))
    with pytest.raises(Unsplittable):
        split(torch.randn(sum(sizes) + 1, 3), sizes)


# ------------------------------------------------------------------ scheduling visible in calls


def test_space_time_fuses_and_batches_what_is_queued():
    models = fake_models()
    prog = FakeProgram(models)
    with runtime(prog) as rt:
        first = busy(rt, prog)
        sent = [(t, make_args(t, 1)) for t in models for _ in range(3)]
        futs = [rt.submit(t, a) for t, a in sent]
        prog.release()
        settle(futs + [first])
    assert prog.calls[1] == {t: 3 for t in models}
    for (t, a), f in zip(sent, futs):
        check(models, t, a, f.result())
    st = rt.stats()
    assert st["mean_tenants_per_launch"] > 1
    assert all(s["fused_launches"] == 1 for s in st["tenants"].values())


def test_space_time_pads_unequal_batches_when_the_profile_says_it_pays():
    models = fake_models()
    prog = FakeProgram(models)
    # unequal sizes cost as much as 100 padding rows
    prof = replace(cheap_fusion(prog.tenants), uneven_fixed={frozenset(prog.tenants): 1e-3})
    with runtime(prog, profile=prof) as rt:
        first = busy(rt, prog)
        sent = [(t, make_args(t, rows)) for t, rows in zip(models, [1, 2, 3, 1]) for _ in range(2)]
        futs = [rt.submit(t, a) for t, a in sent]
        prog.release()
        settle(futs + [first])
    assert prog.calls[1] == {t: 6 for t in models}  # 2, 4, 6, 2 real rows, all padded to 6
    for (t, a), f in zip(sent, futs):
        check(models, t, a, f.result())
    assert rt.stats()["tenants"]["mlp"]["batch_sizes"] == {1: 1, 2: 1}  # stats count real rows only


def test_batch_policy_batches_each_tenant_alone():
    models = fake_models()
    prog = FakeProgram(models)
    with runtime(prog, "batch", max_batch=4) as rt:
        first = busy(rt, prog)
        futs = [rt.submit(t, make_args(t, 1)) for t in models for _ in range(6)]
        prog.release()
        settle(futs + [first])
    later = prog.calls[1:]
    assert all(len(c) == 1 for c in later)
    assert sorted(n for c in later for n in c.values()) == [2, 2, 2, 2, 4, 4, 4, 4]


def test_a_waiting_worker_wakes_only_for_arrivals_that_can_change_its_decision():
    # "batch" holds a tenant's requests one slice (here far longer than the test) unless a batch
    # fills: arrivals before that cannot change its Wait (policies.Wait.wake), and must not cost a
    # decision each (4 a launch at 1x in bench_runtime); the one that fills the batch must wake it
    prog = FakeProgram(fake_models())
    with runtime(prog, "batch", max_batch=8, slice_ms=60_000) as rt:
        decisions = []
        decide = rt._scheduler.decide
        rt._scheduler.decide = lambda *a, **k: decisions.append(decide(*a, **k)) or decisions[-1]
        futs = [rt.submit("mlp", make_args("mlp", 1)) for _ in range(7)]
        time.sleep(0.2)
        assert not any(f.done() for f in futs) and len(decisions) <= 2  # the first arrival's, maybe a second
        futs.append(rt.submit("mlp", make_args("mlp", 1)))  # the 8th row: a whole batch
        settle(futs)
    assert prog.calls == [{"mlp": 8}]


def test_time_policy_runs_one_request_per_slice_round_robin():
    models = fake_models()
    prog = FakeProgram(models)
    with runtime(prog, "time") as rt:
        first = busy(rt, prog, "mlp")
        futs = [rt.submit(t, make_args(t, 1)) for _ in range(2) for t in models]
        prog.release()
        settle(futs + [first])
    assert [list(c) for c in prog.calls[1:]] == [[t] for t in ["cnn", "pair", "twin", "mlp"] * 2]
    assert all(list(c.values()) == [1] for c in prog.calls)


def test_space_policy_runs_tenants_at_the_same_time_and_independently():
    models = fake_models()
    prog = FakeProgram(models)
    with runtime(prog, "space") as rt:
        first = busy(rt, prog, "mlp")  # mlp's call is stuck until release()
        others = [t for t in models if t != "mlp"]
        prog.barrier = threading.Barrier(len(others), timeout=TIMEOUT)  # passes only if they run together
        futs = [rt.submit(t, make_args(t, 1)) for t in others]
        settle(futs)
        prog.barrier = None
        more = [rt.submit(t, make_args(t, 1)) for t in others for _ in range(3)]
        settle(more)  # the other tenants keep going while mlp is stuck
        queued = rt.submit("mlp", make_args("mlp", 1))
        settle([rt.submit("cnn", make_args("cnn", 1))])  # a decision made after mlp's request was queued
        assert rt.stats()["tenants"]["mlp"]["queued"] == 1  # one call per tenant at a time: it waits
        assert not first.done() and not queued.done()
        prog.release()
        settle([first, queued])
    for f in futs + more:
        assert f.exception() is None
    assert all(len(c) == 1 and list(c.values()) == [1] for c in prog.calls)
    assert [c for c in prog.calls if "mlp" in c] == [{"mlp": 1}] * 2


def test_results_resolve_in_submission_order_per_tenant():
    models = fake_models()
    prog = FakeProgram(models)
    order, lock = [], threading.Lock()
    with runtime(prog, max_batch=4) as rt:
        first = busy(rt, prog)
        futs = []
        for i in range(10):
            for t in models:
                f = rt.submit(t, make_args(t, 1))
                f.add_done_callback(lambda _, t=t, i=i: (lock.acquire(), order.append((t, i)), lock.release()))
                futs.append(f)
        prog.release()
        settle(futs + [first])
    for t in models:
        assert [i for tt, i in order if tt == t] == list(range(10))


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize("policy", POLICIES)
def test_a_failing_request_fails_alone(policy):
    models = {**fake_models(), "picky": Picky().eval()}
    prog = FakeProgram(models)
    with runtime(prog, policy) as rt:
        first = busy(rt, prog, "mlp")
        sent = [(t, make_args(t, 1)) for t in models for _ in range(2)]
        bad = (torch.full((1, 8), 666.0),)
        sent.insert(len(sent) - 1, ("picky", bad))  # between the picky tenant's two good requests
        futs = [rt.submit(t, a) for t, a in sent]
        prog.release()
        settle(futs + [first])
    for (t, a), f in zip(sent, futs):
        if a is bad:
            with pytest.raises(ValueError, match="refuses 666"):
                f.result()
        else:
            check(models, t, a, f.result())
    st = rt.stats()["tenants"]
    assert st["picky"]["failed"] == 1 and st["picky"]["served"] == 2
    if policy == "space-time":
        assert len(prog.calls[1]) == len(models)  # the fused attempt that failed, then the retries
        assert all(s["retries"] > 0 for s in st.values())


def test_unsplittable_output_falls_back_to_one_request_per_launch():
    models = {"mlp": fake_models()["mlp"], "scalar": Scalar().eval()}
    prog = FakeProgram(models)
    with runtime(prog, "batch") as rt:
        first = busy(rt, prog)
        sent = [make_args("scalar", 2) for _ in range(4)]
        futs = [rt.submit("scalar", a) for a in sent]
        prog.release()
        settle(futs + [first])
        more = [make_args("scalar", 1) for _ in range(3)]
        futs2 = [rt.submit("scalar", a) for a in more]
        settle(futs2)
    for a, f in zip(sent + more, futs + futs2):
        check(models, "scalar", a, f.result())
    scalar_calls = [c["scalar"] for c in prog.calls if "scalar" in c]
    assert scalar_calls[0] == 8 and scalar_calls[1:5] == [2, 2, 2, 2] and set(scalar_calls[5:]) == {1}


@pytest.mark.parametrize("bad, match", [
    (("nope", make_args("mlp", 1)), "unknown tenant 'nope'"),
    (("mlp", [1, 2, 3]), r"'mlp', argument 0: expected a Tensor, got int"),
    (("mlp", "text"), "expected a Tensor or a tuple"),
    (("mlp", ()), "at least one argument"),
    (("mlp", torch.tensor(1.0)), "0-d tensor"),
    (("mlp", torch.randn(2, 9)), r"'mlp', argument 0 \(arg0\): expected shape Tensor\[B, 8\] float32 on cpu, "
                                 r"got Tensor\[2, 9\]"),
    (("mlp", torch.randn(2, 8, dtype=torch.float64)), "expected dtype torch.float32, got .* float64"),
    (("mlp", torch.randn(9, 8)), "max_batch=8, got 9"),
    (("mlp", torch.randn(0, 8)), "got 0"),
    (("pair", (torch.randn(2, 6),)), "expected 2 argument"),
    (("pair", (torch.randn(2, 6), torch.randn(3, 2))), "argument 1: batch size 3 differs"),
])
def test_bad_input_fails_fast_and_never_reaches_the_program(bad, match):
    prog = FakeProgram(fake_models())
    examples = {t: make_args(t, 2) for t in prog.tenants}
    with runtime(prog, max_batch=8, example_inputs=examples) as rt:
        with pytest.raises(InputError, match=match):
            rt.submit(*bad)
    assert prog.calls == []
    assert issubclass(InputError, StfuseError)


def test_without_examples_the_first_good_request_sets_the_checks():
    prog = FakeProgram(fake_models())
    with runtime(prog) as rt:
        rt.submit("mlp", make_args("mlp", 2)).result(TIMEOUT)
        with pytest.raises(InputError, match=r"argument 0 \(arg0\): expected shape"):
            rt.submit("mlp", torch.randn(1, 3))
    assert prog.calls == [{"mlp": 2}]


def test_program_check_inputs_is_used_when_present():
    class Checked(FakeProgram):
        def check_inputs(self, name, args):
            if name == "twin" and args[0].abs().max() > 100:
                raise InputError(f"tenant {name!r}, argument 0: too large")
            if name == "mlp" and args[0].abs().max() > 100:
                raise RuntimeError("not an StfuseError")

    prog = Checked(fake_models())
    with pytest.raises(InputError, match="too large"):  # examples go through the program's check too
        runtime(prog, example_inputs={"twin": torch.full((1, 5), 1e3)})
    with runtime(prog) as rt:
        with pytest.raises(InputError, match="too large"):
            rt.submit("twin", torch.full((1, 5), 1e3))
        with pytest.raises(InputError, match="'mlp': not an StfuseError"):
            rt.submit("mlp", torch.full((1, 8), 1e3))
    assert prog.calls == []


def test_cancelled_futures_never_run():
    models = fake_models()
    prog = FakeProgram(models)
    with runtime(prog, "batch") as rt:
        first = busy(rt, prog)
        futs = [rt.submit("twin", make_args("twin", 1)) for _ in range(6)]
        assert all(f.cancel() for f in futs[::2])
        prog.release()
        settle(futs + [first])
    assert [f.cancelled() for f in futs] == [True, False] * 3
    assert all(f.result() is not None for f in futs[1::2])
    assert prog.rows_run("twin") == 3
    assert rt.stats()["tenants"]["twin"]["cancelled"] == 3


# ------------------------------------------------------------------ close and back-pressure


def test_submit_after_close_raises():
    rt = runtime(FakeProgram(fake_models()))
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(RuntimeClosedError, match="closed"):
        rt.submit("mlp", make_args("mlp", 1))
    assert issubclass(RuntimeClosedError, StfuseError)


def test_close_drains_queued_work():
    models = fake_models()
    prog = FakeProgram(models)
    rt = runtime(prog)
    first = busy(rt, prog)
    sent = [(t, make_args(t, 1)) for t in models for _ in range(5)]
    futs = [rt.submit(t, a) for t, a in sent]
    closer = threading.Thread(target=rt.close)
    closer.start()
    deadline = time.monotonic() + TIMEOUT
    while not rt._closed and time.monotonic() < deadline:  # close() has begun
        time.sleep(0.001)
    with pytest.raises(RuntimeClosedError):
        rt.submit("mlp", make_args("mlp", 1))
    prog.release()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert all(f.done() and not f.cancelled() for f in futs + [first])
    for (t, a), f in zip(sent, futs):
        check(models, t, a, f.result())


@pytest.mark.parametrize("how", ["cancel_pending", "timeout"])
def test_close_cancels_queued_work_and_finishes_the_launch_in_flight(how):
    prog = FakeProgram(fake_models())
    rt = runtime(prog)
    first = busy(rt, prog)
    futs = [rt.submit("cnn", make_args("cnn", 1)) for _ in range(5)]
    kwargs = {"cancel_pending": True} if how == "cancel_pending" else {"timeout": 0.05}
    closer = threading.Thread(target=rt.close, kwargs=kwargs)
    closer.start()
    settle(futs)  # cancelled while the device is still held
    prog.release()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert all(f.cancelled() for f in futs)
    assert first.result().shape == (1, 4)
    assert prog.rows_run("cnn") == 0
    assert rt.stats()["tenants"]["cnn"]["cancelled"] == 5


def test_full_queue_raises_or_blocks_until_room():
    prog = FakeProgram(fake_models())
    with runtime(prog, "batch", max_queue=2) as rt:
        first = busy(rt, prog)
        queued = [rt.submit("twin", make_args("twin", 1)) for _ in range(2)]
        with pytest.raises(QueueFullError, match="'twin': queue full"):
            rt.submit("twin", make_args("twin", 1))
        with pytest.raises(QueueFullError):
            rt.submit("twin", make_args("twin", 1), block=True, timeout=0.01)
        rt.submit("mlp", make_args("mlp", 1))  # other tenants have their own queues
        late = []
        waiter = threading.Thread(target=lambda: late.append(
            rt.submit("twin", make_args("twin", 1), block=True, timeout=TIMEOUT)))
        waiter.start()
        prog.release()
        waiter.join(TIMEOUT)
        settle(queued + late + [first])
    assert len(late) == 1 and late[0].result() is not None
    assert rt.stats()["tenants"]["twin"]["rejected"] == 2


def test_requests_that_can_no_longer_meet_their_slo_are_shed_with_an_error():
    """Queued behind a held launch for 10 ms with a 1 us SLO (which an idle device meets,
    per the profile): shed, each future failing with DeadlineExceededError, never run."""
    prog = FakeProgram(fake_models())
    fast = LatencyProfile({t: 1e-9 for t in prog.tenants}, {t: 1e-10 for t in prog.tenants})
    with runtime(prog, profile=fast, shed=True, slo_ms={"twin": 1e-3, "mlp": 1e6, "cnn": 1e6}) as rt:
        first = busy(rt, prog)
        late = [rt.submit("twin", make_args("twin", 1)) for _ in range(4)]
        kept = rt.submit("cnn", make_args("cnn", 1))
        time.sleep(0.01)  # at least this long: every twin request is now past its deadline
        prog.release()
        settle(late + [kept, first])
        stats = rt.stats()["tenants"]
    for f in late:
        with pytest.raises(DeadlineExceededError, match="'twin': shed after"):
            f.result()
    assert kept.result().shape == (1, 5) and first.result().shape == (1, 4)
    assert prog.rows_run("twin") == 0
    assert stats["twin"]["shed"] == 4 and stats["twin"]["served"] == 0 and stats["cnn"]["shed"] == 0
    assert issubclass(DeadlineExceededError, StfuseError)


def test_rate_limit_rejects_at_submit_and_only_that_tenant():
    prog = FakeProgram(fake_models())
    with runtime(prog, rate_limits={"twin": (1e-6, 2)}) as rt:  # a burst of 2, then ~nothing
        futs = [rt.submit("twin", make_args("twin", 1)) for _ in range(2)]
        with pytest.raises(QueueFullError, match="'twin': over its rate limit"):
            rt.submit("twin", make_args("twin", 1))
        futs += [rt.submit("mlp", make_args("mlp", 1)) for _ in range(3)]
        settle(futs)
        stats = rt.stats()["tenants"]
    assert stats["twin"]["rejected"] == 1 and stats["twin"]["served"] == 2 and stats["mlp"]["served"] == 3


def test_a_tenant_over_its_share_waits_behind_one_within_it():
    """mlp's launch holds the device for 10 ms (five slices): mlp is then over its share, so
    twin runs first although mlp's queued requests came earlier (earlier deadlines)."""
    prog = FakeProgram(fake_models())
    with runtime(prog, "batch", slice_ms=2.0) as rt:
        first = busy(rt, prog)
        futs = [rt.submit("mlp", make_args("mlp", 1)) for _ in range(3)]
        futs.append(rt.submit("twin", make_args("twin", 1)))
        time.sleep(0.01)  # the held launch lasts at least this long, and is charged to mlp
        prog.release()
        settle(futs + [first])
    assert [set(c) for c in prog.calls] == [{"mlp"}, {"twin"}, {"mlp"}]


@pytest.mark.parametrize("policy", POLICIES)
def test_close_from_a_result_callback_does_not_deadlock(policy):
    prog = FakeProgram(fake_models())
    rt = runtime(prog, policy)
    fut = rt.submit("mlp", make_args("mlp", 1))
    fut.add_done_callback(lambda _: rt.close())  # runs on the worker or a pool thread
    settle([fut])
    rt.close()  # from here it waits for the worker, which ends because the runtime is closed
    assert not rt._thread.is_alive() and fut.result() is not None
    with pytest.raises(RuntimeClosedError):
        rt.submit("mlp", make_args("mlp", 1))


def test_close_wakes_a_blocked_submit():
    prog = FakeProgram(fake_models())
    rt = runtime(prog, max_queue=1)
    first = busy(rt, prog)
    rt.submit("mlp", make_args("mlp", 1))
    errors = []

    def blocked():
        try:
            rt.submit("mlp", make_args("mlp", 1), block=True)
        except StfuseError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=blocked)
    waiter.start()
    closer = threading.Thread(target=rt.close, kwargs={"cancel_pending": True})
    closer.start()
    waiter.join(TIMEOUT)
    prog.release()
    closer.join(TIMEOUT)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeClosedError)
    assert first.result() is not None


def test_a_broken_scheduler_fails_futures_instead_of_hanging():
    class Broken(Scheduler):
        name = "broken"

        def decide(self, queues, now, flush=False):
            raise RuntimeError("scheduler bug")

    prog = FakeProgram(fake_models())
    rt = Runtime(prog, Broken(prog.tenants))
    fut = rt.submit("mlp", make_args("mlp", 1))
    settle([fut])
    with pytest.raises(StfuseError, match="scheduler bug"):
        fut.result()
    with pytest.raises(RuntimeClosedError):
        rt.submit("mlp", make_args("mlp", 1))
    rt.close()


def test_constructor_rejects_bad_settings():
    prog = FakeProgram(fake_models())
    with pytest.raises(StfuseError, match="unknown tenant"):
        Runtime(prog, slo_ms={"bert": 25})
    with pytest.raises(StfuseError, match="unknown policy"):
        Runtime(prog, "fastest")
    with pytest.raises(StfuseError, match="max_queue"):
        Runtime(prog, max_queue=0)
    with pytest.raises(StfuseError, match=r"weights names unknown tenant\(s\) \['bert'\]"):
        Runtime(prog, weights={"bert": 2})
    with pytest.raises(StfuseError, match=r"rate_limits\['mlp'\] must be a finite number > 0, got 0"):
        Runtime(prog, rate_limits={"mlp": 0})
    with pytest.raises(StfuseError, match="pass them to the Scheduler"):
        Runtime(prog, Scheduler(prog.tenants), shed=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"slo_ms": {"mlp": -1}}, r"slo_ms\['mlp'\] must be a finite number of milliseconds > 0, got -1"),
    ({"slo_ms": {"mlp": float("nan")}}, "got nan"),
    ({"slo_ms": float("inf")}, "got inf"),
    ({"slo_ms": 0}, "slo_ms must be"),
    ({"slo_ms": "25"}, "got '25'"),
    ({"slo_ms": {"mlp": True}}, "got True"),
    ({"slice_ms": -1.0}, ">= 0, got -1.0"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"max_batch": 2.5}, "max_batch must be an integer >= 1"),
])
def test_constructor_rejects_bad_times_and_sizes(kwargs, match):
    with pytest.raises(StfuseError, match=match):
        Runtime(FakeProgram(fake_models()), **kwargs)


@pytest.mark.parametrize("policy", ["space-time", "space"])
def test_launching_threads_take_the_processs_intra_op_thread_count(policy, monkeypatch):
    """The worker (and, for "space", each pool thread) sets torch's thread count itself: a new
    thread's OpenMP team is every core whatever torch.get_num_threads() says, and a one-tenant
    linear there took 3.9 ms of CPU instead of 13 us on a busy 2-core machine (batching.py)."""
    callers, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (callers.append((threading.current_thread().name, n)),
                                                           real(n)))
    prog = FakeProgram(fake_models())
    with runtime(prog, policy) as rt:
        settle([rt.submit(t, make_args(t, 1)) for t in prog.tenants])
    names = {name for name, n in callers if n == torch.get_num_threads()}
    assert "stfuse-runtime" in names
    if policy == "space":
        assert any(name.startswith("stfuse-space") for name in names)


def test_stats_report_every_tenant():
    models = fake_models()
    prog = FakeProgram(models)
    with runtime(prog, slo_ms={"mlp": 1e6, "cnn": 1e-6}) as rt:
        settle([rt.submit(t, make_args(t, 2)) for t in models for _ in range(3)])
        st = rt.stats()
    assert st["policy"] == "space-time" and st["served"] == 12 and st["throughput_rps"] > 0
    mlp, cnn = st["tenants"]["mlp"], st["tenants"]["cnn"]
    assert mlp["served"] == 3 and mlp["p50_ms"] <= mlp["p90_ms"] <= mlp["p99_ms"]
    assert mlp["slo_misses"] == 0 and cnn["slo_misses"] == 3 and cnn["slo_miss_rate"] == 1.0
    assert st["tenants"]["pair"]["slo_ms"] == 100.0  # the default
    assert sum(n * c for n, c in mlp["batch_sizes"].items()) == 6 and mlp["queued"] == 0
    rt.reset_stats()
    assert rt.stats()["served"] == 0


def test_requests_of_a_tenant_that_mixes_rows_are_never_merged():
    torch.manual_seed(0)
    models = {"center": Center().eval(), "mlp": zoo.mlp(8, 16, 8)}
    fused = stfuse.compile(models, {t: torch.randn(4, 8) for t in models})
    assert fused.plan.stats["rows_independent"] == {"center": False, "mlp": True}
    gate = Gate(fused.run)
    prog = SimpleNamespace(tenants=fused.tenants, plan=fused.plan, run=gate)  # the program behind a gate
    with Runtime(prog, "batch", slice_ms=0.0, profile=cheap_fusion(fused.tenants)) as rt:
        sent = [(t, torch.randn(2, 8)) for _ in range(4) for t in ("center", "mlp")]
        futs = queue_behind_one_launch(rt, gate, ("mlp", torch.randn(1, 8)), sent)
        stats = rt.stats()
    for (t, a), f in zip(sent, futs):
        assert_close(f.result(), float64_reference(models[t], (a,)), msg=f"tenant {t}")
    assert [c["center"] for c in gate.calls if "center" in c] == [2, 2, 2, 2]  # one request each
    assert [c["mlp"] for c in gate.calls[1:] if "mlp" in c] == [8]  # four requests merged
    assert stats["tenants"]["center"]["merges_requests"] is False
    assert stats["tenants"]["mlp"]["merges_requests"] is True


def test_launches_stay_inside_a_loaded_tenants_batch_range(tmp_path):
    """A tenant traced for batch 1-4 (it branches on its batch size): a loaded artifact
    cannot trace it again, so the runtime never merges more than 4 rows of it."""
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    models = {"br": BranchOnBatch().eval(), "mlp": zoo.mlp(8, 16, 8)}
    stfuse.compile(models, {t: torch.randn(4, 8) for t in models}).save(tmp_path / "br")
    prog = stfuse.load(tmp_path / "br")
    examples = {t: torch.randn(2, 8) for t in models}
    with Runtime(prog, "batch", max_batch=16, slice_ms=1.0, example_inputs=examples, profile_reps=1) as rt:
        gate = prog.run = Gate(prog.run)  # after the latency profile was measured
        sent = [(t, torch.randn(2, 8)) for _ in range(6) for t in models]
        futs = queue_behind_one_launch(rt, gate, ("mlp", torch.randn(1, 8)), sent)
        stats = rt.stats()
    for (t, a), f in zip(sent, futs):
        assert_close(f.result(), float64_reference(models[t], (a,)), msg=f"tenant {t}")
    # 12 rows of br were queued and max_batch is 16: only the batch range splits them, at 4 rows
    assert [c["br"] for c in gate.calls if "br" in c] == [4, 4, 4]
    assert [c["mlp"] for c in gate.calls if "mlp" in c] == [1, 12]
    assert stats["tenants"]["br"]["retries"] == 0 and stats["tenants"]["br"]["failed"] == 0


@pytest.mark.gpu
def test_requests_written_on_another_stream_are_waited_for():
    """The input is still being written on the submitter's own stream when submit returns:
    the launch waits for that stream, and the output is handed over to it (record_stream)."""
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 8).cuda(), zoo.mlp(8, 16, 8).cuda()]
    fused = stfuse.compile(models, [torch.randn(2, 8, device="cuda"), torch.randn(2, 8, device="cuda")])
    side = torch.cuda.Stream()
    with Runtime(fused, policy="space-time", slo_ms=10_000) as rt:
        with torch.cuda.stream(side):
            x = torch.zeros(4, 8, device="cuda")
            torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning before the real values land
            x.copy_(torch.full((4, 8), 3.0, device="cuda"))
            fut = rt.submit("0", x)
            y = fut.result(TIMEOUT)
            want = models[0](torch.full((4, 8), 3.0, device="cuda"))
        side.synchronize()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_keyword_requests_are_merged_and_fused_like_positional_ones():
    """submit takes every call form of fused.run: a BERT tenant's requests as keyword dicts
    (examples too) are merged along the batch and fused with a positional tenant."""
    pytest.importorskip("transformers")
    from conftest import bert_call

    models = {"bert": zoo.hf_model("bert", 0)[0], "mlp": zoo.mlp(8, 16, 4)}
    fused = stfuse.compile(models, {"bert": bert_call(2, 8), "mlp": torch.randn(2, 8)})
    gate = Gate(fused.run)
    prog = SimpleNamespace(tenants=fused.tenants, run=gate, specs=fused.specs, check_inputs=fused.check_inputs)
    sent = [("bert", bert_call(2, 8, seed=i)) for i in range(3)] + [("mlp", torch.randn(2, 8))]
    examples = {"bert": bert_call(1, 8), "mlp": torch.randn(1, 8)}
    # shed=False: on a loaded machine the queued requests outlive the default SLO (a flake seen twice)
    with Runtime(prog, "space-time", profile=cheap_fusion(fused.tenants), example_inputs=examples,
                 shed=False) as rt:
        futs = queue_behind_one_launch(rt, gate, ("bert", ((), bert_call(1, 8, seed=9))), sent)
        with pytest.raises(InputError, match=r"tenant 'bert': missing keyword argument\(s\) 'attention_mask'"):
            rt.submit("bert", {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    assert gate.calls[1] == {"bert": 6, "mlp": 2}  # three requests merged, fused with the MLP
    for (t, call), f in zip(sent, futs):
        assert_close(f.result(), float64_call_reference(models[t], call), msg=f"tenant {t}")


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        return self.lin(x) * scale


def test_requests_pass_the_constant_keywords_compiled_for():
    """A tenant compiled with a constant keyword (scale=0.5): its requests pass it, are
    merged and run with it; a request without it, or with another value, is refused at submit."""
    torch.manual_seed(0)
    models = {"a": _Scaled().eval(), "b": _Scaled().eval()}
    fused = stfuse.compile(models, {"a": {"x": torch.randn(2, 8), "scale": 0.5}, "b": torch.randn(2, 8)})
    sent = [("a", {"x": torch.randn(1, 8), "scale": 0.5}) for _ in range(3)] + [("b", torch.randn(2, 8))]
    with Runtime(fused, policy="batch", slice_ms=20, slo_ms=10_000) as rt:
        futures = [rt.submit(t, call) for t, call in sent]
        for bad in ({"x": torch.randn(1, 8)}, {"x": torch.randn(1, 8), "scale": 2.0}, torch.randn(1, 8)):
            with pytest.raises(InputError, match=r"tenant 'a': (missing keyword argument\(s\) ('x', )?'scale'|"
                                                 r"keyword argument\(s\) scale=2.0, where)"):
                rt.submit("a", bad)
        wait(futures, timeout=60)
    for (t, call), f in zip(sent, futures):
        assert_close(f.result(), float64_call_reference(models[t], call), msg=f"tenant {t}")


def test_requests_of_other_lengths_run_in_separate_launches():
    """A tenant with a declared dynamic dim (issue 14, item 3): its queued requests of
    different lengths are not concatenated (that would fail and be retried one by one);
    each length's requests still share a launch, and another tenant still fuses."""
    torch.manual_seed(0)
    models = {"a": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(),
              "b": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()}
    fused = stfuse.compile(models, {t: torch.randn(2, 6, 8) for t in models},
                           dynamic={"a": {0: {1: "seq"}}})
    with Runtime(fused, policy="batch", slice_ms=50, max_batch=64) as rt:
        lengths = [3, 5, 3, 5, 3, 7]
        reqs = [("a", torch.randn(1, n, 8)) for n in lengths] + [("b", torch.randn(2, 6, 8))]
        futures = [rt.submit(t, x) for t, x in reqs]
        wait(futures, timeout=60)
        stats = rt.stats()["tenants"]
    for (t, x), f in zip(reqs, futures):
        assert_close(f.result(), float64_reference(models[t], (x,)), msg=f"{t} at {tuple(x.shape)}")
    assert stats["a"]["retries"] == 0 and stats["a"]["failed"] == 0
    assert stats["a"]["launches"] < len(lengths)  # equal lengths still merged


def test_submit_takes_every_call_form_for_a_positional_tenant():
    """A tenant traced with positional inputs: an (args, kwargs) pair works, and a dict is
    refused with the program's own message (unknown keyword), not a type complaint."""
    torch.manual_seed(0)
    models = {"a": zoo.mlp(16, 32, 4), "b": zoo.mlp(16, 32, 4)}
    fused = stfuse.compile(models, {t: torch.randn(2, 16) for t in models})
    x = torch.randn(3, 16)
    with Runtime(fused, slo_ms=1000) as rt:
        assert_close(rt.submit("a", ((x,), {})).result(), float64_reference(models["a"], (x,)))
        with pytest.raises(InputError, match=r"tenant 'a': unknown keyword argument\(s\) 'x'"):
            rt.submit("a", {"x": x})


def test_shed_takes_a_bool_or_none():
    torch.manual_seed(0)
    fused = stfuse.compile({"a": zoo.mlp(16, 32, 4)}, {"a": torch.randn(2, 16)})
    with pytest.raises(StfuseError, match=r"shed must be True, False or None, got 'yes'"):
        Runtime(fused, shed="yes")


def test_keyword_examples_give_a_measured_profile():
    """A keyword tenant's example is a call ((), {name: tensor}): measure_profile times it
    like a positional one (stfuse serve passes every tenant's example this way)."""
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 4)

        def forward(self, x, scale):
            return self.l(x) * scale

    torch.manual_seed(0)
    fused = stfuse.compile({"kw": Kw().eval(), "mlp": zoo.mlp(8, 16, 4)},
                           {"kw": {"x": torch.randn(2, 8), "scale": torch.rand(2, 4)}, "mlp": torch.randn(2, 8)})
    examples = {"kw": ((), {"x": torch.randn(1, 8), "scale": torch.rand(1, 4)}), "mlp": torch.randn(1, 8)}
    with Runtime(fused, "space-time", example_inputs=examples, max_batch=4, profile_reps=1) as rt:
        assert rt.submit("kw", {"x": torch.randn(2, 8), "scale": torch.rand(2, 4)}).result(TIMEOUT).shape == (2, 4)
    prof = rt._scheduler.profile
    assert set(prof.fixed) == {"kw", "mlp"} and frozenset({"kw", "mlp"}) in prof.fused_fixed


# ------------------------------------------------------------------ the garbage collector


def test_the_collector_skips_what_was_alive_while_a_runtime_serves():
    """collector.py: objects alive when a Runtime starts are frozen (full collections skip
    them) while it serves, and handed back when the last Runtime stops."""
    import gc

    from stfuse.runtime import collector

    models = fake_models()
    assert collector.holders() == 0 and gc.get_freeze_count() == 0
    keep = [object() for _ in range(10)] + [[] for _ in range(10)]  # tracked containers alive at start
    with runtime(FakeProgram(models), "batch") as first:
        frozen = gc.get_freeze_count()
        assert frozen >= 10
        with runtime(FakeProgram(models), "space-time") as second:
            assert collector.holders() == 2
            sent = hammer(second, list(models))
            settle([f for _, _, f in sent])
        assert collector.holders() == 1 and gc.get_freeze_count() >= frozen  # the first still serves
        sent = hammer(first, list(models))
        settle([f for _, _, f in sent])
    assert collector.holders() == 0 and gc.get_freeze_count() == 0
    for t, args, fut in sent:
        check(models, t, args, fut.result())
    with runtime(FakeProgram(models), "batch", freeze_gc=False):
        assert collector.holders() == 0 and gc.get_freeze_count() == 0
    with pytest.raises(StfuseError, match="freeze_gc must be True or False"):
        Runtime(FakeProgram(models), "batch", freeze_gc="yes")
    del keep


def test_a_runtime_that_cannot_start_gives_its_collector_hold_back(monkeypatch):
    from stfuse.runtime import collector

    def refuse(self):
        raise RuntimeError("can't start new thread")
    before = collector.holders()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        runtime(FakeProgram(fake_models()), "batch")
    assert collector.holders() == before
