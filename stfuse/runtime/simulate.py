"""The runtime on a fake clock: a policy's decisions against a device whose latencies come from a profile.

tests/test_policies.py checks every policy with it, without threads or sleeping.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping

from stfuse.errors import StfuseError
from stfuse.runtime.stats import StatsRecorder
from stfuse.runtime.policies import Scheduler, Wait, woken
from stfuse.runtime.profile import LatencyProfile


@dataclass
class SimRequest:
    """A request in `simulate`; id (arrival order) and its outcome are filled in by it: start,
    finish and launch for a request that ran, else `rejected` (at arrival) or `shed` (at `shed_at`)."""

    tenant: str
    arrival: float
    deadline: float
    rows: int = 1
    id: int = 0
    start: float | None = None
    finish: float | None = None
    launch: int | None = None
    rejected: bool = False
    shed: bool = False
    shed_at: float | None = None


@dataclass
class SimResult:
    requests: list[SimRequest]
    launches: list[tuple[float, float, dict, str]]  # (start, finish, rows per tenant, mode)
    stats: dict


def simulate(scheduler: Scheduler, requests: Iterable[SimRequest], device: LatencyProfile,
             *, slo_s: Mapping[str, float] | None = None, max_queue: int | None = None) -> SimResult:
    """Run a policy on a fake clock against a device whose latencies come from `device`.

    Discrete events: arrivals and launch completions, in the Runtime's order:
    an arrival is refused (`rejected`) when the scheduler does not `admit` it
    or its tenant's queue holds `max_queue` requests, as Runtime.submit does;
    whenever the device is idle the scheduler first sheds what has `expired`
    (`shed`), then is asked for a decision; a Wait advances the clock to its
    time or to the next arrival, whichever is first; each launch's duration
    is `charge`d to the scheduler's fair shares. Every request ends exactly one
    way: run (start/finish set), rejected or shed. A decision that takes more
    than is queued, or waits for the past, raises.
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
    waiting: Wait | None = None  # the Wait decided last, while nothing has launched since
    while True:
        asleep = waiting is not None  # whether the runtime's worker would still be waiting now
        while arrivals and arrivals[0][0] <= now:
            r = heapq.heappop(arrivals)[2]
            if (max_queue is not None and len(queues[r.tenant]) >= max_queue) \
                    or scheduler.admit(r.tenant, r.arrival) is not None:
                r.rejected = True
                stats.count(r.tenant, "rejected")
            else:
                queues[r.tenant].append(r)
                asleep = asleep and not woken(waiting.wake, r.tenant, queues[r.tenant], scheduler.max_batch)
        asleep = asleep and now < waiting.until
        for t, k in scheduler.expired(queues, now).items():
            asleep = False  # the runtime sheds only when its worker wakes: decisions may differ
            for _ in range(k):
                r = queues[t].popleft()
                r.shed, r.shed_at = True, now
            stats.count(t, "shed", k)
        decision = scheduler.decide(queues, now)
        if asleep and decision != waiting:
            raise StfuseError(f"{scheduler.name}: at {now} decides {decision} after arrivals that {waiting} "
                              f"does not wake for (the runtime's worker would still wait)")
        waiting = decision if isinstance(decision, Wait) else None
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
                scheduler.charge({t: b}, device.estimate({t: b}))
        else:
            duration = device.estimate(rows)
            stats.launch(rows)
            scheduler.charge(rows, duration)
        end = now + duration
        launches.append((now, end, rows, decision.mode))
        for rs in taken.values():
            for r in rs:
                r.start, r.finish, r.launch = now, end, len(launches) - 1
                stats.request(r.tenant, r.arrival, end)
        now = end
    return SimResult(reqs, launches, stats.snapshot())

