"""Serving over HTTP with the Open Inference Protocol (KServe v2): ``stfuse serve``.

    protocol.py   the protocol's JSON: datatypes, model metadata, infer requests and responses
    server.py     ModelServer: artifacts under their Runtimes, answering the protocol by model name
    metrics.py    GET /metrics in Prometheus' text format
    http.py       the routes as a Starlette app, and the one-process server on uvicorn
    ray_app.py    replicas on Ray Serve, with an ingress routing each model to its replicas

Needs the ``serve`` extra (starlette, uvicorn, ray[serve]); Ray only with replicas.
docs/serve.md has the protocol mapping and the multi-node setup.
"""
