"""The multi-tenant runtime: one package for serving a fused program.

    runtime.py    Runtime: per-tenant queues, SLOs, a worker thread that executes decisions
    policies.py   the scheduling policies (decisions only: no threads, no clocks);
                  space_time.py the space-time one, scheduler.py their base class
    shares.py     per-tenant fair shares of device time and rate limits, for the policies
    requests.py   a queued request, the input check of submit(), which tenants merge rows
    profile.py    the latency model policies plan with
    batching.py   requests in and out of one launch; the start-up latency measurement
    simulate.py   policies on a fake clock (tests, benchmarks)
    stats.py      per-tenant latency, SLO and batch statistics
"""

from .batching import measure_profile
from .policies import POLICIES
from .runtime import (DEFAULT_MAX_QUEUE, DEFAULT_SLO_MS, DeadlineExceededError, QueueFullError, Runtime,
                      RuntimeClosedError)

__all__ = ["Runtime", "QueueFullError", "RuntimeClosedError", "DeadlineExceededError", "measure_profile",
           "DEFAULT_SLO_MS", "DEFAULT_MAX_QUEUE", "POLICIES"]
