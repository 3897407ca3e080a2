"""The grouped layer-norm and pointwise Triton kernels (kernels/triton_norm.py) against a float64 torch reference.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on
tiny shapes. The pointwise tests also cover every epilogue step in
kernels/epilogue.py, with tensor and scalar operands.
"""

import pytest
import torch

from stfuse.errors import InputError
from stfuse.kernels import epilogue as ep
from stfuse.kernels import reference
from stfuse.kernels.triton_ops import IMPLS
from stfuse.tolerances import assert_close, tolerance

# The interpreter evaluates masked-out lanes too (on the `other` value 0), so
# numpy warns about 0/0 and log2(0) there; those lanes are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# bf16 runs only on the GPU: the interpreter computes bf16 wrongly.
DTYPES = [torch.float32, torch.float16]


def f64(tensors):
    return [None if t is None else t.double() for t in tensors]


# --- layer norm ---------------------------------------------------------------------

# x shapes: widths 33 (three BLOCK_D steps), 17, 1; an empty member; 3-d
LN_SHAPES = [(3, 33), (2, 1, 17), (0, 5), (5, 1), (6, 16)]


def make_layer_norm(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = [(torch.randn(*s, generator=g) * 3 + 1).to(dtype) for s in shapes]
    w = [torch.randn(s[-1], generator=g).to(dtype) if i % 3 != 1 else None for i, s in enumerate(shapes)]
    b = [torch.randn(s[-1], generator=g).to(dtype) if i % 2 == 0 else None for i, s in enumerate(shapes)]
    eps = [1e-5, 1e-3, 1e-5, 1e-6, 0.1][:len(shapes)]
    return x, w, b, eps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", ["", "mul:tensor,gelu,sub:scalar"])
def test_grouped_layer_norm(dtype, epilogue):
    for seed in (0, 1):  # twice, on fresh inputs
        x, w, b, eps = make_layer_norm(LN_SHAPES, dtype, seed)
        g = torch.Generator().manual_seed(10 + seed)
        ext_shapes = [(3, 1), (17,), (5,), (1,), (6, 16)]
        ext = [torch.randn(s, generator=g).to(dtype) for s in ext_shapes] if epilogue else []
        scalars = [1.0, 2.0, 3.0, 4.0, -0.5] if epilogue else []
        ys = IMPLS["grouped_layer_norm"](x, w, b, eps, epilogue, ext, scalars)
        assert_close(ys, reference.grouped_layer_norm(f64(x), f64(w), f64(b), eps, epilogue, f64(ext), scalars))


def test_grouped_layer_norm_single_member_strided():
    x = torch.randn(17, 66)[:, ::2]  # rows with a column stride of 2 are copied to unit stride
    ys = IMPLS["grouped_layer_norm"]([x], [None], [None], [1e-5], "", [], [])
    assert_close(ys, reference.grouped_layer_norm([x.double()], [None], [None], [1e-5], "", [], []))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_stacked_layer_norm(dtype, R, affine):
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(R, 2, 5, 33, generator=g) * 2).to(dtype)
        w = torch.randn(R, 33, generator=g).to(dtype) if affine else None
        b = torch.randn(R, 33, generator=g).to(dtype) if affine else None
        ext = [torch.randn(R, 2, 1, 33, generator=g).to(dtype)]
        scalars = [float(r + 1) for r in range(R)]
        y = IMPLS["stacked_layer_norm"](x, w, b, 1e-5, "add:tensor,mul:scalar", ext, scalars)
        ref = reference.stacked_layer_norm(x.double(), *f64([w, b]), 1e-5, "add:tensor,mul:scalar",
                                           f64(ext), scalars)
        assert_close(y, ref)


# --- pointwise: every epilogue step ---------------------------------------------------

POS_ONLY = {"pow"}  # fractional powers of negatives are nan in both; keep the base positive


def step_cases():
    for op in ep.UNARY:
        yield op
    for op in ep.BINARY:
        for operand in ("tensor", "scalar"):
            if op == "pow" and operand == "tensor":
                continue
            yield f"{op}:{operand}"


@pytest.mark.parametrize("step", list(step_cases()))
def test_every_epilogue_step(step):
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        shapes = [(17,), (2, 33), (1, 1, 3)]
        x = [torch.randn(s, generator=g) for s in shapes]
        if step.startswith("pow"):
            x = [t.abs() + 0.5 for t in x]
        # operands kept away from 0 so div/rdiv stay well conditioned
        ext = [torch.rand(s, generator=g) + 0.5 for s in [(17,), (1, 33), (3,)]] if ":tensor" in step else []
        scalars = [0.5, 2.0, 3.0] if ":scalar" in step else []
        ys = IMPLS["grouped_pointwise"](x, step, ext, scalars)
        assert_close(ys, reference.grouped_pointwise(f64(x), step, f64(ext), scalars))


