"""Grouped group norm in Triton: members of any shape and group count in one launch.

A member x [N, C, *] with G groups is seen as N*G rows of L = (C/G) * S
elements (S the product of the spatial dims): row n*G + g is channel group g
of sample n, its C/G channels of S elements each. As in the layer-norm kernel
(kernels/triton_norm.py), a program takes BLOCK_R rows of one member and walks
L in BLOCK_D chunks three times (mean, variance, normalize), so one compiled
kernel serves every width; the affine weight and bias are per channel, read at
channel g*C/G + col // S. The output is contiguous, so row r starts at r * L.

Epilogue operands are addressed as [N, C, S] views (``ep_outer`` the sample,
``ep_inner`` the channel, ``ep_col`` the spatial position): a per-channel
[C, 1, 1] operand and a full residual both fit without a copy.
"""

from __future__ import annotations

import math

import torch
import triton

from . import codegen
from . import epilogue as ep
from .triton_common import (TL_DTYPE, Launch, cdiv, check, check_lengths, check_operands, choose_config,
                            expand_operands, launcher, next_pow2, operand_columns, try_view)
from .triton_norm import norm_configs

GROUP_NORM = codegen.KernelTemplate(
    kind="group_norm",
    kernel="_grouped_group_norm_kernel",
    columns=("tile0", "R", "G", "CG", "S", "x", "sxn", "sxc", "sxs", "w", "sw", "b", "sb", "y"),
    float_columns=("eps",),
    source='''
    @triton.jit
    def _grouped_group_norm_kernel(
        table_ptr,  # int64 [members, $NCOLS]: one member per row; R = N * G rows of CG * S elements
        tile_ptr,  # int64 [tiles]: the table row of the member that owns each block of rows
        float_ptr,  # float64 [members, $NFLOAT]: eps, then the epilogue scalars
        DTYPE: tl.constexpr,  # element type of x, w, b, y and the epilogue tensors
        BLOCK_R: tl.constexpr,  # rows (sample, channel group) per program
        BLOCK_D: tl.constexpr,  # elements per step along a row
    ):
        pid = tl.program_id(0)
        member = tl.load(tile_ptr + pid)
        prob = table_ptr + member * $NCOLS
        R = tl.load(prob + $R).to(tl.int32)
        G = tl.load(prob + $G).to(tl.int32)
        CG = tl.load(prob + $CG).to(tl.int32)
        S = tl.load(prob + $S).to(tl.int32)
        L = CG * S
        eps = tl.load(float_ptr + member * $NFLOAT + $eps).to(tl.float32)

        local = (pid - tl.load(prob + $tile0)).to(tl.int32)
        offs_r = local * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        n = offs_r // G
        grp = offs_r % G
        cols = tl.arange(0, BLOCK_D)
        sxc = tl.load(prob + $sxc)
        sxs = tl.load(prob + $sxs)
        x_ptr = tl.load(prob + $x).to(tl.pointer_type(DTYPE))
        x_rows = x_ptr + n * tl.load(prob + $sxn) + (grp * CG) * sxc

        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d in range(0, L, BLOCK_D):
            offs_d = d + cols
            mask = r_mask[:, None] & (offs_d < L)[None, :]
            x_offs = (offs_d // S) * sxc + (offs_d % S) * sxs
            acc += tl.load(x_rows[:, None] + x_offs[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=1) / L

        # the variance from a second pass: sum of squares minus squared mean cancels badly in fp32
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d in range(0, L, BLOCK_D):
            offs_d = d + cols
            mask = r_mask[:, None] & (offs_d < L)[None, :]
            x_offs = (offs_d // S) * sxc + (offs_d % S) * sxs
            x = tl.load(x_rows[:, None] + x_offs[None, :], mask=mask, other=0.0).to(tl.float32)
            diff = tl.where(mask, x - mean[:, None], 0.0)
            acc += diff * diff
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / L + eps)

        w_addr = tl.load(prob + $w)
        b_addr = tl.load(prob + $b)
        y_ptr = tl.load(prob + $y).to(tl.pointer_type(DTYPE))
        y_rows = y_ptr + offs_r.to(tl.int64) * L
        ep_outer = n[:, None]
        for d in range(0, L, BLOCK_D):
            offs_d = d + cols
            mask = r_mask[:, None] & (offs_d < L)[None, :]
            chan = grp[:, None] * CG + (offs_d // S)[None, :]
            pos = (offs_d % S)[None, :]
            x = tl.load(x_rows[:, None] + (offs_d // S)[None, :] * sxc + pos * sxs, mask=mask, other=0.0)
            y = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if w_addr != 0:
                weight = tl.load(w_addr.to(tl.pointer_type(DTYPE)) + chan * tl.load(prob + $sw), mask=mask, other=0.0)
                y = y * weight.to(tl.float32)
            if b_addr != 0:
                bias = tl.load(b_addr.to(tl.pointer_type(DTYPE)) + chan * tl.load(prob + $sb), mask=mask, other=0.0)
                y = y + bias.to(tl.float32)
            ep_inner = chan
            ep_col = pos
            #@epilogue
            tl.store(y_rows[:, None] + offs_d[None, :], y.to(DTYPE), mask=mask)
    ''',
)


class _Member:
    """One group norm of a launch: x and y as [N, C, S], its group count, weight and
    bias ([C] or None), epilogue operands as [N, C, S] views, and its floats (eps, scalars)."""

    __slots__ = ("x", "y", "groups", "w", "b", "operands", "floats", "extra")

    def __init__(self, x, y, groups, w, b, operands, floats):
        self.x, self.y, self.groups, self.w, self.b = x, y, groups, w, b
        self.operands, self.floats = operands, floats
        self.extra = (groups,)  # what a launch plan depends on besides the tensors (kernels/launch.py)


