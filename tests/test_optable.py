"""passes/optable.py: the op table's per-class columns that no pass test reaches alone."""

import pytest
import torch
import torch.nn.functional as F

from stfuse.kernels import reference
from stfuse.passes.optable import OP_CLASSES

from stfuse.tolerances import assert_close


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (7, 2, 3), (8, 8, 0), (16, 16, 0)])
def test_conv_weights_pack_channels_last_only_below_8x8(kernel, stride, padding):
    """Packed [R, O, C, kh, kw] weights: channels-last in memory for small kernels, NCHW for
    patch embeddings (8 x 8 and up, where channels-last was up to 30x slower); the stacked
    conv gives each member's own conv2d either way."""
    g = torch.Generator().manual_seed(kernel)
    ws = [torch.randn(6, 3, kernel, kernel, generator=g) for _ in range(3)]
    bs = [torch.randn(6, generator=g) for _ in range(3)]
    xs = [torch.randn(2, 3, 17, 17, generator=g) for _ in range(3)]
    w = OP_CLASSES["conv2d"].pack_weight(ws)
    assert w.flatten(0, 1).is_contiguous() == (kernel >= 8)
    y = reference.stacked_conv2d(torch.stack(xs), w, torch.stack(bs), [stride] * 2, [padding] * 2, [1, 1], 1,
                                 "", [], [])
    for i in range(3):
        assert_close(y[i], F.conv2d(xs[i].double(), ws[i].double(), bs[i].double(), stride, padding))
