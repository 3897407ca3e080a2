"""Replicas on Ray Serve (``stfuse serve --replicas N``)::

    HTTP -> Ray Serve's proxy (host:port) -> ingress: the protocol's routes (http.py),
            routing each model to the replicas that host it
         -> replica-<i>: a ModelServer over the artifacts assigned to it, one Runtime each

Each replica is its own deployment (one actor), so placement is explicit:
``assignment[i]`` lists the artifacts replica i loads (default: all of them on
every replica), and /metrics reads every replica's counters. The ingress sends a
request to the least busy replica hosting its model. A replica that dies mid-request
(its actor killed) makes the ingress retry once, on another host of the model or,
where there is none, on the same replica once Ray Serve has restarted it; a request
still unanswered after ``timeout_s`` gets 503. Requests are idempotent (inference),
so a retry is safe. The dead replica takes no new requests until it answers again.

Ray is imported only here, and only when called, so ``stfuse serve`` without
``--replicas`` needs no Ray. A local Ray instance started here listens on the
loopback interface only and sends no usage statistics (LOCAL_RAY_ENV).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stfuse.errors import StfuseError
from stfuse.serve.http import make_app
from stfuse.serve.metrics import RequestMetrics, render
from stfuse.serve.server import ModelServer, server_metadata

APP = "stfuse"
# Set (unless already set) before a local Ray instance starts; its processes inherit them.
LOCAL_RAY_ENV = {
    # Ray's switch for single-machine clusters (its default on macOS and Windows): every
    # service binds 127.0.0.1 instead of the machine's network address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Requests one replica may hold at once. High: the replica's Runtime, not Ray's queue,
# should see them, since it fuses and batches what is queued together.
REPLICA_ONGOING = 1024
INGRESS_ONGOING = 8192


class Replica:
    """A Ray Serve replica: a ModelServer over its artifacts (paths readable on its node)."""

    def __init__(self, index: int, artifacts: list[str], options: dict):
        self.index = index
        self.server = ModelServer(artifacts, **options)

    async def handle(self, op: str, model: str | None = None, body: bytes = b"") -> tuple[int, Any]:
        return await self.server.handle(op, model, body)

    def stats(self) -> dict:
        return self.server.stats()

    def __del__(self):  # Ray Serve's graceful stop: the runtimes finish what they queued
        server = getattr(self, "server", None)
        if server is not None:
            server.close(timeout=10.0)


class Ingress:
    """The HTTP front end on Ray: the same routes as one process (http.make_app), with
    model operations forwarded to a replica hosting the model."""

    def __init__(self, replicas: list, hosts: dict[str, list[int]], timeout_s: float):
        self.replicas = replicas  # DeploymentHandles, one per replica
        self.hosts = hosts  # model -> replicas that load it
        self.timeout_s = timeout_s
        self.requests = RequestMetrics(hosts)
        self.closing = False
        self.busy = [0] * len(replicas)  # requests in flight per replica
        self.down: set[int] = set()  # replicas that died under a request, until they answer again
        self._turn = 0

    def __serve_build_asgi_app__(self):
        return make_app(self)

    async def handle(self, op: str, model: str | None = None, body: bytes = b"") -> tuple[int, Any]:
        if op == "live":
            return 200, {"live": True}
        if op == "server":
            return 200, server_metadata()
        if op == "ready":
            ok = not self.closing and all(set(h) - self.down for h in self.hosts.values())
            return (200, {"ready": True}) if ok else (400, {"ready": False, "error": self._unready()})
        if op == "metrics":
            return 200, await self._metrics()
        if model not in self.hosts:
            return 404, {"error": f"unknown model {model!r}; the models are {list(self.hosts)}"}
        if op == "model_ready":
            ok = not self.closing and set(self.hosts[model]) - self.down
            return (200 if ok else 400), {"name": model, "ready": bool(ok)}
        if op == "infer" and self.closing:
            return 503, {"error": "the server is draining; retry on another server"}
        return await self._forward(op, model, body)

    def _unready(self) -> str:
        if self.closing:
            return "the server is draining"
        return f"replica(s) {sorted(self.down)} restarting, and no other replica hosts their models"

    def _order(self, model: str) -> list[int]:
        """The replicas to try for ``model``: two, the least busy live one first (ties in
        turn); a model on one replica tries it twice (the second time once Ray restarted it)."""
        self._turn += 1
        n = len(self.busy)
        hosts = sorted(self.hosts[model], key=lambda r: (r in self.down, self.busy[r], (r + self._turn) % n))
        return hosts[:2] if len(hosts) > 1 else hosts * 2

    async def _forward(self, op: str, model: str, body: bytes) -> tuple[int, Any]:
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + self.timeout_s
        failures = []
        for r in self._order(model):
            self.busy[r] += 1
            try:
                left = max(0.0, deadline - time.monotonic())
                return await asyncio.wait_for(self._call(r, "handle", op, model, body), left)
            except asyncio.TimeoutError:
                return 503, {"error": f"model {model!r}: no answer from replica {r} within "
                                      f"{self.timeout_s:g} s{'; ' if failures else ''}{'; '.join(failures)}"}
            except RayActorError as err:  # the replica died under the request (killed, out of memory)
                failures.append(f"replica {r} failed: {type(err).__name__}")
                self._mark_down(r)
            finally:
                self.busy[r] -= 1
        return 503, {"error": f"model {model!r}: {'; '.join(failures)}; Ray Serve is restarting it, retry"}

    async def _call(self, r: int, method: str, *args):
        return await getattr(self.replicas[r], method).remote(*args)

    def _mark_down(self, r: int) -> None:
        if r not in self.down:
            self.down.add(r)
            asyncio.get_running_loop().create_task(self._watch(r))

    async def _watch(self, r: int) -> None:
        """Probe a dead replica until its restarted actor answers; then it takes requests again."""
        from ray.exceptions import RayActorError

        while True:
            try:
                await asyncio.wait_for(self._call(r, "handle", "live"), self.timeout_s)
                break
            except (RayActorError, asyncio.TimeoutError):
                await asyncio.sleep(0.5)
        self.down.discard(r)

    async def _metrics(self) -> str:
        """The front end's request counts and every live replica's runtime counters (label
        replica); a replica that does not answer within 5 s is left out of this page."""
        async def stats(r: int):
            try:
                return {"replica": str(r)}, await asyncio.wait_for(self._call(r, "stats"), 5.0)
            except Exception:  # noqa: BLE001 - a dead or restarting replica: no counters this time
                return None

        got = await asyncio.gather(*(stats(r) for r in range(len(self.replicas)) if r not in self.down))
        return render(self.requests, [g for g in got if g is not None])

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503), wait up to ``timeout_s`` for those in flight; returns how
        many were still in flight."""
        self.closing = True
        deadline = time.monotonic() + timeout_s
        while sum(self.busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return sum(self.busy)


def _placement(artifacts: list[Path], replicas: int, assignment) -> list[list[int]]:
    if assignment is None:
        return [list(range(len(artifacts)))] * replicas
    if len(assignment) != replicas or any(not a or not all(0 <= i < len(artifacts) for i in a)
                                          for a in assignment):
        raise StfuseError(f"assignment: one non-empty list of artifact indices per replica ({replicas}), "
                          f"got {assignment}")
    if unplaced := set(range(len(artifacts))) - {i for a in assignment for i in a}:
        raise StfuseError(f"assignment: artifacts {[str(artifacts[i]) for i in sorted(unplaced)]} are on no replica")
    return [list(a) for a in assignment]


def _models(path: Path) -> tuple[list[str], bool]:
    """(tenant names, runs on CUDA) of an artifact, from its checked manifest."""
    from stfuse.artifact import read

    manifest, _ = read(path)
    return [t["name"] for t in manifest["tenants"]], manifest["tenants"][0]["device"].startswith("cuda")


def serve_on_ray(artifacts: list, replicas: int, options: dict, *, host: str = "127.0.0.1", port: int = 8000,
                 assignment: list[list[int]] | None = None, address: str | None = None,
                 timeout_s: float = 60.0, drain_s: float = 30.0, replica_cpus: float = 1.0,
                 progress=None) -> int:
    """Deploy ``artifacts`` on ``replicas`` Ray Serve replicas and serve until SIGINT or
    SIGTERM; then drain and return 0. ``options``: ModelServer's keyword arguments.
    ``address``: a running Ray cluster (``ray start --head``; RAY_ADDRESS works too), else
    a local instance is started and stopped here."""
    say = progress or (lambda msg: None)
    paths = [Path(a).resolve() for a in artifacts]
    placement = _placement(paths, replicas, assignment)
    models = [_models(p) for p in paths]
    hosts: dict[str, list[int]] = {}
    for r, placed in enumerate(placement):
        for i in placed:
            for t in models[i][0]:
                hosts.setdefault(t, []).append(r)
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray
    from ray import serve

    say(f"starting Ray ({'a local instance' if local else address or os.environ['RAY_ADDRESS']})")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        gpus = 1 if options.get("device") in (None, "cuda") and any(cuda for _, cuda in models) else 0
        handles = [serve.deployment(Replica, name=f"replica-{r}", num_replicas=1,
                                    ray_actor_options={"num_cpus": replica_cpus, "num_gpus": gpus},
                                    max_ongoing_requests=REPLICA_ONGOING, health_check_period_s=2.0,
                                    max_constructor_retry_count=2)
                   .bind(r, [str(paths[i]) for i in placed], options) for r, placed in enumerate(placement)]
        ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=1,
                                   ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_ONGOING)
        say(f"deploying {replicas} replicas: " + "; ".join(
            f"{r}: {', '.join(p.name for p in (paths[i] for i in placed))}" for r, placed in enumerate(placement)))
        handle = serve.run(ingress.bind(handles, hosts, timeout_s), name=APP, route_prefix="/")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"stfuse serve: listening on http://{host}:{port} ({replicas} replicas on Ray; models: "
              f"{', '.join(hosts)})", flush=True)
        while not stop.wait(1.0):
            pass
        say("draining")
        left = handle.drain.remote(drain_s).result(timeout_s=drain_s + 10)
        if left:
            say(f"{left} request(s) still in flight after {drain_s:g} s; stopping anyway")
        serve.delete(APP)  # each replica's __del__ drains its runtimes
    finally:
        if local:
            serve.shutdown()
        ray.shutdown()
    print("stfuse serve: drained, stopped", file=sys.stderr, flush=True)
    return 0
