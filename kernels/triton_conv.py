"""Grouped conv2d in Triton as implicit GEMM: members of any shape, stride, padding, dilation and groups.

Member i is ``epilogue(conv2d(x_i, w_i, b_i, ...))``. For each of its channel
groups g the conv is a GEMM with rows (image, output pixel), columns the
group's output channels and reduction (input channel, kernel row, kernel
column), read straight from x with the padding as masked loads: no im2col
buffer. Each program computes one BLOCK_M x BLOCK_N tile of one (member,
channel group); the table holds every member's sizes, conv parameters,
addresses and strides, so x and w are read in place, whatever their strides.

Depthwise convs (one output channel per group) use 1/BLOCK_N of each tile;
they are correct but not fast here.
"""

from __future__ import annotations

import functools

import torch
import triton

from . import codegen
from . import epilogue as ep
from .triton_common import (TL_DTYPE, Launch, cdiv, check, check_lengths, check_operands, choose_config,
                            device_arch, dot_precision, expand_operands, launcher, math_of, next_pow2,
                            operand_columns, pick_config, sm_count, try_view, vec_width)

CONV = codegen.KernelTemplate(
    kind="conv",
    kernel="_grouped_conv2d_kernel",
    columns=("tile0", "B", "C", "H", "W", "O", "KH", "KW", "HO", "WO", "SH", "SW", "PH", "PW", "DH", "DW",
             "x", "sxb", "sxc", "sxh", "sxw", "w", "swo", "swc", "swh", "sww", "b", "sb", "y", "syb", "syo"),
    source='''
    @triton.jit
    def _grouped_conv2d_kernel(
        table_ptr,  # int64 [members, $NCOLS]: one conv per row; C and O are per channel group
        tile_ptr,  # int64 [tiles]: the table row of the member that owns each tile
        float_ptr,  # float64 [members, $NFLOAT]: the members' epilogue scalars
        DTYPE: tl.constexpr,  # element type of x, w, b, y and the epilogue tensors
        IDX: tl.constexpr,  # offset type: tl.int32 (half the registers) unless a member spans 2**31 elements
        X_C_UNIT: tl.constexpr,  # every member's x has unit stride over channels (channels_last)
        W_C_UNIT: tl.constexpr,  # every member's w has unit stride over input channels (1x1 or channels_last)
        VEC: tl.constexpr,  # 16 bytes in elements where the host found x, w aligned for vector loads, else 1
        INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 ("ieee" or "tf32"), None otherwise
        BLOCK_M: tl.constexpr,  # output pixels (over all images) per tile
        BLOCK_N: tl.constexpr,  # output channels per tile
        BLOCK_K: tl.constexpr,  # reduction step over (input channel, kernel row, kernel column)
    ):
        pid = tl.program_id(0)
        member = tl.load(tile_ptr + pid)
        prob = table_ptr + member * $NCOLS
        B = tl.load(prob + $B).to(tl.int32)
        C = tl.multiple_of(tl.load(prob + $C).to(tl.int32), VEC)
        H = tl.load(prob + $H).to(tl.int32)
        W = tl.load(prob + $W).to(tl.int32)
        O = tl.load(prob + $O).to(tl.int32)
        KH = tl.load(prob + $KH).to(tl.int32)
        KW = tl.load(prob + $KW).to(tl.int32)
        WO = tl.load(prob + $WO).to(tl.int32)
        P = tl.load(prob + $HO).to(tl.int32) * WO
        M = B * P

        # this program's channel group and tile, row-major over tiles within a group
        local = (pid - tl.load(prob + $tile0)).to(tl.int32)
        tiles_n = tl.cdiv(O, BLOCK_N)
        per_group = tl.cdiv(M, BLOCK_M) * tiles_n
        grp = local // per_group
        rest = local % per_group
        offs_m = (rest // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (rest % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < O

        # each row's image and output pixel, and where its receptive field starts
        img = offs_m // P
        pix = offs_m % P
        ih0 = (pix // WO) * tl.load(prob + $SH).to(tl.int32) - tl.load(prob + $PH).to(tl.int32)
        iw0 = (pix % WO) * tl.load(prob + $SW).to(tl.int32) - tl.load(prob + $PW).to(tl.int32)
        DH = tl.load(prob + $DH).to(tl.int32)
        DW = tl.load(prob + $DW).to(tl.int32)
        oc = grp * O + offs_n

        # VEC > 1 promises, for x if X_C_UNIT and for w if W_C_UNIT: a 16-byte aligned address,
        # every other stride and C multiples of VEC (triton_conv._flags); the hints say so
        x_ptr = tl.multiple_of(tl.load(prob + $x).to(tl.pointer_type(DTYPE)), (16 if VEC > 1 else 1) if X_C_UNIT else 1)
        w_ptr = tl.multiple_of(tl.load(prob + $w).to(tl.pointer_type(DTYPE)), (16 if VEC > 1 else 1) if W_C_UNIT else 1)
        sxb = tl.multiple_of(tl.load(prob + $sxb).to(IDX), VEC if X_C_UNIT else 1)
        sxh = tl.multiple_of(tl.load(prob + $sxh).to(IDX), VEC if X_C_UNIT else 1)
        sxw = tl.multiple_of(tl.load(prob + $sxw).to(IDX), VEC if X_C_UNIT else 1)
        swo = tl.multiple_of(tl.load(prob + $swo).to(IDX), VEC if W_C_UNIT else 1)
        swh = tl.multiple_of(tl.load(prob + $swh).to(IDX), VEC if W_C_UNIT else 1)
        sww = tl.multiple_of(tl.load(prob + $sww).to(IDX), VEC if W_C_UNIT else 1)
        sxc = 1 if X_C_UNIT else tl.load(prob + $sxc).to(IDX)
        swc = 1 if W_C_UNIT else tl.load(prob + $swc).to(IDX)
        x_rows = img * sxb + (grp * C) * sxc
        w_cols = oc * swo

        # The reduction walks kernel positions (r, s) and, within each, BLOCK_K input channels:
        # one flat loop (so Triton pipelines it) whose row offsets and padding masks are 1-d,
        # instead of a gather over (c, r, s) that kept a BLOCK_M x BLOCK_K address tile live
        # (255 registers and up to 12 KB of spills per thread; RESULTS.md).
        c_steps = tl.cdiv(C, BLOCK_K)
        offs_c = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, KH * KW * c_steps):
            rs = step // c_steps
            c = (step - rs * c_steps) * BLOCK_K + offs_c
            r = rs // KW
            s = rs - r * KW
            ih = ih0 + r * DH
            iw = iw0 + s * DW
            row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_mask = c < C
            a = tl.load(x_ptr + (x_rows + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                        mask=row_ok[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(w_ptr + w_cols[None, :] + (r * swh + s * sww + c * swc)[:, None],
                        mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        y = _with_bias(acc, prob, $b, $sb, oc, n_mask, DTYPE, IDX)

        mask = m_mask[:, None] & n_mask[None, :]
        ep_outer = img[:, None]
        ep_inner = pix[:, None]
        ep_col = oc[None, :]
        #@epilogue

        y_ptr = tl.load(prob + $y).to(tl.pointer_type(DTYPE))
        y_offs = (img[:, None] * tl.load(prob + $syb).to(IDX) + oc[None, :] * tl.load(prob + $syo).to(IDX)
                  + pix[:, None])
        tl.store(y_ptr + y_offs, y.to(DTYPE), mask=mask)
    ''',
)


