"""The multi-tenant runtime: per-tenant queues, latency SLOs, and a scheduler thread.

    rt = stfuse.Runtime(fused, policy="space-time", slice_ms=2.0,
                        slo_ms={"bert": 25, "resnet": 50}, max_batch=32)
    fut = rt.submit("bert", ids)      # concurrent.futures.Future, from any thread
    y = fut.result()
    rt.stats()                        # latency percentiles, SLO misses, batches, launches
    rt.close()                        # drain (default) or cancel_pending=True; also `with Runtime(...)`

One worker thread owns the device. Whenever it is idle it asks the policy's
`Scheduler` (stfuse/scheduler.py) for a decision over the queues, pops the
chosen requests, concatenates each tenant's requests along dim 0, calls
`fused.run` once, and splits every tensor leaf of each output back along
dim 0 per request. When a call raises, each tenant is retried alone, then
each request alone, so the fault stays with the request that caused it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from stfuse.errors import InputError, StfuseError
from stfuse.scheduler import LatencyProfile, Launch, Scheduler, StatsRecorder, Wait, make_scheduler

DEFAULT_SLO_MS = 100.0  # for tenants that slo_ms does not name
DEFAULT_MAX_QUEUE = 1024  # requests per tenant before submit() pushes back


class QueueFullError(StfuseError):
    """submit() found the tenant's queue full (and, with block=True, it stayed full until the timeout)."""


class RuntimeClosedError(StfuseError):
    """submit() after close(), or a blocked submit() interrupted by close()."""


class _Unsplittable(StfuseError):
    """A batched output has a tensor leaf without the batch dimension, so it cannot be split per request."""


class _Request:
    __slots__ = ("tenant", "args", "rows", "arrival", "deadline", "future")

    def __init__(self, tenant, args, rows, arrival, deadline, future):
        self.tenant, self.args, self.rows = tenant, args, rows
        self.arrival, self.deadline, self.future = arrival, deadline, future


class _Spec:
    """What one tenant's arguments must look like, apart from the batch size."""

    def __init__(self, args: tuple):
        self.items = [(a.dim(), tuple(a.shape[1:]), a.dtype) for a in args]
        self.device = args[0].device

    def check(self, tenant: str, args: tuple) -> None:
        if len(args) != len(self.items):
            raise InputError(f"tenant {tenant!r}: expected {len(self.items)} argument(s), got {len(args)}")
        for i, (a, (ndim, rest, dtype)) in enumerate(zip(args, self.items)):
            got = (a.dim(), tuple(a.shape[1:]), a.dtype)
            if got != (ndim, rest, dtype):
                raise InputError(
                    f"tenant {tenant!r}, argument {i}: expected shape (batch, {', '.join(map(str, rest))}) "
                    f"of {dtype}, got {tuple(a.shape)} of {a.dtype}")
            if a.device != self.device:
                raise InputError(f"tenant {tenant!r}, argument {i}: expected device {self.device}, got {a.device}")


def _as_args(tenant: str, args: Any, max_batch: int | None) -> tuple:
    """Normalise to a tuple of tensors sharing one batch size and device, or raise InputError."""
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, (tuple, list)):
        args = tuple(args)
    else:
        raise InputError(f"tenant {tenant!r}: expected a Tensor or a tuple of Tensors, got {type(args).__name__}")
    if not args:
        raise InputError(f"tenant {tenant!r}: expected at least one argument, got none")
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise InputError(f"tenant {tenant!r}, argument {i}: expected a Tensor, got {type(a).__name__}")
        if a.dim() == 0:
            raise InputError(f"tenant {tenant!r}, argument {i}: expected a batch dimension (dim 0), got a 0-d tensor")
        if a.shape[0] != args[0].shape[0]:
            raise InputError(f"tenant {tenant!r}, argument {i}: batch size {a.shape[0]} differs from "
                             f"argument 0's {args[0].shape[0]}")
        if a.device != args[0].device:
            raise InputError(f"tenant {tenant!r}, argument {i}: on {a.device}, argument 0 on {args[0].device}")
    rows = args[0].shape[0]
    if rows < 1 or (max_batch is not None and rows > max_batch):
        raise InputError(f"tenant {tenant!r}: batch size must be between 1 and max_batch={max_batch}, got {rows}")
    return args


