"""codegen="inductor" (kernels/inductor.py): the canonical program compiled by Inductor.

Every Inductor compile takes seconds on the 2-core CPU, so the programs here are tiny
and each is compiled once per module (fixtures); the conformance tier runs real
architectures (tests/conformance/test_conformance_inductor.py). Marked ``inductor``: deselect
with ``-m "not inductor"``.
"""

import logging

import pytest
import torch

import stfuse
from stfuse.artifact import validate
from stfuse.kernels.inductor import InductorProgram
from stfuse.tolerances import assert_close

pytestmark = pytest.mark.inductor


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.LayerNorm(24),
                               torch.nn.Linear(24, 6), torch.nn.Tanh()).eval()


class _Seq(torch.nn.Module):
    """A token model with a declared dynamic sequence: linear, then a mean over the sequence."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x):
        return torch.relu(self.proj(x)).mean(1) * x.shape[1]


def _eager(models, xs):
    with torch.no_grad():
        return [m(x) for m, x in zip(models, xs)]


@pytest.fixture(scope="module")
def mlps():
    models = [_mlp(s) for s in range(3)]
    fused = stfuse.compile(models, [(torch.randn(2, 12),) for _ in models], tune="off", codegen="inductor")
    return fused, models


def test_matches_eager_at_two_batches_with_one_compile(mlps):
    fused, models = mlps
    assert fused.codegen == "inductor" and isinstance(fused.program, InductorProgram)
    for batch in (2, 5):
        xs = [torch.randn(batch, 12) for _ in models]
        for out, ref in zip(fused(*xs), _eager(models, xs)):
            assert_close(out, ref)
    prog = fused.program
    assert prog.error is None and prog.runs == 2
    assert prog.compiles == 1  # the batch dim was marked dynamic: batch 5 reused batch 2's graph
    # what Inductor compiled is the canonical program, stfuse's groups in it as custom ops
    assert "torch.ops.stfuse.stacked_linear" in prog.canonical.code


def test_subsets_and_mixed_batches(mlps):
    fused, models = mlps
    xs = {"0": torch.randn(3, 12), "2": torch.randn(3, 12)}
    out = fused.run(xs)
    for t in xs:
        assert_close(out[t], _eager([models[int(t)]], [xs[t]])[0])
    mixed = [torch.randn(b, 12) for b in (2, 3, 4)]  # grouped ops: one batch per tenant
    for o, r in zip(fused(*mixed), _eager(models, mixed)):
        assert_close(o, r)
    for key in [(("0", "2"), True), (("0", "1", "2"), False)]:
        prog = fused._programs[key][0]
        assert isinstance(prog, InductorProgram) and prog.error is None and prog.runs == 1


def test_declared_dynamic_dim_survives():
    models = [_Seq(s) for s in range(2)]
    seq = {0: {1: "seq"}}
    fused = stfuse.compile(models, [(torch.randn(2, 6, 8),) for _ in models], tune="off",
                           dynamic=[seq, seq], codegen="inductor")
    for length in (6, 9):
        xs = [torch.randn(3, length, 8) for _ in models]
        for out, ref in zip(fused(*xs), _eager(models, xs)):
            assert_close(out, ref)
    assert fused.program.error is None and fused.program.compiles == 1


def test_a_failing_compile_runs_direct(mlps, monkeypatch, caplog):
    """Inductor failing on a program is a warning, never a failed call: the direct program runs."""
    fused, models = mlps
    prog = InductorProgram(fused.canonical_program, fused.program.direct, fused.program.dynamic)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(prog, "_compiled", broken)
    xs = [torch.randn(2, 12) for _ in models]
    with caplog.at_level(logging.WARNING, logger="stfuse.kernels.inductor"):
        outs = prog.forward(*xs)
        prog.forward(*xs)
    for o, r in zip(outs, _eager(models, xs)):
        assert_close(o, r)
    assert prog.error == "RuntimeError: no C++ compiler" and prog.runs == 0
    assert sum("codegen='direct'" in r.getMessage() for r in caplog.records) == 1


def test_artifact_recompiles_on_load(mlps, tmp_path):
    """An artifact stores the canonical program only; load(codegen="inductor") compiles it."""
    fused, models = mlps
    path = fused.save(tmp_path / "mlps.stfuse")
    assert not any(f.suffix in (".so", ".cpp", ".py", ".pt2") for f in path.rglob("*"))
    loaded = stfuse.load(path, codegen="inductor")
    xs = [torch.randn(3, 12) for _ in models]
    for o, r in zip(loaded(*xs), _eager(models, xs)):
        assert_close(o, r)
    prog = loaded.program
    assert isinstance(prog, InductorProgram) and prog.error is None and prog.runs == 1
    assert not isinstance(stfuse.load(path).program, InductorProgram)  # the default stays direct


@pytest.mark.parametrize("where", ["compile", "load", "env"])
def test_bad_codegen_is_a_stfuse_error(where, tmp_path, monkeypatch, mlps):
    with pytest.raises(stfuse.StfuseError, match="codegen|STFUSE_CODEGEN"):
        if where == "compile":
            stfuse.compile([_mlp(0)], [torch.randn(2, 12)], codegen="triton")
        elif where == "load":
            stfuse.load(tmp_path, codegen=3)
        else:
            monkeypatch.setenv("STFUSE_CODEGEN", "fast")
            stfuse.compile([_mlp(0)], [torch.randn(2, 12)])


@pytest.mark.parametrize("inductor_faster", [True, False])
def test_auto_keeps_the_faster_codegen(inductor_faster, monkeypatch, tmp_path, mlps):
    """codegen="auto" times both (a fake timer here, as tests/test_tune.py does), keeps the
    faster, records it, and takes a cached decision without timing again."""
    from stfuse.kernels import timing

    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "busy", lambda: None)
    timed = []

    def fake(first, second, device, what="", budget_ms=0):
        first(), second()  # both must run: the Inductor program compiles here
        timed.append(what)
        return (10.0, 20.0) if inductor_faster else (20.0, 10.0)

    monkeypatch.setattr(timing, "time_pair", fake)
    models = mlps[1]  # the fixture's program again: Inductor's cache has compiled it already
    xs = [torch.randn(2, 12) for _ in models]
    for round_ in range(2):
        fused = stfuse.compile(models, [(x,) for x in xs], tune="off", codegen="auto")
        choice = fused.plan.stats["codegen"]
        assert choice["decision"] == fused.codegen == ("inductor" if inductor_faster else "direct")
        assert choice["source"] == ("measured", "cached")[round_]
        assert isinstance(fused.program, InductorProgram) == inductor_faster
        for o, r in zip(fused(*xs), _eager(models, xs)):
            assert_close(o, r)
    assert timed == ["codegen"]
    validate.plan_record(fused.plan.record(), "plan.json")  # an artifact's plan can hold the choice
    if inductor_faster:
        assert fused.program.compiles == 1  # the program timed is the one that runs
