"""Scheduling decisions for the multi-tenant runtime, kept free of threads and clocks.

A policy looks at the per-tenant queues and the time, and answers with one
decision: a `Dispatch` (which tenants, how many queued requests of each, fused
into one call or run concurrently), a `Wait` (hold the work until a given time
so that a batch or a fusion group can fill), or None (nothing queued).
`stfuse.runtime.Runtime` (runtime.py) executes decisions on a worker thread;
`stfuse.runtime.simulate` executes them on a fake clock against a device whose
latencies come from a `LatencyProfile` (profile.py), which is how tests/test_policies.py
checks the policies without sleeping.

A decision is asked for only while the device is idle, so a policy never has
to reason about overlapping launches (for "space", a tenant whose own call is
still running is shown with an empty queue). Times are seconds (floats).

Policies (the paper's taxonomy plus the scheduler it proposed but never built):

    time        one tenant per slice, round robin, one request per launch
    space       every tenant with work runs one request, concurrently and unfused
    batch       per-tenant dynamic batching (up to max_batch rows, held at most
                one slice to fill), one tenant per launch, most urgent first
    space-time  one fused launch per slice over a subset of tenants, each with
                a batch of its queued requests; subset and batch sizes chosen
                earliest-deadline-first against the latency profile, so that
                a tenant that can still meet its deadline is never pushed past
                it by the tenants fused with it
    slice       every request arriving within one slice joins one fused launch
                (the torch.compile backend's groups: no latency profile, calls
                that share a slice are always fused)

`OneRequestEach(policy)` wraps any of them for programs whose rows may depend on
each other (a Dynamo graph): at most one request per tenant in a launch.

Around the decisions, every policy answers three more questions the same way
(shares.py holds the bookkeeping): `admit` (a request at submit: refused when
its tenant is over its rate limit), `expired` (queued requests to shed: those
that can no longer meet their deadline, where shedding is on: by default for
"space-time" only) and `charge` (a launch's device time, against the fair
shares that "batch" and "space-time" rank tenants by).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

from stfuse.errors import StfuseError

from .profile import LatencyProfile
from .shares import Shares

POLICIES = ("time", "space", "batch", "space-time", "slice")
_EPS = 1e-9  # seconds: deadline comparisons tolerate float rounding of this much


class Pending(Protocol):
    """What a policy reads from a queued request (the runtime's and the simulator's both have it)."""

    arrival: float
    deadline: float
    rows: int  # size of the request's batch dimension


@dataclass(frozen=True)
class Dispatch:
    """Run the first `take[t]` queued requests of each tenant t.

    mode "fused": one call of the fused program over all tenants in `take`
    (one tenant means an ordinary single-tenant call); mode "concurrent": one
    call per tenant, all at the same time (threads on CPU, streams on GPU).
    With `pad_to`, every member's rows are padded (repeating its last row) to
    that many before the fused call, and the padding is dropped from the outputs.
    """

    take: Mapping[str, int]
    mode: str = "fused"
    pad_to: int | None = None


@dataclass(frozen=True)
class Wait:
    """Nothing to launch before `until`, unless a request of a tenant in `wake` arrives first
    (None: of any tenant), or one that leaves its tenant a whole batch (max_batch rows) queued.

    `wake` spares the runtime's worker the arrivals that cannot change the decision: woken
    by every one, at 1x load in bench_runtime (4 x mlp-small, 2-core CPU) "batch" decided
    four times per launch, 0.4 s of the worker's CPU in 2 s spent deciding to wait again.
    """

    until: float
    wake: frozenset | None = None


def woken(wake: frozenset | None, tenant: str, queue: Sequence[Pending], max_batch: int) -> bool:
    """Whether an arrival of `tenant` (now last in `queue`) ends a Wait whose `wake` this is:
    what Runtime.submit notifies the worker for, and what simulate checks against."""
    return wake is None or tenant in wake or _holds_rows(queue, 0, max_batch)


# --------------------------------------------------------------------------- policies


def _prefix(queue: Sequence[Pending], max_rows: int) -> list[int]:
    """Cumulative rows of the head requests that fit in max_rows rows (always at least one request)."""
    out: list[int] = []
    total = 0
    for r in queue:
        if out and total + r.rows > max_rows:
            break
        total += r.rows
        out.append(total)
    return out


def _holds_rows(queue: Sequence[Pending], start: int, rows: int) -> bool:
    """Whether queue[start:] holds at least `rows` rows (every request has at least one)."""
    n = len(queue)
    return n - start >= rows or sum([queue[i].rows for i in range(start, n)]) >= rows


def _full(queue: Sequence[Pending], prefix: list[int], max_rows: int) -> bool:
    """Whether the queue already holds a whole batch."""
    return prefix[-1] >= max_rows or len(prefix) < len(queue)


class Scheduler:
    """Base class. Subclasses implement `decide`; `tenants` fixes the round-robin and tie order.

    weights / rate_limits: see shares.Shares. shed: whether `expired` sheds
    requests (None: the policy's SHED default).
    """

    name = "base"
    SHED = False

    def __init__(self, tenants: Sequence[str], *, slice_s: float = 0.002, max_batch: int = 32,
                 profile: LatencyProfile | None = None, slo_s: Mapping[str, float] | None = None,
                 weights: Mapping[str, float] | None = None,
                 rate_limits: Mapping[str, float | tuple[float, float]] | None = None, shed: bool | None = None):
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
        self.shares = Shares(self.tenants, weights, rate_limits, quantum_s=slice_s)
        if shed is not None and not isinstance(shed, bool):
            raise StfuseError(f"scheduler: shed must be True, False or None, got {shed!r}")
        self.shed = self.SHED if shed is None else shed

    def admit(self, tenant: str, now: float) -> str | None:
        """A request of `tenant` arrives at `now`: None to queue it, else why it is refused."""
        return self.shares.admit(tenant, now)

    def expired(self, queues: Mapping[str, Sequence[Pending]], now: float) -> dict[str, int]:
        """{tenant: k}: shed the first k queued requests, which can no longer meet their deadline.

        A request is shed when, launched now, it would finish after its
        deadline: launched alone, or, while its tenant is overloaded (a whole
        batch, max_batch rows, queued from it on), in the launch the policy
        gives an overloaded tenant (`_full_launch`). Without that second rule
        an overloaded tenant's oldest requests, each still just in time alone,
        fill every full launch and all finish late: in the simulated 2x
        overload of tests/test_policies.py, 2% of requests made their SLO
        instead of half. Only for a tenant whose SLO an idle device meets
        (slo_s >= its one-row latency alone): a tenant that misses its SLO even
        alone, or has none, keeps being served late. Requests of a tenant are
        in arrival order with one SLO, so the expired ones are a prefix.
        """
        out: dict[str, int] = {}
        if not self.shed:
            return out
        for t, queue in queues.items():
            slo = self.slo_s.get(t)
            if not queue or slo is None or self.profile.estimate({t: 1}) > slo:
                continue
            full = None
            k = 0
            for r in queue:
                if _holds_rows(queue, k, self.max_batch):
                    full = self._full_launch(queues, t) if full is None else full
                    cost = max(full, self.profile.estimate({t: r.rows}))
                else:
                    cost = self.profile.estimate({t: r.rows})
                if now + cost <= r.deadline + _EPS:
                    break
                k += 1
            if k:
                out[t] = k
        return out

    def _full_launch(self, queues: Mapping[str, Sequence[Pending]], t: str) -> float:
        """Seconds of the launch an overloaded tenant t gets: its own whole batch (space-time fuses
        others into it only while that keeps its head on time)."""
        return self.profile.estimate({t: self.max_batch})

    def charge(self, rows: Mapping[str, int], seconds: float) -> None:
        """One launch ran for `seconds` (measured, or simulated) with `rows[t]` rows of each tenant."""
        self.shares.charge(rows, seconds, self.profile.solo)

    def decide(self, queues: Mapping[str, Sequence[Pending]], now: float,
               flush: bool = False) -> Dispatch | Wait | None:
        """The next decision. `flush` (set while closing) forbids waiting."""
        raise NotImplementedError

    def _by_urgency(self, queues: Mapping[str, Sequence[Pending]], tenants: Iterable[str],
                    now: float) -> list[str]:
        """Tenants within their fair share before those over it; inside each, earliest deadline
        first over the tenants' oldest requests, late ones after on-time ones.

        A head is late when even alone it cannot finish by its deadline. Ranking
        late heads last is what keeps a light tenant on time beside an
        overloaded one (whose backlog is all late); plain EDF would serve the
        backlog first and make both miss. Late heads still run whenever no
        on-time work is waiting, and in space-time they join fused launches.
        The share comes first because deadlines alone do not isolate: a flood
        whose backlog is still on time has earlier deadlines than a quiet
        tenant's new request, and EDF would serve the whole backlog first.
        """
        self.shares.refresh(self._busy(queues))

        def key(t):
            head = queues[t][0]
            late = now + self.profile.estimate({t: head.rows}) > head.deadline
            return (self.shares.over(t), late, head.deadline, head.arrival, self._order[t])

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
                return Dispatch({t: 1})
        return None


class SpaceScheduler(Scheduler):
    """Space-only multiplexing: every tenant with work runs its oldest request, concurrently."""

    name = "space"

    def decide(self, queues, now, flush=False):
        busy = self._busy(queues)
        return Dispatch({t: 1 for t in busy}, mode="concurrent") if busy else None


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
        prefix = {t: _prefix(queues[t], self.max_batch) for t in busy}
        ready = [t for t in busy
                 if flush or now >= queues[t][0].arrival + self.slice_s
                 or _full(queues[t], prefix[t], self.max_batch)]
        if not ready:  # until a slice has passed or a batch fills: other arrivals change nothing
            return Wait(min(queues[t][0].arrival for t in busy) + self.slice_s, frozenset())
        t = self._by_urgency(queues, ready, now)[0]
        return Dispatch({t: len(prefix[t])})


class SpaceTimeScheduler(Scheduler):
    """Dynamic space-time scheduling: one fused launch per slice over a subset of tenants.

    1. Hold: while some tenant has no work, no batch is full, the oldest
       request has waited less than a slice and the most urgent tenant can
       still start later and meet its deadline, wait for fusion partners.
    2. Head: the most urgent tenant (Scheduler._by_urgency) takes the largest
       batch (up to max_batch rows) that meets its oldest request's deadline;
       if even one request would miss, it is late and takes as many as it may.
       A tenant whose queue holds a whole batch (max_batch rows) is
       overloaded: it takes the whole batch, whatever its own head's deadline.
       Trimming its batch to that deadline would spend a launch's fixed cost
       on a few rows while the rest of the queue waits and goes late in turn:
       that is how a deadline-trimming scheduler loses to plain batching past
       capacity. What cannot make its deadline even so is shed (`expired`).
    3. Grow: in order of urgency, each other tenant joins with the largest
       batch that keeps every on-time member on time (an overloaded member's
       own deadline included in that only when it is not overloaded), if fusing
       it costs no more than running it after the launch (else with a batch the
       size of the launch's largest, or one request, if either is worth it;
       else it waits for a later slice).
    4. Reserve: beyond the head's first request, a launch never grows past
       min over tenants u of (slo_s[u] - u's latency alone for one row): a
       request of any tenant arriving just after the launch starts can still
       wait for it and meet its SLO. Tenants whose SLO is out of reach even
       alone, or unknown, reserve nothing. Without this, one tenant's big
       batch blocks the device while a tight-SLO tenant's request waits.
    5. Pad: the launch asks for padding to the largest member batch where the
       profile prices unequal batch sizes above padded equal ones.
    """

    name = "space-time"
    SHED = True

    def decide(self, queues, now, flush=False):
        busy = self._busy(queues)
        if not busy:
            return None
        prof = self.profile
        prefix = {t: _prefix(queues[t], self.max_batch) for t in busy}
        order = self._by_urgency(queues, busy, now)
        if not flush:
            hold = self._hold_until(queues, busy, prefix, order[0], now)
            if hold is not None and hold > now:
                # what ends the hold sooner: a fusion partner, a batch filling, or the head's rows
                # moving its latest start (_hold_until); other arrivals change nothing
                return Wait(hold, frozenset(t for t in self.tenants if t not in busy) | {order[0]})
        budget = self._reserve()
        take: dict[str, int] = {}
        rows: dict[str, int] = {}
        latency = 0.0  # estimate of the launch as built so far
        slack = math.inf  # time left to the earliest deadline among on-time members
        for t in order:
            pre = prefix[t]
            first = prof.estimate({**rows, t: pre[0]})
            left = queues[t][0].deadline - now
            on_time = first <= left + _EPS  # a head held to its latest start is on time
            # an overloaded head fills its batch: its own head's deadline does not trim it
            own = left if on_time and (take or not _full(queues[t], pre, self.max_batch)) else math.inf
            limit = min(slack, budget, own) + _EPS
            if take and first > limit:
                continue
            # the largest batch within the limit; the head runs at least one request, whatever it costs.
            # Everything queued first: it fits in most decisions, and then one estimate does
            lo, hi = 1, len(pre)
            if hi > 1 and prof.estimate({**rows, t: pre[-1]}) <= limit:
                lo = hi
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if prof.estimate({**rows, t: pre[mid - 1]}) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            if take:
                lo = self._worth_fusing(rows, latency, t, pre, lo)
                if not lo:
                    continue  # fusing t costs more than running it in a later launch
            take[t], rows[t] = lo, pre[lo - 1]
            latency = prof.estimate(rows)
            if on_time and latency <= left + _EPS:  # joiners must keep this member on time
                slack = min(slack, left)
        return Dispatch(take, pad_to=prof.pad_to(rows))

    def _full_launch(self, queues, t):
        """The launch an overloaded tenant gets: every busy tenant's whole batch (or all it has
        queued) fused, up to the reserve (step 4), where that costs less than running them apart;
        else its own whole batch. Shedding against its own batch alone would keep requests that
        then finish late in the fused launch; against a fused launch never made, it would shed
        requests that its own launch serves in time."""
        alone = self.profile.estimate({t: self.max_batch})
        rows = {u: self.max_batch if _holds_rows(q, 0, self.max_batch) else sum([r.rows for r in q])
                for u, q in queues.items() if q}
        fused = self.profile.estimate(rows)
        if len(rows) < 2 or fused > sum(self.profile.estimate({u: b}) for u, b in rows.items()):
            return alone
        return max(alone, min(fused, self._reserve()))

    def _reserve(self) -> float:
        """Step 4: how long a launch may grow (beyond the head's first request)."""
        reserve = [self.slo_s[u] - self.profile.solo(u, 1) for u in self.tenants if u in self.slo_s]
        return min((r for r in reserve if r > 0), default=math.inf)

    def _worth_fusing(self, rows: dict[str, int], latency: float, t: str, pre: list[int], k: int) -> int:
        """The batch (at most k requests) with which t joins the launch for less than it costs alone
        after it, or 0: k itself, else the batch that matches the launch's largest (an equal-size
        member is cheaper where the program has a fast path for those), else one request."""
        most = max(rows.values())
        even = bisect.bisect_left(pre, most) + 1  # requests whose rows add up to `most`, if any do
        tries = [k] + ([even] if even < k and pre[even - 1] == most else []) + ([1] if k > 1 else [])
        for c in tries:
            alone = self.profile.estimate({t: pre[c - 1]})
            if self.profile.estimate({**rows, t: pre[c - 1]}) <= latency + alone:
                return c
        return 0

    def _hold_until(self, queues, busy, prefix, head, now) -> float | None:
        if len(busy) == len(self.tenants):
            return None
        if any(_full(queues[t], prefix[t], self.max_batch) for t in busy):
            return None
        oldest = min(queues[t][0].arrival for t in busy)
        latest_start = queues[head][0].deadline - self.profile.estimate({head: prefix[head][-1]})
        return min(oldest + self.slice_s, latest_start)


class SliceScheduler(Scheduler):
    """Launch when every *live* tenant has a call queued, or when the oldest queued call
    has waited one slice; take the oldest call of every tenant with work.

    A tenant is live when it had a call within the last LIVE_SLICES slices (at least
    LIVE_S seconds): a backend group keeps tenants that no longer get calls (the static
    graph of a model Dynamo has since recompiled with a dynamic batch), and waiting for
    those would hold every call a full slice. Unlike "space-time" it does not weigh the
    launch against a latency profile, so calls that share a slice are always fused.
    """

    name = "slice"
    LIVE_SLICES, LIVE_S = 50, 1.0

    def __init__(self, tenants: Sequence[str], **kwargs):
        super().__init__(tenants, **kwargs)
        self.horizon = max(self.LIVE_S, self.LIVE_SLICES * self.slice_s)
        self.seen: dict[str, float] = {}  # tenant -> arrival of its latest call seen

    def decide(self, queues, now, flush=False):
        busy = self._busy(queues)
        if not busy:
            return None
        for t in busy:
            self.seen[t] = max(self.seen.get(t, -math.inf), queues[t][-1].arrival)
        live = {t for t, at in self.seen.items() if now - at <= self.horizon}
        if not flush and not live <= set(busy):
            until = min(queues[t][0].arrival for t in busy) + self.slice_s
            if until > now:
                return Wait(until)
        return Dispatch({t: 1 for t in busy})


class OneRequestEach(Scheduler):
    """``inner``'s decisions with at most one request per tenant in a launch.

    The runtime would otherwise concatenate a tenant's queued requests along dim 0,
    which is right only for models whose rows are independent; a Dynamo graph
    promises no such thing.
    """

    def __init__(self, inner: Scheduler):
        super().__init__(inner.tenants, slice_s=inner.slice_s, max_batch=inner.max_batch,
                         profile=inner.profile, slo_s=inner.slo_s, shed=inner.shed)
        self.inner, self.name, self.shares = inner, inner.name, inner.shares

    def decide(self, queues, now, flush=False):
        d = self.inner.decide(queues, now, flush)
        return Dispatch({t: 1 for t in d.take}, d.mode) if isinstance(d, Dispatch) else d


_SCHEDULERS = {cls.name: cls for cls in (TimeScheduler, SpaceScheduler, BatchScheduler, SpaceTimeScheduler,
                                         SliceScheduler)}


def make_scheduler(policy: str, tenants: Sequence[str], **kwargs) -> Scheduler:
    """The scheduler for a policy name in POLICIES; kwargs go to `Scheduler.__init__`."""
    if policy not in _SCHEDULERS:
        raise StfuseError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return _SCHEDULERS[policy](tenants, **kwargs)
