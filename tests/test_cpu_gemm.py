"""kernels/cpu_gemm.py: oneDNN's prepacked GEMM for CPU linears on constant weights."""

import pytest
import torch
import torch.nn.functional as F

import stfuse
from stfuse import zoo
from stfuse.errors import StfuseError
from stfuse.kernels import cpu_gemm, reference, timing
from stfuse.kernels.bind import bind
from stfuse.tolerances import assert_close

from conftest import float64_reference

CPU = torch.device("cpu")

needs_onednn = pytest.mark.skipif(not cpu_gemm.available(), reason="torch built without oneDNN")


def _f64_linear(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# (rows, K, N): odd sizes on both sides of the oneDNN threshold (MIN_MACS = 2^20), a
# weight just over MIN_WEIGHT
BIG, SMALL = (9, 513, 257), (3, 513, 257)


@needs_onednn
@pytest.mark.parametrize("rows,k,n", [BIG, SMALL])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (1,)])
def test_linear_matches_float64(rows, k, n, bias, lead):
    torch.manual_seed(0)
    x, w = torch.randn(*lead, rows, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    assert cpu_gemm.packable(w) and cpu_gemm.use_onednn(rows, k, n) == ((rows, k, n) == BIG)
    least = cpu_gemm.min_numel(k, n)
    assert (rows * k >= least) == cpu_gemm.use_onednn(rows, k, n)
    got = cpu_gemm.linear(x, w, b, cpu_gemm.pack(w), least)
    assert got.shape == (*lead, rows, n)
    assert_close(got, _f64_linear(x, w, b))


@needs_onednn
@pytest.mark.parametrize("rows,k,n", [BIG, SMALL])
@pytest.mark.parametrize("epilogue", ["", "add:tensor,relu"])
def test_stacked_linear_matches_float64(rows, k, n, epilogue):
    torch.manual_seed(0)
    R = 3
    x, w, b = torch.randn(R, rows, k), torch.randn(R, n, k), torch.randn(R, n)
    ext = [torch.randn(R, rows, n)] if epilogue else []
    got = cpu_gemm.stacked_linear(x, w.transpose(1, 2), b.unsqueeze(1), tuple(cpu_gemm.pack(wi) for wi in w),
                                  tuple(b), cpu_gemm.min_numel(k, n, R), epilogue, ext, [])
    want = torch.stack([_f64_linear(x[i], w[i], b[i]) for i in range(R)])
    if epilogue:
        want = torch.relu(want + ext[0].double())
    assert got.shape == (R, rows, n)
    assert_close(got, want)


def test_small_weights_are_not_packed():
    assert not cpu_gemm.packable(torch.randn(256, 256))  # 65536 < MIN_WEIGHT: a 4 x MLP-256's
    assert not cpu_gemm.packable(torch.randn(513, 257, dtype=torch.float64))
    assert cpu_gemm.packable(torch.randn(513, 257))


def _targets(bound):
    return {n.target for n in bound.graph.nodes if n.op == "call_function"}


@needs_onednn
def test_bind_packs_fused_and_own_linears_for_onednn(monkeypatch):
    """Two MLPs fused (stacked_linear) plus a third of another width (its own
    aten.linear: the cost model keeps the equal-shape pair): with STFUSE_CPU_GEMM=onednn
    both kinds bind to cpu_gemm's kernels on packed copies and compute what the
    canonical program computes, at a batch that takes oneDNN; with "mkl" neither."""
    torch.manual_seed(0)
    models = [zoo.mlp(513, 257, 5, depth=2), zoo.mlp(513, 257, 5, depth=2), zoo.mlp(513, 258, 5, depth=2)]
    fused = stfuse.compile(models, [(torch.randn(1, 513),) for _ in models], tune="model")
    canonical = fused.canonical_program
    xs = [torch.randn(9, 513) for _ in models]  # 9 x 513 x 257: over MIN_MACS
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    bound = bind(canonical, CPU)
    assert {cpu_gemm.stacked_linear, cpu_gemm.linear} <= _targets(bound)
    with torch.no_grad():
        for got, want in zip(bound(*xs), canonical(*xs)):
            assert_close(got, want.double())
    monkeypatch.setenv("STFUSE_CPU_GEMM", "mkl")
    plain = _targets(bind(canonical, CPU))
    assert cpu_gemm.stacked_linear not in plain and cpu_gemm.linear not in plain
    assert reference.stacked_linear_kn in plain


@needs_onednn
def test_grouped_linears_bind_member_by_member_to_onednn(monkeypatch):
    """Linears of other shapes fused (tune="off": a grouped_linear) bind to
    cpu_gemm.grouped_linear, each member on its packed weight (on aten's GEMM they ran 3x
    slower than the same linears bound apart), and compute what float64 eager does, at a
    batch on either side of each member's oneDNN threshold."""
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    models = [zoo.mlp(513, 257, 5, depth=2), zoo.mlp(300, 520, 5, depth=2), zoo.mlp(8, 4, 5, depth=2)]
    widths = (513, 300, 8)
    fused = stfuse.compile(models, [(torch.randn(1, k),) for k in widths], tune="off")
    assert any(g.op_class == "linear" and len(g.members) == 3 for g in fused.plan.groups.values())
    assert cpu_gemm.grouped_linear in _targets(fused.program)
    for batch in (1, 9):
        xs = [torch.randn(batch, k) for k in widths]
        for got, m, x in zip(fused(*xs), models, xs):
            assert_close(got, float64_reference(m, (x,)))
    monkeypatch.setenv("STFUSE_CPU_GEMM", "mkl")
    assert cpu_gemm.grouped_linear not in _targets(bind(fused.canonical_program, CPU))


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STFUSE_CPU_GEMM", "auto")
    monkeypatch.setattr(timing, "busy", lambda: None)
    cpu_gemm._measured.cache_clear()
    yield
    cpu_gemm._measured.cache_clear()


@needs_onednn
@pytest.mark.parametrize("mkl_us,onednn_us,want", [(400.0, 200.0, "onednn"), (400.0, 380.0, "mkl"),
                                                   (200.0, 400.0, "mkl")])
def test_auto_times_the_probe_once_and_keeps_a_clear_winner(fresh_choice, monkeypatch, mkl_us, onednn_us, want):
    calls = []

    def fake_pair(first, second, device, what="", budget_ms=None, decide_at=1.0):
        calls.append((what, torch.get_num_threads()))
        return mkl_us, onednn_us

    threads = torch.get_num_threads()
    monkeypatch.setattr(timing, "time_pair", fake_pair)
    assert cpu_gemm.mode(CPU) == want
    assert calls == [("cpu_gemm", 1)] and torch.get_num_threads() == threads  # one thread, then restored
    cpu_gemm._measured.cache_clear()
    assert cpu_gemm.mode(CPU) == want and len(calls) == 1  # from the cache file
    assert timing.TimingCache(CPU).get("cpu_gemm") == {"mkl_us": mkl_us, "onednn_us": onednn_us}


def test_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("STFUSE_CPU_GEMM", "mkl")
    assert cpu_gemm.mode(CPU) == "mkl"
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    assert cpu_gemm.mode(CPU) == ("onednn" if cpu_gemm.available() else "mkl")
    assert cpu_gemm.mode(torch.device("meta")) == "mkl"
    monkeypatch.setenv("STFUSE_CPU_GEMM", "fast")
    with pytest.raises(StfuseError, match="STFUSE_CPU_GEMM"):
        cpu_gemm.mode(CPU)


@needs_onednn
def test_programs_on_the_same_weights_share_one_packed_copy(monkeypatch):
    """Every subset program (and a second bind) reads the full program's packed weights:
    packed copies per subset would multiply the weights' memory by the subsets served."""
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    models = [zoo.mlp(513, 257, 5, depth=2) for _ in range(3)]
    fused = stfuse.compile(models, [(torch.randn(1, 513),) for _ in models], tune="off")

    def packs(bound):
        out = []
        for n in bound.graph.nodes:
            if n.op == "get_attr" and n.target.endswith("_onednn"):
                v = getattr(bound, n.target)
                out += list(v) if isinstance(v, tuple) else [v]
        return out

    full = packs(fused.program)
    again = packs(bind(fused.canonical_program, CPU))
    assert full and all(a is b for a, b in zip(full, again))
    fused.run({"0": (torch.randn(9, 513),), "2": (torch.randn(9, 513),)})
    sub = next(p for (active, _), (p, _) in fused._programs.items() if active == ("0", "2"))
    assert {id(p) for p in packs(sub)} <= {id(p) for p in full}


@needs_onednn
def test_a_weight_changed_in_place_is_packed_again():
    w = torch.randn(2, 513, 257)
    first = cpu_gemm.pack(w[1])
    assert cpu_gemm.pack(w[1]) is first and cpu_gemm.pack(w[0]) is not first
    w[1].add_(1.0)
    again = cpu_gemm.pack(w[1])
    assert again is not first
    x = torch.randn(9, 257)
    assert_close(cpu_gemm.linear(x, w[1], None, again, 0), _f64_linear(x, w[1], None))


class _Conv1DGelu(torch.nn.Module):
    """GPT-2's MLP shape of a linear: addmm on the flattened rows, the batch dims
    restored by a view, then gelu."""

    def __init__(self, k=513, n=257, approximate="tanh"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(k, n) * 0.05)
        self.b = torch.nn.Parameter(torch.randn(n) * 0.1)
        self.approximate = approximate

    def forward(self, x):
        y = torch.addmm(self.b, x.view(-1, x.shape[-1]), self.w).view(*x.shape[:-1], self.w.shape[1])
        return F.gelu(y, approximate=self.approximate)


class _LinearGelu(torch.nn.Module):
    def __init__(self, k=513, n=257, approximate="none"):
        super().__init__()
        self.fc, self.approximate = torch.nn.Linear(k, n), approximate

    def forward(self, x):
        return F.gelu(self.fc(x), approximate=self.approximate)


@needs_onednn
@pytest.mark.parametrize("make", [_Conv1DGelu, _LinearGelu])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_after_a_linear_is_its_post_op(monkeypatch, make, approximate):
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    model = make(approximate=approximate).eval()
    fused = stfuse.compile([model], [(torch.randn(1, 9, 513),)])
    targets = _targets(fused.program)
    assert cpu_gemm.linear_gelu in targets and torch.ops.aten.gelu.default not in targets
    for batch in (1, 3):  # 9 and 27 rows: oneDNN from 8 rows (min_numel)
        x = torch.randn(batch, 9, 513)
        assert_close(fused(x)[0], float64_reference(model, (x,)))
