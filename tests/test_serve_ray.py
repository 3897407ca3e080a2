"""`stfuse serve --replicas 2` on a local Ray instance (one for the module), over real HTTP
on 127.0.0.1: endpoints, outputs against eager, concurrent clients, bad requests, metrics
per replica, and a replica killed mid-load (every request succeeds or gets a clear error,
none hangs, and Ray Serve brings the replica back). Ray on 2 cores is slow to start
(~45 s here): the tests are few and share the one server."""

import importlib.util
import re
import signal
import socket
import threading
import time

import pytest
import torch

from serving import Client, ServerProcess, check_eager, kill, kw_call, models, process_titled, saved_artifact

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("starlette") is None,
                       reason="needs the serve extra (pip install -e '.[serve]'): ray[serve], starlette, uvicorn"),
]


def _free_port() -> int:
    with socket.socket() as s:  # Ray Serve's proxy takes a port number, not 0
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    artifact = saved_artifact(tmp_path_factory)
    proc = ServerProcess([artifact, "--replicas", "2", "--port", _free_port(), "--slo-ms", "600000",
                          "--timeout-s", "90", "-q"], tmp_path_factory.mktemp("ray-logs"), start_timeout=400)
    yield proc
    status = proc.stop(signal.SIGTERM, timeout=180)
    assert status == 0, f"SIGTERM: exit {status}\n{proc.stderr()}"


@pytest.fixture
def client(server):
    c = Client(server.url, timeout=120)
    yield c
    c.close()


def test_endpoints_and_outputs_match_eager(client):
    assert client.call("GET", "/v2/health/live") == (200, {"live": True})
    assert client.call("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = client.call("GET", "/v2/models/kw")
    assert status == 200 and meta["inputs"][1] == {"name": "mask", "datatype": "INT64", "shape": [-1, -1]}
    assert client.call("GET", "/v2/models/b/ready") == (200, {"name": "b", "ready": True})
    ms = models()
    x = torch.randn(3, 8)
    for name in ("a", "b"):
        status, resp = client.infer(name, x)
        assert status == 200, resp
        check_eager(name, ms[name], x, resp)
    call = kw_call(2, 6)
    status, resp = client.infer("kw", call)
    assert status == 200, resp
    check_eager("kw", ms["kw"], call, resp)


def test_bad_requests_get_a_clear_error(client):
    status, resp = client.call("POST", "/v2/models/nope/infer", {"inputs": []})
    assert status == 404 and "unknown model 'nope'" in resp["error"]
    status, resp = client.infer("a", torch.randn(1, 7))
    assert status == 400 and "expected shape Tensor[B, 8]" in resp["error"]
    status, resp = client.call("POST", "/v2/models/a/infer", b"{not json")
    assert status == 400 and "not JSON" in resp["error"]
    assert client.call("GET", "/v2/health/ready")[0] == 200


def _load(url: str, threads: int, per_thread: int, results: list, progress: threading.Event | None = None):
    """``threads`` clients sending ``per_thread`` requests each to a and b; results gets
    (name, input, status, response) or (name, input, the client's exception, None)."""
    def run(k: int) -> None:
        c = Client(url, timeout=150)  # longer than --timeout-s: the server answers first
        for i in range(per_thread):
            name, x = "ab"[i % 2], torch.randn(1, 8, generator=torch.Generator().manual_seed(100 * k + i))
            try:
                results.append((name, x, *c.infer(name, x)))
            except OSError as err:
                results.append((name, x, err, None))
                c.close()
                c = Client(url, timeout=150)
            if progress is not None and len(results) >= 8:
                progress.set()
        c.close()

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    return pool


def test_concurrent_clients_are_spread_over_both_replicas(client, server):
    results = []
    for t in _load(server.url, 4, 25, results):
        t.join(timeout=300)
    assert len(results) == 100
    ms = models()
    for name, x, status, resp in results:
        assert status == 200, resp
        check_eager(name, ms[name], x, resp)
    status, page = client.call("GET", "/metrics")
    assert status == 200
    served = {r: sum(int(v) for v in re.findall(
        rf'stfuse_served_total\{{model="[ab]",replica="{r}"\}} (\d+)', page)) for r in "01"}
    assert served["0"] > 0 and served["1"] > 0, served


def test_a_replica_killed_mid_load(client, server):
    """SIGKILL replica 0 while 4 clients send 30 requests each: every request gets 200 or a
    503 naming the failure, none hangs, and Ray Serve restarts the replica."""
    victim = process_titled(server.proc.pid, "ServeReplica:stfuse:replica-0")
    assert victim is not None
    results, progress = [], threading.Event()
    pool = _load(server.url, 4, 30, results, progress)
    assert progress.wait(120)
    kill(victim)
    for t in pool:
        t.join(timeout=400)
    assert not any(t.is_alive() for t in pool), "a request hung"
    assert len(results) == 120
    ms = models()
    for name, x, status, resp in results:
        assert status in (200, 503), (status, resp)
        if status == 200:
            check_eager(name, ms[name], x, resp)
        else:
            assert "replica 0" in resp["error"], resp
    deadline = time.monotonic() + 300
    while (process_titled(server.proc.pid, "ServeReplica:stfuse:replica-0") in (None, victim)
           or client.call("GET", "/v2/health/ready")[0] != 200):
        assert time.monotonic() < deadline, "replica 0 did not come back"
        time.sleep(1)
    after = []
    for t in _load(server.url, 2, 10, after):
        t.join(timeout=300)
    assert [r[2] for r in after] == [200] * 20
