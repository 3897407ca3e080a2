"""kernels/cpu_conv.py: oneDNN's prepacked conv for CPU convs on constant weights."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stfuse
from stfuse import zoo
from stfuse.kernels import cpu_conv, cpu_gemm
from stfuse.kernels.bind import bind
from stfuse.tolerances import assert_close

from conftest import float64_reference

CPU = torch.device("cpu")
CL = torch.channels_last

needs_onednn = pytest.mark.skipif(not cpu_gemm.available(), reason="torch built without oneDNN")


def _f64_conv(x, w, b, stride, padding, dilation, groups):
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation, groups)


# (C, O, kernel, stride, padding, dilation, groups): a 3x3, stride 2, a 1x1, a 7x7 stem,
# depthwise, two groups, dilation 2, an odd kernel and padding per dim
CONVS = [(3, 5, (3, 3), 1, 1, 1, 1), (6, 10, (3, 3), 2, 1, 1, 1), (7, 9, (1, 1), 1, 0, 1, 1),
         (3, 8, (7, 7), 2, 3, 1, 1), (8, 8, (3, 3), 2, 1, 1, 8), (6, 4, (3, 3), 1, 1, 1, 2),
         (5, 6, (3, 3), 1, 2, 2, 1), (4, 6, (3, 1), (2, 1), (1, 0), 1, 1)]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


@needs_onednn
@pytest.mark.parametrize("c,o,k,stride,padding,dilation,groups", CONVS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("attr", ["none", "relu"])
def test_conv_matches_float64(c, o, k, stride, padding, dilation, groups, batch, bias, attr):
    """Both paths (oneDNN: ``least`` 0; aten: a batch-1 input under ``least``) against
    float64; the oneDNN one leaves its output channels-last, so the test knows it ran."""
    torch.manual_seed(0)
    x, w = torch.randn(batch, c, 11, 13), torch.randn(o, c // groups, *k)
    b = torch.randn(o) if bias else None
    conv = (_pair(stride), _pair(padding), _pair(dilation), groups)
    want = _f64_conv(x, w, b, *conv)
    if attr == "relu":
        want = torch.relu(want)
    packed = cpu_conv.pack(w, *conv)
    for least, onednn in [(0, True), (x.numel() + 1, batch > 1)]:
        got = cpu_conv.conv(x, w, b, *conv, packed, least, attr)
        assert got.shape == want.shape
        assert (got.is_contiguous(memory_format=CL) and not got.is_contiguous()) == onednn
        assert_close(got, want)


def test_min_numel_keeps_small_batch_1_convs_on_aten():
    """Measured (cpu_conv): ResNet-50/8's 147K-MAC 3x3s at batch 1 are faster on aten's
    native conv, zoo.cnn(16)'s are faster on oneDNN; grouped convs and kernels over 3x3
    take oneDNN always (aten runs oneDNN itself there)."""
    def onednn(c, o, k, hw, stride=1, groups=1):
        w = torch.empty(o, c // groups, k, k)
        return c * hw * hw >= cpu_conv.min_numel(w, [stride, stride], groups)

    assert not onednn(8, 8, 3, 16) and not onednn(32, 32, 3, 4) and not onednn(64, 32, 1, 16, stride=2)
    assert onednn(3, 16, 3, 32) and onednn(16, 32, 3, 32, stride=2)
    assert onednn(3, 8, 7, 8) and onednn(8, 8, 3, 2, groups=8)
    assert onednn(64, 64, 3, 19)  # 23104 elements: over aten's native limit, whatever the MACs


@needs_onednn
def test_params_and_packable_refuse_what_is_not_plain():
    assert cpu_conv.params(([2, 1], [1, 0], [1, 1], 1)) == ([2, 1], [1, 0], [1, 1], 1)
    assert cpu_conv.params(()) == ([1, 1], [0, 0], [1, 1], 1)
    assert cpu_conv.params((1, "same")) is None
    assert cpu_conv.packable(torch.randn(4, 3, 3, 3)) and cpu_conv.packable(torch.randn(4, 3, 1, 1))
    assert not cpu_conv.packable(torch.randn(4, 3, 4, 4)) and not cpu_conv.packable(torch.randn(4, 3, 7, 7))
    assert not cpu_conv.packable(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    assert not cpu_conv.packable(torch.randn(4, 3, 3))  # conv1d
    assert not cpu_conv.packable(torch.randn(4, 3, 3, 3, requires_grad=True))


def _targets(bound):
    return {n.target for n in bound.graph.nodes if n.op == "call_function"}


@needs_onednn
@pytest.mark.parametrize("batch", [1, 8])
def test_bind_runs_a_cnn_on_onednn_with_relu_as_post_op(monkeypatch, batch):
    """One zoo CNN (nothing to fuse): both convs bind to cpu_conv.conv with their relu
    folded in, and the program computes what float64 eager does; with
    STFUSE_CPU_GEMM=mkl, aten's convs."""
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    model = zoo.cnn(16).eval()
    x = torch.randn(batch, 3, 32, 32)
    fused = stfuse.compile([model], [(x,)])
    convs = [n for n in fused.program.graph.nodes if n.target is cpu_conv.conv]
    assert len(convs) == 2 and all(n.args[-1] == "relu" for n in convs)
    assert torch.ops.aten.relu.default not in _targets(fused.program)
    assert_close(fused(x)[0], float64_reference(model, (x,)))
    monkeypatch.setenv("STFUSE_CPU_GEMM", "mkl")
    assert cpu_conv.conv not in _targets(bind(fused.canonical_program, CPU))


