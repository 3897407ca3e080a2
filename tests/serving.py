"""Shared by the serving tests: the served models and their artifact, a server started as
a subprocess, and a small HTTP client on 127.0.0.1 (the standard library's, so the
client is not the server's own stack)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import assert_close, float64_call_reference


class KwSeq(torch.nn.Module):
    """Keyword inputs with a declared dynamic dim (seq), an INT64 input and a dict output."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x, mask):
        y = self.l(x) * mask.unsqueeze(-1).to(x.dtype)
        return {"y": y, "pooled": y.sum(1)}


def models() -> dict:
    """{name: model}: "a" and "b" fuse (same MLP shapes), "kw" as KwSeq. Deterministic."""
    from stfuse import zoo

    torch.manual_seed(0)
    return {"a": zoo.mlp(8, 16, 4).eval(), "b": zoo.mlp(8, 16, 4).eval(), "kw": KwSeq().eval()}


def kw_call(batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, seq, 8, generator=g), "mask": torch.randint(0, 2, (batch, seq), generator=g)}


def saved_artifact(tmp_path_factory) -> Path:
    """The artifact of models(), compiled once per test session (the first caller saves it)."""
    import stfuse

    path = tmp_path_factory.getbasetemp() / "serving.stfuse"
    if not (path / "manifest.json").is_file():
        examples = {"a": torch.randn(3, 8), "b": torch.randn(3, 8), "kw": kw_call(2, 5)}
        fused = stfuse.compile(models(), examples, dynamic={"kw": {"x": {1: "seq"}, "mask": {1: "seq"}}})
        fused.save(path)
    return path


def input_json(name: str, x: torch.Tensor) -> dict:
    datatype = {torch.float32: "FP32", torch.int64: "INT64"}[x.dtype]
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.reshape(-1).tolist()}


def request(model: str, call) -> dict:
    """An infer request body for a Tensor (positional input "input") or a dict of keyword inputs."""
    items = call.items() if isinstance(call, dict) else [("input", call)]
    return {"inputs": [input_json(n, x) for n, x in items]}


def outputs(response: dict) -> dict:
    """{output name: float32 tensor} of an infer response."""
    return {o["name"]: torch.tensor(o["data"], dtype=torch.float32).reshape(o["shape"])
            for o in response["outputs"]}


def check_eager(model_name: str, model, call, response: dict) -> None:
    """The response's outputs within tolerance of the model's float64 eager output."""
    ref = float64_call_reference(model, call if isinstance(call, dict) else (call,))
    got = outputs(response)
    assert_close(got if isinstance(ref, dict) else got["output_0"], ref, msg=model_name)


class Client:
    """One keep-alive connection; ``call`` returns (status, parsed JSON or text)."""

    def __init__(self, url: str, timeout: float = 60.0):
        host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def call(self, method: str, path: str, body=None) -> tuple[int, object]:
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        self.conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        resp = self.conn.getresponse()
        text = resp.read().decode()
        kind = resp.getheader("content-type", "")
        return resp.status, json.loads(text) if kind.startswith("application/json") else text

    def infer(self, model: str, call) -> tuple[int, object]:
        return self.call("POST", f"/v2/models/{model}/infer", request(model, call))

    def close(self) -> None:
        self.conn.close()


class ServerProcess:
    """``stfuse serve ARGS`` as a subprocess (its stdout and stderr in files): ``url`` once it
    prints its address, ``stop(sig)`` -> its exit status."""

    def __init__(self, args: list, log_dir: Path, start_timeout: float = 240.0):
        self.log = log_dir / f"server-{time.monotonic_ns()}"
        self.out, self.err = open(f"{self.log}.out", "w+"), open(f"{self.log}.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "stfuse.cli", "serve", *map(str, args)],
                                     stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while not (found := re.search(r"listening on (http://\S+)", Path(f"{self.log}.out").read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the server did not start (exit {self.proc.wait()}):\n{self.stderr()}")
            time.sleep(0.2)
        self.url = found.group(1)

    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()[-3000:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.out.close()
            self.err.close()


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (from /proc): the Ray processes a server started."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        out += sorted(frontier)
    return out


def process_titled(root: int, title: str) -> int | None:
    """The process below ``root`` whose command line (Ray's process title) contains ``title``."""
    for p in descendants(root):
        try:
            if title in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                return p
        except OSError:
            continue
    return None


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
