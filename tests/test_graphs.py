"""kernels/graphs.py: which calls capture, replay or run eagerly (a fake backend on CPU), and
real CUDA graphs of fused programs (gpu)."""

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.kernels import launch
from stfuse.kernels.graphs import GraphedProgram
from stfuse.tolerances import assert_close

CPU = torch.device("cpu")


class FakeGraphs:
    """Captures by remembering the signature; a replay calls the program (no CUDA here)."""

    def __init__(self, fail=False):
        self.fail, self.captured = fail, []

    def usable(self, device):
        return True

    def capture(self, program, flat, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(tuple(t.shape if isinstance(t, torch.Tensor) else t for t in flat))
        return lambda args: tuple(y.clone() for y in program(*args))


def program(x, y):
    return (x + 1, y * 2)


def graphed(**kwargs):
    backend = kwargs.pop("backend", None) or FakeGraphs()
    return GraphedProgram(program, CPU, backend=backend, **kwargs), backend


def test_a_signature_captures_after_its_warm_up_then_replays():
    g, backend = graphed(warmup=1)
    x, y = torch.ones(2, 3), torch.ones(4)
    for _ in range(4):
        a, b = g(x, y)
        assert torch.equal(a, x + 1) and torch.equal(b, y * 2)
    assert g.counts == {"replay": 3, "capture": 1, "failed": 0, "eager": 1}
    assert backend.captured == [((2, 3), (4,))]


def test_each_batch_bucket_gets_its_own_graph_up_to_the_cap():
    g, backend = graphed(warmup=0, max_graphs=2)
    for batch in (1, 2, 3, 1, 3):
        g(torch.ones(batch, 3), torch.ones(4))
    assert backend.captured == [((1, 3), (4,)), ((2, 3), (4,))]
    assert g.counts["eager"] == 2  # batch 3: beyond the cap, shapes not bucketed


def test_strides_and_dtypes_key_graphs_too():
    g, _ = graphed()
    x = torch.ones(3, 2)
    assert g.signature((x, x)) != g.signature((x.t().contiguous().t(), x))
    assert g.signature((x, x)) != g.signature((x.double(), x))


def test_a_failed_capture_runs_eagerly_from_then_on():
    g, _ = graphed(warmup=0, backend=FakeGraphs(fail=True))
    x, y = torch.ones(2), torch.ones(2)
    for _ in range(3):
        a, _ = g(x, y)
        assert torch.equal(a, x + 1)
    assert g.counts == {"replay": 0, "capture": 0, "failed": 1, "eager": 3}


@pytest.mark.parametrize("args", [
    (torch.ones(2, device="meta"), torch.ones(2)),  # an input on another device
    (torch.ones(2), [1, 2]),  # a value that cannot key a graph
])
def test_calls_that_cannot_replay_run_eagerly(args):
    g, backend = graphed(warmup=0, backend=FakeGraphs())
    g.program = lambda *a: a
    g(*args)
    assert backend.captured == [] and g.counts["eager"] == 1


def test_no_capture_inside_a_warm_up_or_off_cuda():
    g, backend = graphed(warmup=0)
    with launch.tuning():
        g(torch.ones(2), torch.ones(2))
    real = GraphedProgram(program, CPU, warmup=0)  # the CUDA backend on a CPU program
    real(torch.ones(2), torch.ones(2))
    assert backend.captured == [] and g.counts["eager"] == real.counts["eager"] == 1


# --- GPU: real graphs of fused programs ------------------------------------------------


def _mlps(n=3):
    torch.manual_seed(0)
    return [zoo.mlp(64, 128, 32, depth=2).cuda() for _ in range(n)]


@pytest.mark.gpu
@pytest.mark.parametrize("batches", [(4, 4, 4), (1, 5, 9)])  # stacked; grouped (planned sites)
def test_fused_programs_replay_cuda_graphs(batches):
    torch.backends.cuda.matmul.allow_tf32 = False
    models = _mlps()
    fused = stfuse.compile(models, [torch.randn(2, 64, device="cuda") for _ in models])
    for step in range(4):
        xs = [torch.randn(b, 64, device="cuda") for b in batches]
        outs = fused(*xs)
        kept = [o.clone() for o in outs]
        fused(*[-x for x in xs])  # a replay must not overwrite what the last one returned
        for m, x, y, k in zip(models, xs, outs, kept):
            assert torch.equal(y, k)
            with torch.no_grad():
                assert_close(y.cpu(), m.double()(x.double()).cpu())
            m.float()
    programs = [p for p, _ in fused._programs.values() if isinstance(p, GraphedProgram)]
    assert programs and sum(p.counts["replay"] for p in programs) >= 4


@pytest.mark.gpu
def test_a_program_that_syncs_falls_back_to_eager():
    class Syncs(torch.nn.Module):
        def forward(self, x):
            return x * float(x.abs().max().item() > 0)  # .item(): not capturable

    g = GraphedProgram(Syncs().cuda(), torch.device("cuda"), warmup=0)
    x = torch.randn(8, device="cuda")
    for _ in range(2):
        assert torch.equal(g(x), x)
    assert g.counts["failed"] == 1 and g.counts["replay"] == 0


@pytest.mark.gpu
def test_a_replay_never_synchronizes():
    models = _mlps()
    fused = stfuse.compile(models, [torch.randn(2, 64, device="cuda") for _ in models])
    xs = [torch.randn(b, 64, device="cuda") for b in (1, 5, 9)]
    for _ in range(3):
        fused(*xs)  # warm-up, capture, first replay
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused(*xs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
