"""ModelServer: the models of one process (the one-process server, or one Ray replica):
each artifact loaded once under its own stfuse.Runtime, answering the protocol's
operations by tenant name.

    server = ModelServer(["pair.stfuse", "bert.stfuse"], slo_ms={"bert": 50})
    status, payload = await server.handle("infer", "bert", body)   # (200, {"model_name": ...})
    server.close()                                                 # drains every runtime

Every failure is an HTTP status and {"error": message}, never an exception out of
handle(): STATUS below is the one table from stfuse's errors to statuses.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Mapping

import stfuse
from stfuse import dims
from stfuse.errors import (DeadlineExceededError, InputError, QueueFullError, RuntimeClosedError,
                           StfuseError)
from stfuse.runtime import DEFAULT_MAX_QUEUE
from stfuse.serve.metrics import RequestMetrics, render
from stfuse.serve.protocol import VERSION, ProtocolError, TenantProtocol, output_metadata

# An error of a request -> its HTTP status; the first row that matches wins.
STATUS = (
    (ProtocolError, None),  # its own status (400 for a malformed request)
    (QueueFullError, 429),  # the tenant's queue is full, or the tenant over its rate limit
    (RuntimeClosedError, 503),  # the server is draining (or its drain ran out of time)
    (DeadlineExceededError, 503),  # shed: it could no longer meet its SLO
    (InputError, 400),  # shape, dtype, batch size, a dynamic dim out of its range
)
OPERATIONS = ("live", "ready", "server", "metadata", "model_ready", "infer", "metrics")
# Bodies above this are decoded on a worker thread: the event loop keeps answering
# (health checks, small requests) while a large JSON body is parsed.
DECODE_OFF_LOOP_BYTES = 1 << 20


def error_status(err: BaseException) -> int:
    """The HTTP status of a request that raised ``err`` (500: a fault in the server or model)."""
    for kind, status in STATUS:
        if isinstance(err, kind):
            return status if status is not None else err.status
    return 500


def error_body(err: BaseException) -> dict:
    """The protocol's error body; a fault that is not stfuse's own error says what raised."""
    if isinstance(err, StfuseError):
        return {"error": str(err) or type(err).__name__}
    return {"error": f"the model raised {type(err).__name__}: {err}"}


def server_metadata() -> dict:
    return {"name": "stfuse", "version": stfuse.__version__, "extensions": []}


def check_slo_names(slo_ms: float | Mapping[str, float] | None, tenants: list[str]) -> None:
    """``slo_ms`` names only served models: a typo must not pass silently."""
    if isinstance(slo_ms, Mapping):
        unknown = sorted(set(slo_ms) - set(tenants))
        if unknown:
            raise StfuseError(f"--slo-ms names unknown model(s) {unknown}; the models are {tenants}")


async def result_of(future: Future):
    """Await a Runtime future. One the runtime cancelled (a drain that ran out of time)
    raises RuntimeClosedError, not asyncio's CancelledError, which means that the awaiting
    task itself was cancelled (the client left; then the request is cancelled too)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def settle(f: Future) -> None:
        if waiter.done():
            return
        if f.cancelled():
            waiter.set_exception(RuntimeClosedError("the request was cancelled: the server drained"))
        elif f.exception() is not None:
            waiter.set_exception(f.exception())
        else:
            waiter.set_result(f.result())

    future.add_done_callback(lambda f: loop.call_soon_threadsafe(settle, f))
    try:
        return await waiter
    except asyncio.CancelledError:
        future.cancel()
        raise


def _probe_calls(prog, tenant: str) -> tuple[Any, Any]:
    """Two calls of ``tenant`` that differ in every dim that may vary (the batch where it
    is dynamic, each declared dim) within their traced ranges, or the same call twice."""
    from stfuse.artifact.inputs import random_inputs

    spec = prog.specs[tenant]
    first = random_inputs(prog, [tenant], None, 0, 1024)[tenant]
    batch = spec.batch + 1 if spec.dynamic and spec.in_range(spec.batch + 1) else \
        spec.batch - 1 if spec.dynamic and spec.batch > 1 and spec.in_range(spec.batch - 1) else None
    second = random_inputs(prog, [tenant], batch, 1, 1024)[tenant]
    example = {name: s.shape[d] for s in spec.inputs for d, name in s.dims}
    other = {}
    for name, (low, high) in spec.dim_ranges.items():
        up, down = example[name] + 1, example[name] - 1
        other[name] = up if high is None or up <= high else down if down >= low else example[name]
    second = dims.resize(second, spec.inputs, other) if other else second
    # (args, {}) as args alone: the form a tenant of positional tensors takes in the Runtime
    return tuple(call[0] if not call[1] else call for call in (first, second))


