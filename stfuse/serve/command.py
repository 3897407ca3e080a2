"""``stfuse serve``: from the command line's arguments (stfuse/cli.py) to a server."""

from __future__ import annotations

import math
from importlib.util import find_spec

from stfuse.errors import StfuseError
from stfuse.runtime import POLICIES


def named_numbers(values: list[str], what: str, zero_ok: bool = False) -> list[tuple[str, float]]:
    """``[NAME=]NUMBER`` options as (name, value) pairs, name "" for a bare number; every
    value finite and positive (or zero, with ``zero_ok``). Shared by serve and place."""
    out = []
    for v in values:
        name, _, text = v.rpartition("=")
        try:
            x = float(text)
        except ValueError:
            x = float("nan")
        if not math.isfinite(x) or x < 0 or (x == 0 and not zero_ok):
            raise StfuseError(f"{what} {v!r}: expected [NAME=]NUMBER, a finite number "
                              f"{'>= 0' if zero_ok else '> 0'}")
        out.append((name, x))
    return out


def slo_option(values: list[str]) -> float | dict | None:
    """--slo-ms: one number for every model, or NAME=MS per model."""
    pairs = named_numbers(values, "--slo-ms")
    if not pairs:
        return None
    if len(pairs) == 1 and not pairs[0][0]:
        return pairs[0][1]
    if bare := [v for v, (name, _) in zip(values, pairs) if not name]:
        raise StfuseError(f"--slo-ms: {bare[0]!r}: give one MS for every model, or NAME=MS per model")
    return dict(pairs)


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
