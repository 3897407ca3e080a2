"""Per-tenant latency, SLO and launch accounting, shared by the Runtime and the simulator."""

from __future__ import annotations

import math
from collections import deque
from typing import Mapping, Sequence


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
        self.t = {name: {"served": 0, "failed": 0, "cancelled": 0, "rejected": 0, "shed": 0, "slo_misses": 0,
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

    def served(self, tenant: str, arrivals: Sequence[float], finish: float) -> None:
        """Requests of one tenant that all finished at `finish` (those of one launch): what
        request() records for each, in one call per launch and tenant rather than per request."""
        if not arrivals:
            return
        s = self.t[tenant]
        self._span(min(arrivals), finish)
        latencies = [finish - a for a in arrivals]
        slo = self.slo_s[tenant]
        s["served"] += len(latencies)
        s["latencies"].extend(latencies)
        s["slo_misses"] += len([latency for latency in latencies if latency > slo])

    def count(self, tenant: str, what: str, n: int = 1) -> None:
        """Bump a plain counter: "cancelled", "rejected", "shed" or "retries"."""
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
                "rejected": s["rejected"], "shed": s["shed"], "retries": s["retries"],
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
