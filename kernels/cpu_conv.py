"""CPU convolutions on constant weights: oneDNN's prepacked conv, channels-last.

A tenant's own ``aten.conv2d`` on a float32 weight of its program runs, on CPU,
as oneDNN's conv on a weight reordered once into its blocked layout
(``mkldnn._reorder_convolution_weight``, what Inductor's freezing pass does for
CPU convs) and ``mkldnn._convolution_pointwise`` per call, a reading relu applied in
place on its output. Not as oneDNN's relu post-op: that maps NaN to 0 (so do its
leaky_relu and hardtanh post-ops; tested on torch 2.13), where eager's relu keeps NaN,
and a NaN input then came back as a finite, wrong output (a residual block's add + relu
as the binary post-op measured no faster than the add and relu in place after the
conv: [8, 16, 8, 8] 3x3, 36 against 34 us; not used either). Measured on the
project's 2-core AMD EPYC, 2 threads, median of turns, 3x3 convs of
``zoo.cnn(16)`` (scratch A/B script, noisy: another engineer shared the cores):

==========================  =======  ==============  ===============
conv (+ relu), batch        aten us  oneDNN, NCHW in  oneDNN, CL in
==========================  =======  ==============  ===============
3 -> 16, 32x32, b1          44       34               29
16 -> 32, 32x32 s2, b1      50       46               30
3 -> 16, 32x32, b8          80       70               53
16 -> 32, 32x32 s2, b8      112      105              65
==========================  =======  ==============  ===============

oneDNN's output is channels-last whatever its input (the packed weight fixes
the format), and it is fastest on channels-last input; so a bound conv takes its
input channels-last (a copy only for the first conv of a chain) and hands its
output on as it is. Ops that compute the same values from any strides (CL_SAFE:
pointwise ops, pooling, flatten, stack, the next conv) read it directly;
every other reader, and the program's outputs, get it made contiguous once
(``bind`` inserts the ``contiguous`` calls), so a tenant's ``view`` and the
caller see eager's layout.

Whether convs are bound is the linears' switch (kernels/cpu_gemm.py ``mode``:
STFUSE_CPU_GEMM "onednn", "mkl", or "auto", one probe linear timed): one
library for both, so "mkl" runs every conv on aten's as before.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from . import cpu_gemm, reference

aten = torch.ops.aten
CL = torch.channels_last
_conv = torch.ops.mkldnn._convolution_pointwise.default


def params(n_args: tuple) -> tuple | None:
    """(stride, padding, dilation, groups), each 2 ints (groups one), of an aten.conv2d
    call's arguments after (x, w, b); None where one is not plain ints (``padding="same"``)."""
    stride, padding, dilation, groups = (list(n_args) + [1, 0, 1, 1][len(n_args):])[:4]
    pair = [[v, v] if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) else None
            for v in (stride, padding, dilation)]
    if any(p is None or len(p) != 2 or not all(isinstance(i, int) for i in p) for p in pair):
        return None
    return (*pair, groups) if isinstance(groups, int) else None


# Kernels up to this size (both dims) are bound; larger ones stay on aten. The prepacked
# conv lost to aten on the patchify stems of vision transformers and ConvNeXt/Swin
# (kernel = stride): 3 -> 96, 4x4 s4 at 64x64 148 against 51 us at batch 1, 199 against
# 98 at batch 8; grouped (4 tenants' 3 -> 768, 16x16 s16 fused) 57 ms against aten's
# 0.3 ms. A 7x7 stem ties (91 against 92 us). 3x3 and 1x1 convs are where it wins.
MAX_KERNEL = 3


def packable(w) -> bool:
    """A weight oneDNN's conv takes, and is faster with: a 4-D float32 CPU tensor (2-D
    convs, not transposed) of a kernel up to MAX_KERNEL x MAX_KERNEL."""
    return (isinstance(w, torch.Tensor) and w.dim() == 4 and w.dtype == torch.float32
            and w.device.type == "cpu" and not w.requires_grad
            and w.shape[2] <= MAX_KERNEL and w.shape[3] <= MAX_KERNEL)


