"""Shared test setup: Triton runs in its interpreter on CPU-only machines."""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Generated kernels go to a fresh cache, not the user's ~/.cache/stfuse (removed at the end).
_OWN_CACHE = None if "STFUSE_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="stfuse-test-cache-")
if _OWN_CACHE:
    os.environ["STFUSE_CACHE_DIR"] = _OWN_CACHE
# Plans must not depend on timings: the suite prices groups with the cost model on its
# nominal constants (tests/test_tune.py runs "measure" with a fake timer). Children
# started by tests (test_determinism, the CLI) inherit both.
os.environ.setdefault("STFUSE_TUNE", "model")
os.environ.setdefault("STFUSE_DEVICE_MODEL", "cuda" if torch.cuda.is_available() else "cpu")
# Programs run direct (the backend's default is "inductor"): an Inductor compile takes
# seconds on 2 cores. tests/test_inductor.py and tests/conformance/test_conformance_inductor.py ask
# for "inductor" by name.
os.environ.setdefault("STFUSE_CODEGEN", "direct")

import copy  # noqa: E402

import pytest  # noqa: E402

from stfuse.tolerances import TOLERANCES, assert_close  # noqa: E402,F401


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and os.environ.get("STFUSE_CACHE_DIR") == _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _timings_kept_whatever_runs_beside(monkeypatch):
    """A timing cache written by a test does not depend on what else the machine runs
    (kernels/timing.py OthersMeter); tests of the meter itself patch it back."""
    from stfuse.kernels import timing

    monkeypatch.setattr(timing.OthersMeter, "reason", lambda self: None)


def float64_reference(model, args):
    """The model's output computed in float64 on a copy (the reference for every check)."""
    ref = copy.deepcopy(model).double().eval()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        return ref(*args)


def tenant_graph(models, args):
    """The IR graph of traced tenants "0", "1", ... (what the first pass takes)."""
    from stfuse import ir
    from stfuse.frontend import trace_tenant

    return ir.build({str(i): trace_tenant(str(i), m, a) for i, (m, a) in enumerate(zip(models, args))})


def check_tenants(fused, models, args):
    """Every tenant's fused output within tolerance of its float64 eager reference."""
    outs = fused(*[a[0] if len(a) == 1 else a for a in args])
    for name, m, a, out in zip(fused.tenants, models, args, outs):
        assert_close(out, float64_reference(m, a), msg=f"tenant {name}")
    return outs


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def saved_mlp_pair(tmp_path_factory, name: str):
    """Two small fused MLP tenants ("0", "1": 8 -> 16 -> 4) and the artifact they saved."""
    import stfuse
    from stfuse import zoo

    torch.manual_seed(0)
    fused = stfuse.compile([zoo.mlp(8, 16, 4), zoo.mlp(8, 16, 4)], [torch.randn(3, 8), torch.randn(3, 8)])
    path = tmp_path_factory.mktemp(name) / name
    fused.save(path)
    return fused, path


def rehash(path, name):
    """Update an artifact manifest's size and sha256 of file ``name`` (what a deliberate
    attacker would do after editing it)."""
    import hashlib
    import json

    m = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------------------- shared test models


class BranchOnBatch(torch.nn.Module):
    """Branches on its batch size: export narrows the batch symbol's range (issue 11, item 6)."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.l(x)
        return y * 2 if x.shape[0] > 4 else y * 3


class Center(torch.nn.Module):
    """Mixes rows: each output row depends on every row of its batch (issue 11, item 7)."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.l(x)
        return y - y.mean(0)


# ---------------------------------------------------------------------------- keyword calls


def bert_call(batch: int, length: int, seed: int = 0) -> dict:
    """BertModel keyword inputs: ``input_ids`` and an ``attention_mask`` whose row i pads
    its last i % 3 positions (so the mask is not all ones)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, length - i % 3:] = 0
    return {"input_ids": torch.randint(3, 100, (batch, length), generator=g), "attention_mask": mask}


def vit_call(batch: int, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def float64_call_reference(model, call):
    """``float64_reference`` for a call in any form (calls.call_parts)."""
    from stfuse.calls import call_parts

    args, kwargs = call_parts(call)
    ref = copy.deepcopy(model).double().eval()
    dbl = torch.utils._pytree.tree_map(
        lambda a: a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a, (args, kwargs))
    with torch.no_grad():
        return ref(*dbl[0], **dbl[1])
