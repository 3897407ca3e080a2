"""Per-tenant fair shares of the device and per-tenant rate limits, kept free of threads and clocks.

Fair share is start-time fair queueing over device time. Each tenant t has a
weight w[t] (default 1) and a virtual time vt[t]: the device seconds charged to
it divided by its weight. The floor is the least virtual time among tenants
with queued work (never decreasing). A tenant is *over its share* when its
virtual time is more than one quantum (default: one slice) ahead of the floor:
it has had more than its weight's part of the device while the others had
work. The schedulers rank every tenant within its share before every tenant
over it (policies.Scheduler._by_urgency), so a flooding tenant is served only
from what the others leave over, and deadlines order the tenants inside each
of the two classes.

A tenant that was idle joins at the floor (vt = max(vt, floor)): idling banks
no credit, so a tenant that returns cannot then hold the device for as long as
it was away.

    before: vt = {quiet: 0.0, flood: 0.0}, both busy
    charge({flood: 32}, 3 ms)          -> vt[flood] = 3 ms, floor 0: flood over its share (quantum 2 ms)
    charge({quiet: 1}, 0.1 ms)         -> floor 0.1 ms; flood still over
    quiet idle, refresh({flood})       -> floor 3 ms: flood within its share again (work conserving)

Rate limits are token buckets of requests: `rate` per second, at most `burst`
banked (default: a tenth of a second of the rate, at least one request).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

from stfuse.errors import StfuseError


def _positive(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise StfuseError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


class Shares:
    """Virtual times and token buckets for `tenants`; every time is passed in (seconds)."""

    def __init__(self, tenants: Sequence[str], weights: Mapping[str, float] | None = None,
                 rate_limits: Mapping[str, float | tuple[float, float]] | None = None, quantum_s: float = 0.002):
        for what, table in (("weights", weights), ("rate_limits", rate_limits)):
            unknown = set(table or ()) - set(tenants)
            if unknown:
                raise StfuseError(f"{what} names unknown tenant(s) {sorted(unknown)}; tenants are {list(tenants)}")
        self.weights = {t: _positive(f"weights[{t!r}]", (weights or {}).get(t, 1.0)) for t in tenants}
        self.quantum_s = quantum_s
        self.vt = {t: 0.0 for t in tenants}
        self.floor = 0.0
        self._busy: frozenset = frozenset()
        self.buckets: dict[str, list[float]] = {}  # tenant -> [rate, burst, tokens, last time]
        for t, limit in (rate_limits or {}).items():
            rate, burst = limit if isinstance(limit, tuple) else (limit, None)
            rate = _positive(f"rate_limits[{t!r}]", rate)
            burst = _positive(f"rate_limits[{t!r}] burst", max(1.0, rate / 10) if burst is None else burst)
            self.buckets[t] = [rate, burst, burst, None]

    # ------------------------------------------------------------------ admission

    def admit(self, tenant: str, now: float) -> str | None:
        """Take one request's token: None if admitted, else why not (the tenant is over its rate limit)."""
        bucket = self.buckets.get(tenant)
        if bucket is None:
            return None
        rate, burst, tokens, last = bucket
        tokens = burst if last is None else min(burst, tokens + (now - last) * rate)
        bucket[3] = now
        if tokens < 1.0:
            bucket[2] = tokens
            return f"tenant {tenant!r}: over its rate limit of {rate:g} requests/s (burst {burst:g})"
        bucket[2] = tokens - 1.0
        return None

    # ------------------------------------------------------------------ fair share

    def refresh(self, busy: Iterable[str]) -> None:
        """Tenants with work now: those that were idle join at the floor, then the floor moves up."""
        busy = frozenset(busy)
        for t in busy - self._busy:
            self.vt[t] = max(self.vt[t], self.floor)
        if busy:
            self.floor = max(self.floor, min(self.vt[t] for t in busy))
        self._busy = busy

    def over(self, tenant: str) -> bool:
        """Whether the tenant has had more than its share (by more than one quantum)."""
        return self.vt[tenant] > self.floor + self.quantum_s + 1e-12

    def charge(self, rows: Mapping[str, int], seconds: float, solo: Callable[[str, int], float]) -> None:
        """Charge one launch's device time to its members, in proportion to what each would cost alone."""
        if not rows or seconds <= 0:
            return
        alone = {t: max(solo(t, b), 1e-12) for t, b in rows.items()}
        total = sum(alone.values())
        for t, c in alone.items():
            self.vt[t] += seconds * c / total / self.weights[t]
