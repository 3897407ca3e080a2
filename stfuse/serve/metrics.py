"""GET /metrics: per-model request counts and latencies as the HTTP front end sees them,
and the runtimes' own counters (stfuse.Runtime.stats), in Prometheus' text format 0.0.4.

    stfuse_requests_total{model="a",code="200"} 12
    stfuse_request_duration_seconds_bucket{model="a",le="0.005"} 9
    stfuse_fused_launches_total{model="a",replica="0"} 7      (replica: on Ray only)

Written by hand rather than with prometheus_client: a few families, and the Ray front
end merges the replicas' counters into one page (one HELP/TYPE per family).
"""

from __future__ import annotations

import bisect
from typing import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Request latency buckets, seconds: a batch-1 MLP answers in ~1 ms over loopback HTTP,
# a fused transformer batch in tens of ms, an overloaded queue in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Rows per launch: powers of two up to the largest max_batch worth serving.
ROW_BUCKETS = tuple(2 ** i for i in range(11))

# Runtime.stats() counters per tenant: (metric, stats key, help). One row per family.
RUNTIME_COUNTERS = (
    ("stfuse_served_total", "served", "Requests the runtime served."),
    ("stfuse_failures_total", "failed", "Requests whose launch raised (after isolating the fault)."),
    ("stfuse_shed_total", "shed", "Requests shed: queued past the point where they could meet their SLO."),
    ("stfuse_rejected_total", "rejected", "Requests refused at submit: queue full or over the rate limit."),
    ("stfuse_cancelled_total", "cancelled", "Requests cancelled before they ran."),
    ("stfuse_slo_misses_total", "slo_misses", "Served requests that took longer than their SLO."),
    ("stfuse_launches_total", "launches", "Program launches that included the tenant."),
    ("stfuse_fused_launches_total", "fused_launches", "Launches shared with at least one other tenant."),
)


class RequestMetrics:
    """Per model: requests by HTTP status, and a latency histogram. Updated on the event
    loop's thread only (http.py), so without a lock."""

    def __init__(self, models: Iterable[str]):
        self.codes: dict[str, dict[int, int]] = {m: {} for m in models}
        self.buckets = {m: [0] * (len(LATENCY_BUCKETS) + 1) for m in self.codes}
        self.sums = dict.fromkeys(self.codes, 0.0)

    def observe(self, model: str, status: int, seconds: float) -> None:
        """One answered infer request. Unknown model names (404s) are not counted: a label
        per name a client invents would grow the page without bound."""
        codes = self.codes.get(model)
        if codes is None:
            return
        codes[status] = codes.get(status, 0) + 1
        self.buckets[model][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[model] += seconds


def _labels(labels: Mapping[str, str]) -> str:
    def esc(v) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


def _histogram(lines: list, name: str, labels: dict, bounds, counts, total: float) -> None:
    """Sample lines of one histogram: ``counts`` per bucket (the last: above every bound)."""
    running = 0
    for bound, n in zip((*bounds, "+Inf"), counts):
        running += n
        lines.append(f"{name}_bucket{_labels({**labels, 'le': bound})} {running}")
    lines.append(f"{name}_sum{_labels(labels)} {total}")
    lines.append(f"{name}_count{_labels(labels)} {running}")


def render(requests: RequestMetrics | None, runtimes: list[tuple[dict, Mapping[str, dict]]]) -> str:
    """The /metrics page: ``requests`` from the HTTP front end, and per source of runtime
    statistics (extra labels such as {"replica": "0"}, {tenant: Runtime.stats() entry})."""
    families: list[tuple[str, str, str, list[str]]] = []  # (name, type, help, sample lines)
    if requests is not None:
        codes = [f"stfuse_requests_total{_labels({'model': m, 'code': c})} {n}"
                 for m, by_code in requests.codes.items() for c, n in sorted(by_code.items())]
        failures = [f"stfuse_request_failures_total{_labels({'model': m})} "
                    f"{sum(n for c, n in by_code.items() if c != 200)}" for m, by_code in requests.codes.items()]
        latency: list[str] = []
        for m in requests.codes:
            _histogram(latency, "stfuse_request_duration_seconds", {"model": m}, LATENCY_BUCKETS,
                       requests.buckets[m], requests.sums[m])
        families += [
            ("stfuse_requests_total", "counter", "Infer requests answered, by model and HTTP status.", codes),
            ("stfuse_request_failures_total", "counter", "Infer requests answered with an error status.",
             failures),
            ("stfuse_request_duration_seconds", "histogram", "Infer request latency, from the request "
             "read to the response built.", latency),
        ]
    for name, key, text in RUNTIME_COUNTERS:
        lines = [f"{name}{_labels({'model': t, **extra})} {s[key]}" for extra, stats in runtimes
                 for t, s in stats.items()]
        families.append((name, "counter", text, lines))
    queued = [f"stfuse_queued{_labels({'model': t, **extra})} {s['queued']}" for extra, stats in runtimes
              for t, s in stats.items()]
    families.append(("stfuse_queued", "gauge", "Requests waiting in the tenant's queue.", queued))
    rows: list[str] = []
    for extra, stats in runtimes:
        for t, s in stats.items():
            sizes = s["batch_sizes"]  # {rows: launches}
            counts = [0] * (len(ROW_BUCKETS) + 1)
            for size, n in sizes.items():
                counts[bisect.bisect_left(ROW_BUCKETS, int(size))] += n
            _histogram(rows, "stfuse_batch_rows", {"model": t, **extra}, ROW_BUCKETS, counts,
                       sum(int(size) * n for size, n in sizes.items()))
    families.append(("stfuse_batch_rows", "histogram", "Rows of the tenant per launch (its batch size).", rows))
    out = []
    for name, kind, text, lines in families:
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"
