"""ModelServer in this process: the error table (status per error), a full queue (429),
a draining server (503), and the metrics page it renders."""

import asyncio
import json
import threading

import pytest
import torch

from stfuse.errors import (DeadlineExceededError, InputError, QueueFullError, RuntimeClosedError,
                           StfuseError)
from stfuse.serve.protocol import ProtocolError
from stfuse.serve.server import ModelServer, error_status

from serving import request, saved_artifact


@pytest.mark.parametrize("err,status", [
    (ProtocolError(404, "unknown model"), 404), (ProtocolError(400, "inputs"), 400),
    (QueueFullError("full"), 429), (RuntimeClosedError("closed"), 503), (DeadlineExceededError("shed"), 503),
    (InputError("shape"), 400), (StfuseError("runtime worker failed"), 500), (RuntimeError("model bug"), 500),
])
def test_error_status(err, status):
    assert error_status(err) == status


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return saved_artifact(tmp_path_factory)


def _infer(server, model, call):
    return asyncio.run(server.handle("infer", model, json.dumps(request(model, call)).encode()))


def test_full_queue_is_429_and_a_draining_server_503(artifact):
    server = ModelServer([artifact], max_queue=1, slo_ms=600000)
    runtime, _ = server.models["a"]
    release, entered = threading.Event(), threading.Event()
    run = runtime._fused.run

    def held_run(inputs):  # the launch in flight waits: the queue behind it fills
        entered.set()
        release.wait(60)
        return run(inputs)

    runtime._fused.run = held_run
    try:
        async def scenario():
            first = asyncio.ensure_future(server.handle("infer", "a", json.dumps(request("a", torch.randn(1, 8))).encode()))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(server.handle("infer", "a", json.dumps(request("a", torch.randn(1, 8))).encode()))
            await asyncio.sleep(0.05)
            third = await server.handle("infer", "a", json.dumps(request("a", torch.randn(1, 8))).encode())
            release.set()
            return await first, await second, third

        first, second, third = asyncio.run(scenario())
    finally:
        release.set()
        runtime._fused.run = run
    assert first[0] == 200 and second[0] == 200
    assert third[0] == 429 and "queue full" in third[1]["error"]
    assert runtime.stats()["tenants"]["a"]["rejected"] == 1
    server.close()
    status, body = _infer(server, "a", torch.randn(1, 8))
    assert status == 503 and "draining" in body["error"]
    assert asyncio.run(server.handle("ready"))[0] == 400
    assert _infer(server, "zz", torch.randn(1, 8))[0] == 404


def test_metrics_page_counts_served_requests_and_launches(artifact):
    server = ModelServer([artifact], slo_ms=600000)
    try:
        for _ in range(3):
            assert _infer(server, "a", torch.randn(2, 8))[0] == 200
        status, text = asyncio.run(server.handle("metrics"))
    finally:
        server.close()
    assert status == 200
    assert 'stfuse_served_total{model="a"} 3' in text
    assert 'stfuse_batch_rows_bucket{model="a",le="2"} 3' in text
    assert 'stfuse_served_total{model="kw"} 0' in text


def test_unknown_slo_name_and_duplicate_models_are_refused(artifact):
    with pytest.raises(StfuseError, match=r"--slo-ms names unknown model\(s\) \['zz'\]"):
        ModelServer([artifact], slo_ms={"zz": 5})
    with pytest.raises(StfuseError, match="model 'a' is in two artifacts"):
        ModelServer([artifact, artifact])


def test_a_model_that_raises_is_500_and_the_others_still_answer(artifact):
    server = ModelServer([artifact], slo_ms=600000)
    runtime, _ = server.models["b"]
    run = runtime._fused.run

    def failing(inputs):
        if "b" in inputs:
            raise RuntimeError("bad weights")
        return run(inputs)

    runtime._fused.run = failing
    try:
        failed = _infer(server, "b", torch.randn(1, 8))
        served = _infer(server, "a", torch.randn(1, 8))
    finally:
        runtime._fused.run = run
        server.close()
    assert failed == (500, {"error": "the model raised RuntimeError: bad weights"})
    assert served[0] == 200