@functools.lru_cache(maxsize=None)
def conv_configs(arith: str, arch: int | None, vector: bool) -> tuple[triton.Config, ...]:
    """Tile shapes per arithmetic (``math_of``), compute capability and x layout, largest
    first; ``pick_config`` chooses, a warm-up tunes. ``vector``: x has unit channel stride
    (channels_last) and is aligned, so its tiles load as 16-byte vectors with cp.async and
    pipeline 3 stages; otherwise x is a gather of scalars held in registers until the dot,
    and 2 stages with 8 warps for the larger tiles keep it at 0 spills (4 warps and 3 stages
    spilled up to 5 KB per thread; ``stfuse kernels``, RESULTS.md). fp16/bf16 take the scalar
    shapes only where their channels per group are not a multiple of 8 (``vector_x``).
    """
    if arch is None:
        return (triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), num_warps=1, num_stages=1),)
    if vector and arith in ("fp32", "tf32"):  # 4-byte elements: BLOCK_K=64 spilled up to 18 KB (fp32 FMA)
        shapes = ((128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3))
    elif vector:
        shapes = ((128, 64, 32, 8, 3), (64, 64, 64, 4, 3), (128, 32, 64, 4, 3), (32, 64, 64, 4, 3))
    else:
        bk = 16 if arith == "fp32" else 32  # fp32 64x128 at BLOCK_K=32 spilled 112 bytes on sm_80
        shapes = ((64, 128, bk, 8, 2), (64, 64, 32, 8, 2), (32, 64, 32, 4, 2))
    return tuple(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                 for bm, bn, bk, w, st in shapes)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class _Member:
    """One conv of a launch; ``y`` is its fresh [B, O, Ho, Wo] output with (Ho, Wo) contiguous."""

    __slots__ = ("x", "w", "b", "y", "params", "groups", "operands", "floats")

    def __init__(self, x, w, b, y, params, groups, operands, floats):
        self.x, self.w, self.b, self.y = x, w, b, y
        self.params, self.groups = params, groups  # params: (sh, sw, ph, pw, dh, dw)
        self.operands, self.floats = operands, floats

    extra = property(lambda self: (self.params, self.groups))  # for the launch plan's signature


