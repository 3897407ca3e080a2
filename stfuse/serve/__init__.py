"""Serving over HTTP with the Open Inference Protocol (KServe v2): ``stfuse serve``.

    protocol.py   the protocol's JSON: datatypes, model metadata, infer requests and responses
    server.py     ModelServer: artifacts under their Runtimes, answering the protocol by model name
    metrics.py    GET /metrics in Prometheus' text format
    http.py       the routes as a Starlette app, and the one-process server on uvicorn
    ray_app.py    replicas on Ray Serve, with an ingress routing each model to its replicas
    placement.py  plan_placement: which replicas host which tenants (place_sim.py simulates it)

Needs the ``serve`` extra (starlette, uvicorn, ray[serve]); Ray only with replicas.
docs/serve.md has the protocol mapping, placement and the multi-node setup. Placement
needs only the base install.
"""

from .placement import PlacementPlan, TenantDesc, describe, plan_placement

__all__ = ["plan_placement", "PlacementPlan", "TenantDesc", "describe"]
