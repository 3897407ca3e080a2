"""Torch reference implementations of the fused operators (the CPU path).

Two forms of each operator:

- ``grouped_*``: members given as lists; they may differ in every shape. Each
  member's output is its own tensor. On CPU this is one loop of torch calls
  inside a single operator call.
- ``stacked_*``: members of identical shape, stacked along a new leading dim
  R; one batched torch call (``baddbmm``, a grouped ``conv2d``, one
  ``layer_norm``) does the work of R calls. Outputs stay stacked so that a chain
  of fused groups passes one tensor along without unstacking.

Epilogue operands follow kernels/epilogue.py: grouped ops take ``ext`` flat
member-major, stacked ops take one stacked [R, ...] tensor per tensor step,
broadcastable to the output [R, ...] dim for dim (passes/lower.py pads a
member operand of lower rank, a per-channel [C] weight, to [R, 1, ..., C]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import epilogue as ep


def _stacked_scalars(scalars, steps, R: int, like: torch.Tensor) -> list[torch.Tensor]:
    """Per-step [R, 1, ..., 1] tensors of member scalars, broadcastable to ``like``."""
    _, ns = ep.counts(steps)
    shape = (R,) + (1,) * (like.dim() - 1)
    return [
        torch.tensor(scalars[k::ns] if ns else [], dtype=like.dtype, device=like.device).reshape(shape)
        for k in range(ns)
    ]


def _stacked_epilogue(y, epilogue, ext, scalars, inplace=True):
    if not epilogue:
        return y
    steps = ep.parse(epilogue)
    if scalars:
        scalars = _stacked_scalars(scalars, steps, y.shape[0], y)
    return ep.apply(y, steps, ext, scalars, inplace)


def _grouped_epilogue(ys, epilogue, ext, scalars, inplace=True):
    if not epilogue:
        return ys
    steps = ep.parse(epilogue)
    out = []
    for i, y in enumerate(ys):
        tensors, member_scalars = ep.member_operands(steps, ext, scalars, i)
        out.append(ep.apply(y, steps, tensors, member_scalars, inplace))
    return out


# --- linear -----------------------------------------------------------------


def grouped_linear(x, w, b, epilogue, ext, scalars):
    """y_i = epilogue(x_i @ w_i^T + b_i); x_i [..., K_i], w_i [N_i, K_i]."""
    ys = [F.linear(xi, wi, bi) for xi, wi, bi in zip(x, w, b)]
    return _grouped_epilogue(ys, epilogue, ext, scalars)


def stacked_linear(x, w, b, epilogue, ext, scalars):
    """x [R, ..., K], w [R, N, K], b [R, N] or None -> [R, ..., N] with one baddbmm."""
    return stacked_linear_kn(x, w.transpose(1, 2), None if b is None else b.unsqueeze(1),
                             epilogue, ext, scalars)


def stacked_linear_kn(x, wt, b1, epilogue, ext, scalars):
    """``stacked_linear`` given the weight as [R, K, N] and the bias as [R, 1, N]: the
    views the CPU program takes once, at binding (kernels/bind.py), not per call."""
    # Python overhead matters at batch 1 (about 1 us per tensor call on a 2-core CPU),
    # so the common 3-D case skips the reshape and view.
    x3 = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
    y = torch.bmm(x3, wt) if b1 is None else torch.baddbmm(b1, x3, wt)
    if x.dim() != 3:
        y = y.view(*x.shape[:-1], wt.shape[2])
    return _stacked_epilogue(y, epilogue, ext, scalars)


# --- conv2d -----------------------------------------------------------------


def grouped_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars):
    """Members may differ in every shape and conv parameter; 2 ints per member in
    stride/padding/dilation, one in groups."""
    ys = [
        # A member's view of a channels-last packed weight (passes/lower.py) makes a
        # channels-last output: each member gets the contiguous one its model would.
        F.conv2d(xi, wi, bi, stride[2 * i:2 * i + 2], padding[2 * i:2 * i + 2],
                 dilation[2 * i:2 * i + 2], groups[i]).contiguous()
        for i, (xi, wi, bi) in enumerate(zip(x, w, b))
    ]
    return _grouped_epilogue(ys, epilogue, ext, scalars)


def stacked_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars):
    """x [R, B, C, H, W], w [R, O, C/g, kh, kw] -> [R, B, O, Ho, Wo] as ONE conv2d
    with R*g channel groups (members side by side in the channel dim).

    With a channels-last packed weight (CPU, passes/lower.py) the conv runs
    channels-last: x is laid out [B, H, W, R*C] in one copy (none when x is the
    previous stacked conv's output), and the output stays channels-last, a view
    [R, B, O, Ho, Wo] of memory [B, Ho, Wo, R*O]. The program makes it
    contiguous where it leaves the stacked chain (kernels/bind.py).
    """
    R, B, C, H, W = x.shape
    O = w.shape[1]
    w4 = w.reshape(R * O, *w.shape[2:])
    if w4.is_contiguous(memory_format=torch.channels_last) and not w4.is_contiguous():
        xb = x.permute(1, 3, 4, 0, 2).reshape(B, H, W, R * C).permute(0, 3, 1, 2)
    else:  # [R, B, C, H, W] -> [B, R*C, H, W]: free when x is the previous stacked conv's output
        xb = x.transpose(0, 1).reshape(B, R * C, H, W)
    y = F.conv2d(xb, w4, None if b is None else b.reshape(R * O), stride, padding, dilation, groups * R)
    y = y.view(B, R, O, *y.shape[2:]).transpose(0, 1)
    return _stacked_epilogue(y, epilogue, ext, scalars)


# --- layer_norm ---------------------------------------------------------------


def grouped_layer_norm(x, w, b, eps, epilogue, ext, scalars):
    """Layer norm over the last dim of each member (widths may differ)."""
    ys = [F.layer_norm(xi, (xi.shape[-1],), wi, bi, e) for xi, wi, bi, e in zip(x, w, b, eps)]
    return _grouped_epilogue(ys, epilogue, ext, scalars)


def stacked_layer_norm(x, w, b, eps, epilogue, ext, scalars):
    """x [R, ..., D], w/b [R, D] or None, one eps for all members."""
    R, D = x.shape[0], x.shape[-1]
    y = F.layer_norm(x, (D,), None, None, eps)
    bshape = (R,) + (1,) * (x.dim() - 2) + (D,)
    if w is not None:
        y = y * w.view(bshape)
    if b is not None:
        y = y + b.view(bshape)
    return _stacked_epilogue(y, epilogue, ext, scalars)


# --- pointwise ----------------------------------------------------------------


def grouped_pointwise(x, epilogue, ext, scalars):
    """The epilogue chain alone, applied to each member (never returning an input)."""
    if not epilogue:
        return [xi.clone() for xi in x]
    return _grouped_epilogue(list(x), epilogue, ext, scalars, inplace=False)


def stacked_pointwise(x, epilogue, ext, scalars):
    if not epilogue:
        return x.clone()
    return _stacked_epilogue(x, epilogue, ext, scalars, inplace=False)