def _check_member(op: str, i, x, w, b, groups: int, hw) -> None:
    check(x.dim() == 4 and w.dim() == 4, op, f"member {i}: x {tuple(x.shape)} and w {tuple(w.shape)} are not 4-d")
    check(groups > 0 and x.shape[1] == w.shape[1] * groups and w.shape[0] % groups == 0, op,
          f"member {i}: x {tuple(x.shape)} and w {tuple(w.shape)} do not match groups={groups}")
    check(b is None or tuple(b.shape) == (w.shape[0],), op, f"member {i}: bias is not [{w.shape[0]}]")
    check(min(hw) > 0, op, f"member {i}: output size {tuple(hw)} is too small")


def _pixel_views(operands: list[torch.Tensor]) -> tuple[list[bool], list[torch.Tensor]]:
    """[B, O, Ho*Wo] views of operands expanded to a [B, O, Ho, Wo] output; copies where (Ho, Wo) won't merge."""
    views = [try_view(t, (t.shape[0], t.shape[1], t.shape[2] * t.shape[3])) for t in operands]
    fits = [v is not None for v in views]
    views = [v if v is not None else t.contiguous().flatten(2) for v, t in zip(views, operands)]
    return fits, views


def _add_member(launch: Launch, m: _Member, cfg: triton.Config) -> None:
    B, _, H, W = m.x.shape
    O, C, KH, KW = m.w.shape
    _, _, HO, WO = m.y.shape
    og = O // m.groups
    tiles = m.groups * cdiv(B * HO * WO, cfg.kwargs["BLOCK_M"]) * cdiv(og, cfg.kwargs["BLOCK_N"])
    if tiles == 0:
        return
    _, views = _pixel_views(m.operands)
    launch.keep.extend(views)
    sh, sw, ph, pw, dh, dw = m.params
    launch.add(
        tiles, m.floats,
        B=B, C=C, H=H, W=W, O=og, KH=KH, KW=KW, HO=HO, WO=WO, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        x=m.x.data_ptr(), sxb=m.x.stride(0), sxc=m.x.stride(1), sxh=m.x.stride(2), sxw=m.x.stride(3),
        w=m.w.data_ptr(), swo=m.w.stride(0), swc=m.w.stride(1), swh=m.w.stride(2), sww=m.w.stride(3),
        b=0 if m.b is None else m.b.data_ptr(), sb=0 if m.b is None else m.b.stride(0),
        y=m.y.data_ptr(), syb=m.y.stride(0), syo=m.y.stride(1),
        **operand_columns(views, col_dim=1),
    )


def _unit(t: torch.Tensor, dim: int) -> bool:
    return t.shape[dim] <= 1 or t.stride(dim) == 1


def _strides(t: torch.Tensor, dims=(0, 2, 3)) -> list[int]:
    """``t``'s strides over ``dims``, 0 where the dim has one element: its index is always 0
    there, so its stride (1 in a contiguous 1x1 weight [O, C, 1, 1]) promises nothing."""
    return [t.stride(d) if t.shape[d] > 1 else 0 for d in dims]


def _flags(members: list[_Member]) -> dict:
    """Constexprs from the members' strides (once per plan): which of x and w have unit
    channel stride, and the VEC their other strides and channel counts allow."""
    x_unit = all(_unit(m.x, 1) for m in members)
    w_unit = all(_unit(m.w, 1) for m in members)
    dims = [m.w.shape[1] for m in members]
    dims += [d for m in members for d in _strides(m.x)] if x_unit else []
    dims += [d for m in members for d in _strides(m.w)] if w_unit else []
    vec = vec_width(members[0].x.dtype, *dims) if x_unit or w_unit else 1
    return dict(X_C_UNIT=x_unit, W_C_UNIT=w_unit, VEC=vec)


