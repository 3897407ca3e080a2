"""Grouped GEMM in Triton: ``y_i = epilogue(x_i @ w_i^T + b_i)`` for members of any M, N, K in one launch.

Every member's sizes, addresses and strides sit in a per-call problem table
(kernels/triton_common.py), so members may differ in every shape and use
their own weights, and any subset of members with any batch sizes runs
through the same compiled kernel. Each program computes one BLOCK_M x
BLOCK_N tile of one member's output: it reads its member from the tile table
(one load), walks K in BLOCK_K steps with fp32 accumulation, adds the bias,
runs the epilogue chain and stores in the input dtype.

``stacked_linear`` is the same kernel over views of the stacked tensors (no
copies of weights), with a uniform table.
"""

from __future__ import annotations

import functools
import math
import threading
import types

import torch
import triton

from . import codegen
from . import epilogue as ep
from .launch import Stack
from .triton_common import (TL_DTYPE, Launch, RowsMember, as_rows, cdiv, check, check_lengths, check_operands,
                            choose_config, device_arch, dot_precision, expand_operands, launcher, math_of,
                            next_pow2, operand_columns, pick_config, rows_layout, sm_count, stack_rows_operands,
                            vec_width)

GEMM = codegen.KernelTemplate(
    kind="gemm",
    kernel="_grouped_gemm_kernel",
    columns=("tile0", "M", "N", "K", "x", "sxm", "sxk", "w", "swn", "swk", "b", "sb", "y", "sym", "inner", "splits"),
    source='''
    @triton.jit
    def _grouped_gemm_kernel(
        table_ptr,  # int64 [members, $NCOLS]: one problem per row (columns listed above)
        tile_ptr,  # int64 [tiles]: the table row of the member that owns each tile
        float_ptr,  # float64 [members, $NFLOAT]: the members' epilogue scalars
        DTYPE: tl.constexpr,  # element type of x, w, b, y and the epilogue tensors
        IDX: tl.constexpr,  # offset type: tl.int32 (half the registers) unless a member spans 2**31 elements
        K_CONTIGUOUS: tl.constexpr,  # every member's x and w have unit stride along K
        VEC: tl.constexpr,  # 16 bytes in elements where the host found every member aligned, else 1
        INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 ("ieee" or "tf32"), None otherwise
        SPLIT: tl.constexpr,  # 0: one pass; split-K (triton_gemm.split_k): 1, the fp32 partial sums of one K
        #   slice into the workspace at the y column, [splits, M, N]; 2, those partials (the x column)
        #   summed in split order, then bias, epilogue, store
        BLOCK_M: tl.constexpr,  # output rows per tile
        BLOCK_N: tl.constexpr,  # output columns per tile
        BLOCK_K: tl.constexpr,  # reduction step
    ):
        pid = tl.program_id(0)
        member = tl.load(tile_ptr + pid)
        prob = table_ptr + member * $NCOLS
        # VEC > 1 promises (checked on the host, triton_common.aligned): N, K, the row strides
        # multiples of VEC and x, w, y 16-byte aligned, so rows load as 16-byte vectors
        M = tl.load(prob + $M).to(tl.int32)
        N = tl.multiple_of(tl.load(prob + $N).to(tl.int32), VEC)
        K = tl.multiple_of(tl.load(prob + $K).to(tl.int32), VEC)

        # this program's tile of the member's output, row-major over tiles
        local = (pid - tl.load(prob + $tile0)).to(tl.int32)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k0 = 0
        k1 = K
        if SPLIT == 1:
            # split-major: programs that start together read one K slice of x and w
            tiles_mn = tl.cdiv(M, BLOCK_M) * tiles_n
            part = local // tiles_mn
            local = local - part * tiles_mn
            k_len = tl.cdiv(tl.cdiv(K, tl.load(prob + $splits).to(tl.int32)), BLOCK_K) * BLOCK_K
            k0 = part * k_len
            k1 = tl.minimum(K, k0 + k_len)  # the last slice is shorter (or empty: its partial is 0)
        offs_m = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N

        if K_CONTIGUOUS:
            sxk = 1
            swk = 1
        else:
            sxk = tl.load(prob + $sxk).to(IDX)
            swk = tl.load(prob + $swk).to(IDX)
        sxm = tl.multiple_of(tl.load(prob + $sxm).to(IDX), VEC)
        swn = tl.multiple_of(tl.load(prob + $swn).to(IDX), VEC)
        x_ptr = tl.multiple_of(tl.load(prob + $x).to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
        w_ptr = tl.multiple_of(tl.load(prob + $w).to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
        x_offs = offs_m[:, None] * sxm + offs_k[None, :] * sxk
        w_offs = offs_k[:, None] * swk + offs_n[None, :] * swn
        mask = m_mask[:, None] & n_mask[None, :]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SPLIT == 2:
            # fixed order, no atomics: the same sum whatever order the partial programs ran in
            ws_ptr = tl.multiple_of(tl.load(prob + $x).to(tl.pointer_type(tl.float32)), 16 if VEC > 1 else 1)
            ws_offs = offs_m[:, None] * sxm + offs_n[None, :]
            for part in range(0, tl.load(prob + $splits).to(tl.int32)):
                acc += tl.load(ws_ptr + part * (M * sxm) + ws_offs, mask=mask, other=0.0)
        else:
            x_ptr += k0 * sxk
            w_ptr += k0 * swk
            for k in range(k0, k1, BLOCK_K):
                k_mask = offs_k < k1 - k
                a = tl.load(x_ptr + x_offs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(w_ptr + w_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                x_ptr += BLOCK_K * sxk
                w_ptr += BLOCK_K * swk

        sym = tl.multiple_of(tl.load(prob + $sym).to(IDX), VEC)
        if SPLIT == 1:
            ws_ptr = tl.multiple_of(tl.load(prob + $y).to(tl.pointer_type(tl.float32)), 16 if VEC > 1 else 1)
            tl.store(ws_ptr + part * (M * sym) + offs_m[:, None] * sym + offs_n[None, :], acc, mask=mask)
        else:
            y = _with_bias(acc, prob, $b, $sb, offs_n, n_mask, DTYPE, IDX)

            inner = tl.load(prob + $inner).to(tl.int32)
            ep_outer = (offs_m // inner)[:, None]
            ep_inner = (offs_m % inner)[:, None]
            ep_col = offs_n[None, :]
            #@epilogue

            y_ptr = tl.multiple_of(tl.load(prob + $y).to(tl.pointer_type(DTYPE)), 16 if VEC > 1 else 1)
            tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :], y.to(DTYPE), mask=mask)
    ''',
)


