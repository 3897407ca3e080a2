"""Grouped layer norm and grouped pointwise in Triton: members of any shape in one launch.

Both see each member as rows x D (D its last dim). Layer norm gives each
program BLOCK_R rows of one member and walks D in BLOCK_D chunks three times
(mean, variance, normalize), so one compiled kernel serves every width; the
second and third reads come from L2 for the widths models use. Pointwise
tiles rows x D with BLOCK_R x BLOCK_D programs and only runs the epilogue.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from . import codegen
from . import epilogue as ep
from .triton_common import (TL_DTYPE, Launch, RowsMember, launcher, as_rows, cdiv, check, check_lengths, check_operands, choose_config,
                            expand_operands, interpreting, next_pow2, operand_columns,
                            rows_layout, stack_rows_operands, vec_width)

LAYER_NORM = codegen.KernelTemplate(
    kind="layer_norm",
    kernel="_grouped_layer_norm_kernel",
    columns=("tile0", "R", "D", "x", "sxr", "w", "b", "y", "syr", "inner"),
    float_columns=("eps",),
    source='''
    @triton.jit
    def _grouped_layer_norm_kernel(
        table_ptr,  # int64 [members, $NCOLS]: one member per row; x, w, b, y have unit stride along D
        tile_ptr,  # int64 [tiles]: the table row of the member that owns each block of rows
        float_ptr,  # float64 [members, $NFLOAT]: eps, then the epilogue scalars
        DTYPE: tl.constexpr,  # element type of x, w, b, y and the epilogue tensors
        IDX: tl.constexpr,  # offset type: tl.int32 unless a member spans 2**31 elements
        VEC: tl.constexpr,  # 16 bytes in elements where x, w, b, y are 16-byte aligned and D and the row strides multiples of it, else 1
        BLOCK_R: tl.constexpr,  # rows per program
        BLOCK_D: tl.constexpr,  # columns per step along D
    ):
        pid = tl.program_id(0)
        member = tl.load(tile_ptr + pid)
        prob = table_ptr + member * $NCOLS
        R = tl.load(prob + $R).to(tl.int32)
        D = tl.multiple_of(tl.load(prob + $D).to(tl.int32), VEC)
        eps = tl.load(float_ptr + member * $NFLOAT + $eps).to(tl.float32)

        local = (pid - tl.load(prob + $tile0)).to(tl.int32)
        offs_r = local * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        cols = tl.arange(0, BLOCK_D)
        x_ptr = tl.multiple_of(tl.load(prob + $x).to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
        x_rows = x_ptr + offs_r * tl.multiple_of(tl.load(prob + $sxr).to(IDX), VEC)

        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d in range(0, D, BLOCK_D):
            mask = r_mask[:, None] & (d + cols < D)[None, :]
            acc += tl.load(x_rows[:, None] + (d + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=1) / D

        # the variance from a second pass: sum of squares minus squared mean cancels badly in fp32
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d in range(0, D, BLOCK_D):
            mask = r_mask[:, None] & (d + cols < D)[None, :]
            x = tl.load(x_rows[:, None] + (d + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            diff = tl.where(mask, x - mean[:, None], 0.0)
            acc += diff * diff
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)

        w_addr = tl.load(prob + $w)
        b_addr = tl.load(prob + $b)
        y_ptr = tl.multiple_of(tl.load(prob + $y).to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
        y_rows = y_ptr + offs_r * tl.multiple_of(tl.load(prob + $syr).to(IDX), VEC)
        inner = tl.load(prob + $inner).to(tl.int32)
        ep_outer = (offs_r // inner)[:, None]
        ep_inner = (offs_r % inner)[:, None]
        for d in range(0, D, BLOCK_D):
            offs_d = d + cols
            d_mask = offs_d < D
            mask = r_mask[:, None] & d_mask[None, :]
            x = tl.load(x_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if w_addr != 0:
                w_ptr = tl.multiple_of(w_addr.to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
                weight = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0)
                y = y * weight.to(tl.float32)[None, :]
            if b_addr != 0:
                b_ptr = tl.multiple_of(b_addr.to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
                bias = tl.load(b_ptr + offs_d, mask=d_mask, other=0.0)
                y = y + bias.to(tl.float32)[None, :]
            ep_col = offs_d[None, :]
            #@epilogue
            tl.store(y_rows[:, None] + offs_d[None, :], y.to(DTYPE), mask=mask)
    ''',
)

POINTWISE = codegen.KernelTemplate(
    kind="pointwise",
    kernel="_grouped_pointwise_kernel",
    columns=("tile0", "R", "D", "x", "sxr", "sxd", "y", "syr", "inner"),
    source='''
    @triton.jit
    def _grouped_pointwise_kernel(
        table_ptr,  # int64 [members, $NCOLS]: one member per row, seen as R x D
        tile_ptr,  # int64 [tiles]: the table row of the member that owns each tile
        float_ptr,  # float64 [members, $NFLOAT]: the members' epilogue scalars
        DTYPE: tl.constexpr,  # element type of x, y and the epilogue tensors
        IDX: tl.constexpr,  # offset type: tl.int32 unless a member spans 2**31 elements
        VEC: tl.constexpr,  # 16 bytes in elements where x, y are 16-byte aligned, x has unit stride along D and D and the row strides are multiples of it, else 1
        BLOCK_R: tl.constexpr,  # rows per tile
        BLOCK_D: tl.constexpr,  # columns per tile
    ):
        pid = tl.program_id(0)
        member = tl.load(tile_ptr + pid)
        prob = table_ptr + member * $NCOLS
        R = tl.load(prob + $R).to(tl.int32)
        D = tl.multiple_of(tl.load(prob + $D).to(tl.int32), VEC)

        local = (pid - tl.load(prob + $tile0)).to(tl.int32)
        tiles_d = tl.cdiv(D, BLOCK_D)
        offs_r = (local // tiles_d) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = (local % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (offs_r < R)[:, None] & (offs_d < D)[None, :]

        x_ptr = tl.multiple_of(tl.load(prob + $x).to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
        sxd = 1 if VEC > 1 else tl.load(prob + $sxd).to(IDX)
        x_offs = offs_r[:, None] * tl.multiple_of(tl.load(prob + $sxr).to(IDX), VEC) + offs_d[None, :] * sxd
        y = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)

        inner = tl.load(prob + $inner).to(tl.int32)
        ep_outer = (offs_r // inner)[:, None]
        ep_inner = (offs_r % inner)[:, None]
        ep_col = offs_d[None, :]
        #@epilogue

        y_ptr = tl.multiple_of(tl.load(prob + $y).to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
        y_offs = offs_r[:, None] * tl.multiple_of(tl.load(prob + $syr).to(IDX), VEC) + offs_d[None, :]
        tl.store(y_ptr + y_offs, y.to(DTYPE), mask=mask)
    ''',
)


@functools.lru_cache(maxsize=None)
def norm_configs(max_d: int) -> list[triton.Config]:
    """Row blocks to time on the GPU: BLOCK_D covers the widest member up to 4096."""
    if interpreting():
        # small blocks keep the interpreted tests fast and make D=33 take three steps
        return [triton.Config(dict(BLOCK_R=4, BLOCK_D=16), num_warps=1, num_stages=1)]
    block_d = min(next_pow2(max_d), 4096)
    # (elements per program, warps): 8192 elements on 8 warps spilled 16 bytes (fp32, sm_90)
    return [
        triton.Config(dict(BLOCK_R=max(1, elems // block_d), BLOCK_D=block_d), num_warps=warps, num_stages=1)
        for elems, warps in ((2048, 4), (4096, 8))
    ]


@functools.lru_cache(maxsize=None)
def pointwise_configs() -> list[triton.Config]:
    """Tile shapes to time on the GPU (the first one alone under the interpreter)."""
    if interpreting():
        return [triton.Config(dict(BLOCK_R=4, BLOCK_D=16), num_warps=1, num_stages=1)]
    return [
        # 4 x 256, not 8 x 256: ptxas spilled 8-16 bytes there with scalar (unaligned) loads
        triton.Config(dict(BLOCK_R=4, BLOCK_D=256), num_warps=4, num_stages=1),
        triton.Config(dict(BLOCK_R=32, BLOCK_D=128), num_warps=8, num_stages=1),
        triton.Config(dict(BLOCK_R=1, BLOCK_D=1024), num_warps=4, num_stages=1),
    ]


_Member = RowsMember


def _add_layer_norm(launch: Launch, m: _Member, cfg: triton.Config) -> None:
    R, D = m.x2.shape
    tiles = cdiv(R, cfg.kwargs["BLOCK_R"]) if D > 0 else 0
    if tiles == 0:
        return
    inner, views = rows_layout(m.y_shape, m.operands)
    launch.keep.extend(views)
    launch.add(
        tiles, m.floats,
        R=R, D=D, x=m.x2.data_ptr(), sxr=m.x2.stride(0),
        w=0 if m.w is None else m.w.data_ptr(), b=0 if m.b is None else m.b.data_ptr(),
        y=m.y2.data_ptr(), syr=m.y2.stride(0), inner=inner, **operand_columns(views),
    )


def _add_pointwise(launch: Launch, m: _Member, cfg: triton.Config) -> None:
    R, D = m.x2.shape
    tiles = cdiv(R, cfg.kwargs["BLOCK_R"]) * cdiv(D, cfg.kwargs["BLOCK_D"])
    if tiles == 0:
        return
    inner, views = rows_layout(m.y_shape, m.operands)
    launch.keep.extend(views)
    launch.add(
        tiles, m.floats,
        R=R, D=D, x=m.x2.data_ptr(), sxr=m.x2.stride(0), sxd=m.x2.stride(1),
        y=m.y2.data_ptr(), syr=m.y2.stride(0), inner=inner, **operand_columns(views),
    )


def _flags(members: list[_Member]) -> dict:
    """VEC (once per plan): rows of unit stride along D whose width and row strides allow it."""
    dims = [d for m in members for d in (m.x2.shape[1], m.x2.stride(0), m.y2.stride(0))]
    unit = all(m.x2.shape[1] <= 1 or m.x2.stride(1) == 1 for m in members)
    return dict(VEC=vec_width(members[0].x2.dtype, *dims) if unit else 1)


# template -> (how a member enters the table, its configs from the widest member)
_KINDS = {
    "layer_norm": (LAYER_NORM, _add_layer_norm, norm_configs),
    "pointwise": (POINTWISE, _add_pointwise, lambda max_d: pointwise_configs()),
}


def _run(kind: str, members: list[_Member], epilogue: str, uniform: int | None = None, floats=None) -> None:
    """Launch ``kind`` over ``members`` (``uniform``: as in triton_gemm._run)."""
    if not members:
        return
    template, add_member, configs = _KINDS[kind]
    steps = ep.parse(epilogue)
    dtype, device = members[0].x2.dtype, members[0].x2.device
    kernel = codegen.load_kernel(template, epilogue)

    run = launcher(kernel, template, steps, members, add_member, uniform, floats, device, flags=_flags,
                   DTYPE=TL_DTYPE[dtype])

    max_d = max(m.x2.shape[1] for m in members)
    key = (kind, epilogue, dtype, next_pow2(max_d), next_pow2(uniform or len(members)))
    run(choose_config(key, configs(max_d), run))


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with unit stride along its last dim, as the layer-norm kernel reads rows."""
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def grouped_layer_norm(x, w, b, eps, epilogue, ext, scalars):
    """Layer norm over the last dim of each member (widths may differ), one launch."""
    op = "grouped_layer_norm"
    check_operands(op, epilogue, ext, scalars, check_lengths(op, x=x, w=w, b=b, eps=eps), stacked=False)
    for i, (xi, wi, bi) in enumerate(zip(x, w, b)):
        for name, t in (("weight", wi), ("bias", bi)):
            check(xi.dim() >= 1 and (t is None or tuple(t.shape) == (xi.shape[-1],)), op,
                  f"member {i}: {name} does not match x {tuple(xi.shape)}")
    steps = ep.parse(epilogue)
    members, ys = [], []
    for i, (xi, wi, bi, e) in enumerate(zip(x, w, b, eps)):
        y = torch.empty_like(xi, memory_format=torch.contiguous_format)
        tensors, member_scalars = ep.member_operands(steps, ext, scalars, i)
        members.append(_Member(_unit_stride(as_rows(xi)), _unit_stride(wi), _unit_stride(bi), as_rows(y), y.shape,
                               expand_operands(tensors, y.shape, y.dtype), [e, *member_scalars]))
        ys.append(y)
    _run("layer_norm", members, epilogue)
    return ys