# Half-precision x goes channels_last before the launch (``vector_x``). Why: with NCHW x
# the reduction over channels is a gather of 2-byte scalars, and cp.async copies at least
# 4 bytes, so an NCHW fp16/bf16 conv gets neither vector loads nor async copies: its x tile
# sits in registers until the dot (2 stages at most, smaller tiles to stay at 0 spills;
# conv_configs) and every tensor-core step waits on scalar loads. Channels_last x makes the
# BLOCK_K channels of a pixel 16 contiguous bytes: cp.async.cg 16-byte copies pipelined 3
# stages into shared memory, the tiles conv_configs(vector=True) gives. The price is one
# pass over x on the device (read 2 bytes, write 2 per element); the conv itself reads x
# KH*KW times per column of output-channel tiles and runs B*Ho*Wo*O*C*KH*KW*2 flops on it,
# so for the tensor-core convs this path serves (C >= 8 per group) the pass is a small
# fraction of the conv's own traffic; for a 1x1 conv with few output tiles it is closest
# to even, and bench_gpu_kernels / gpu_check.sh should time it there first. Not done:
# - fp32 (and tf32): 4-byte scalars already go through cp.async (``stfuse kernels``), so
#   the pass would buy vector width only; fp32 x keeps its layout;
# - channels per group not a multiple of 8 (a 3-channel stem, depthwise convs): no
#   16-byte vector fits a pixel's channels, so VEC stays 1 and the copy would buy nothing.
# Weights are repacked once, at binding (``repack_weights``), never per call; weights the
# program does not own (a loaded artifact's inputs) keep their layout (W_C_UNIT=0 unless 1x1).
_HALF = (torch.float16, torch.bfloat16)


def vector_x(dtype: torch.dtype, channels_per_group) -> bool:
    """Whether half-precision x is made channels_last for this launch (see above): fp16/bf16
    and every member's channels per group a multiple of the 16-byte vector."""
    return dtype in _HALF and all(c % 8 == 0 for c in channels_per_group)


def _vectorizable(x: torch.Tensor) -> bool:
    """Whether ``x`` [..., C, H, W] already has unit channel stride, 16-byte multiple strides
    and a 16-byte aligned address (its first element: members of a stack share the strides)."""
    n = x.dim()
    return (_unit(x, n - 3) and vec_width(x.dtype, *_strides(x, tuple(d for d in range(n) if d != n - 3))) > 1
            and x.data_ptr() % 16 == 0)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A conv weight [O, C/g, kh, kw] (or a stack [R, ...]) as binding keeps it on CUDA: fp16/bf16
    with a multiple of 8 channels per group, channels_last (``channels_last``); else ``w``."""
    return channels_last(w) if vector_x(w.dtype, [w.shape[-3]]) else w


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., C, H, W] (4-d, or a 5-d stack) in one copy with unit channel stride,
    every member channels_last; ``t`` itself where it already loads as vectors."""
    if _vectorizable(t):
        return t
    n = t.dim()
    return t.movedim(n - 3, n - 1).contiguous().movedim(n - 1, n - 3)


