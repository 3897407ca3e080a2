"""The grouped group-norm Triton kernel (kernels/triton_group_norm.py): what the OpInfo table
(tests/test_opinfo.py) does not cover: strided and channels-last inputs, epilogue operands
that fit no [N, C, S] view, refused inputs, and the GPU.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on tiny shapes.
"""

import pytest
import torch

from stfuse.errors import InputError
from stfuse.kernels import reference
from stfuse.kernels.triton_group_norm import grouped_group_norm, stacked_group_norm
from stfuse.tolerances import assert_close

pytest.importorskip("triton")

# The interpreter evaluates masked-out lanes too (on the `other` value 0), so
# numpy warns about 0/0 there; those lanes are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def f64(tensors):
    return [None if t is None else t.double() for t in tensors]


def test_strided_and_channels_last_members():
    """Inputs read through their strides: channels-last (sxc = 1), a sliced spatial dim
    (a copy: H and W do not merge), a transposed 3-d input."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 6, 5, 3, generator=g).to(memory_format=torch.channels_last),
         torch.randn(1, 4, 6, 10, generator=g)[..., ::3],
         torch.randn(3, 7, 8, generator=g).transpose(1, 2)]
    w = [torch.randn(6, generator=g), torch.randn(8, generator=g)[::2], None]
    b = [None, torch.randn(4, generator=g), torch.randn(8, generator=g)]
    groups, eps = [3, 2, 4], [1e-5, 1e-5, 1e-3]
    ys = grouped_group_norm(x, w, b, groups, eps, "", [], [])
    assert_close(ys, reference.grouped_group_norm(f64(x), f64(w), f64(b), groups, eps, "", [], []))
    assert all(y.is_contiguous() for y in ys)


def test_operands_that_fit_no_view_are_copied():
    """A [H, 1] operand broadcast over [N, C, H, W] leaves H and W unmergeable (strides 1 and
    0): it is copied contiguous, for one member and for the whole stack alike."""
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(2, 4, 3, 5, generator=g)]
    ext = [torch.randn(3, 1, generator=g)]
    ys = grouped_group_norm(x, [None], [None], [2], [1e-5], "add:tensor,tanh", ext, [])
    assert_close(ys, reference.grouped_group_norm(f64(x), [None], [None], [2], [1e-5], "add:tensor,tanh",
                                                  f64(ext), []))
    xs = torch.randn(3, 2, 4, 3, 5, generator=g)
    ext = [torch.randn(3, 1, 1, 3, 1, generator=g)]
    y = stacked_group_norm(xs, None, None, 2, 1e-5, "mul:tensor", ext, [])
    assert_close(y, reference.stacked_group_norm(xs.double(), None, None, 2, 1e-5, "mul:tensor", f64(ext), []))


def test_refuses_mismatched_input():
    with pytest.raises(InputError, match="do not split into 3 groups"):
        grouped_group_norm([torch.randn(2, 4, 5)], [None], [None], [3], [1e-5], "", [], [])
    with pytest.raises(InputError, match="weight is not"):
        grouped_group_norm([torch.randn(2, 4, 5)], [torch.randn(5)], [None], [2], [1e-5], "", [], [])
    with pytest.raises(InputError, match="member lists differ"):
        grouped_group_norm([torch.randn(2, 4)], [None], [None], [2, 2], [1e-5], "", [], [])
    with pytest.raises(InputError, match="is not"):
        grouped_group_norm([torch.randn(4)], [None], [None], [2], [1e-5], "", [], [])
    with pytest.raises(InputError, match="bias is not"):
        stacked_group_norm(torch.randn(2, 3, 4, 5), None, torch.randn(2, 5), 2, 1e-5, "", [], [])
    with pytest.raises(InputError, match="takes 2 scalars"):
        stacked_group_norm(torch.randn(2, 3, 4), None, None, 2, 1e-5, "mul:scalar", [], [1.0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_norm_cuda(dtype):
    """Widths past one BLOCK_D (32 groups of 512 channels x 16 x 16: 4096 per row) and small ones."""
    g = torch.Generator().manual_seed(2)
    shapes = [((2, 512, 16, 16), 32), ((4, 64, 7, 7), 8), ((1, 6, 5), 3)]
    x = [(torch.randn(*s, generator=g) + 1).to(dtype) for s, _ in shapes]
    w = [torch.randn(s[1], generator=g).to(dtype) for s, _ in shapes]
    groups, eps = [n for _, n in shapes], [1e-5] * len(shapes)
    ys = torch.ops.stfuse.grouped_group_norm([t.cuda() for t in x], [t.cuda() for t in w], [None] * 3,
                                             groups, eps, "silu", [], [])
    assert_close([y.cpu() for y in ys], reference.grouped_group_norm(f64(x), f64(w), [None] * 3, groups, eps,
                                                                     "silu", [], []))
    xs = torch.stack([x[1], x[1] * 2]).cuda()
    y = torch.ops.stfuse.stacked_group_norm(xs, None, None, 8, 1e-5, "", [], [])
    assert_close(y.cpu(), reference.stacked_group_norm(xs.cpu().double(), None, None, 8, 1e-5, "", [], []))