def _concat(reqs: Sequence[_Request]) -> tuple:
    if len(reqs) == 1:
        return reqs[0].args
    return tuple(torch.cat([r.args[i] for r in reqs]) for i in range(len(reqs[0].args)))


def _split(output: Any, sizes: list[int]) -> list:
    """Split every tensor leaf of a batched output along dim 0; other leaves are shared."""
    leaves, spec = pytree.tree_flatten(output)
    total = sum(sizes)
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0 or leaf.shape[0] != total:
                raise _Unsplittable(f"output leaf of shape {tuple(leaf.shape)} has no batch dimension of {total}")
            parts.append(leaf.split(sizes))
        else:
            parts.append([leaf] * len(sizes))
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(len(sizes))]


def _synchronize(inputs: Mapping[str, tuple]) -> None:
    first = next(iter(inputs.values()))[0]
    if first.is_cuda:
        torch.cuda.current_stream(first.device).synchronize()


def _normalise_examples(tenants: Sequence[str], example_inputs) -> dict[str, tuple]:
    if isinstance(example_inputs, Mapping):
        unknown = set(example_inputs) - set(tenants)
        if unknown:
            raise InputError(f"example_inputs: unknown tenant(s) {sorted(unknown)}; tenants are {list(tenants)}")
        items = dict(example_inputs)
    else:
        items = dict(zip(tenants, example_inputs))
    return {t: _as_args(t, a, None) for t, a in items.items()}


def measure_profile(fused, example_inputs, max_batch: int = 32, reps: int = 3) -> LatencyProfile:
    """Time fused.run on example-size inputs: each tenant alone at 1 and max_batch rows, all fused at 1 row.

    Median of `reps` timed calls after one warm-up call each, so 6 * (2n + 1)
    calls for n tenants. The fit is the linear model of LatencyProfile.
    """
    tenants = list(fused.tenants)
    ex = _normalise_examples(tenants, example_inputs)

    def rows(t, b):
        return tuple(a[:1].repeat(b, *([1] * (a.dim() - 1))) for a in ex[t])

    def timed(inputs):
        times = []
        for i in range(reps + 1):
            start = time.perf_counter()
            fused.run(inputs)
            _synchronize(inputs)
            if i:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    fixed, per_row = {}, {}
    for t in ex:
        one = timed({t: rows(t, 1)})
        per_row[t] = max(0.0, (timed({t: rows(t, max_batch)}) - one) / (max_batch - 1)) if max_batch > 1 else 0.0
        fixed[t] = max(one - per_row[t], 1e-6)
    fused_fixed = {}
    if len(ex) > 1:
        together = timed({t: rows(t, 1) for t in ex})
        fused_fixed[frozenset(ex)] = max(together - sum(per_row.values()), 1e-6)
    return LatencyProfile(fixed, per_row, fused_fixed)


