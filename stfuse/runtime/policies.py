"""Scheduling decisions for the multi-tenant runtime, kept free of threads and clocks.

This module holds the simple policies and the registry; "space-time" is in
space_time.py, and what every policy shares (the decisions, the base class) in
scheduler.py. A policy looks at the per-tenant queues and the time, and answers with one
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
(the base class `Scheduler`, scheduler.py; shares.py holds the bookkeeping): `admit` (a request at submit: refused when
its tenant is over its rate limit), `expired` (queued requests to shed: those
that can no longer meet their deadline, where shedding is on: by default for
"space-time" only) and `charge` (a launch's device time, against the fair
shares that "batch" and "space-time" rank tenants by).
"""

from __future__ import annotations

import math
from typing import Sequence

from stfuse.errors import StfuseError

# the interface, re-exported: the runtime, the simulator and users import it from here
from .scheduler import Dispatch, Pending, Scheduler, Wait, _full, _prefix, woken  # noqa: F401
from .space_time import SpaceTimeScheduler

POLICIES = ("time", "space", "batch", "space-time", "slice")


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

    def charge(self, rows, seconds):
        self.inner.charge(rows, seconds)  # the inner policy's shares (this one's too) and its load


_SCHEDULERS = {cls.name: cls for cls in (TimeScheduler, SpaceScheduler, BatchScheduler, SpaceTimeScheduler,
                                         SliceScheduler)}


def make_scheduler(policy: str, tenants: Sequence[str], **kwargs) -> Scheduler:
    """The scheduler for a policy name in POLICIES; kwargs go to `Scheduler.__init__`."""
    if policy not in _SCHEDULERS:
        raise StfuseError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return _SCHEDULERS[policy](tenants, **kwargs)
