"""``stfuse serve``: from the command line's arguments (stfuse/cli.py) to a server."""

from __future__ import annotations

import math
from importlib.util import find_spec

from stfuse.errors import StfuseError
from stfuse.runtime import POLICIES


def slo_option(values: list[str]) -> float | dict | None:
    """--slo-ms: one number for every model, or NAME=MS per model."""
    def ms(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise StfuseError(f"--slo-ms: {text!r} is not a positive number of milliseconds")
        return value

    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return ms(values[0])
    if bare := [v for v in values if "=" not in v]:
        raise StfuseError(f"--slo-ms: {bare[0]!r}: give one MS for every model, or NAME=MS per model")
    return {name: ms(value) for name, _, value in (v.rpartition("=") for v in values)}


def serve(args, say) -> int:
    """`stfuse serve` (cli.py parses its arguments): one process, or replicas on Ray."""
    if args.policy not in POLICIES:
        raise StfuseError(f"--policy {args.policy!r}: policies are {', '.join(POLICIES)}")
    options = {"policy": args.policy, "slo_ms": slo_option(args.slo_ms), "slice_ms": args.slice_ms,
               "max_batch": args.max_batch, "max_queue": args.max_queue, "device": args.device}
    on_ray = args.replicas > 1 or args.ray or args.ray_address is not None
    # find_spec, not import: Ray reads its environment once, at import (ray_app.LOCAL_RAY_ENV)
    if missing := [m for m in ("starlette", "uvicorn", *(("ray",) if on_ray else ())) if find_spec(m) is None]:
        raise StfuseError(f"stfuse serve needs the serve extra: pip install 'stfuse[serve]' "
                          f"(missing {', '.join(missing)})")
    if on_ray:
        if args.port == 0:
            raise StfuseError("--port 0 is for one process; Ray Serve's proxy needs a port number")
        from .ray_app import serve_on_ray

        return serve_on_ray(args.artifacts, args.replicas, options, host=args.host,
                            port=args.port, address=args.ray_address, timeout_s=args.timeout_s,
                            drain_s=args.drain_s, replica_cpus=args.replica_cpus, progress=say)
    from .http import bind, serve_forever
    from .server import ModelServer

    sock = bind(args.host, args.port)  # a port in use fails now, not after loading the artifacts
    try:
        server = ModelServer(args.artifacts, progress=say, **options)
    except BaseException:
        sock.close()
        raise
    return serve_forever(server, sock, drain_s=args.drain_s)