def _run(members: list[_Member], epilogue: str, uniform: int | None = None, floats=None) -> None:
    """Launch the grouped conv over ``members`` (``uniform``: as in triton_gemm._run)."""
    if not members:
        return
    steps = ep.parse(epilogue)
    dtype, device = members[0].x.dtype, members[0].x.device
    kernel = codegen.load_kernel(CONV, epilogue)
    # fp32 follows torch's switch for convolutions (cuDNN's, on by default: tf32 tensor cores)
    arith = math_of(dtype, torch.backends.cudnn.allow_tf32)
    run = launcher(kernel, CONV, steps, members, _add_member, uniform, floats, device, flags=_flags,
                   DTYPE=TL_DTYPE[dtype], INPUT_PRECISION=dot_precision(dtype, arith == "tf32"))

    count = uniform or len(members)
    max_m = max(m.y.shape[0] * m.y.shape[2] * m.y.shape[3] for m in members)
    max_n = max(m.w.shape[0] // m.groups for m in members)
    consts = run.consts  # the constexprs this launch will use (the same dict)
    if consts["VEC"] == 1:  # unit strides only matter for vector loads: one variant fewer to compile and check
        consts["X_C_UNIT"] = consts["W_C_UNIT"] = False
    vector = consts["X_C_UNIT"]
    configs = conv_configs(arith, device_arch(device), vector)
    default = pick_config(configs, max_m, lambda c: count * cdiv(max_m, c.kwargs["BLOCK_M"])
                          * cdiv(max_n, c.kwargs["BLOCK_N"]), sm_count(device))
    key = ("conv", epilogue, arith, vector, consts["W_C_UNIT"], max_m <= 64, next_pow2(max_n),
           next_pow2(max(m.w[0].numel() for m in members)), next_pow2(count))
    run(choose_config(key, configs, run, default))


def grouped_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars):
    """Members may differ in every shape and conv parameter; 2 ints per member in
    stride/padding/dilation, one in groups. One launch."""
    op = "grouped_conv2d"
    n = check_lengths(op, x=x, w=w, b=b, groups=groups)
    check(len(stride) == len(padding) == len(dilation) == 2 * n, op,
          f"stride, padding and dilation need 2 ints per member, got {len(stride)}, {len(padding)}, {len(dilation)}")
    check_operands(op, epilogue, ext, scalars, n, stacked=False)
    steps = ep.parse(epilogue)
    shapes = []  # per member: conv parameters, output size
    for i, (xi, wi, bi) in enumerate(zip(x, w, b)):
        params = (*stride[2 * i:2 * i + 2], *padding[2 * i:2 * i + 2], *dilation[2 * i:2 * i + 2])
        sh, sw, ph, pw, dh, dw = params
        hw = (_conv_out(xi.shape[2], wi.shape[2], sh, ph, dh), _conv_out(xi.shape[3], wi.shape[3], sw, pw, dw))
        _check_member(op, i, xi, wi, bi, groups[i], hw)
        shapes.append((params, hw))
    vector = n > 0 and vector_x(x[0].dtype, [wi.shape[1] for wi in w])
    members, ys = [], []
    for i, (xi, wi, bi, (params, hw)) in enumerate(zip(x, w, b, shapes)):
        xi = channels_last(xi) if vector else xi
        y = xi.new_empty(xi.shape[0], wi.shape[0], *hw)
        tensors, member_scalars = ep.member_operands(steps, ext, scalars, i)
        members.append(_Member(xi, wi, bi, y, params, groups[i],
                               expand_operands(tensors, y.shape, y.dtype), member_scalars))
        ys.append(y)
    _run(members, epilogue)
    return ys


def stacked_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars):
    """x [R, B, C, H, W], w [R, O, C/g, kh, kw] -> [R, B, O, Ho, Wo]; members are views, one launch.

    The output has the reference's layout (a [B, R, O, Ho, Wo] buffer seen
    through transpose(0, 1)), so that consumers see the same strides on
    either path.
    """
    op = "stacked_conv2d"
    check(x.dim() == 5 and w.dim() == 5 and x.shape[0] == w.shape[0], op,
          f"x {tuple(x.shape)} and w {tuple(w.shape)} are not stacks of one length")
    check_operands(op, epilogue, ext, scalars, x.shape[0], stacked=True)
    R, B, _, H, W = x.shape
    O, KH, KW = w.shape[1], w.shape[3], w.shape[4]
    params = (*stride, *padding, *dilation)
    hw = (_conv_out(H, KH, stride[0], padding[0], dilation[0]), _conv_out(W, KW, stride[1], padding[1], dilation[1]))
    _check_member(op, "of the stack", x[0], w[0], None if b is None else b[0], groups, hw)
    check(b is None or tuple(b.shape) == (R, O), op, f"bias is not [{R}, {O}]")
    y = x.new_empty(B, R, O, *hw).transpose(0, 1)
    x = channels_last(x) if vector_x(x.dtype, [w.shape[2]]) else x
    operands = expand_operands(ext, y.shape, y.dtype)
    if R > 0:
        # copy an operand whole rather than per member, to keep member addresses affine in r
        fits, _ = _pixel_views([o[0] for o in operands])
        operands = [o if fit else o.contiguous() for o, fit in zip(operands, fits)]
    members = [
        _Member(x[r], w[r], None if b is None else b[r], y[r], params, groups, [o[r] for o in operands], ())
        for r in range(min(R, 2))
    ]
    _run(members, epilogue, uniform=R, floats=[float(s) for s in scalars])
    return y
