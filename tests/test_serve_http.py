"""`stfuse serve` in one process, started as a subprocess: every endpoint over real HTTP on
127.0.0.1, outputs against the models' eager outputs, concurrent clients, bad requests,
and the drain on SIGINT/SIGTERM (exit 0)."""

import importlib.util
import signal
import threading

import pytest
import torch

from stfuse.tolerances import assert_close

from serving import Client, ServerProcess, check_eager, kw_call, models, outputs, saved_artifact

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None,
    reason="needs the serve extra (pip install -e '.[serve]'): starlette and uvicorn")

# Requests here must not be shed on a loaded 2-core machine: an SLO no test run reaches.
SERVE_ARGS = ["--port", "0", "--slo-ms", "600000", "-q"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return saved_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    """One server for the module; stopped with SIGTERM, which must drain and exit 0."""
    proc = ServerProcess([artifact, *SERVE_ARGS], tmp_path_factory.mktemp("logs"))
    yield proc
    status = proc.stop(signal.SIGTERM)
    assert status == 0, f"SIGTERM: exit {status}\n{proc.stderr()}"


@pytest.fixture
def client(server):
    c = Client(server.url)
    yield c
    c.close()


def test_health_and_server_metadata(client):
    assert client.call("GET", "/v2/health/live") == (200, {"live": True})
    assert client.call("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = client.call("GET", "/v2")
    assert status == 200 and meta["name"] == "stfuse" and "version" in meta


def test_model_metadata_marks_dynamic_dims(client):
    status, meta = client.call("GET", "/v2/models/kw")
    assert status == 200
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 8]},
                              {"name": "mask", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 8]},
                               {"name": "pooled", "datatype": "FP32", "shape": [-1, 8]}]
    status, meta = client.call("GET", "/v2/models/a/versions/1")
    assert status == 200
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 4]}]
    for name in ("a", "b", "kw"):
        assert client.call("GET", f"/v2/models/{name}/ready") == (200, {"name": name, "ready": True})


@pytest.mark.parametrize("batch,seq", [(1, 3), (3, 7)])
def test_infer_matches_eager(client, batch, seq):
    ms = models()
    g = torch.Generator().manual_seed(batch)
    for name in ("a", "b"):
        x = torch.randn(batch, 8, generator=g)
        status, resp = client.infer(name, x)
        assert status == 200, resp
        assert resp["model_name"] == name and resp["model_version"] == "1"
        check_eager(name, ms[name], x, resp)
    call = kw_call(batch, seq, seed=batch)
    status, resp = client.infer("kw", call)
    assert status == 200, resp
    check_eager("kw", ms["kw"], call, resp)


def test_infer_takes_inputs_in_any_order_by_name_echoes_id_and_selects_outputs(client):
    call = kw_call(2, 4)
    body = {"id": "req-7", "outputs": [{"name": "pooled"}],
            "inputs": [{"name": "mask", "shape": [2, 4], "datatype": "INT64", "data": call["mask"].tolist()},
                       {"name": "x", "shape": [2, 4, 8], "datatype": "FP32", "data": call["x"].tolist()}]}
    status, resp = client.call("POST", "/v2/models/kw/versions/1/infer", body)
    assert status == 200, resp
    assert resp["id"] == "req-7" and [o["name"] for o in resp["outputs"]] == ["pooled"]
    ref = models()["kw"](**call)["pooled"]
    assert_close(outputs(resp)["pooled"], ref)  # the tolerance table (float32: 1e-4)