class _ConvView(nn.Module):
    """A conv's output read by a ``view`` (needs eager's contiguous layout) and returned
    as it is (the caller sees eager's layout)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16 * 8 * 8, 5)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1)), y


@needs_onednn
@pytest.mark.parametrize("batch", [1, 4])
def test_channels_last_outputs_are_made_contiguous_where_layout_shows(monkeypatch, batch):
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    model = _ConvView().eval()
    x = torch.randn(batch, 3, 8, 8)
    fused = stfuse.compile([model], [(x,)])
    assert cpu_conv.conv in _targets(fused.program)
    out, y = fused(x)[0]
    want_out, want_y = float64_reference(model, (x,))
    assert y.is_contiguous()
    assert_close(out, want_out)
    assert_close(y, want_y)


class _Unusual(nn.Module):
    """Convs the binding leaves to aten: padding="same", a transposed conv, a weight that
    is an input rather than the program's constant."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 8, 3, padding="same")
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x, w):
        return F.conv2d(self.up(self.same(x)), w, padding=1)


@needs_onednn
def test_unusual_convs_stay_on_aten(monkeypatch):
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    model = _Unusual().eval()
    args = (torch.randn(2, 3, 9, 9), torch.randn(5, 4, 3, 3))
    fused = stfuse.compile([model], [args])
    assert cpu_conv.conv not in _targets(fused.program)
    assert_close(fused(args)[0], float64_reference(model, args))


class _Patchify(nn.Module):
    """A vision transformer's or ConvNeXt's stem: kernel = stride, few input channels."""

    def __init__(self, k):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, k, stride=k)

    def forward(self, x):
        return self.stem(x).flatten(2)


@needs_onednn
@pytest.mark.parametrize("k", [4, 16])
def test_patchify_stems_fused_or_not_stay_on_aten(monkeypatch, k):
    # the prepacked conv lost to aten on these (cpu_conv.MAX_KERNEL): fused across 4 tenants
    # with tune="off", ViT's 16x16 stem took 57 ms against aten's 0.3 ms
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    models = [_Patchify(k).eval() for _ in range(2)]
    xs = [torch.randn(1, 3, 32, 32) for _ in models]
    for tune in ("off", "measure"):
        fused = stfuse.compile(models, [(x,) for x in xs], tune=tune)
        assert not {cpu_conv.conv, cpu_conv.stacked_conv2d} & _targets(fused.program)
        for m, x, got in zip(models, xs, fused(*xs)):
            assert_close(got, float64_reference(m, (x,)))


@needs_onednn
def test_float64_models_stay_on_aten(monkeypatch):
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    model = zoo.cnn(8).eval().double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    fused = stfuse.compile([model], [(x,)])
    assert cpu_conv.conv not in _targets(fused.program)
    assert_close(fused(x)[0], float64_reference(model, (x,)))