@pytest.mark.parametrize("exponent", [2.0, 3.0, -1.0, 0.0, 0.5])
def test_pow_of_negative_bases_follows_torch(exponent):
    x = [torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])]
    ys = IMPLS["grouped_pointwise"](x, "pow:scalar", [], [exponent])
    ref = reference.grouped_pointwise(f64(x), "pow:scalar", [], [exponent])
    tol = tolerance(torch.float32)
    torch.testing.assert_close(ys[0].double(), ref[0], rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_pointwise_mixed(dtype):
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(17, generator=g), torch.randn(2, 33, generator=g).t(), torch.tensor(1.5),
         torch.randn(0, 3, generator=g)]
    x = [t.to(dtype) for t in x]
    ext = [torch.randn(s, generator=g).to(dtype) for s in [(17,), (1, 2), (), (3,)]]
    epilogue = "silu,add:tensor,mul:scalar"
    ys = IMPLS["grouped_pointwise"](x, epilogue, ext, [1.0, 2.0, 3.0, 4.0])
    assert_close(ys, reference.grouped_pointwise(f64(x), epilogue, f64(ext), [1.0, 2.0, 3.0, 4.0]))


def test_empty_epilogue_copies_into_fresh_outputs():
    x = [torch.randn(5, 3), torch.randn(7)]
    ys = IMPLS["grouped_pointwise"](x, "", [], [])
    assert all(torch.equal(y, t) and y.data_ptr() != t.data_ptr() for y, t in zip(ys, x))
    xs = torch.randn(2, 4)
    y = IMPLS["stacked_pointwise"](xs, "", [], [])
    assert torch.equal(y, xs) and y.data_ptr() != xs.data_ptr()


@pytest.mark.parametrize("shape", [(1,), (3,), (3, 17), (2, 2, 5, 3)])
def test_stacked_pointwise(shape):
    R = shape[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g)
    ext = [torch.randn(shape, generator=g), torch.randn(shape[-1:], generator=g)]
    scalars = [0.5 * (r + 1) for r in range(R) for _ in range(2)]
    epilogue = "mul:tensor,sub:scalar,add:tensor,relu,pow:scalar"  # relu before pow: no nan
    y = IMPLS["stacked_pointwise"](x, epilogue, ext, scalars)
    assert_close(y, reference.stacked_pointwise(x.double(), epilogue, f64(ext), scalars))


# --- GPU: the registered ops on CUDA tensors ---------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm_and_pointwise_cuda(dtype):
    x, w, b, eps = make_layer_norm(LN_SHAPES + [(64, 768), (8, 5000)], dtype, seed=0)
    cuda = lambda ts: [None if t is None else t.cuda() for t in ts]  # noqa: E731
    ys = torch.ops.stfuse.grouped_layer_norm(cuda(x), cuda(w), cuda(b), eps, "gelu", [], [])
    assert_close([y.cpu() for y in ys], reference.grouped_layer_norm(f64(x), f64(w), f64(b), eps, "gelu", [], []))
    ys = torch.ops.stfuse.grouped_pointwise(cuda(x), "tanh,mul:scalar", [], [float(i) for i in range(len(x))])
    ref = reference.grouped_pointwise(f64(x), "tanh,mul:scalar", [], [float(i) for i in range(len(x))])
    assert_close([y.cpu() for y in ys], ref)


def test_layer_norm_and_pointwise_refuse_mismatched_input():
    with pytest.raises(InputError, match="weight does not match"):
        IMPLS["grouped_layer_norm"]([torch.randn(3, 5)], [torch.randn(4)], [None], [1e-5], "", [], [])
    with pytest.raises(InputError, match="member lists differ"):
        IMPLS["grouped_layer_norm"]([torch.randn(3, 5)], [None], [None], [1e-5, 1e-5], "", [], [])
    with pytest.raises(InputError, match="bias is not"):
        IMPLS["stacked_layer_norm"](torch.randn(2, 3, 5), None, torch.randn(2, 4), 1e-5, "", [], [])
    with pytest.raises(InputError, match="takes 2 tensors"):
        IMPLS["grouped_pointwise"]([torch.randn(3), torch.randn(3)], "add:tensor", [torch.randn(3)], [])
    with pytest.raises(InputError, match="takes 3 scalars"):
        IMPLS["stacked_pointwise"](torch.randn(3, 2), "add:scalar", [], [1.0])


def test_empty_widths():
    x = [torch.randn(3, 0), torch.randn(2, 5)]
    ys = IMPLS["grouped_layer_norm"](x, [None, None], [None, None], [1e-5, 1e-5], "", [], [])
    assert_close(ys, reference.grouped_layer_norm(f64(x), [None, None], [None, None], [1e-5, 1e-5], "", [], []))
    ys = IMPLS["grouped_pointwise"](x, "relu", [], [])
    assert_close(ys, reference.grouped_pointwise(f64(x), "relu", [], []))