class Runtime:
    """Serve many tenants of one FusedProgram through per-tenant queues and a scheduling policy.

    policy: "time", "space", "batch", "space-time" (see stfuse/scheduler.py) or a Scheduler.
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
    """

    def __init__(self, fused, policy: str | Scheduler = "space-time", *, slice_ms: float = 2.0,
                 slo_ms: float | Mapping[str, float] | None = None, max_batch: int = 32,
                 max_queue: int = DEFAULT_MAX_QUEUE, example_inputs=None,
                 profile: LatencyProfile | None = None, profile_reps: int = 3):
        self._fused = fused
        self.tenants = list(fused.tenants)
        if max_queue < 1:
            raise StfuseError(f"Runtime: max_queue must be >= 1, got {max_queue}")
        if isinstance(slo_ms, Mapping):
            unknown = set(slo_ms) - set(self.tenants)
            if unknown:
                raise StfuseError(f"Runtime: slo_ms names unknown tenant(s) {sorted(unknown)}; "
                                  f"tenants are {self.tenants}")
            slo = {t: float(slo_ms.get(t, DEFAULT_SLO_MS)) for t in self.tenants}
        else:
            slo = {t: float(DEFAULT_SLO_MS if slo_ms is None else slo_ms) for t in self.tenants}
        self._slo_s = {t: ms / 1e3 for t, ms in slo.items()}
        self.max_batch = max_batch
        self.max_queue = max_queue
        examples = _normalise_examples(self.tenants, example_inputs) if example_inputs else {}
        if isinstance(policy, Scheduler):
            self._scheduler = policy
        else:
            if profile is None:
                profile = (measure_profile(fused, examples, max_batch, profile_reps) if examples
                           else LatencyProfile({}, {}))
            self._scheduler = make_scheduler(policy, self.tenants, slice_s=slice_ms / 1e3,
                                             max_batch=max_batch, profile=profile, slo_s=self._slo_s)
        self.policy = self._scheduler.name
        self._specs = {t: _Spec(a) for t, a in examples.items()}
        self._check = getattr(fused, "check_inputs", None)
        self._stats = StatsRecorder(self.tenants, self._slo_s)
        self._stats_lock = threading.Lock()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the worker waits here for requests
        self._room = threading.Condition(self._lock)  # blocked submitters wait here for queue space
        self._queues: dict[str, deque[_Request]] = {t: deque() for t in self.tenants}
        self._unbatchable: set[str] = set()
        self._closed = False
        self._cancelled_some = False
        self._inflight: list[_Request] = []
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._loop, name="stfuse-runtime", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def submit(self, tenant: str, args, *, block: bool = False, timeout: float | None = None) -> Future:
        """Queue one request (a Tensor or a tuple of Tensors, batch on dim 0); returns its Future.

        Bad input raises InputError here, before anything is queued. A full
        queue raises QueueFullError at once, or with block=True waits for room
        up to `timeout` seconds (None: no limit) and then raises it. After
        close(), raises RuntimeClosedError. Thread-safe.
        """
        if tenant not in self._queues:
            raise InputError(f"unknown tenant {tenant!r}; tenants are {self.tenants}")
        args = _as_args(tenant, args, self.max_batch)
        spec = self._specs.get(tenant)
        if spec is not None:
            spec.check(tenant, args)
        if self._check is not None:
            try:
                self._check(tenant, args)
            except StfuseError:
                raise
            except Exception as exc:
                raise InputError(f"tenant {tenant!r}: {exc}") from exc
        future = Future()
        future.add_done_callback(self._on_done)
        with self._lock:
            queue = self._queues[tenant]
            limit = None if timeout is None else time.monotonic() + timeout
            while not self._closed and len(queue) >= self.max_queue:
                left = None if limit is None else limit - time.monotonic()
                if not block or (left is not None and left <= 0):
                    with self._stats_lock:
                        self._stats.count(tenant, "rejected")
                    raise QueueFullError(f"tenant {tenant!r}: queue full ({self.max_queue} requests waiting)")
                self._room.wait(left)
            if self._closed:
                raise RuntimeClosedError(f"tenant {tenant!r}: the runtime is closed")
            now = time.perf_counter()
            queue.append(_Request(tenant, args, args[0].shape[0], now, now + self._slo_s[tenant], future))
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
        if threading.current_thread() is self._thread:
            return  # called from a future's callback: the worker stops by itself after this launch
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

    def _on_done(self, future: Future) -> None:
        if future.cancelled():
            self._cancelled_some = True  # read by the worker, which then drops cancelled requests

    def _cancel_queued(self) -> None:
        for t, queue in self._queues.items():
            for r in queue:
                r.future.cancel()
            with self._stats_lock:
                self._stats.count(t, "cancelled", len(queue))
            queue.clear()

    def _drop_cancelled(self) -> None:
        self._cancelled_some = False
        for t, queue in self._queues.items():
            keep = [r for r in queue if not r.future.cancelled()]
            if len(keep) != len(queue):
                with self._stats_lock:
                    self._stats.count(t, "cancelled", len(queue) - len(keep))
                queue.clear()
                queue.extend(keep)

    def _next_launch(self) -> tuple[Launch, dict[str, list[_Request]]] | None:
        """Block until the policy launches something; None once closed and drained."""
        with self._lock:
            while True:
                if self._cancelled_some:
                    self._drop_cancelled()
                if not any(self._queues.values()):
                    if self._closed:
                        return None
                    self._work.wait()
                    continue
                now = time.perf_counter()
                decision = self._scheduler.decide(self._queues, now, flush=self._closed)
                if isinstance(decision, Wait):
                    self._work.wait(max(0.0, decision.until - now))
                    continue
                if decision is None:
                    raise StfuseError(f"policy {self.policy!r} launched nothing with requests queued")
                batch = {}
                for t, k in decision.take.items():
                    queue = self._queues[t]
                    k = min(k, 1) if t in self._unbatchable else k
                    got = []
                    while queue and len(got) < k:
                        r = queue.popleft()
                        if r.future.set_running_or_notify_cancel():
                            got.append(r)
                        else:
                            with self._stats_lock:
                                self._stats.count(t, "cancelled")
                    if got:
                        batch[t] = got
                self._room.notify_all()
                if batch:
                    self._inflight = [r for reqs in batch.values() for r in reqs]
                    return decision, batch

    def _loop(self) -> None:
        try:
            while (item := self._next_launch()) is not None:
                launch, batch = item
                if launch.mode == "concurrent" and len(batch) > 1:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(len(self.tenants), thread_name_prefix="stfuse-space")
                    for f in [self._pool.submit(self._run_on_stream, t, reqs) for t, reqs in batch.items()]:
                        f.result()
                else:
                    self._run_group(batch)
                self._inflight = []
        except BaseException as exc:  # a bug here must not leave futures unresolved
            with self._lock:
                self._closed = True
                stranded = self._inflight + [r for q in self._queues.values() for r in q]
                for q in self._queues.values():
                    q.clear()
                self._room.notify_all()
            for r in stranded:
                if not r.future.done():
                    if r.future.running() or r.future.set_running_or_notify_cancel():
                        r.future.set_exception(StfuseError(f"runtime worker failed: {exc!r}"))
            raise

    def _run_on_stream(self, tenant: str, reqs: list[_Request]) -> None:
        device = reqs[0].args[0].device
        if device.type != "cuda":
            self._run_group({tenant: reqs})
            return
        stream = self._streams.setdefault(tenant, torch.cuda.Stream(device))
        stream.wait_stream(torch.cuda.default_stream(device))
        with torch.cuda.stream(stream):
            self._run_group({tenant: reqs})

    def _run_group(self, batch: dict[str, list[_Request]]) -> None:
        """One call of the program for `batch`; on failure, isolate the fault by retrying smaller groups."""
        start = time.perf_counter()
        try:
            inputs = {t: _concat(reqs) for t, reqs in batch.items()}
            outs = self._fused.run(inputs)
            if not isinstance(outs, Mapping) or set(outs) != set(batch):
                raise StfuseError(f"fused.run returned {type(outs).__name__} "
                                  f"{sorted(outs) if isinstance(outs, Mapping) else ''} for {sorted(batch)}")
            _synchronize(inputs)
            results = {t: [outs[t]] if len(reqs) == 1 else _split(outs[t], [r.rows for r in reqs])
                       for t, reqs in batch.items()}
        except Exception as exc:
            self._isolate(batch, exc)
            return
        finish = time.perf_counter()
        rows = {t: sum(r.rows for r in reqs) for t, reqs in batch.items()}
        with self._stats_lock:
            self._stats.launch(rows)
            self._scheduler.profile.observe(rows, finish - start)
            for t, reqs in batch.items():
                for r in reqs:
                    self._stats.request(t, r.arrival, finish)
        for t, reqs in batch.items():
            if t not in self._specs:
                self._specs[t] = _Spec(reqs[0].args)
            for r, out in zip(reqs, results[t]):
                r.future.set_result(out)

    def _isolate(self, batch: dict[str, list[_Request]], exc: Exception) -> None:
        if len(batch) > 1:
            groups = [{t: reqs} for t, reqs in batch.items()]
        else:
            (t, reqs), = batch.items()
            if len(reqs) == 1:
                with self._stats_lock:
                    self._stats.request(t, reqs[0].arrival, time.perf_counter(), ok=False)
                reqs[0].future.set_exception(exc)
                return
            if isinstance(exc, _Unsplittable):
                self._unbatchable.add(t)  # from now on this tenant runs one request per launch
            groups = [{t: [r]} for r in reqs]
        with self._stats_lock:
            for g in groups:
                for t, reqs in g.items():
                    self._stats.count(t, "retries", len(reqs))
        for g in groups:
            self._run_group(g)
