"""The space-time policy: one fused launch per slice over a subset of tenants, sized
against the latency profile (policies.py lists every policy; scheduler.py the base).
"""

from __future__ import annotations

import bisect
import math

from .scheduler import _EPS, Dispatch, Scheduler, Wait, _full, _holds_rows, _prefix


class SpaceTimeScheduler(Scheduler):
    """Dynamic space-time scheduling: one fused launch per slice over a subset of tenants.

    1. Hold: while some tenant has no work, no batch is full, the oldest
       request has waited less than a slice and the most urgent tenant can
       still start later and meet its deadline, wait for fusion partners.
       Fill: while every tenant has work, a launch waits only where the device
       has been busy more than FILL_FROM of the recent wall time (`load`), and
       then until its oldest request has waited `_fill_s()` (a whole slice
       from FILL_FULL of load on), under the same other limits. Launching
       at once is what keeps p50 low; under load it makes launches of a few
       rows each, whose fixed cost keeps the device busier than batching's
       (bench_runtime, 4 MLP tenants at 1.5x on the 2-core CPU: the worker's
       CPU 44-45% of the wall time against batch's 32%, and 36% with 1 ms of
       fill).
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
    FILL_FROM, FILL_FULL = 0.5, 0.75  # the device's busy shares from which launches over every
    # tenant wait to fill, and at which they wait a whole slice
    LOAD_WINDOW_S = 0.02  # time constant of `load`, the device's recent busy share

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.load = 0.0  # the device's busy share of the recent wall time, between 0 and 1
        self._launched_at: float | None = None
        self._charged_s = 0.0  # device seconds charged since the last launch was decided

    def charge(self, rows, seconds):
        super().charge(rows, seconds)
        self._charged_s += seconds

    def _launched(self, now: float) -> None:
        """A launch is decided at ``now``: fold the busy share of the time since the previous one
        into ``load`` (an average weighted by time). Only here, so that a held decision stays
        the same until the next launch, as its Wait promised the runtime."""
        if self._launched_at is not None and now > self._launched_at:
            span = now - self._launched_at
            share = min(1.0, self._charged_s / span)
            self.load += min(1.0, span / self.LOAD_WINDOW_S) * (share - self.load)
        self._launched_at, self._charged_s = now, 0.0

    def _fill_s(self) -> float:
        """How long a launch over every tenant waits for rows: none up to FILL_FROM of load,
        then in proportion, a whole slice from FILL_FULL on."""
        if self.load <= self.FILL_FROM:
            return 0.0
        return self.slice_s * min(1.0, (self.load - self.FILL_FROM) / (self.FILL_FULL - self.FILL_FROM))

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
        self._launched(now)
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
        """Step 1: until when to hold (for fusion partners, or to fill under load), or None."""
        hold = self.slice_s if len(busy) < len(self.tenants) else self._fill_s()
        if not hold or any(_full(queues[t], prefix[t], self.max_batch) for t in busy):
            return None
        oldest = min(queues[t][0].arrival for t in busy)
        latest_start = queues[head][0].deadline - self.profile.estimate({head: prefix[head][-1]})
        return min(oldest + hold, latest_start)