def stacked_layer_norm(x, w, b, eps, epilogue, ext, scalars):
    """x [R, ..., D], w/b [R, D] or None, one eps for all members; members are views, one launch."""
    op = "stacked_layer_norm"
    check(x.dim() >= 2, op, f"x {tuple(x.shape)} is not a stack of [..., D] members")
    for name, t in (("weight", w), ("bias", b)):
        check(t is None or tuple(t.shape) == (x.shape[0], x.shape[-1]), op,
              f"{name} is not [{x.shape[0]}, {x.shape[-1]}]")
    check_operands(op, epilogue, ext, scalars, x.shape[0], stacked=True)
    steps = ep.parse(epilogue)
    R, D = x.shape[0], x.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = math.prod(x.shape[1:-1])
    x3, y3 = _unit_stride(x.reshape(R, rows, D)), y.view(R, rows, D)
    w, b = _unit_stride(w), _unit_stride(b)
    operands = stack_rows_operands(expand_operands(ext, y.shape, y.dtype), y.shape[1:])
    members = [
        _Member(x3[r], None if w is None else w[r], None if b is None else b[r], y3[r], y.shape[1:],
                [o[r] for o in operands], ())
        for r in range(min(R, 2))
    ]
    _, ns = ep.counts(steps)
    floats = [f for r in range(R) for f in (eps, *scalars[r * ns:(r + 1) * ns])]
    _run("layer_norm", members, epilogue, uniform=R, floats=floats)
    return y


