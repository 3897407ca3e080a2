"""The stfuse:: custom ops (CPU reference path) against independent float64 formulas
(F.linear / F.conv2d / F.layer_norm per member, then the epilogue), so a stacked op
is checked against its members computed one by one. Every op x implementation x
dtype, fakes included, is tests/test_opinfo.py's table."""

import pytest
import torch
import torch.nn.functional as F

from stfuse.kernels import epilogue as ep
from stfuse.kernels.ops import op
from stfuse.tolerances import TOLERANCES

DTYPES = [torch.float32, torch.float64]


def _close(got, want, dtype):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epi", ["", "relu", "add:tensor,gelu", "mul:scalar,tanh", "rsub:tensor,pow:scalar"])
def test_grouped_linear_mixed_shapes(dtype, epi):
    torch.manual_seed(0)
    shapes = [(17, 33, 5), (1, 8, 17), (0, 4, 3)]  # (M, K, N), one empty member
    x = [torch.randn(m, k, dtype=dtype) for m, k, _ in shapes]
    w = [torch.randn(n, k, dtype=dtype) for _, k, n in shapes]
    b = [torch.randn(shapes[0][2], dtype=dtype), None, torch.randn(shapes[2][2], dtype=dtype)]
    steps = ep.parse(epi)
    nt, ns = ep.counts(steps)
    ext = [torch.randn(n, dtype=dtype) for _, _, n in shapes for _ in range(nt)]
    scalars = [1.0 + i for i in range(len(shapes)) for _ in range(ns)]  # integer powers: no NaN
    ys = op("grouped_linear")(x, w, b, epi, ext, scalars)
    for i in range(len(shapes)):
        want = F.linear(x[i].double(), w[i].double(), None if b[i] is None else b[i].double())
        t, s = ep.member_operands(steps, [e.double() for e in ext], scalars, i)
        _close(ys[i], ep.apply(want, steps, t, s), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_linear_matches_members(dtype):
    torch.manual_seed(1)
    R, M, K, N = 3, 17, 33, 9
    x, w, b = torch.randn(R, 2, M, K, dtype=dtype), torch.randn(R, N, K, dtype=dtype), torch.randn(R, N, dtype=dtype)
    res = torch.randn(R, 2, M, N, dtype=dtype)
    y = op("stacked_linear")(x, w, b, "add:tensor,mul:scalar", [res], [1.0, 2.0, 3.0])
    for i in range(R):
        want = (F.linear(x[i].double(), w[i].double(), b[i].double()) + res[i].double()) * (i + 1)
        _close(y[i], want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_and_stacked_conv2d(dtype):
    torch.manual_seed(2)
    x = [torch.randn(2, 4, 9, 9, dtype=dtype), torch.randn(1, 6, 17, 17, dtype=dtype)]
    w = [torch.randn(8, 2, 3, 3, dtype=dtype), torch.randn(5, 6, 1, 1, dtype=dtype)]
    b = [None, torch.randn(5, dtype=dtype)]
    ys = op("grouped_conv2d")(x, w, b, [2, 1, 1, 1], [1, 0, 0, 0], [1, 2, 1, 1], [2, 1], "relu", [], [])
    _close(ys[0], torch.relu(F.conv2d(x[0].double(), w[0].double(), None, (2, 1), (1, 0), (1, 2), 2)), dtype)
    _close(ys[1], torch.relu(F.conv2d(x[1].double(), w[1].double(), b[1].double())), dtype)
    xs, ws, bs = torch.randn(3, 2, 4, 7, 7, dtype=dtype), torch.randn(3, 6, 4, 3, 3, dtype=dtype), torch.randn(3, 6, dtype=dtype)
    y = op("stacked_conv2d")(xs, ws, bs, [1, 1], [1, 1], [1, 1], 1, "", [], [])
    for i in range(3):
        _close(y[i], F.conv2d(xs[i].double(), ws[i].double(), bs[i].double(), 1, 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_and_pointwise(dtype):
    torch.manual_seed(3)
    x = [torch.randn(3, 17, dtype=dtype), torch.randn(2, 5, 33, dtype=dtype)]
    w = [torch.randn(17, dtype=dtype), None]
    b = [torch.randn(17, dtype=dtype), None]
    ys = op("grouped_layer_norm")(x, w, b, [1e-5, 1e-6], "", [], [])
    _close(ys[0], F.layer_norm(x[0].double(), (17,), w[0].double(), b[0].double(), 1e-5), dtype)
    _close(ys[1], F.layer_norm(x[1].double(), (33,), None, None, 1e-6), dtype)
    xs = torch.randn(2, 4, 17, dtype=dtype)
    ws, bs = torch.randn(2, 17, dtype=dtype), torch.randn(2, 17, dtype=dtype)
    y = op("stacked_layer_norm")(xs, ws, bs, 1e-5, "gelu_tanh", [], [])
    for i in range(2):
        _close(y[i], F.gelu(F.layer_norm(xs[i].double(), (17,), ws[i].double(), bs[i].double()),
                            approximate="tanh"), dtype)
    p = op("grouped_pointwise")(x, "sub:scalar,sigmoid", [], [1.0, 2.0])
    for i in range(2):
        _close(p[i], torch.sigmoid(x[i].double() - (i + 1)), dtype)
    assert p[0].data_ptr() != x[0].data_ptr()  # never aliases its input


def test_epilogue_spec_rejects_unknown_steps():
    with pytest.raises(ValueError, match="unknown epilogue step"):
        ep.parse("frobnicate")
    with pytest.raises(ValueError, match="pow takes a scalar"):
        ep.parse("pow:tensor")


def test_dispatched_ops_return_the_layout_their_fakes_declare():
    """A stacked conv over a channels-last packed weight computes a channels-last output
    (kernels/reference.py); called through the dispatcher, as Inductor calls it, the op
    returns it contiguous, the layout its fake declares, with the same values."""
    from stfuse.kernels import reference

    torch.manual_seed(0)
    R, B, C, O = 2, 3, 4, 5
    x = torch.randn(R, B, C, 7, 7)
    w = torch.randn(R * O, C, 3, 3).to(memory_format=torch.channels_last).view(R, O, C, 3, 3)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], [])
    direct = reference.stacked_conv2d(*args)
    assert not direct.is_contiguous()  # else this test checks nothing
    dispatched = op("stacked_conv2d")(*args)
    fake = op("stacked_conv2d")(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    assert dispatched.is_contiguous() and dispatched.stride() == fake.stride()
    torch.testing.assert_close(dispatched, direct, rtol=0, atol=0)