@functools.lru_cache(maxsize=None)
def gemm_configs(arith: str, arch: int | None, vector: bool = True) -> tuple[triton.Config, ...]:
    """Tile shapes per arithmetic (``math_of``: fp32, tf32, fp16, bf16), compute capability and
    load width, largest first, the small-M ones last; ``pick_config`` chooses, a warm-up tunes.

    Each compiles for sm_80 and sm_90 with 0 spills (``stfuse kernels``, RESULTS.md).
    ``vector``: x and w load as 16-byte vectors (VEC > 1), through cp.async, so tiles pipeline
    3-4 stages deep. Unaligned members load scalars held in registers until the dot: there
    128x128 tiles and 3 stages spilled up to 900 bytes, so smaller tiles and 2 stages.
    fp32 without tf32 has no tensor cores: its 64x128 FMA tile takes 8 warps (4 spilled).
    """
    if arch is None:
        # The interpreter runs every program in numpy: 16 is the smallest tl.dot
        # tile on GPUs, and keeps the tests' odd shapes at a few programs each.
        return (triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), num_warps=1, num_stages=1),)
    if vector:
        bk = 64 if arith in ("fp16", "bf16") else 32
        mid_warps = 8 if arith == "fp32" else 4
        shapes = ((128, 128, bk, 8, 3), (128, 64, bk, 4, 4), (64, 128, bk, mid_warps, 4), (64, 64, bk, 4, 4),
                  (32, 64, bk, 4, 4), (16, 64, bk, 4, 4))  # the last two: small M, a few rows per member
    else:
        # fp32 FMA tiles hold more: at BLOCK_K=32, 128x64 and 64x64 spilled ~100 bytes (K strided, sm_80)
        bk = 16 if arith == "fp32" else 32
        shapes = ((128, 64, bk, 8, 2), (64, 64, bk, 4, 2), (32, 64, 32, 4, 2), (16, 64, 32, 4, 2))
    return tuple(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                 for bm, bn, bk, w, st in shapes)