def grouped_pointwise(x, epilogue, ext, scalars):
    """The epilogue chain alone on each member, into fresh outputs; one launch."""
    check_operands("grouped_pointwise", epilogue, ext, scalars, len(x), stacked=False)
    steps = ep.parse(epilogue)
    members, ys = [], []
    for i, xi in enumerate(x):
        y = torch.empty_like(xi, memory_format=torch.contiguous_format)
        tensors, member_scalars = ep.member_operands(steps, ext, scalars, i)
        members.append(_Member(as_rows(xi), None, None, as_rows(y), y.shape or (1,),
                               expand_operands(tensors, y.shape, y.dtype), member_scalars))
        ys.append(y)
    _run("pointwise", members, epilogue)
    return ys


def stacked_pointwise(x, epilogue, ext, scalars):
    """x [R, ...]: the epilogue chain on each member's slice, into one fresh tensor; one launch."""
    check(x.dim() >= 1, "stacked_pointwise", "x is 0-d, not a stack")
    check_operands("stacked_pointwise", epilogue, ext, scalars, x.shape[0], stacked=True)
    R = x.shape[0]
    D = x.shape[-1] if x.dim() > 1 else 1
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = math.prod(x.shape[1:-1]) if x.dim() > 1 else 1
    x3, y3 = x.reshape(R, rows, D), y.view(R, rows, D)
    member_shape = y.shape[1:] or (1,)
    operands = [o.reshape(R, *member_shape) for o in expand_operands(ext, y.shape, y.dtype)]
    operands = stack_rows_operands(operands, member_shape)
    members = [
        _Member(x3[r], None, None, y3[r], member_shape, [o[r] for o in operands], ())
        for r in range(min(R, 2))
    ]
    _run("pointwise", members, epilogue, uniform=R, floats=[float(s) for s in scalars])
    return y
