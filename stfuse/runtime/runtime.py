"""The multi-tenant runtime: per-tenant queues, latency SLOs, and a scheduler thread.

    rt = stfuse.Runtime(fused, policy="space-time", slice_ms=2.0,
                        slo_ms={"bert": 25, "resnet": 50}, max_batch=32)
    fut = rt.submit("bert", ids)      # concurrent.futures.Future, from any thread
    y = fut.result()
    rt.stats()                        # latency percentiles, SLO misses, batches, launches
    rt.close()                        # drain (default) or cancel_pending=True; also `with Runtime(...)`

One worker thread owns the device. Whenever it is idle it asks the policy's
`Scheduler` (policies.py) for a decision over the queues, pops the
chosen requests, concatenates each tenant's requests along dim 0 (only for
tenants whose rows are independent, plan.stats["rows_independent"]; the
others run one request per launch), calls
`fused.run` once, and splits every tensor leaf of each output back along
dim 0 per request. When a call raises, each tenant is retried alone, then
each request alone, so the fault stays with the request that caused it.
Before each decision the policy names the queued requests that can no longer
meet their deadline (shedding: "space-time" by default); their futures get
DeadlineExceededError, outside the lock like every other result.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import torch

from stfuse.errors import DeadlineExceededError, InputError, QueueFullError, RuntimeClosedError, StfuseError
from stfuse.runtime import collector
from stfuse.runtime.batching import (Unsplittable, adopt_intra_op_threads, as_args, as_call, call_specs, concat, hand_over,
                                     measure_profile, normalise_examples, split, synchronize,
                                     wait_for_callers)
from stfuse.runtime.stats import StatsRecorder
from stfuse.runtime.policies import Dispatch, Scheduler, Wait, make_scheduler, woken
from stfuse.runtime.profile import LatencyProfile
from stfuse.runtime.requests import (DEFAULT_SLO_MS, InputCheck, Request, RequestFuture, rows_independent,
                                     same_shape, settings)

__all__ = ["Runtime", "QueueFullError", "RuntimeClosedError", "DeadlineExceededError", "measure_profile",
           "DEFAULT_SLO_MS", "DEFAULT_MAX_QUEUE"]

DEFAULT_MAX_QUEUE = 1024  # requests per tenant before submit() pushes back


def _plain(args) -> bool:
    """A Tensor, or a tuple or list of Tensors: a positional request."""
    return isinstance(args, torch.Tensor) or (
        isinstance(args, (tuple, list)) and all(isinstance(a, torch.Tensor) for a in args))


class Runtime:
    """Serve many tenants of one FusedProgram through per-tenant queues and a scheduling policy.

    policy: "time", "space", "batch", "space-time" (see policies.py) or a Scheduler.
    slice_ms: the batching window: "batch" and "space-time" hold a request at
        most this long for its batch or fusion partners (0 never holds).
    slo_ms: a number for every tenant, or {tenant: ms}; others get DEFAULT_SLO_MS.
        A request's deadline is its arrival plus its tenant's SLO.
    max_batch: most rows of one tenant in one launch; a single request may not exceed it.
    max_queue: most queued requests per tenant; see submit() for what happens beyond.
    example_inputs: {tenant: args} or a list in tenant order; gives the startup
        latency profile and the input checks of submit(). Without it, the checks
        come from each tenant's first successful request and the profile is
        learnt from launches as they run.
    profile: a LatencyProfile to use instead of measuring one.
    weights: {tenant: weight} for the fair share of device time (default 1 each).
    rate_limits: {tenant: requests/s or (requests/s, burst)}; submit() refuses beyond.
    shed: fail queued requests that can no longer meet their deadline with
        DeadlineExceededError (None: the policy's default, on for "space-time").
    freeze_gc: while the Runtime serves, Python's cyclic collector skips the objects
        alive when it started (collector.py: a full collection over a compiled
        program stalls every request for 100+ ms); False leaves the collector alone.
    weights, rate_limits and shed go to the policy: give them to a Scheduler
    instance yourself (see shares.py and policies.Scheduler).
    """

    def __init__(self, fused, policy: str | Scheduler = "space-time", *, slice_ms: float = 2.0,
                 slo_ms: float | Mapping[str, float] | None = None, max_batch: int = 32,
                 max_queue: int = DEFAULT_MAX_QUEUE, example_inputs=None,
                 profile: LatencyProfile | None = None, profile_reps: int = 5,
                 weights: Mapping[str, float] | None = None, rate_limits: Mapping[str, Any] | None = None,
                 shed: bool | None = None, freeze_gc: bool = True):
        self._fused = fused
        self.tenants = list(fused.tenants)
        self._slo_s = settings(self.tenants, slo_ms, slice_ms, max_queue=max_queue, max_batch=max_batch)
        self.max_batch = max_batch
        self.max_queue = max_queue
        # Tenants called with keywords (or nested args): requests hold their flat tensors.
        self._calls = call_specs(fused)
        examples = normalise_examples(self.tenants, example_inputs, self._calls) if example_inputs else {}
        self._input_check = InputCheck(fused, self._calls, examples)
        if isinstance(policy, Scheduler):
            if weights is not None or rate_limits is not None or shed is not None:
                raise StfuseError("Runtime: weights, rate_limits and shed are the policy's settings; "
                                  "pass them to the Scheduler instance")
            self._scheduler = policy
        else:
            if profile is None:
                profile = (measure_profile(fused, example_inputs, max_batch, profile_reps) if examples
                           else LatencyProfile({}, {}))
            self._scheduler = make_scheduler(policy, self.tenants, slice_s=slice_ms / 1e3,
                                             max_batch=max_batch, profile=profile, slo_s=self._slo_s,
                                             weights=weights, rate_limits=rate_limits, shed=shed)
        self.policy = self._scheduler.name
        self._stats = StatsRecorder(self.tenants, self._slo_s)
        self._stats_lock = threading.Lock()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the worker waits here for requests
        self._room = threading.Condition(self._lock)  # blocked submitters wait here for queue space
        self._queues: dict[str, deque[Request]] = {t: deque() for t in self.tenants}
        # Tenants whose requests are never merged: rows that depend on each other
        # (plan.stats["rows_independent"], passes/rows.py), or outputs that cannot be split.
        self._unbatchable: set[str] = set(self.tenants) - rows_independent(fused)
        # Most rows per launch of tenants traced for a bounded batch range (issue 11, item 6):
        # a loaded artifact refuses more, a compiled program would trace the tenant again.
        self._row_cap = {t: spec.batch_range[1] for t, spec in getattr(fused, "specs", {}).items()
                         if spec.dynamic and spec.batch_range[1] is not None}
        # Tenants whose requests may differ after dim 0 (same_shape, a call a request): all but
        # those the program's own check_inputs pins to one shape there (no declared dims).
        pinned = {t for t, spec in getattr(fused, "specs", {}).items()
                  if not any(s.dims for s in spec.inputs)} if hasattr(fused, "check_inputs") else set()
        self._shapes_vary = set(self.tenants) - pinned
        self._closed = False
        self._idle = False  # the worker waits on self._work (submit() notifies it only then)
        self._wake: frozenset | None = None  # whose arrivals wake it then (policies.Wait.wake; None: all)
        self.error: BaseException | None = None  # what stopped the worker, if anything did
        self._cancelled_some = False
        self._inflight: list[Request] = []  # the synchronous launch in flight
        self._running: set[str] = set()  # tenants with a concurrent call in flight
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[str, Any] = {}
        self._local = threading.local()  # in_pool: set on the threads of concurrent launches
        if not isinstance(freeze_gc, bool):
            raise StfuseError(f"Runtime: freeze_gc must be True or False, got {freeze_gc!r}")
        self._freeze_gc = freeze_gc
        if freeze_gc:
            collector.hold()  # released by the worker as it stops
        self._thread = threading.Thread(target=self._loop, name="stfuse-runtime", daemon=True)
        try:
            self._thread.start()
        except BaseException:  # no worker will release it
            if freeze_gc:
                collector.release()
            raise

    # ------------------------------------------------------------------ public API

    def submit(self, tenant: str, args, *, block: bool = False, timeout: float | None = None) -> Future:
        """Queue one request (a Tensor, a tuple of Tensors, a dict of keyword Tensors or an
        (args, kwargs) pair, as fused.run takes; batch on dim 0); returns its Future.

        Bad input raises InputError here, before anything is queued. A tenant
        over its rate limit raises QueueFullError; a full queue raises it at once, or with block=True waits for room
        up to `timeout` seconds (None: no limit) and then raises it. After
        close(), raises RuntimeClosedError. Thread-safe.
        """
        if tenant not in self._queues:
            raise InputError(f"unknown tenant {tenant!r}; tenants are {self.tenants}")
        spec = self._calls.get(tenant)
        if spec is None and not _plain(args):  # a dict or an (args, kwargs) pair: the program's own rule
            spec = getattr(self._fused, "specs", {}).get(tenant)
        args = as_args(tenant, args, self.max_batch, spec)
        self._input_check(tenant, args)
        with self._lock:
            queue = self._queues[tenant]
            limit = None
            while not self._closed and len(queue) >= self.max_queue:
                if limit is None and timeout is not None:
                    limit = time.monotonic() + timeout
                left = None if limit is None else limit - time.monotonic()
                if not block or (left is not None and left <= 0):
                    with self._stats_lock:
                        self._stats.count(tenant, "rejected")
                    raise QueueFullError(f"tenant {tenant!r}: queue full ({self.max_queue} requests waiting)")
                self._room.wait(left)
            if self._closed:
                raise RuntimeClosedError(f"tenant {tenant!r}: the runtime is closed")
            now = time.perf_counter()
            refused = self._scheduler.admit(tenant, now)
            if refused is not None:
                with self._stats_lock:
                    self._stats.count(tenant, "rejected")
                raise QueueFullError(refused)
            # made once admitted: a refused request (a flood's) costs no Future, its lock and condition
            future = RequestFuture(self._on_cancel)
            queue.append(Request(tenant, args, args[0].shape[0], now, now + self._slo_s[tenant], future))
            # only while the worker waits (no notify() while it runs: 3 calls a request), and only for
            # an arrival its policy waits for (policies.Wait.wake) or one that fills a batch
            if self._idle and woken(self._wake, tenant, queue, self.max_batch):
                self._work.notify()
        return future

    def stats(self) -> dict:
        """Per tenant: served, failed, cancelled, rejected, p50/p90/p99/mean latency (ms), SLO misses,
        batch sizes, launches, fused launches, queued; overall: throughput, launches, mean tenants per launch."""
        with self._lock:
            queued = {t: len(q) for t, q in self._queues.items()}
        with self._stats_lock:
            snap = self._stats.snapshot()
        for t, n in queued.items():
            snap["tenants"][t]["queued"] = n
            snap["tenants"][t]["merges_requests"] = t not in self._unbatchable
        snap["policy"] = self.policy
        return snap

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats.reset()

    def close(self, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests, then finish the queued ones (default) or cancel them.

        With a timeout, whatever is still queued after `timeout` seconds is
        cancelled. The launch in flight always completes. Idempotent.
        """
        with self._lock:
            self._closed = True
            if cancel_pending:
                self._cancel_queued()
            self._work.notify_all()
            self._room.notify_all()
        if threading.current_thread() is self._thread or getattr(self._local, "in_pool", False):
            return  # called from a future's callback: the worker stops by itself once drained
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._cancel_queued()
                self._work.notify_all()
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ worker

    def _on_cancel(self) -> None:
        self._cancelled_some = True  # read by the worker, which then drops cancelled requests

    def _wait(self, timeout: float | None = None, wake: frozenset | None = None) -> None:
        """The worker waits for work (under self._lock); submit() notifies only while it does,
        and only for arrivals of the tenants in `wake` (None: all) or that fill a batch."""
        self._idle, self._wake = True, wake
        try:
            self._work.wait(timeout)
        finally:
            self._idle = False

    def _cancel_queued(self) -> None:
        for t, queue in self._queues.items():
            for r in queue:
                r.future.cancel()
                r.future.set_running_or_notify_cancel()  # wakes concurrent.futures.wait() callers
            with self._stats_lock:
                self._stats.count(t, "cancelled", len(queue))
            queue.clear()

    def _drop_cancelled(self) -> None:
        self._cancelled_some = False
        for t, queue in self._queues.items():
            keep = []
            for r in queue:
                if r.future.cancelled():
                    r.future.set_running_or_notify_cancel()  # wakes concurrent.futures.wait() callers
                else:
                    keep.append(r)
            if len(keep) != len(queue):
                with self._stats_lock:
                    self._stats.count(t, "cancelled", len(queue) - len(keep))
                queue.clear()
                queue.extend(keep)

    def _next_launch(self) -> tuple[Dispatch | None, dict[str, list[Request]]] | None:
        """Block until the policy launches something, or sheds (then the decision is None and the
        requests are the shed ones); None once closed and drained."""
        with self._lock:
            while True:
                if self._cancelled_some:
                    self._drop_cancelled()
                if not any(self._queues.values()):
                    if self._closed:
                        return None
                    self._wait()
                    continue
                # a tenant with a concurrent call still running shows no work: one call per tenant at a time
                view = {t: () if t in self._running else q for t, q in self._queues.items()}
                if not any(view.values()):
                    self._wait()
                    continue
                now = time.perf_counter()
                expired = self._scheduler.expired(view, now)
                if expired:
                    shed = {t: [self._queues[t].popleft() for _ in range(k)] for t, k in expired.items()}
                    self._room.notify_all()
                    return None, shed
                decision = self._scheduler.decide(view, now, flush=self._closed)
                if isinstance(decision, Wait):
                    self._wait(max(0.0, decision.until - now), decision.wake)
                    continue
                if decision is None:
                    raise StfuseError(f"policy {self.policy!r} launched nothing with requests queued")
                batch = {}
                for t, k in decision.take.items():
                    queue = self._queues[t]
                    k = min(k, 1) if t in self._unbatchable else k
                    got, rows, cap, later = [], 0, self._row_cap.get(t), []
                    vary = t in self._shapes_vary
                    while queue and len(got) < k:
                        if got and cap is not None and rows + queue[0].rows > cap:
                            break  # more rows than the tenant's traced batch range holds
                        r = queue.popleft()
                        if vary and got and not same_shape(got[0], r):
                            later.append(r)  # another length: a later launch, in its order
                        elif r.future.set_running_or_notify_cancel():
                            got.append(r)
                            rows += r.rows
                        else:
                            with self._stats_lock:
                                self._stats.count(t, "cancelled")
                    queue.extendleft(reversed(later))
                    if got:
                        batch[t] = got
                self._room.notify_all()
                if batch:
                    self._inflight = [r for reqs in batch.values() for r in reqs]
                    return decision, batch

    def _loop(self) -> None:
        try:
            adopt_intra_op_threads()  # else this thread's OpenMP team is every core (batching.py)
            while (item := self._next_launch()) is not None:
                launch, batch = item
                if launch is None:
                    self._shed(batch)
                elif launch.mode == "concurrent":
                    # each tenant's call runs on its own thread (stream) and the worker does not wait:
                    # the tenant shows work again as soon as its own call is done
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(len(self.tenants), thread_name_prefix="stfuse-space",
                                                        initializer=adopt_intra_op_threads)
                    with self._lock:
                        self._running.update(batch)
                    for t, reqs in batch.items():
                        self._pool.submit(self._run_concurrently, t, reqs)
                else:
                    self._run_group(batch, launch.pad_to)
                self._inflight = []
        except BaseException as exc:  # a bug here must not leave futures unresolved
            with self._lock:
                self._closed = True
                stranded = self._inflight + [r for q in self._queues.values() for r in q]
                for q in self._queues.values():
                    q.clear()
                self._room.notify_all()
            self.error = exc
            for r in stranded:
                if not r.future.done():
                    if r.future.running() or r.future.set_running_or_notify_cancel():
                        r.future.set_exception(StfuseError(f"runtime worker failed: {exc!r}"))
        finally:
            if self._freeze_gc:
                collector.release()

    def _shed(self, batch: dict[str, list[Request]]) -> None:
        now = time.perf_counter()
        for t, reqs in batch.items():
            with self._stats_lock:
                self._stats.count(t, "shed", len(reqs))
            for r in reqs:
                if r.future.set_running_or_notify_cancel():
                    r.future.set_exception(DeadlineExceededError(
                        f"tenant {t!r}: shed after {(now - r.arrival) * 1e3:.1f} ms in the queue: it could no "
                        f"longer finish within its SLO of {self._slo_s[t] * 1e3:g} ms"))

    def _run_concurrently(self, tenant: str, reqs: list[Request]) -> None:
        """One tenant's call of a concurrent launch, on a pool thread (and its own CUDA stream)."""
        self._local.in_pool = True
        try:
            device = reqs[0].args[0].device
            if device.type != "cuda":
                self._run_group({tenant: reqs})
                return
            # Its own stream; _run_group makes it wait for each request's caller stream.
            stream = self._streams.setdefault(tenant, torch.cuda.Stream(device))
            with torch.cuda.stream(stream):
                self._run_group({tenant: reqs})
        finally:
            with self._lock:
                self._running.discard(tenant)
                self._work.notify()

    def _run_group(self, batch: dict[str, list[Request]], pad_to: int | None = None) -> None:
        """One call of the program for `batch`; on failure, isolate the fault by retrying smaller groups."""
        start = time.perf_counter()
        if pad_to is not None and (len(batch) < 2 or self._unbatchable.intersection(batch)
                                   or any(self._row_cap.get(t, pad_to) < pad_to for t in batch)):
            pad_to = None
        try:
            for reqs in batch.values():
                wait_for_callers(reqs)
            inputs = {t: concat([r.args for r in reqs], pad_to) for t, reqs in batch.items()}
            outs = self._fused.run({t: as_call(a, self._calls.get(t)) for t, a in inputs.items()})
            if type(outs) is not dict and not isinstance(outs, Mapping) or set(outs) != set(batch):
                raise StfuseError(f"fused.run returned {type(outs).__name__} "
                                  f"{sorted(outs) if isinstance(outs, Mapping) else ''} for {sorted(batch)}")
            synchronize(inputs)
            results, rows = {}, {}
            for t, reqs in batch.items():
                sizes = [r.rows for r in reqs]
                rows[t] = sum(sizes)
                extra = inputs[t][0].shape[0] - rows[t]
                if extra:
                    results[t] = split(outs[t], sizes + [extra])[:-1]
                else:
                    results[t] = [outs[t]] if len(reqs) == 1 else split(outs[t], sizes)
        except Exception as exc:
            self._isolate(batch, exc)
            return
        finish = time.perf_counter()
        with self._lock:  # the fair shares are the worker's, read by decide() under this lock
            self._scheduler.charge(rows, finish - start)
        with self._stats_lock:
            self._stats.launch(rows)
            self._scheduler.profile.observe(rows, finish - start)
            for t, reqs in batch.items():
                self._stats.served(t, [r.arrival for r in reqs], finish)
        for t, reqs in batch.items():
            self._input_check.seen(t, reqs[0].args)
            for r, out in zip(reqs, results[t]):
                if r.stream is not None:
                    hand_over(out, r.stream)
                r.future.set_result(out)

    def _isolate(self, batch: dict[str, list[Request]], exc: Exception) -> None:
        if len(batch) > 1:
            groups = [{t: reqs} for t, reqs in batch.items()]
        else:
            (t, reqs), = batch.items()
            if len(reqs) == 1:
                with self._stats_lock:
                    self._stats.request(t, reqs[0].arrival, time.perf_counter(), ok=False)
                reqs[0].future.set_exception(exc)
                return
            if isinstance(exc, Unsplittable):
                self._unbatchable.add(t)  # from now on this tenant runs one request per launch
            groups = [{t: [r]} for r in reqs]
        with self._stats_lock:
            for g in groups:
                for t, reqs in g.items():
                    self._stats.count(t, "retries", len(reqs))
        for g in groups:
            self._run_group(g)