# Split-K (``split_k``): where a launch's tiles fill well under the SMs (R=1 of the paper's
# GEMM, M=256, N=128, K=1152: 8 tiles of 64x64 for an H100's 132 SMs, one cuBLAS call would
# fill them), K is cut into slices run by separate programs. Deterministic by construction:
# each slice's fp32 partial sums go to a workspace (SPLIT=1), and a second launch (SPLIT=2)
# adds them in slice order and runs bias, epilogue and store; no float atomics.
MIN_SPLIT_STEPS = 4  # BLOCK_K steps per slice at least: the 3-4 stage cp.async pipeline stays full
MAX_SPLITS = 16  # the reduce pass reads splits x M x N fp32: past this it costs more than it frees
SPLIT_FILL = 2  # split only where the tiles fill fewer than 1/SPLIT_FILL of the SMs


SPLIT_MAX_TILE = 128 * 64  # BLOCK_M x BLOCK_N: split-K is for few tiles, so never the largest
# (and fp32's 128x128 partial pass spilled 8 bytes on sm_80; ``stfuse kernels``)


def split_configs(configs) -> tuple[triton.Config, ...]:
    """The configs of ``gemm_configs`` a split-K partial pass may run with."""
    return tuple(c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= SPLIT_MAX_TILE)


def split_k(tiles: int, K: int, block_k: int, sms: int) -> int:
    """K slices for a launch of ``tiles`` output tiles on ``sms`` SMs (``sm_count``: the
    device's own on CUDA): 1 unless the tiles fill under half the SMs; then enough slices to
    fill them, each at least MIN_SPLIT_STEPS BLOCK_K steps, at most MAX_SPLITS."""
    if tiles == 0 or tiles * SPLIT_FILL > sms:
        return 1
    return max(1, min(sms // tiles, K // (MIN_SPLIT_STEPS * block_k), MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def reduce_config(arch: int | None) -> triton.Config:
    """The tile of the split-K reduce pass (SPLIT=2): no dot, so no stages; BLOCK_K is unused.
    32x64 fp32 tiles: more programs than 64x64 for the few tiles split-K runs on."""
    if arch is None:
        return triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), num_warps=1, num_stages=1)
    return triton.Config(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16), num_warps=4, num_stages=1)


_Member = RowsMember


def _add_member(launch: Launch, m: _Member, cfg: triton.Config, splits: int = 1, phase: int = 0) -> None:
    """``phase``: the SPLIT constexpr; split-K members carry the workspace as y (1) or x (2)."""
    if phase == 2:  # x: the partials [splits * M, N]; w: none
        (M, N), K = m.y2.shape, 0
    else:
        (M, K), N = m.x2.shape, m.w.shape[0]
    tiles = cdiv(M, cfg.kwargs["BLOCK_M"]) * cdiv(N, cfg.kwargs["BLOCK_N"]) * (splits if phase == 1 else 1)
    if tiles == 0:
        return
    inner, views = rows_layout(m.y_shape, m.operands)
    launch.keep.extend(views)
    launch.add(
        tiles, m.floats,
        M=M, N=N, K=K,
        x=m.x2.data_ptr(), sxm=m.x2.stride(0), sxk=m.x2.stride(1),
        w=0 if m.w is None else m.w.data_ptr(), swn=0 if m.w is None else m.w.stride(0),
        swk=0 if m.w is None else m.w.stride(1),
        b=0 if m.b is None else m.b.data_ptr(), sb=0 if m.b is None else m.b.stride(0),
        y=m.y2.data_ptr(), sym=m.y2.stride(0),
        inner=inner, splits=splits, **operand_columns(views),
    )