@needs_onednn
def test_a_weight_changed_in_place_is_packed_again(monkeypatch):
    """Per pack: a new version, a new packed copy. Per program: the model's conv weight
    changed in place rebuilds the program (stfuse/program.py), which then computes with
    the new weight on oneDNN."""
    w = torch.randn(8, 3, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    first = cpu_conv.pack(w, *conv)
    assert cpu_conv.pack(w, *conv) is first and cpu_conv.pack(w, [2, 2], [1, 1], [1, 1], 1) is not first
    w.add_(1.0)
    assert cpu_conv.pack(w, *conv) is not first

    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    model = zoo.cnn(16).eval()
    x = torch.randn(8, 3, 32, 32)
    fused = stfuse.compile([model], [(x,)])
    fused(x)
    with torch.no_grad():
        model[0].weight.mul_(-1.5)
    got = fused(x)[0]
    assert fused.weight_rebuilds == 1 and cpu_conv.conv in _targets(fused.program)
    assert_close(got, float64_reference(model, (x,)))


@needs_onednn
@pytest.mark.parametrize("c,o,k,stride,padding,dilation,groups", CONVS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("epilogue", ["", "relu", "add:tensor,relu"])
def test_stacked_conv2d_matches_float64(c, o, k, stride, padding, dilation, groups, batch, epilogue):
    """R = 3 members as one grouped oneDNN conv on their packed weights, the input
    stacked contiguous, the weights channels-last (as passes/lower.py packs them)."""
    torch.manual_seed(0)
    R = 3
    x = torch.randn(R, batch, c, 11, 13)
    w = torch.randn(R, o, c // groups, *k)
    b = torch.randn(R, o)
    conv = (_pair(stride), _pair(padding), _pair(dilation), groups)
    want = torch.stack([_f64_conv(x[i], w[i], b[i], *conv) for i in range(R)])
    ext = [torch.randn(want.shape)] if "add" in epilogue else []
    if ext:
        want = want + ext[0].double()
    if "relu" in epilogue:
        want = torch.relu(want)
    w_cl = torch.stack([wi.contiguous(memory_format=CL) for wi in w])
    packed = cpu_conv.pack(w.reshape(-1, *w.shape[2:]), conv[0], conv[1], conv[2], groups * R)
    got = cpu_conv.stacked_conv2d(x, w_cl, b, *conv, epilogue, ext, [], packed, b.reshape(-1))
    assert got.shape == want.shape
    assert_close(got, want)


@needs_onednn
@pytest.mark.parametrize("batch", [1, 8])
def test_bind_runs_fused_convs_on_onednn(monkeypatch, batch):
    """Four zoo CNNs fused (tune="off"): the stacked convs bind to
    cpu_conv.stacked_conv2d and the program computes what float64 eager does."""
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    models = [zoo.cnn(16).eval() for _ in range(4)]
    xs = [torch.randn(batch, 3, 32, 32) for _ in models]
    fused = stfuse.compile(models, [(x,) for x in xs], tune="off")
    assert cpu_conv.stacked_conv2d in _targets(fused.program)
    for got, m, x in zip(fused(*xs), models, xs):
        assert_close(got, float64_reference(m, (x,)))
    monkeypatch.setenv("STFUSE_CPU_GEMM", "mkl")
    assert cpu_conv.stacked_conv2d not in _targets(bind(fused.canonical_program, CPU))


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3])
def test_bind_runs_grouped_convs_member_by_member_on_onednn(monkeypatch, batch):
    """Convs of other shapes fused (tune="off": a grouped_conv2d) bind to
    cpu_conv.grouped_conv2d, each packable member on its packed weight, and compute what
    float64 eager does (the members' outputs contiguous, as eager's)."""
    monkeypatch.setenv("STFUSE_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    models = [zoo.cnn(16).eval(), zoo.cnn(24).eval()]
    xs = [torch.randn(batch, 3, 32, 32) for _ in models]
    fused = stfuse.compile(models, [(x,) for x in xs], tune="off")
    assert cpu_conv.grouped_conv2d in _targets(fused.program)
    for got, m, x in zip(fused(*xs), models, xs):
        assert got.is_contiguous()
        assert_close(got, float64_reference(m, (x,)))
    monkeypatch.setenv("STFUSE_CPU_GEMM", "mkl")
    assert cpu_conv.grouped_conv2d not in _targets(bind(fused.canonical_program, CPU))


def _assert_same_nans(got, want):
    assert torch.isnan(want).any()  # the case can fail
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert_close(got.nan_to_num(), want.nan_to_num())


@needs_onednn
def test_relu_keeps_nan_as_eager_does():
    """A NaN input gives NaN where eager's conv + relu does: oneDNN's relu post-op maps NaN
    to 0 (a NaN image once came back from a fused CNN as finite logits), so relu runs after."""
    torch.manual_seed(0)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    x, w, b = torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3), torch.randn(6)
    x[0, 1, 3, 3] = float("nan")
    want = torch.relu(_f64_conv(x, w, b, *conv))
    _assert_same_nans(cpu_conv.conv(x, w, b, *conv, cpu_conv.pack(w, *conv), 0, "relu"), want)
    R = 3
    xs, ws, bs = torch.randn(R, 2, 4, 7, 7), torch.randn(R, 6, 4, 3, 3), torch.randn(R, 6)
    xs[1, 0, 2, 3, 3] = float("nan")
    want = torch.relu(torch.stack([_f64_conv(xs[i], ws[i], bs[i], *conv) for i in range(R)]))
    packed = cpu_conv.pack(ws.reshape(-1, 4, 3, 3), *conv[:3], R)
    w_cl = torch.stack([wi.contiguous(memory_format=CL) for wi in ws])
    _assert_same_nans(cpu_conv.stacked_conv2d(xs, w_cl, bs, *conv, "relu", [], [], packed, bs.reshape(-1)), want)
