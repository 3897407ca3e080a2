"""Scheduling decisions for the multi-tenant runtime, kept free of threads and clocks.

A policy looks at the per-tenant queues and the time, and answers with one
decision: a `Launch` (which tenants, how many queued requests of each, fused
into one call or run concurrently), a `Wait` (hold the work until a given time
so that a batch or a fusion group can fill), or None (nothing queued). The
runtime (stfuse/runtime.py) executes decisions on a worker thread; `simulate`
executes them on a fake clock and a device whose latencies come from a
`LatencyProfile`, which is how tests/test_scheduler.py checks the policies
without sleeping.

A decision is asked for only while the device is idle, so a policy never has
to reason about overlapping launches. Times are seconds (floats).

Policies (the paper's taxonomy plus the scheduler it proposed but never built):

    time        one tenant per slice, round robin, one request per launch
    space       every tenant with work runs one request, concurrently and unfused
    batch       per-tenant dynamic batching (up to max_batch rows, held at most
                one slice to fill), tenants served earliest-deadline-first
    space-time  one fused launch per slice over a subset of tenants, each with
                a batch of its queued requests; subset and batch sizes chosen
                earliest-deadline-first against the latency profile, so that
                a tenant that can still meet its deadline is never pushed past
                it by the tenants fused with it
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from stfuse.errors import StfuseError

POLICIES = ("time", "space", "batch", "space-time")


class Pending(Protocol):
    """What a policy reads from a queued request (the runtime's and the simulator's both have it)."""

    arrival: float
    deadline: float
    rows: int  # size of the request's batch dimension


@dataclass(frozen=True)
class Launch:
    """Run the first `take[t]` queued requests of each tenant t.

    mode "fused": one call of the fused program over all tenants in `take`
    (one tenant means an ordinary single-tenant call); mode "concurrent": one
    call per tenant, all at the same time (threads on CPU, streams on GPU).
    """

    take: Mapping[str, int]
    mode: str = "fused"


@dataclass(frozen=True)
class Wait:
    """Nothing to launch before `until` (unless new work arrives first)."""

    until: float


# --------------------------------------------------------------------------- profile


@dataclass
class LatencyProfile:
    """Latency model of the fused program, per group of tenants and batch sizes.

    A tenant alone with b rows costs `fixed[t] + per_row[t] * b`. A fused group
    S costs `group_fixed(S) + sum(per_row[t] * b_t)`: fusion shares the fixed
    part (dispatch and launch overhead, weight loads) and adds up the per-row
    work. `group_fixed` is looked up in `fused_fixed` (measured groups) and
    otherwise scaled from the largest measured group: with r = fixed(measured)
    / sum(fixed[t] of its members), a k-tenant group gets a ratio interpolated
    linearly between 1 (k = 1) and r (k = size of the measured group).

    `observe` keeps an exponentially weighted correction per tenant set, so a
    startup profile taken on a cold machine converges to what launches take.
    `concurrent_ratio` only matters to `simulate`: a concurrent (space) launch
    takes `concurrent_ratio * sum(solo costs)`, 1.0 meaning no overlap at all.
    """

    fixed: dict[str, float]
    per_row: dict[str, float]
    fused_fixed: dict[frozenset, float] = field(default_factory=dict)
    concurrent_ratio: float = 1.0
    default_fixed: float = 1e-3
    default_per_row: float = 1e-4
    correction: dict[frozenset, float] = field(default_factory=dict)

    def solo(self, tenant: str, rows: int) -> float:
        return self._fixed(tenant) + self._per_row(tenant) * rows

    def estimate(self, rows: Mapping[str, int]) -> float:
        """Seconds for one fused launch with `rows[t]` rows of each tenant t."""
        if not rows:
            return 0.0
        key = frozenset(rows)
        work = sum(self._per_row(t) * b for t, b in rows.items())
        return (self.group_fixed(key) + work) * self.correction.get(key, 1.0)

    def estimate_concurrent(self, rows: Mapping[str, int]) -> float:
        return self.concurrent_ratio * sum(self.estimate({t: b}) for t, b in rows.items())

    def group_fixed(self, tenants: frozenset) -> float:
        base = sum(self._fixed(t) for t in tenants)
        if len(tenants) <= 1:
            return base
        if tenants in self.fused_fixed:
            return self.fused_fixed[tenants]
        if not self.fused_fixed:
            return base
        ref = max(self.fused_fixed, key=lambda s: (len(s), sorted(s)))
        ratio = self.fused_fixed[ref] / max(sum(self._fixed(t) for t in ref), 1e-12)
        if len(ref) <= 1:
            return base
        frac = min(1.0, (len(tenants) - 1) / (len(ref) - 1))
        return base * (1.0 + (ratio - 1.0) * frac)

    def observe(self, rows: Mapping[str, int], seconds: float, weight: float = 0.2) -> None:
        """Fold one measured launch into the correction of its tenant set."""
        key = frozenset(rows)
        old = self.correction.get(key, 1.0)
        model = self.estimate(rows) / old
        if model <= 0 or seconds <= 0:
            return
        ratio = min(10.0, max(0.1, seconds / model))
        self.correction[key] = (1 - weight) * old + weight * ratio

    def _fixed(self, tenant: str) -> float:
        return self.fixed.get(tenant, self.default_fixed)

    def _per_row(self, tenant: str) -> float:
        return self.per_row.get(tenant, self.default_per_row)


# --------------------------------------------------------------------------- policies


def _rows(queue: Sequence[Pending], count: int) -> int:
    return sum(r.rows for r in itertools.islice(queue, count))


def _fit(queue: Sequence[Pending], max_rows: int) -> int:
    """How many head requests fit in max_rows rows (at least one)."""
    total = 0
    count = 0
    for r in queue:
        if count and total + r.rows > max_rows:
            break
        total += r.rows
        count += 1
    return count


class Scheduler:
    """Base class. Subclasses implement `decide`; `tenants` fixes the round-robin and tie order."""

    name = "base"

    def __init__(self, tenants: Sequence[str], *, slice_s: float = 0.002, max_batch: int = 32,
                 profile: LatencyProfile | None = None, slo_s: Mapping[str, float] | None = None):
        if not tenants:
            raise StfuseError("scheduler: no tenants")
        if max_batch < 1:
            raise StfuseError(f"scheduler: max_batch must be >= 1, got {max_batch}")
        if slice_s < 0:
            raise StfuseError(f"scheduler: slice must be >= 0, got {slice_s}")
        self.tenants = list(tenants)
        self.slice_s = slice_s
        self.max_batch = max_batch
        self.profile = profile if profile is not None else LatencyProfile({}, {})
        self.slo_s = dict(slo_s or {})
        self._order = {t: i for i, t in enumerate(self.tenants)}

    def decide(self, queues: Mapping[str, Sequence[Pending]], now: float,
               flush: bool = False) -> Launch | Wait | None:
        """The next decision. `flush` (set while closing) forbids waiting."""
        raise NotImplementedError

    def _by_urgency(self, queues: Mapping[str, Sequence[Pending]], tenants: Iterable[str],
                    now: float) -> list[str]:
        """Earliest deadline first over the tenants' oldest requests, late ones after on-time ones.

        A head is late when even alone it cannot finish by its deadline. Ranking
        late heads last is what keeps a light tenant on time beside an
        overloaded one (whose backlog is all late); plain EDF would serve the
        backlog first and make both miss. Late heads still run whenever no
        on-time work is waiting, and in space-time they join fused launches.
        """
        def key(t):
            head = queues[t][0]
            late = now + self.profile.estimate({t: head.rows}) > head.deadline
            return (late, head.deadline, head.arrival, self._order[t])

        return sorted(tenants, key=key)

    def _busy(self, queues: Mapping[str, Sequence[Pending]]) -> list[str]:
        return [t for t in self.tenants if queues.get(t)]


class TimeScheduler(Scheduler):
    """Time-only multiplexing: the next tenant with work, round robin, runs its oldest request."""

    name = "time"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next = 0

    def decide(self, queues, now, flush=False):
        n = len(self.tenants)
        for i in range(n):
            t = self.tenants[(self._next + i) % n]
            if queues.get(t):
                self._next = (self._next + i + 1) % n
                return Launch({t: 1})
        return None


class SpaceScheduler(Scheduler):
    """Space-only multiplexing: every tenant with work runs its oldest request, concurrently."""

    name = "space"

    def decide(self, queues, now, flush=False):
        busy = self._busy(queues)
        return Launch({t: 1 for t in busy}, mode="concurrent") if busy else None


class BatchScheduler(Scheduler):
    """Exclusive dynamic batching: one tenant per launch with up to max_batch rows.

    A tenant is ready when its queue fills a batch or its oldest request has
    waited one slice; among ready tenants the most urgent goes first.
    """

    name = "batch"

    def decide(self, queues, now, flush=False):
        busy = self._busy(queues)
        if not busy:
            return None
        ready = [t for t in busy
                 if flush or now >= queues[t][0].arrival + self.slice_s
                 or _rows(queues[t], len(queues[t])) >= self.max_batch]
        if not ready:
            return Wait(min(queues[t][0].arrival for t in busy) + self.slice_s)
        t = self._by_urgency(queues, ready, now)[0]
        return Launch({t: _fit(queues[t], self.max_batch)})


class SpaceTimeScheduler(Scheduler):
    """Dynamic space-time scheduling: one fused launch per slice over a subset of tenants.

    1. Hold: while some tenant has no work, no batch is full, the oldest
       request has waited less than a slice and the most urgent tenant can
       still start later and meet its deadline, wait for fusion partners.
    2. Head: the most urgent tenant (Scheduler._by_urgency) takes the largest
       batch (up to max_batch rows) that meets its oldest request's deadline;
       if even one request would miss, it is late and takes as many as it may.
    3. Grow: in order of urgency, each other tenant joins when fusing it costs
       no more than running it after the group (else it waits for a later
       slice), with the largest batch that keeps every on-time member on time.
    4. Reserve: beyond the head's first request, a launch never grows past
       min over tenants u of (slo_s[u] - u's latency alone for one row): a
       request of any tenant arriving just after the launch starts can still
       wait for it and meet its SLO. Tenants whose SLO is out of reach even
       alone, or unknown, reserve nothing. Without this, one tenant's big
       batch blocks the device while a tight-SLO tenant's request waits.
    """

    name = "space-time"

    def decide(self, queues, now, flush=False):
        busy = self._busy(queues)
        if not busy:
            return None
        prof = self.profile
        caps = {t: _fit(queues[t], self.max_batch) for t in busy}
        order = self._by_urgency(queues, busy, now)
        head = order[0]
        if not flush:
            hold = self._hold_until(queues, busy, caps, head, now)
            if hold is not None and hold > now:
                return Wait(hold)

        def rows_of(take):
            return {t: _rows(queues[t], k) for t, k in take.items()}

        def deadline(t):
            return queues[t][0].deadline

        reserve = [self.slo_s[u] - prof.solo(u, 1) for u in self.tenants if u in self.slo_s]
        budget = min((r for r in reserve if r > 0), default=math.inf)
        take: dict[str, int] = {}
        protected: list[str] = []  # members that must stay on time
        for t in order:
            if take:
                base = rows_of(take)
                alone = {t: queues[t][0].rows}
                if prof.estimate({**base, **alone}) > prof.estimate(base) + prof.estimate(alone):
                    continue  # fusing t would cost more than running it in a later launch
            on_time = now + prof.estimate(rows_of({**take, t: 1})) <= deadline(t)
            guard = protected + [t] if on_time else protected

            def feasible(k, t=t, guard=guard, first=not take):
                latency = prof.estimate(rows_of({**take, t: k}))
                if latency > budget and not (first and k == 1):
                    return False
                return all(now + latency <= deadline(m) for m in guard)

            if not feasible(1):
                continue
            take[t] = self._largest(feasible, caps[t])
            if on_time:
                protected.append(t)
        return Launch(take)

    @staticmethod
    def _largest(ok, hi: int) -> int:
        """Largest k in [1, hi] with ok(k), given ok(1) and ok monotone (latency grows with rows)."""
        lo = 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _hold_until(self, queues, busy, caps, head, now) -> float | None:
        if len(busy) == len(self.tenants):
            return None
        if any(_rows(queues[t], caps[t]) >= self.max_batch for t in busy):
            return None
        oldest = min(queues[t][0].arrival for t in busy)
        latest_start = queues[head][0].deadline - self.profile.estimate({head: _rows(queues[head], caps[head])})
        return min(oldest + self.slice_s, latest_start)


_SCHEDULERS = {cls.name: cls for cls in (TimeScheduler, SpaceScheduler, BatchScheduler, SpaceTimeScheduler)}


def make_scheduler(policy: str, tenants: Sequence[str], **kwargs) -> Scheduler:
    """The scheduler for a policy name in POLICIES; kwargs go to `Scheduler.__init__`."""
    if policy not in _SCHEDULERS:
        raise StfuseError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return _SCHEDULERS[policy](tenants, **kwargs)


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


class StatsRecorder:
    """Per-tenant latency, SLO and launch accounting, driven by explicit times.

    Latencies are kept for the last `window` requests per tenant (bounded
    memory); counters cover everything since the last reset.
    """

    def __init__(self, tenants: Sequence[str], slo_s: Mapping[str, float], window: int = 100_000):
        self.tenants = list(tenants)
        self.slo_s = dict(slo_s)
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.first = None
        self.last = None
        self.launches = 0
        self.launch_tenants = 0
        self.t = {name: {"served": 0, "failed": 0, "cancelled": 0, "rejected": 0, "slo_misses": 0,
                         "launches": 0, "fused_launches": 0, "rows": 0, "retries": 0,
                         "batch_sizes": {}, "latencies": deque(maxlen=self.window)}
                  for name in self.tenants}

    def _span(self, start: float, end: float) -> None:
        self.first = start if self.first is None else min(self.first, start)
        self.last = end if self.last is None else max(self.last, end)

    def request(self, tenant: str, arrival: float, finish: float, ok: bool = True) -> None:
        s = self.t[tenant]
        self._span(arrival, finish)
        if not ok:
            s["failed"] += 1
            return
        latency = finish - arrival
        s["served"] += 1
        s["latencies"].append(latency)
        if latency > self.slo_s[tenant]:
            s["slo_misses"] += 1

    def count(self, tenant: str, what: str, n: int = 1) -> None:
        """Bump a plain counter: "cancelled", "rejected" or "retries"."""
        self.t[tenant][what] += n

    def launch(self, rows: Mapping[str, int]) -> None:
        """One launch (a fused call, or one tenant's call within a concurrent slice)."""
        self.launches += 1
        self.launch_tenants += len(rows)
        for name, b in rows.items():
            s = self.t[name]
            s["launches"] += 1
            s["fused_launches"] += len(rows) > 1
            s["rows"] += b
            s["batch_sizes"][b] = s["batch_sizes"].get(b, 0) + 1

    def snapshot(self) -> dict:
        out = {}
        served = 0
        for name, s in self.t.items():
            lat = sorted(s["latencies"])
            ms = [None if v is None else v * 1e3 for v in (percentile(lat, p) for p in (50, 90, 99))]
            served += s["served"]
            out[name] = {
                "served": s["served"], "failed": s["failed"], "cancelled": s["cancelled"],
                "rejected": s["rejected"], "retries": s["retries"],
                "p50_ms": ms[0], "p90_ms": ms[1], "p99_ms": ms[2],
                "mean_ms": sum(lat) / len(lat) * 1e3 if lat else None,
                "slo_ms": self.slo_s[name] * 1e3, "slo_misses": s["slo_misses"],
                "slo_miss_rate": s["slo_misses"] / s["served"] if s["served"] else 0.0,
                "launches": s["launches"], "fused_launches": s["fused_launches"],
                "mean_batch": s["rows"] / s["launches"] if s["launches"] else 0.0,
                "batch_sizes": dict(sorted(s["batch_sizes"].items())),
            }
        span = (self.last - self.first) if self.first is not None else 0.0
        return {
            "tenants": out,
            "served": served,
            "elapsed_s": span,
            "throughput_rps": served / span if span > 0 else 0.0,
            "launches": self.launches,
            "mean_tenants_per_launch": self.launch_tenants / self.launches if self.launches else 0.0,
        }


# --------------------------------------------------------------------------- simulation


@dataclass
class SimRequest:
    """A request in `simulate`; id (arrival order), start, finish and launch are filled in by it."""

    tenant: str
    arrival: float
    deadline: float
    rows: int = 1
    id: int = 0
    start: float | None = None
    finish: float | None = None
    launch: int | None = None


@dataclass
class SimResult:
    requests: list[SimRequest]
    launches: list[tuple[float, float, dict, str]]  # (start, finish, rows per tenant, mode)
    stats: dict


def simulate(scheduler: Scheduler, requests: Iterable[SimRequest], device: LatencyProfile,
             *, slo_s: Mapping[str, float] | None = None, max_queue: int | None = None) -> SimResult:
    """Run a policy on a fake clock against a device whose latencies come from `device`.

    Discrete events: arrivals and launch completions. The scheduler is asked
    for a decision whenever the device is idle; a Wait advances the clock to
    its time or to the next arrival, whichever is first. Every request ends
    with start/finish set, except arrivals that found their tenant's queue
    holding `max_queue` requests (rejected, as Runtime.submit does). A
    decision that takes more than is queued, or waits for the past, raises.
    """
    reqs = sorted(requests, key=lambda r: (r.arrival, r.id))
    for i, r in enumerate(reqs):
        r.id = i
    slo = dict(slo_s) if slo_s is not None else {
        t: max((r.deadline - r.arrival for r in reqs if r.tenant == t), default=math.inf)
        for t in scheduler.tenants}
    stats = StatsRecorder(scheduler.tenants, slo)
    queues: dict[str, deque] = {t: deque() for t in scheduler.tenants}
    arrivals = [(r.arrival, r.id, r) for r in reqs]
    heapq.heapify(arrivals)
    launches: list[tuple[float, float, dict, str]] = []
    now = 0.0
    while True:
        while arrivals and arrivals[0][0] <= now:
            r = heapq.heappop(arrivals)[2]
            if max_queue is not None and len(queues[r.tenant]) >= max_queue:
                stats.count(r.tenant, "rejected")
            else:
                queues[r.tenant].append(r)
        decision = scheduler.decide(queues, now)
        if decision is None:
            if not arrivals:
                break
            now = arrivals[0][0]
            continue
        if isinstance(decision, Wait):
            if decision.until <= now:
                raise StfuseError(f"{scheduler.name}: at {now} waits until {decision.until}")
            now = min(decision.until, arrivals[0][0]) if arrivals else decision.until
            continue
        taken = {}
        for t, k in decision.take.items():
            if not 1 <= k <= len(queues[t]):
                raise StfuseError(f"{scheduler.name}: takes {k} of {len(queues[t])} queued for {t!r}")
            taken[t] = [queues[t].popleft() for _ in range(k)]
        rows = {t: sum(r.rows for r in rs) for t, rs in taken.items()}
        if decision.mode == "concurrent":
            duration = device.estimate_concurrent(rows)
            for t, b in rows.items():
                stats.launch({t: b})
        else:
            duration = device.estimate(rows)
            stats.launch(rows)
        end = now + duration
        launches.append((now, end, rows, decision.mode))
        for rs in taken.values():
            for r in rs:
                r.start, r.finish, r.launch = now, end, len(launches) - 1
                stats.request(r.tenant, r.arrival, end)
        now = end
    return SimResult(reqs, launches, stats.snapshot())