def _flags(members: list[_Member]) -> dict:
    """Constexprs from the members' strides (once per plan): K_CONTIGUOUS, and the VEC that N,
    K and the row strides allow (vector loads along K need it contiguous)."""
    k_contiguous = all((m.x2.shape[1] <= 1 or (m.x2.stride(1) == 1 and m.w.stride(1) == 1)) for m in members)
    dims = [d for m in members for d in (m.x2.shape[1], m.w.shape[0], m.x2.stride(0), m.w.stride(0), m.y2.stride(0))]
    vec = vec_width(members[0].x2.dtype, *dims) if k_contiguous else 1
    return dict(K_CONTIGUOUS=k_contiguous, VEC=vec)


def _reduce_flags(members: list[_Member]) -> dict:
    """The split-K reduce pass's constexprs: it reads the partials and writes y, rows of N."""
    dims = [d for m in members for d in (m.y2.shape[1], m.x2.stride(0), m.y2.stride(0))]
    return dict(K_CONTIGUOUS=True, VEC=vec_width(members[0].y2.dtype, *dims))


def _run(members, epilogue: str, dtype: torch.dtype, device: torch.device, sizes: tuple[int, int, int],
         uniform: int | None = None, floats=None):
    """Launch the grouped GEMM over ``members`` (a list, or a ``launch.Stack`` with
    ``uniform=R`` and ``floats`` all R members' scalars); ``sizes``: the largest M, N, K.
    Returns the launch (``launch.launcher``'s ``prepare``): kernels/arena.py launches it
    again while the members stay where they are."""
    steps = ep.parse(epilogue)
    kernel = codegen.load_kernel(GEMM, epilogue)
    # fp32 follows torch's own switch for matmuls (off by default: exact fp32, no tensor cores)
    arith, dtypes = _arith(dtype, torch.backends.cuda.matmul.allow_tf32)
    run = launcher(kernel, GEMM, steps, members, _add_member, uniform, floats, device, flags=_flags, SPLIT=0,
                   **dtypes)

    configs, default, key, splits = _choice(epilogue, arith, device, run.consts["VEC"] > 1, sizes,
                                            uniform or len(members))
    if splits is None:  # no config splits K at these sizes: the one-pass launch
        launch = run.prepare(choose_config(key, configs, run, default))
    else:
        def prepare(cfg: triton.Config):
            n = splits[id(cfg)]
            if n == 1:
                return run.prepare(cfg)
            return _split_launch(members, epilogue, device, uniform, floats, cfg, reduce_config(device_arch(device)),
                                 n, dtypes)
        launch = prepare(choose_config(key, configs, types.SimpleNamespace(prepare=prepare), default))
    launch()
    return launch


@functools.lru_cache(maxsize=None)
def _arith(dtype: torch.dtype, allow_tf32: bool) -> tuple[str, dict]:
    """(``math_of``, the dtype constexprs) of a launch in ``dtype``."""
    arith = math_of(dtype, allow_tf32)
    return arith, dict(DTYPE=TL_DTYPE[dtype], INPUT_PRECISION=dot_precision(dtype, arith == "tf32"))


@functools.lru_cache(maxsize=4096)
def _choice(epilogue: str, arith: str, device: torch.device, vector: bool, sizes: tuple[int, int, int],
            count: int) -> tuple[tuple[triton.Config, ...], int, tuple, dict | None]:
    """(the configs, the heuristic's pick, the tuning key, each config's K slices by id, or None
    where none splits) of a launch: fixed by its sizes, so worked out once per size (about 1 us
    of host work per call)."""
    max_m, max_n, max_k = sizes
    sms = sm_count(device)
    configs = gemm_configs(arith, device_arch(device), vector)

    def tiles(c: triton.Config) -> int:
        return count * cdiv(max_m, c.kwargs["BLOCK_M"]) * cdiv(max_n, c.kwargs["BLOCK_N"])

    default = pick_config(configs, max_m, tiles, sms)
    key = ("gemm", epilogue, arith, vector, max_m <= 64, next_pow2(max_n), next_pow2(max_k), next_pow2(count))
    # split-K for aligned members only (the unaligned path is the slow one anyway)
    splittable = split_configs(configs) if vector else ()
    splits = {id(c): split_k(tiles(c), max_k, c.kwargs["BLOCK_K"], sms) if c in splittable else 1 for c in configs}
    return configs, default, key, splits if any(n > 1 for n in splits.values()) else None