def _channels(t: torch.Tensor, lead: int = 0) -> torch.Tensor:
    """[..., N, C, *] as [..., N, C, S] (``lead`` dims before N): a view where the spatial
    dims merge, else a copy. S spelled out rather than -1, which torch refuses when N is 0."""
    return t.reshape(*t.shape[:lead + 2], math.prod(t.shape[lead + 2:]))


def _channel_views(operands: list[torch.Tensor], lead: int = 0) -> list[torch.Tensor]:
    """Operands expanded to an [..., N, C, *] output as [..., N, C, S] views (stride 0 kept on
    broadcast dims); copied contiguous where the spatial dims do not merge. ``lead``: how many
    stack dims come first (a copy covers the whole stack, so member addresses stay affine)."""
    out = []
    for t in operands:
        shape = (*t.shape[:lead + 2], math.prod(t.shape[lead + 2:]))
        v = try_view(t, shape)
        out.append(v if v is not None else t.contiguous().view(shape))
    return out


def _add_member(launch: Launch, m: _Member, cfg: triton.Config) -> None:
    N, C, S = m.x.shape
    rows, width = N * m.groups, (C // m.groups) * S
    tiles = cdiv(rows, cfg.kwargs["BLOCK_R"]) if width > 0 else 0
    if tiles == 0:
        return
    launch.add(
        tiles, m.floats,
        R=rows, G=m.groups, CG=C // m.groups, S=S,
        x=m.x.data_ptr(), sxn=m.x.stride(0), sxc=m.x.stride(1), sxs=m.x.stride(2),
        w=0 if m.w is None else m.w.data_ptr(), sw=0 if m.w is None else m.w.stride(0),
        b=0 if m.b is None else m.b.data_ptr(), sb=0 if m.b is None else m.b.stride(0),
        y=m.y.data_ptr(), **operand_columns(m.operands),
    )


def _run(members: list[_Member], epilogue: str, uniform: int | None = None, floats=None) -> None:
    """Launch the grouped group norm over ``members`` (``uniform``: as in triton_gemm._run)."""
    if not members:
        return
    steps = ep.parse(epilogue)
    dtype, device = members[0].x.dtype, members[0].x.device
    kernel = codegen.load_kernel(GROUP_NORM, epilogue)
    run = launcher(kernel, GROUP_NORM, steps, members, _add_member, uniform, floats, device,
                   DTYPE=TL_DTYPE[dtype])
    widths = [(m.x.shape[1] // m.groups) * m.x.shape[2] for m in members]
    max_rows = max(m.x.shape[0] * m.groups for m in members)
    key = ("group_norm", epilogue, dtype, next_pow2(max_rows), next_pow2(max(widths)),
           next_pow2(uniform or len(members)))
    run(choose_config(key, norm_configs(max(widths)), run))


def _check_member(op: str, i, x, w, b, groups: int, lead: int = 0) -> None:
    where = f"member {i}: " if i is not None else ""
    check(x.dim() >= 2 + lead, op, f"{where}x {tuple(x.shape)} is not [{'R, ' * lead}N, C, *]")
    C = x.shape[1 + lead]
    check(groups > 0 and C % groups == 0, op, f"{where}{C} channels do not split into {groups} groups")
    want = tuple(x.shape[:lead]) + (C,)
    for name, t in (("weight", w), ("bias", b)):
        check(t is None or tuple(t.shape) == want, op, f"{where}{name} is not {list(want)}")


def grouped_group_norm(x, w, b, num_groups, eps, epilogue, ext, scalars):
    """Group norm of each member x_i [N_i, C_i, *] over num_groups[i] groups; one launch."""
    op = "grouped_group_norm"
    count = check_lengths(op, x=x, w=w, b=b, num_groups=num_groups, eps=eps)
    check_operands(op, epilogue, ext, scalars, count, stacked=False)
    for i, (xi, wi, bi, gi) in enumerate(zip(x, w, b, num_groups)):
        _check_member(op, i, xi, wi, bi, gi)
    steps = ep.parse(epilogue)
    members, ys = [], []
    for i, (xi, wi, bi, gi, e) in enumerate(zip(x, w, b, num_groups, eps)):
        y = torch.empty_like(xi, memory_format=torch.contiguous_format)
        tensors, member_scalars = ep.member_operands(steps, ext, scalars, i)
        operands = _channel_views(expand_operands(tensors, y.shape, y.dtype))
        members.append(_Member(_channels(xi), _channels(y), gi, wi, bi, operands, [e, *member_scalars]))
        ys.append(y)
    _run(members, epilogue)
    return ys


def stacked_group_norm(x, w, b, num_groups, eps, epilogue, ext, scalars):
    """x [R, N, C, *], w/b [R, C] or None, one num_groups and eps for all members; members
    are views of one stack, one launch."""
    op = "stacked_group_norm"
    _check_member(op, None, x, w, b, num_groups, lead=1)
    check_operands(op, epilogue, ext, scalars, x.shape[0], stacked=True)
    steps = ep.parse(epilogue)
    R = x.shape[0]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    x4, y4 = _channels(x, lead=1), _channels(y, lead=1)
    operands = _channel_views(expand_operands(ext, y.shape, y.dtype), lead=1)
    members = [
        _Member(x4[r], y4[r], num_groups, None if w is None else w[r], None if b is None else b[r],
                [o[r] for o in operands], ())
        for r in range(min(R, 2))
    ]
    _, ns = ep.counts(steps)
    floats = [f for r in range(R) for f in (eps, *scalars[r * ns:(r + 1) * ns])]
    _run(members, epilogue, uniform=R, floats=floats)
    return y
