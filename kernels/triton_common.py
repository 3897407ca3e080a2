"""Host-side pieces shared by the Triton launchers: dtypes, checks, epilogue operands, configs.

A launch is described by tables (kernels/launch.py builds them, once per member
signature, and keeps them on the device):

- the problem table, one int64 row per member with work: sizes, addresses and
  strides (columns from ``codegen.table_columns``), and ``tile0``, the
  member's first tile;
- the tile table, one int64 per program: the row of the member that owns the
  tile, so a program finds its member with one load and no search.

Members of a stacked op are views of one tensor, so every column is affine in
the member index; ``Launch.extend_uniform`` builds their rows from the first
two with one multiply-add instead of R Python-level row builds.

Config lists come from a named function per kernel, keyed by ``math_of`` (the
arithmetic: fp32, tf32, fp16, bf16), the compute capability (``device_arch``)
and whether loads are vectors (``vec_width``); ``pick_config`` is the heuristic
choice where no warm-up tuned one (docs/cuda.md).
"""

from __future__ import annotations

import functools
import math
import operator
import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from stfuse.errors import InputError

from . import epilogue as ep
from .launch import Launch, choose_config, launch_options, launcher, tuning  # noqa: F401 - re-exported

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supported(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether the Triton kernels take these inputs: one device, one dtype among TL_DTYPE."""
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    dtype, device = present[0].dtype, present[0].device
    return dtype in TL_DTYPE and all(t.dtype == dtype and t.device == device for t in present)


def check(ok: bool, op: str, message: str) -> None:
    """Refuse input the kernels would read out of bounds: as InputError, naming the op."""
    if not ok:
        raise InputError(f"stfuse::{op}: {message}")


def check_operands(op: str, epilogue: str, ext, scalars, members: int, stacked: bool) -> None:
    """The epilogue operand counts: per member (grouped, flat member-major) or per step (stacked)."""
    n_tensor, n_scalar = ep.counts(ep.parse(epilogue))
    want = n_tensor if stacked else n_tensor * members
    if len(ext) != want:  # messages formatted only on failure (every call comes here)
        check(False, op, f"epilogue {epilogue!r} takes {want} tensors here, got {len(ext)}")
    if len(scalars) != n_scalar * members:
        check(False, op, f"epilogue {epilogue!r} takes {n_scalar * members} scalars here, got {len(scalars)}")


def check_lengths(op: str, **lists) -> int:
    """All member lists have one length; returns it."""
    lengths = {name: len(v) for name, v in lists.items()}
    check(len(set(lengths.values())) <= 1, op, f"member lists differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str | None:
    """tl.dot's input precision: follows torch's tf32 switch for fp32, default for 16-bit types."""
    if dtype != torch.float32:
        return None
    return "tf32" if allow_tf32 else "ieee"


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as rows x D, D its last dim (a 0-d tensor is 1 x 1); a view where strides allow.

    Row count spelled out rather than -1, which torch refuses when D is 0.
    """
    if t.dim() == 2:  # already rows: no new view object (~1 us per member on the call path)
        return t
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def expand_operands(tensors, shape, dtype) -> list[torch.Tensor]:
    """Epilogue operands as views of ``shape`` (stride 0 on broadcast dims), in the output's dtype."""
    return [t.to(dtype).expand(shape) for t in tensors]


def try_view(t: torch.Tensor, shape) -> torch.Tensor | None:
    try:
        return t.view(shape)
    except RuntimeError:
        return None


def rows_split(shape: Sequence[int], operands: list[torch.Tensor]) -> tuple[int, int, list[torch.Tensor | None]]:
    """How kernels that see an output ``shape`` [..., N] as rows x N address its epilogue operands.

    Row m splits as (m // inner, m % inner), so an operand expanded to
    ``shape`` is read through an [outer, inner, N] view. Returns (outer,
    inner, each operand's view or None where it fits no view). The split is
    chosen among the leading dims to fit as many operands as possible, inner =
    all rows first (a full residual or a broadcast bias fit that); an operand
    that fits no common split (a [B, S, 1] operand of a [B, S, N] output
    beside a [S, N] one, say) has to be copied contiguous.
    """
    lead, n = list(shape[:-1]), shape[-1]
    if not operands:
        return 1, math.prod(lead), []
    best = None
    for j in range(len(lead) + 1):
        outer, inner = math.prod(lead[:j]), math.prod(lead[j:])
        views = [try_view(t, (outer, inner, n)) for t in operands]
        fitted = sum(v is not None for v in views)
        if best is None or fitted > best[0]:
            best = (fitted, outer, inner, views)
        if fitted == len(operands):
            break
    return best[1:]


def rows_layout(shape: Sequence[int], operands: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
    """(inner, [outer, inner, N] views of the operands); see ``rows_split``."""
    outer, inner, views = rows_split(shape, operands)
    n = shape[-1]
    return inner, [v if v is not None else t.contiguous().view(outer, inner, n) for v, t in zip(views, operands)]


def stack_rows_operands(operands: list[torch.Tensor], member_shape: Sequence[int]) -> list[torch.Tensor]:
    """Stacked operands [R, ...] whose members fit no common row split, made contiguous for the whole stack.

    Copying per member would break the affine addresses ``Launch.extend_uniform`` relies on.
    """
    if not operands or operands[0].shape[0] == 0:
        return operands
    _, _, views = rows_split(member_shape, [o[0] for o in operands])
    return [o if v is not None else o.contiguous() for o, v in zip(operands, views)]


def operand_columns(views: list[torch.Tensor], col_dim: int = 2) -> dict[str, int]:
    """Table columns of the epilogue operands, each a 3-d view indexed (outer, inner, col).

    ``col_dim`` says which dim of the view is the column: 2 for rows x N
    outputs ([outer, inner, N]), 1 for conv outputs ([B, O, Ho*Wo]).
    """
    cols = {}
    inner_dim = 1 if col_dim == 2 else 2
    for k, v in enumerate(views):
        cols[f"e{k}"] = v.data_ptr()
        cols[f"e{k}_outer"] = v.stride(0)
        cols[f"e{k}_inner"] = v.stride(inner_dim)
        cols[f"e{k}_col"] = v.stride(col_dim)
    return cols


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def math_of(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The arithmetic a dot product runs in: fp16, bf16, tf32 (fp32 inputs, torch's tf32
    switch on) or fp32 (ieee, no tensor cores). Config functions are keyed by it."""
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "fp32"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


@functools.lru_cache(maxsize=None)
def _device_facts(device: torch.device) -> tuple[int | None, int]:
    if device.type != "cuda":
        return None, 132
    props = torch.cuda.get_device_properties(device)
    return props.major * 10 + props.minor, props.multi_processor_count


def device_arch(device: torch.device) -> int | None:
    """The CUDA compute capability as 80, 90, ... (None off CUDA: the interpreter's configs)."""
    return None if interpreting() else _device_facts(device)[0] or 90


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (132, an H100's, off CUDA)."""
    return _device_facts(device)[1]


def vec_width(dtype: torch.dtype, *multiples: int) -> int:
    """16 bytes in elements if every value in ``multiples`` (strides, sizes) is a multiple
    of it, else 1: the VEC a kernel may promise once the addresses are aligned too."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return vec if functools.reduce(operator.or_, multiples, 0) % vec == 0 else 1


def pick_config(configs: Sequence[triton.Config], max_m: int, tiles: Callable[[triton.Config], int],
                sms: int) -> int:
    """The heuristic config (no timing): the largest tile, in list order, that still gives every
    SM a tile, failing that the smallest; among tiles no taller than the rows, and the small-M
    ones (BLOCK_M < 64) only for members of at most 64 rows."""
    top = max(16, next_pow2(max_m))
    fits = [i for i, c in enumerate(configs)
            if c.kwargs["BLOCK_M"] <= top and (max_m <= 64 or c.kwargs["BLOCK_M"] >= 64)] or [0]
    for i in fits:
        if tiles(configs[i]) >= sms:
            return i
    return fits[-1]


class RowsMember:
    """One member seen as rows: x2 and y2 2-D, w/b or None, y_shape the output's shape,
    its epilogue tensor operands and scalars. ``x``, ``y`` and ``extra`` are the names the
    launch plans read (launch.member_tensors), set once rather than as properties (the
    plan's signature reads them on every call)."""

    __slots__ = ("x2", "w", "b", "y2", "y_shape", "operands", "floats", "x", "y", "extra")

    def __init__(self, x2, w, b, y2, y_shape, operands, floats):
        self.x2, self.w, self.b, self.y2 = x2, w, b, y2
        self.x, self.y = x2, y2
        self.y_shape, self.operands, self.floats = y_shape, operands, floats
        self.extra = tuple(y_shape)