# (thread, device, stream) -> its split-K workspace: one address call after call, so the two
# passes' launch plans find their tables as they are (a fresh workspace per call moved it:
# stacked R=1 host work 61 against ~30 us, bench_host_overhead.py, launch stubbed, loaded CPU).
# Per thread and stream: launches queued on one stream run in order, so a call's partial pass
# never overwrites partials the last call's reduce pass has yet to read.
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """``numel`` fp32 for split-K partials: fresh while a CUDA graph captures (its pool keeps
    them for the graph), else this thread and stream's cached buffer, grown as needed."""
    cuda = device.type == "cuda"
    if cuda and torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    key = (threading.get_ident(), device, torch.cuda.current_stream(device).cuda_stream if cuda else None)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.numel() < numel:
        if len(_WORKSPACES) >= 64:
            _WORKSPACES.clear()
        ws = _WORKSPACES[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return ws[:numel]


def _split_launch(members, epilogue: str, device: torch.device, uniform, floats, cfg: triton.Config,
                  reduce_cfg: triton.Config, splits: int, consts: dict):
    """The split-K launch of ``members`` (as ``_run`` takes them): a fp32 workspace of
    ``splits`` partial [M, N] sums per member, the partial launch (SPLIT=1, with ``cfg``,
    no epilogue) into it and the reduce launch (SPLIT=2, with ``reduce_cfg``) out of it,
    as one function with the launch attributes kernels/arena.py reads (``reusable``,
    ``now``, ``moved``); it holds its workspace (``_workspace``)."""
    if isinstance(members, Stack):  # the stack's tensors: x3 [R, rows, K], w, b, y3 [R, rows, N], operands
        x3, w, b, y3, *ops = members.tensors
        R, rows, N = y3.shape
        ws = _workspace(R * splits * rows * N, device).view(R, splits * rows, N)
        shape = members.extra[1:]
        first = Stack((x3, w, None, ws), ("partial", splits), lambda: [
            _Member(x3[r], w[r], None, ws[r], ws.shape[1:], (), ()) for r in range(min(R, 2))])
        second = Stack((ws, None, b, y3, *ops), (members.extra, splits), lambda: [
            _Member(ws[r], None, None if b is None else b[r], y3[r], shape, [o[r] for o in ops], ())
            for r in range(min(R, 2))])
    else:
        # one allocation, each member's partials 16-byte aligned (4 fp32)
        sizes = [cdiv(splits * m.y2.shape[0] * m.y2.shape[1], 4) * 4 for m in members]
        ws = _workspace(sum(sizes), device)
        views, at = [], 0
        for m, n in zip(members, sizes):
            views.append(ws[at:at + splits * m.y2.numel()].view(splits * m.y2.shape[0], m.y2.shape[1]))
            at += n
        first = [_Member(m.x2, m.w, None, v, v.shape, (), ()) for m, v in zip(members, views)]
        second = [_Member(v, None, m.b, m.y2, m.y_shape, m.operands, m.floats) for m, v in zip(members, views)]
    partial = launcher(codegen.load_kernel(GEMM, ""), GEMM, (), first,
                       functools.partial(_add_member, splits=splits, phase=1), uniform, [] if uniform else None,
                       device, flags=_flags, SPLIT=1, **consts)
    reduce = launcher(codegen.load_kernel(GEMM, epilogue), GEMM, ep.parse(epilogue), second,
                      functools.partial(_add_member, splits=splits, phase=2), uniform, floats, device,
                      flags=_reduce_flags, SPLIT=2, **consts)
    return _pair(partial.prepare(cfg), reduce.prepare(reduce_cfg), ws)


def _pair(first, second, ws):
    """``first`` then ``second`` as one launch (``launch._launch_of``'s attributes); a move of
    the inputs (``moved``) moves the first only: the second reads the workspace."""
    def launch_now() -> None:
        first()
        second()

    def moved(now):
        again = first.moved(now)
        return None if again is None else _pair(again, second, ws)

    launch_now.reusable = first.reusable and second.reusable
    launch_now.now, launch_now.moved, launch_now.workspace = first.now, moved, ws
    return launch_now


def grouped_linear(x, w, b, epilogue, ext, scalars, out=None, plan=None):
    """y_i = epilogue(x_i @ w_i^T + b_i); x_i [..., K_i], w_i [N_i, K_i], one launch.

    ``out``: the outputs, allocated by the caller (kernels/arena.py's planned outputs),
    else new. ``plan``: a list that receives the launch, to launch again (arena.py)."""
    op = "grouped_linear"
    check_operands(op, epilogue, ext, scalars, check_lengths(op, x=x, w=w, b=b), stacked=False)
    for i, (xi, wi, bi) in enumerate(zip(x, w, b)):
        # messages formatted only on failure: this is the per-call path
        if not (xi.dim() >= 1 and wi.dim() == 2 and xi.shape[-1] == wi.shape[1]):
            check(False, op, f"member {i}: x {tuple(xi.shape)} does not match w {tuple(wi.shape)}")
        if not (bi is None or bi.shape == wi.shape[:1]):
            check(False, op, f"member {i}: bias is not [{wi.shape[0]}]")

    nt, ns = ep.counts(ep.parse(epilogue))
    members, ys = [], []
    max_m = max_n = max_k = 0
    for i, (xi, wi, bi) in enumerate(zip(x, w, b)):
        y = xi.new_empty(*xi.shape[:-1], wi.shape[0]) if out is None else out[i]
        x2, y2 = as_rows(xi), as_rows(y)
        operands = expand_operands(ext[i * nt:(i + 1) * nt], y.shape, y.dtype) if nt else ()
        members.append(_Member(x2, wi, bi, y2, y.shape, operands, scalars[i * ns:(i + 1) * ns]))
        ys.append(y)
        max_m, max_n, max_k = max(max_m, x2.shape[0]), max(max_n, y2.shape[1]), max(max_k, x2.shape[1])
    if members:
        launch = _run(members, epilogue, members[0].x2.dtype, members[0].x2.device, (max_m, max_n, max_k))
        if plan is not None:
            plan.append(launch)
    return ys


def stacked_linear(x, w, b, epilogue, ext, scalars):
    """x [R, ..., K], w [R, N, K], b [R, N] or None -> [R, ..., N]; members are views, one launch."""
    op = "stacked_linear"
    # messages formatted only on failure: this is the per-call path
    if not (x.dim() >= 2 and w.dim() == 3 and x.shape[0] == w.shape[0] and x.shape[-1] == w.shape[2]):
        check(False, op, f"x {tuple(x.shape)} does not match w {tuple(w.shape)}")
    if not (b is None or b.shape == w.shape[:2]):
        check(False, op, f"bias is not {list(w.shape[:2])}")
    check_operands(op, epilogue, ext, scalars, x.shape[0], stacked=True)

    R, K, N = x.shape[0], x.shape[-1], w.shape[1]
    y = x.new_empty(*x.shape[:-1], N)
    rows = math.prod(x.shape[1:-1])
    x3, y3 = x.reshape(R, rows, K), y.view(R, rows, N)
    operands = stack_rows_operands(expand_operands(ext, y.shape, y.dtype), y.shape[1:])

    def members():
        return [_Member(x3[r], w[r], None if b is None else b[r], y3[r], y.shape[1:], [o[r] for o in operands], ())
                for r in range(min(R, 2))]
    if R:
        stack = Stack((x3, w, b, y3, *operands), tuple(y.shape), members)
        _run(stack, epilogue, x.dtype, x.device, (rows, N, K), uniform=R, floats=[float(s) for s in scalars])
    return y
