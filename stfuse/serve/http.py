"""The HTTP side: the protocol's routes as a Starlette app over any front end, and the
one-process server on uvicorn with its drain on SIGINT/SIGTERM.

A front end has ``async handle(op, model, body) -> (status, payload)`` (server.py's
OPERATIONS), ``requests`` (metrics.RequestMetrics) and ``closing``: a ModelServer in
one process, the Ray ingress (ray_app.py) in front of replicas. The app is the same.

Shutdown: the first SIGINT or SIGTERM marks the front end closing (ready: 400, new
infer requests: 503), uvicorn stops listening and waits for the requests in flight,
then the runtimes drain and the process exits 0. A second SIGINT stops at once.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

from stfuse.serve.metrics import CONTENT_TYPE
from stfuse.serve.protocol import VERSION

# The Open Inference Protocol's routes: (path, method, operation of the front end). The
# versioned forms take version "1" only: each model has one version, its artifact.
ROUTES = (
    ("/v2/health/live", "GET", "live"),
    ("/v2/health/ready", "GET", "ready"),
    ("/v2", "GET", "server"),
    ("/v2/models/{model}", "GET", "metadata"),
    ("/v2/models/{model}/versions/{version}", "GET", "metadata"),
    ("/v2/models/{model}/ready", "GET", "model_ready"),
    ("/v2/models/{model}/versions/{version}/ready", "GET", "model_ready"),
    ("/v2/models/{model}/infer", "POST", "infer"),
    ("/v2/models/{model}/versions/{version}/infer", "POST", "infer"),
    ("/metrics", "GET", "metrics"),
)
DEFAULT_MAX_REQUEST_MB = 64


def response(status: int, payload: Any):
    """A JSON body, or the metrics page (text). NaN and infinities are written as JSON's
    common extension (NaN, Infinity) rather than refused: a model may return them."""
    from starlette.responses import Response

    if isinstance(payload, str):
        return Response(payload, status, media_type=CONTENT_TYPE)
    return Response(json.dumps(payload, separators=(",", ":")), status, media_type="application/json")


def make_app(frontend, max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20, lifespan=None):
    """The Starlette app of ROUTES over ``frontend``; unknown paths 404 and wrong methods 405,
    with the protocol's error body {"error": message}."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    def endpoint(op: str):
        async def answer(request):
            model = request.path_params.get("model")
            version = request.path_params.get("version", VERSION)
            if version != VERSION:
                return response(404, {"error": f"model {model!r} has version {VERSION} only, not {version!r}"})
            start = time.perf_counter()
            if op == "infer":
                size = request.headers.get("content-length")
                if size is not None and size.isdigit() and int(size) > max_request_bytes:
                    status, payload = 413, {"error": f"request body of {int(size)} bytes is over the "
                                                     f"limit of {max_request_bytes} bytes"}
                else:
                    status, payload = await frontend.handle(op, model, await request.body())
                frontend.requests.observe(model, status, time.perf_counter() - start)
            else:
                status, payload = await frontend.handle(op, model)
            return response(status, payload)
        return answer

    async def http_error(request, exc: HTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, exc.detail)
        return response(exc.status_code, {"error": message})

    routes = [Route(path, endpoint(op), methods=[method]) for path, method, op in ROUTES]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free port; serve_forever prints it)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve_forever(server, sock: socket.socket, *, drain_s: float = 30.0,
                  max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20) -> int:
    """Serve ``server`` (a ModelServer) over HTTP on ``sock`` (``bind``) until SIGINT or
    SIGTERM; then drain (at most ``drain_s`` seconds for the requests in flight, as long
    again for the queues) and return 0. Prints ``listening on URL`` on stdout once
    connections are accepted."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn re-raises a caught signal after its shutdown (exit status 130 or -15);
            # a drained stop is a success, so the signal is handled here and not recorded.
            server.closing = True
            self.force_exit = self.should_exit  # a second signal: stop without waiting
            self.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.close(timeout=drain_s)  # after uvicorn waited for the requests in flight

    sock.listen(2048)  # connections wait in the backlog until uvicorn's loop accepts them
    app = make_app(server, max_request_bytes, lifespan)
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=drain_s, timeout_keep_alive=30)
    print(f"stfuse serve: listening on {url(sock)} (models: {', '.join(server.tenants)})", flush=True)
    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
        server.close(timeout=0)  # idempotent; a failed start still stops the runtimes' threads
    print("stfuse serve: drained, stopped", file=sys.stderr, flush=True)
    return 0