def pack(w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """w [O, C/g, kh, kw] in oneDNN's blocked layout for this conv: one copy per weight,
    version and conv parameters, shared like cpu_gemm.pack's."""
    return cpu_gemm.pack(w, torch.ops.mkldnn._reorder_convolution_weight, padding, stride, dilation, groups)


# oneDNN's conv costs ~24 us a call at any size (aten's own "native" conv ~8 us), so a
# small conv stays on aten where aten takes its native path: batch 1, an input of at
# most NATIVE_NUMEL elements, kernel up to 3x3, one group (aten's use_mkldnn); there
# oneDNN wins from about MIN_MACS multiply-adds (ResNet-50/8's 147K-MAC 3x3s at batch
# 1: aten 18-24 us, oneDNN 25-44 us; zoo.cnn's 442K and 1.2M: aten 44-50, oneDNN 29-30).
# Everywhere else aten runs oneDNN itself, on the unpacked weight (ResNet-50/8 at batch
# 8: aten ~60 us a conv, packed ~30).
MIN_MACS = 1 << 18
NATIVE_NUMEL = 20480


def min_numel(w: torch.Tensor, stride, groups: int) -> int:
    """The input size (elements) from which a batch-1 call takes oneDNN (a larger batch
    always does): computed once, at binding. Multiply-adds ~ input size x O kh kw / (g
    sh sw)."""
    O, _, kh, kw = w.shape
    if groups > 1 or (kh > 3 and kw > 3):
        return 0
    return min(NATIVE_NUMEL + 1, -(-MIN_MACS * stride[0] * stride[1] // (O * kh * kw)))


def _onednn(x, least: int) -> bool:
    return x.dtype is torch.float32 and x.dim() == 4 and (x.shape[0] > 1 or x.numel() >= least)


def conv(x, w, b, stride, padding, dilation, groups, packed, least: int, attr: str = "none"):
    """``F.conv2d(x, w, b, ...)`` (then relu, in place, where ``attr`` is "relu") through
    oneDNN on ``packed`` (= pack(w, ...)), its output channels-last, where x is a float32
    [N, C, H, W] batch of ``least`` (min_numel) elements or more than one sample; else
    aten's conv."""
    if _onednn(x, least):
        y = _conv(x.contiguous(memory_format=CL), packed, b, padding, stride, dilation, groups, "none", [], "")
    else:
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return y.relu_() if attr == "relu" else y  # not oneDNN's post-op: it maps NaN to 0


def grouped_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars, packed, least):
    """``reference.grouped_conv2d`` with each member whose weight ``packed`` holds (None: not
    packed) through ``conv``, as that member alone would run (each output contiguous)."""
    ys = []
    for i, (xi, wi, bi, p, n) in enumerate(zip(x, w, b, packed, least)):
        params = (stride[2 * i:2 * i + 2], padding[2 * i:2 * i + 2], dilation[2 * i:2 * i + 2], groups[i])
        y = conv(xi, wi, bi, *params, p, n) if p is not None else F.conv2d(xi, wi, bi, *params)
        ys.append(y.contiguous())
    return reference._grouped_epilogue(ys, epilogue, ext, scalars)


def stacked_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars, packed, bias):
    """``reference.stacked_conv2d`` (one conv, members side by side in the channel dim)
    through oneDNN on ``packed``, the members' weights as one [R*O, C/g, kh, kw] weight of
    R*g groups packed once (``bias``: [R*O]); the epilogue runs after it (a "relu" not
    as oneDNN's post-op, which maps NaN to 0: module docstring). aten's
    grouped conv runs oneDNN too, reordering the weight every call: 4 members, batch 1,
    ResNet-50/8's [16, 16, 3, 3] at 8x8 34 against 24 us, [64, 64, 3, 3] stride 2 at 4x4
    61 against 26."""
    if x.dtype is not torch.float32:
        return reference.stacked_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars)
    R, B, C, H, W = x.shape
    xb = x.permute(1, 3, 4, 0, 2).reshape(B, H, W, R * C).permute(0, 3, 1, 2)  # channels-last, one copy at most
    y = _conv(xb, packed, bias, padding, stride, dilation, groups * R, "none", [], "")
    y = y.view(B, R, w.shape[1], *y.shape[2:]).transpose(0, 1)
    return reference._stacked_epilogue(y, epilogue, ext, scalars)


# Readers that compute the same values from a channels-last input as from a contiguous
# one, and take it without a copy: a bound conv's output goes to them as it is. Every
# other reader gets it made contiguous (bind).
CL_SAFE = frozenset({
    conv, stacked_conv2d, reference.stacked_conv2d, reference.stacked_pointwise, aten.conv2d.default,
    torch.stack, operator.getitem,
    aten.relu.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.hardtanh.default, aten.clamp.default, aten.sigmoid.default, aten.silu.default, aten.gelu.default,
    aten.tanh.default, aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
    aten.mean.dim, aten.flatten.using_ints, aten.reshape.default,
})