def test_concurrent_clients_get_their_own_answers(client, server):
    """8 threads x 200 requests over keep-alive connections, tenants mixed (a and b fuse,
    kw at two lengths): every response is 200 and matches its own request's eager output."""
    ms = models()
    results, errors = {}, []

    def run(k: int) -> None:
        c = Client(server.url)
        try:
            for i in range(200):
                g = torch.Generator().manual_seed(1000 * k + i)
                name = ("a", "b", "a", "kw")[i % 4]
                call = kw_call(1, 3 + 2 * (i % 8 == 3), seed=1000 * k + i) if name == "kw" else \
                    torch.randn(1, 8, generator=g)
                results[(k, i)] = (name, call, *c.infer(name, call))
        except Exception as err:  # noqa: BLE001 - reported below, with the thread
            errors.append(f"thread {k}: {err!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert len(results) == 1600
    for (k, i), (name, call, status, resp) in sorted(results.items()):
        assert status == 200, (k, i, resp)
        check_eager(f"{name} thread {k} request {i}", ms[name], call, resp)
    status, text = client.call("GET", "/metrics")
    assert status == 200
    assert 'stfuse_requests_total{model="kw",code="200"}' in text


def _x(shape, datatype="FP32", data=None, name="x"):
    n = 1
    for d in shape:
        n *= d
    return {"name": name, "shape": shape, "datatype": datatype, "data": [0.5] * n if data is None else data}


# (method, path, body, status, a fragment of the error message): each names what is wrong
BAD_REQUESTS = [
    ("POST", "/v2/models/nope/infer", {"inputs": [_x([1, 8])]}, 404, "unknown model 'nope'"),
    ("GET", "/v2/models/nope", None, 404, "unknown model"),
    ("GET", "/v2/models/nope/ready", None, 404, "unknown model"),
    ("POST", "/v2/models/a/versions/2/infer", {"inputs": [_x([1, 8])]}, 404, "version 1 only"),
    ("GET", "/v3/anything", None, 404, "no route"),
    ("GET", "/v2/models/a/infer", None, 405, "GET is not allowed"),
    ("POST", "/v2/models/a/infer", b"{not json", 400, "request body: not JSON"),
    ("POST", "/v2/models/a/infer", [1, 2], 400, "expected a JSON object"),
    ("POST", "/v2/models/a/infer", {}, 400, "inputs: expected a non-empty list"),
    ("POST", "/v2/models/a/infer", {"inputs": [{"shape": [1, 8]}]}, 400, "inputs[0].name"),
    ("POST", "/v2/models/a/infer", {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32"}]}, 400,
     "inputs[0] (x).data: missing"),
    ("POST", "/v2/models/a/infer", {"inputs": [_x([1, 7])]}, 400, "expected shape Tensor[B, 8]"),
    ("POST", "/v2/models/a/infer", {"inputs": [_x([1, 8], data=[0.5] * 7)]}, 400, "7 values for shape [1, 8]"),
    ("POST", "/v2/models/a/infer", {"inputs": [_x([1, 8], "INT64", [1] * 8)]}, 400,
     "inputs[0] (x).datatype: expected FP32, got INT64"),
    ("POST", "/v2/models/a/infer", {"inputs": [_x([1, 8], "FP99")]}, 400, "'FP99' is not one of"),
    ("POST", "/v2/models/a/infer", {"inputs": [_x([1, 8], data=["a"] * 8)]}, 400, "inputs[0] (x).data"),
    ("POST", "/v2/models/a/infer", {"inputs": [_x([1, 8]), _x([1, 8], name="y")]}, 400,
     "2 positional input(s)"),
    ("POST", "/v2/models/a/infer", {"inputs": [_x([1, 8])], "outputs": [{"name": "z"}]}, 400,
     "unknown output(s) ['z']"),
    ("POST", "/v2/models/kw/infer", {"inputs": [_x([1, 3, 8])]}, 400, "missing 'mask'"),
    ("POST", "/v2/models/kw/infer", {"inputs": [_x([1, 3, 8]), _x([1, 3], "INT64", [1, 0.5, 1], "mask")]}, 400,
     "INT64 takes int values"),
    ("POST", "/v2/models/kw/infer", {"inputs": [_x([1, 3, 8]), _x([1, 4], "INT64", [1] * 4, "mask")]}, 400,
     "dim 1 (seq) is 4, but seq is 3"),
]


@pytest.mark.parametrize("method,path,body,status,fragment", BAD_REQUESTS,
                         ids=[f"{r[3]}-{r[4][:30]}" for r in BAD_REQUESTS])
def test_bad_requests_get_a_clear_error(client, method, path, body, status, fragment):
    got, resp = client.call(method, path, body)
    assert got == status, resp
    assert fragment in resp["error"], resp
    assert client.call("GET", "/v2/health/ready") == (200, {"ready": True})  # nothing crashed


def test_oversized_request_gets_413_before_its_body_is_read(server):
    """Only the headers are sent: the server answers from Content-Length alone."""
    import socket

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/a/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (65 << 20))
        head = b""
        while b"over the limit" not in head and (chunk := sock.recv(65536)):
            head += chunk
    head = head.decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert "over the limit" in head


def test_sigint_drains_requests_in_flight_and_exits_0(artifact, tmp_path):
    """Clients keep sending while the server gets SIGINT: every request answered is 200
    (or 503 while draining); the process exits 0."""
    proc = ServerProcess([artifact, *SERVE_ARGS], tmp_path)
    answered, started = [], threading.Event()

    def run(k: int) -> None:
        c = Client(proc.url, timeout=60)
        try:
            for i in range(400):
                answered.append(c.infer("a", torch.randn(1, 8))[0])
                started.set()
        except OSError:  # the connection closed by the drain: this request was never taken
            pass
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    assert started.wait(60)
    status = proc.stop(signal.SIGINT)
    for t in threads:
        t.join(timeout=60)
    assert status == 0, proc.stderr()
    assert "drained" in proc.stderr()
    assert answered and set(answered) <= {200, 503}, sorted(set(answered))
