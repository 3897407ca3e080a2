"""The latency model the policies plan with: a fit of each tenant's launch time and of
fused groups, measured at start-up (``measure_profile`` in batching.py) and corrected
by what launches really take (``observe``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

_ANY = frozenset()  # LatencyProfile.correction key of the shared correction
_MAX_STEP = math.log(4.0)  # an observation moves an estimate by at most 4 ** weight
_MAX_RESIDUAL = math.log(2.0)  # a tenant set's own correction stays within 2x of the shared one
_MAX_RISE = 4.0  # an observation counts for at most 4x the per-request cost learnt so far


def _moved(old: float, seen: float, weight: float) -> float:
    """A moving average of seen costs, each counted for at most _MAX_RISE times the average so far."""
    return old + weight * ((min(seen, _MAX_RISE * old) if old > 0 else seen) - old)


def _groups(table: Mapping[frozenset, float]) -> list:
    return [[sorted(g), v] for g, v in sorted(table.items(), key=lambda kv: sorted(kv[0]))]


@dataclass
class LatencyProfile:
    """Latency model of the fused program, per group of tenants and batch sizes.

    A tenant alone with b rows costs `fixed[t] + per_row[t] * b`. A fused group
    S with equal batch sizes costs `group_fixed(S) + sum(per_row[t] * b_t)`:
    fusion shares the fixed part (dispatch and launch overhead) and adds up the
    per-row work. With unequal batch sizes the program may lose its fast path
    (on CPU stfuse stacks equal-size members into one bmm and loops over
    unequal ones): that costs `uneven_cost(S)` more, unless the smaller batches
    are padded up to the largest (padding rows cost per_row like real ones).
    `estimate` is the cheaper of the two and `pad_to` says which it was.

    `fused_fixed` and `uneven_fixed` hold measured groups; a group never
    measured is scaled from the largest measured one: with r = fused_fixed /
    (sum of its members' fixed), a k-tenant group gets a ratio interpolated
    linearly between 1 (k = 1) and r (k = the measured group's size), and its
    uneven cost is its group_fixed times the measured group's uneven/fused ratio.
    The estimate never falls when a member's rows grow, which lets the
    space-time scheduler size batches by bisection.

    `observe` keeps a multiplicative correction: a shared one, moved toward
    every measured launch (how fast the machine runs the program now), times
    a residual per tenant set, moved toward that set's own launches relative
    to the shared one and kept within 2x of it (`correction[frozenset()]` is
    the shared one, `correction[set]` the residuals). Both move in log space
    with a clipped step: a profile that is off by 1000x converges within a few
    dozen launches, while one 50 ms hiccup moves an estimate by at most 32%.
    A correction per set alone (as before) went stale for sets launched
    rarely: under real overload on 2 cores, where the submitting thread's
    GIL contention made every launch 2-4x slower than at start-up, the sets
    had corrections from 1.5x to 3.8x, learnt at different times, and the
    space-time policy compared a fused launch priced at one slowdown with
    separate launches priced at another: it ran full queues one tenant at a
    time. With the shared part every estimate follows the machine at once
    and comparisons between sets keep the start-up model's proportions.
    `per_request` and `per_launch` are the runtime's own work, outside the
    program: per request in a launch (concatenating it, splitting its output,
    resolving its future, its statistics) and per launch (the decision, taking
    the requests off the queues). A launch of n requests costs
    `per_launch + n * per_request` more, so the policies price a launch of 32
    one-row requests above one request of 32 rows, and two launches above one
    fused launch by a whole decision. Neither is a device cost: the fair
    shares are charged without them (`solo`). `observe_requests` learns both
    from what the runtime measures; a profile measured at start-up has none.
    Without it, deadlines were planned as if a request cost its rows' device
    time alone: on 4 x mlp-small (2 CPU cores) a one-row request costs ~2 us
    of device time and ~10-40 us of the runtime's Python (GIL waits included),
    so under load the planned launches finished late and queued requests that
    could not make it were kept and served late instead of shed.
    `concurrent_ratio` only matters to `simulate`: a concurrent (space) launch
    takes `concurrent_ratio * sum(solo costs)`, 1.0 meaning no overlap at all.
    """

    fixed: dict[str, float]
    per_row: dict[str, float]
    fused_fixed: dict[frozenset, float] = field(default_factory=dict)
    uneven_fixed: dict[frozenset, float] = field(default_factory=dict)
    concurrent_ratio: float = 1.0
    default_fixed: float = 1e-3
    default_per_row: float = 1e-4
    correction: dict[frozenset, float] = field(default_factory=dict)
    per_request: float = 0.0
    per_launch: float = 0.0

    def to_json(self) -> dict:
        """The model as plain JSON (groups as sorted name lists); corrections are not kept."""
        return {"fixed": dict(self.fixed), "per_row": dict(self.per_row), "fused_fixed": _groups(self.fused_fixed),
                "uneven_fixed": _groups(self.uneven_fixed), "concurrent_ratio": self.concurrent_ratio,
                "per_request": self.per_request, "per_launch": self.per_launch}

    @classmethod
    def from_json(cls, data: Mapping) -> "LatencyProfile":
        return cls(dict(data["fixed"]), dict(data["per_row"]),
                   {frozenset(g): v for g, v in data.get("fused_fixed", [])},
                   {frozenset(g): v for g, v in data.get("uneven_fixed", [])},
                   concurrent_ratio=data.get("concurrent_ratio", 1.0), per_request=data.get("per_request", 0.0),
                   per_launch=data.get("per_launch", 0.0))

    def solo(self, tenant: str, rows: int) -> float:
        """Device seconds of the tenant alone with `rows` rows (no correction, no per-request work)."""
        return self._fixed(tenant) + self._per_row(tenant) * rows

    def estimate(self, rows: Mapping[str, int], requests: int | None = None) -> float:
        """Seconds for one fused launch with `rows[t]` rows of each tenant t, in `requests`
        requests (default: one a row), the runtime's own work per launch and request included."""
        if not rows:
            return 0.0
        key = frozenset(rows)
        work = self.per_launch + self.per_request * (sum(rows.values()) if requests is None else requests)
        corr = self.correction
        return self._model(rows, key)[0] * corr.get(_ANY, 1.0) * corr.get(key, 1.0) + work

    def pad_to(self, rows: Mapping[str, int]) -> int | None:
        """The batch size to pad every member to, where that beats running unequal sizes; else None."""
        return self._model(rows, frozenset(rows))[1] if rows else None

    def estimate_concurrent(self, rows: Mapping[str, int]) -> float:
        return self.concurrent_ratio * sum(self.estimate({t: b}) for t, b in rows.items())

    def group_fixed(self, tenants: frozenset) -> float:
        if len(tenants) > 1 and tenants in self.fused_fixed:
            return self.fused_fixed[tenants]
        base = sum([self._fixed(t) for t in tenants])
        if len(tenants) <= 1:
            return base
        ref = self._reference(self.fused_fixed)
        if ref is None:
            return base
        ratio = self.fused_fixed[ref] / max(sum(self._fixed(t) for t in ref), 1e-12)
        frac = min(1.0, (len(tenants) - 1) / (len(ref) - 1))
        return base * (1.0 + (ratio - 1.0) * frac)

    def uneven_cost(self, tenants: frozenset) -> float:
        """Extra seconds when the members' batch sizes differ and are not padded."""
        if len(tenants) <= 1:
            return 0.0
        if tenants in self.uneven_fixed:
            return self.uneven_fixed[tenants]
        ref = self._reference(self.uneven_fixed)
        if ref is None:
            return 0.0
        return self.group_fixed(tenants) * self.uneven_fixed[ref] / max(self.group_fixed(ref), 1e-12)

    def observe(self, rows: Mapping[str, int], seconds: float, weight: float = 0.2) -> None:
        """Fold one measured launch of the program into the shared correction and its set's residual."""
        if not rows or seconds <= 0:
            return
        key = frozenset(rows)
        model = self._model(rows, key)[0]
        if model <= 0:
            return
        ratio = math.log(seconds / model)
        shared = math.log(self.correction.get(_ANY, 1.0))
        residual = math.log(self.correction.get(key, 1.0))
        half = weight * _MAX_STEP / 2  # each part moves at most half the clipped step: the estimate at most all of it
        shared += max(-half, min(half, weight * (ratio - shared)))
        self.correction[_ANY] = math.exp(shared)
        step = max(-half, min(half, weight * (ratio - shared - residual)))
        self.correction[key] = math.exp(max(-_MAX_RESIDUAL, min(_MAX_RESIDUAL, residual + step)))

    def observe_requests(self, requests: int, seconds: float, launch: float | None = None,
                         weight: float = 0.2) -> None:
        """Fold the runtime's own work around one launch into per_request (`seconds` for its
        `requests` requests) and per_launch (`launch` seconds): moving averages that one stalled
        launch can raise by at most (_MAX_RISE - 1) * weight."""
        if requests >= 1 and seconds >= 0:
            self.per_request = _moved(self.per_request, seconds / requests, weight)
        if launch is not None and launch >= 0:
            self.per_launch = _moved(self.per_launch, launch, weight)

    def _model(self, rows: Mapping[str, int], key: frozenset) -> tuple[float, int | None]:
        """Uncorrected seconds and pad_to: unequal sizes padded or not, whichever is cheaper."""
        if len(rows) == 1:  # a tenant alone, most of a decision's estimates: no group work
            (t, b), = rows.items()
            return self._fixed(t) + self._per_row(t) * b, None
        fixed = self.group_fixed(key)
        work = sum([self._per_row(t) * b for t, b in rows.items()])
        most = max(rows.values())
        if len(rows) < 2 or min(rows.values()) == most:
            return fixed + work, None
        padded = fixed + sum([self._per_row(t) for t in rows]) * most
        uneven = fixed + self.uneven_cost(key) + work
        return (padded, most) if padded < uneven else (uneven, None)

    @staticmethod
    def _reference(table: Mapping[frozenset, float]) -> frozenset | None:
        """The largest measured multi-tenant group (ties: the first by sorted names), or None."""
        groups = [g for g in table if len(g) > 1]
        return max(groups, key=lambda g: (len(g), sorted(g))) if groups else None

    def _fixed(self, tenant: str) -> float:
        return self.fixed.get(tenant, self.default_fixed)

    def _per_row(self, tenant: str) -> float:
        return self.per_row.get(tenant, self.default_per_row)