class ModelServer:
    """The models (tenants) of several artifacts, each artifact under its own Runtime.

    Model names are tenant names, so two artifacts may not both hold a tenant of one
    name. ``slo_ms``: one number for every model, or {model: ms}; the Runtime's options
    (policy, slice_ms, max_batch, max_queue) apply to each artifact's Runtime.
    """

    def __init__(self, artifacts: list, *, policy: str = "space-time", slo_ms=None, slice_ms: float = 2.0,
                 max_batch: int = 32, max_queue: int = DEFAULT_MAX_QUEUE,
                 device: str | None = None, progress: Callable[[str], None] | None = None):
        say = progress or (lambda msg: None)
        self.runtimes: list[stfuse.Runtime] = []
        self.models: dict[str, tuple[stfuse.Runtime, TenantProtocol]] = {}
        self.closing = False
        loaded = []
        try:
            for path in artifacts:
                say(f"loading {path}")
                prog = stfuse.load(path, device=device)
                for t in prog.tenants:
                    if t in self.models or any(t in p.tenants for _, p in loaded):
                        raise StfuseError(f"model {t!r} is in two artifacts ({path} and another); "
                                          "model names are tenant names and must be unique")
                loaded.append((Path(path), prog))
            names = [t for _, p in loaded for t in p.tenants]
            check_slo_names(slo_ms, names)
            for path, prog in loaded:
                say(f"measuring {path.name}: outputs and a latency profile")
                calls = {t: _probe_calls(prog, t) for t in prog.tenants}
                outs = [prog.run({t: c[i] for t, c in calls.items()}) for i in (0, 1)]
                slo = {t: ms for t, ms in slo_ms.items() if t in prog.tenants} \
                    if isinstance(slo_ms, Mapping) else slo_ms
                rt = stfuse.Runtime(prog, policy, slice_ms=slice_ms, slo_ms=slo, max_batch=max_batch,
                                    max_queue=max_queue, example_inputs={t: c[0] for t, c in calls.items()})
                self.runtimes.append(rt)
                for t in prog.tenants:
                    spec = prog.specs[t]
                    self.models[t] = (rt, TenantProtocol(spec, output_metadata(spec, outs[0][t], outs[1][t])))
        except BaseException:
            self.close()
            raise
        self.requests = RequestMetrics(self.models)  # recorded by the HTTP front end (http.py)

    @property
    def tenants(self) -> list[str]:
        return list(self.models)

    async def handle(self, op: str, model: str | None = None, body: bytes = b"") -> tuple[int, Any]:
        """One protocol operation (OPERATIONS) -> (HTTP status, JSON-able payload or text)."""
        try:
            if op == "live":
                return 200, {"live": True}
            if op == "ready":
                return (400, {"ready": False, "error": "the server is draining"}) if self.closing \
                    else (200, {"ready": True})
            if op == "server":
                return 200, server_metadata()
            if op == "metrics":
                return 200, render(self.requests, [({}, self.stats())])
            runtime, proto = self._model(model)
            if op == "metadata":
                return 200, proto.metadata()
            if op == "model_ready":
                return (400, {"name": model, "ready": False}) if self.closing else (200, {"name": model,
                                                                                          "ready": True})
            if op == "infer":
                return 200, await self._infer(runtime, proto, body)
            raise ProtocolError(404, f"no operation {op!r}; operations are {', '.join(OPERATIONS)}")
        except Exception as err:  # noqa: BLE001 - every failure is a status (STATUS), nothing escapes
            return error_status(err), error_body(err)

    def _model(self, model: str | None) -> tuple[stfuse.Runtime, TenantProtocol]:
        found = self.models.get(model)
        if found is None:
            raise ProtocolError(404, f"unknown model {model!r}; the models are {self.tenants}")
        return found

    async def _infer(self, runtime, proto: TenantProtocol, body: bytes) -> dict:
        if self.closing:
            raise RuntimeClosedError("the server is draining; send the request to another replica")
        if len(body) > DECODE_OFF_LOOP_BYTES:
            call, rid, wanted = await asyncio.to_thread(proto.decode, body)
        else:
            call, rid, wanted = proto.decode(body)
        out = await result_of(runtime.submit(proto.spec.name, call))
        return proto.encode(out, rid, wanted)

    def stats(self) -> dict[str, dict]:
        """{model: its Runtime.stats() entry}, for /metrics (plain data: it crosses Ray)."""
        out = {}
        for rt in self.runtimes:
            out.update(rt.stats()["tenants"])
        return out

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests (503) and drain every runtime: queued requests still run,
        unless ``timeout`` seconds pass (then they are cancelled: 503)."""
        self.closing = True
        for rt in self.runtimes:
            rt.close(timeout=timeout)


__all__ = ["ModelServer", "STATUS", "OPERATIONS", "VERSION", "error_status", "error_body", "server_metadata"]
