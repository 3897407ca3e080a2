"""The implicit-GEMM grouped conv2d Triton kernel (kernels/triton_conv.py) against a float64 torch reference.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on tiny shapes.
"""

import pytest
import torch

from stfuse.errors import InputError
from stfuse.kernels import reference, triton_conv
from stfuse.kernels.triton_ops import IMPLS
from stfuse.tolerances import assert_close

# The interpreter evaluates masked-out lanes too (on the `other` value 0), so
# numpy warns about 0/0 there; those lanes are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# bf16 runs only on the GPU: the interpreter computes bf16 wrongly.
DTYPES = [torch.float32, torch.float16]

# (x shape, w shape, stride, padding, dilation, groups): odd sizes, an empty batch,
# strided/dilated/padded, grouped, 1x1, depthwise
MIXED = [
    ((2, 4, 9, 7), (6, 2, 3, 3), (1, 2), (1, 0), (1, 2), 2),
    ((1, 6, 5, 5), (5, 6, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((0, 3, 4, 4), (2, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 6, 6), (4, 1, 3, 3), (2, 1), (1, 1), (1, 1), 4),
    ((1, 2, 17, 3), (3, 2, 2, 1), (3, 1), (2, 0), (1, 1), 1),
]


def f64(tensors):
    return [None if t is None else t.double() for t in tensors]


def flat(pairs):
    return [v for p in pairs for v in p]


def make_conv(specs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(*s[0], generator=g).to(dtype) for s in specs]
    w = [(torch.randn(*s[1], generator=g) / 3).to(dtype) for s in specs]
    b = [torch.randn(s[1][0], generator=g).to(dtype) if i % 2 == 0 else None for i, s in enumerate(specs)]
    params = [flat(s[2] for s in specs), flat(s[3] for s in specs), flat(s[4] for s in specs),
              [s[5] for s in specs]]
    return x, w, b, params


def check_grouped(x, w, b, params, epilogue, ext, scalars):
    ys = IMPLS["grouped_conv2d"](x, w, b, *params, epilogue, ext, scalars)
    refs = reference.grouped_conv2d(f64(x), f64(w), f64(b), *params, epilogue, f64(ext), scalars)
    assert_close(ys, refs)
    return ys


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", ["", "add:tensor,relu,mul:scalar"])
def test_grouped_conv2d_mixed_shapes(dtype, epilogue):
    for seed in (0, 1):  # twice, on fresh inputs
        x, w, b, params = make_conv(MIXED, dtype, seed)
        out = reference.grouped_conv2d(f64(x), f64(w), f64(b), *params, "", [], [])
        g = torch.Generator().manual_seed(50 + seed)
        # per-channel, full-size, per-column and per-row operands
        shapes = [(out[0].shape[1], 1, 1), out[1].shape, (1, 1, 1, out[2].shape[3]), out[3].shape[2:3] + (1,),
                  (1,)]
        ext = [torch.randn(s, generator=g).to(dtype) for s in shapes] if epilogue else []
        scalars = [0.5, -1.0, 2.0, 1.5, 3.0] if epilogue else []
        ys = check_grouped(x, w, b, params, epilogue, ext, scalars)
        assert [y.shape for y in ys] == [o.shape for o in out]


def test_grouped_conv2d_strided_input_and_weight():
    # channels-last input and a permuted weight are read through their strides, uncopied
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(2, 3, 7, 5, generator=g).to(memory_format=torch.channels_last)]
    w = [torch.randn(3, 3, 4, 2, generator=g).permute(2, 0, 1, 3)]  # [4, 3, 3, 2]
    check_grouped(x, w, [None], [[1, 1], [1, 1], [1, 1], [1]], "silu", [], [])


def test_grouped_conv2d_operand_with_unmergeable_pixels():
    # a [1, 1, Ho, 1] operand: its (Ho, Wo) strides (1, 0) do not merge, so it is copied
    x, w, b, params = make_conv(MIXED[:1], torch.float32, seed=4)
    ho = reference.grouped_conv2d(x, w, b, *params, "", [], [])[0].shape[2]
    check_grouped(x, w, b, params, "sub:tensor", [torch.randn(1, 1, ho, 1)], [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", [1, 3])
def test_stacked_conv2d(dtype, R):
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(R, 2, 4, 7, 6, generator=g).to(dtype)
        w = (torch.randn(R, 6, 2, 3, 2, generator=g) / 3).to(dtype)
        b = torch.randn(R, 6, generator=g).to(dtype)
        args = ([2, 1], [1, 0], [1, 2], 2)
        y0 = reference.stacked_conv2d(x.double(), w.double(), b.double(), *args, "", [], [])
        ext = [torch.randn(R, 1, 6, 1, 1, generator=g).to(dtype), torch.randn(y0.shape, generator=g).to(dtype)]
        scalars = [1.0 + r for r in range(R)]
        epilogue = "add:tensor,tanh,mul:tensor,div:scalar"
        y = IMPLS["stacked_conv2d"](x, w, b, *args, epilogue, ext, scalars)
        ref = reference.stacked_conv2d(x.double(), w.double(), b.double(), *args, epilogue, f64(ext), scalars)
        assert_close(y, ref)
        assert y.stride() == ref.stride()  # the reference's [B, R, ...] layout, for its consumers


def test_stacked_conv2d_unmergeable_operand_without_bias():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 2, 5, 5, generator=g)
    w = torch.randn(3, 4, 2, 3, 3, generator=g)
    ext = [torch.randn(3, 1, 1, 5, 1, generator=g)]
    y = IMPLS["stacked_conv2d"](x, w, None, [1, 1], [1, 1], [1, 1], 1, "mul:tensor", ext, [])
    assert_close(y, reference.stacked_conv2d(x.double(), w.double(), None, [1, 1], [1, 1], [1, 1], 1,
                                             "mul:tensor", f64(ext), []))


# --- GPU: the registered ops on CUDA tensors ---------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_conv2d_cuda(dtype, monkeypatch):
    # fp32 through IEEE tl.dot, against the 1e-4 tolerance (the kernel follows cudnn's tf32 switch, as F.conv2d)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    specs = MIXED + [((4, 64, 28, 28), (128, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1)]
    x, w, b, params = make_conv(specs, dtype, seed=0)
    ext = [torch.randn(s[1][0], 1, 1).to(dtype) for s in specs]
    cuda = lambda ts: [None if t is None else t.cuda() for t in ts]  # noqa: E731
    ys = torch.ops.stfuse.grouped_conv2d(cuda(x), cuda(w), cuda(b), *params, "add:tensor,relu", cuda(ext), [])
    refs = reference.grouped_conv2d(f64(x), f64(w), f64(b), *params, "add:tensor,relu", f64(ext), [])
    assert_close([y.cpu() for y in ys], refs)


def test_conv2d_refuses_mismatched_input():
    x, w = [torch.randn(1, 4, 5, 5)], [torch.randn(6, 3, 3, 3)]
    with pytest.raises(InputError, match="do not match groups=1"):
        IMPLS["grouped_conv2d"](x, w, [None], [1, 1], [0, 0], [1, 1], [1], "", [], [])
    with pytest.raises(InputError, match="2 ints per member"):
        IMPLS["grouped_conv2d"](x, [torch.randn(6, 4, 3, 3)], [None], [1], [0, 0], [1, 1], [1], "", [], [])
    with pytest.raises(InputError, match="too small"):
        IMPLS["grouped_conv2d"](x, [torch.randn(6, 4, 7, 7)], [None], [1, 1], [0, 0], [1, 1], [1], "", [], [])
    with pytest.raises(InputError, match="stfuse::stacked_conv2d"):
        IMPLS["stacked_conv2d"](torch.randn(2, 1, 4, 5, 5), torch.randn(2, 6, 2, 3, 3), None,
                                [1, 1], [0, 0], [1, 1], 1, "", [], [])


# --- half-precision layouts: what the launcher runs (kernels/triton_conv.py, vector_x) ----


@pytest.fixture
def launched(monkeypatch):
    """The constexprs of every conv launch in the test (the dict the launch used)."""
    seen = []
    real = triton_conv.launcher

    def spy(*args, **kwargs):
        run = real(*args, **kwargs)
        seen.append(run.consts)
        return run
    monkeypatch.setattr(triton_conv, "launcher", spy)
    return seen


def flags_of(consts) -> tuple:
    return consts["X_C_UNIT"], consts["W_C_UNIT"], consts["VEC"]


# (x shape, w shape, groups, dtype, how w is given, the flags launched)
LAYOUTS = [
    ((2, 8, 5, 6), (4, 8, 3, 3), 1, torch.float16, "nchw", (True, False, 8)),  # x made channels_last
    ((2, 8, 5, 6), (4, 8, 3, 3), 1, torch.float16, "packed", (True, True, 8)),  # w packed as at binding
    ((1, 16, 3, 5), (8, 16, 1, 1), 1, torch.float16, "nchw", (True, True, 8)),  # a 1x1 w: unit channels as it is
    ((2, 16, 4, 4), (6, 8, 3, 3), 2, torch.float16, "packed", (True, True, 8)),  # 8 channels per group
    ((2, 3, 6, 6), (8, 3, 3, 3), 1, torch.float16, "packed", (False, False, 1)),  # a 3-channel stem: scalars
    ((1, 8, 5, 5), (8, 1, 3, 3), 8, torch.float16, "packed", (False, False, 1)),  # depthwise: scalars
    ((2, 8, 5, 6), (4, 8, 3, 3), 1, torch.float32, "nchw", (False, False, 1)),  # fp32 keeps x's layout
]


@pytest.mark.parametrize("xs, wsh, groups, dtype, w_layout, flags", LAYOUTS)
def test_half_precision_nchw_runs_channels_last(launched, xs, wsh, groups, dtype, w_layout, flags):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*xs, generator=g).to(dtype)
    w = (torch.randn(*wsh, generator=g) / 3).to(dtype)
    w = triton_conv.pack_weight(w) if w_layout == "packed" else w
    before = x.clone()
    params = [[1, 1], [1, 1], [1, 1], [groups]]
    check_grouped([x], [w], [None], params, "relu", [], [])
    assert [flags_of(c) for c in launched] == [flags]
    assert torch.equal(x, before) and x.is_contiguous()  # the caller's x is neither changed nor relaid


def test_half_precision_stacked_nchw_runs_channels_last(launched):
    g = torch.Generator().manual_seed(8)
    R = 3
    x = torch.randn(R, 2, 8, 5, 4, generator=g).half()
    w = (torch.randn(R, 8, 8, 3, 3, generator=g) / 3).half()
    b = torch.randn(R, 8, generator=g).half()
    args = ([1, 1], [1, 1], [1, 1], 1)
    for packed in (False, True):
        wr = triton_conv.pack_weight(w) if packed else w
        y = IMPLS["stacked_conv2d"](x, wr, b, *args, "gelu", [], [])
        ref = reference.stacked_conv2d(x.double(), w.double(), b.double(), *args, "gelu", [], [])
        assert_close(y, ref)
    assert [flags_of(c) for c in launched] == [(True, False, 8), (True, True, 8)]


def test_pack_weight_only_where_vectors_fit():
    w = torch.randn(4, 8, 3, 3).half()
    packed = triton_conv.pack_weight(w)
    assert packed.stride(1) == 1 and torch.equal(packed, w)
    assert triton_conv.pack_weight(packed) is packed  # already channels_last: no copy
    for other in (torch.randn(4, 8, 3, 3), torch.randn(4, 3, 3, 3).half(), torch.randn(4, 8, 1, 1).half()):
        assert triton_conv.pack_weight(other) is other  # fp32, 3 channels, a 1x1 (unit channels already)
    stack = torch.randn(2, 4, 16, 3, 3).bfloat16()
    assert triton_conv.pack_weight(stack)[1].stride(1) == 1 and torch.equal(triton_conv.pack_weight(stack), stack)
