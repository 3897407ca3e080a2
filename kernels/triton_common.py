"""Host-side pieces shared by the Triton launchers: dtypes, problem tables, epilogue operands, configs.

A launch is described by two tables built on the host per call and copied to
the device in one transfer (see ``Launch``):

- the problem table, one int64 row per member with work: sizes, addresses and
  strides (columns from ``codegen.table_columns``), and ``tile0``, the
  member's first tile;
- the tile table, one int64 per program: the row of the member that owns the
  tile, so a program finds its member with one load and no search.

Members of a stacked op are views of one tensor, so every column is affine in
the member index; ``Launch.extend_uniform`` builds their rows from the first
two with one multiply-add instead of R Python-level row builds: for R=118
GEMMs, 70 us against 0.8 ms for the rows one by one (timeit, min of 5, on the
2-core CPU these were written on). Grouped ops build a row per member, so their
host cost grows by about 12 us per member there.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from stfuse.errors import InputError

from . import codegen
from . import epilogue as ep

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
    check(len(ext) == want, op, f"epilogue {epilogue!r} takes {want} tensors here, got {len(ext)}")
    check(len(scalars) == n_scalar * members, op,
          f"epilogue {epilogue!r} takes {n_scalar * members} scalars here, got {len(scalars)}")


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


class Launch:
    """The problem and tile tables of one launch."""

    def __init__(self, template: codegen.KernelTemplate, steps) -> None:
        self.columns = codegen.table_columns(template, steps)
        self.nfloat = codegen.float_width(template, steps)
        self.rows: list[list[int]] = []
        self.tiles: list[int] = []
        self.floats: list[float] = []
        self.keep: list[torch.Tensor] = []  # temporaries the table points into, alive until launch
        self.total = 0

    def add(self, tiles: int, floats: Sequence[float], **cols: int) -> None:
        """One member with ``tiles`` programs of work; members with none get no row."""
        if tiles == 0:
            return
        cols["tile0"] = self.total
        self.rows.append([int(cols[c]) for c in self.columns])
        self.tiles.append(tiles)
        self.floats.extend(float(f) for f in floats)
        self.total += tiles

    def extend_uniform(self, count: int, floats: Sequence[float]) -> None:
        """Rows for ``count`` members of a stack, from the rows ``add``-ed for its first two.

        ``floats`` holds all ``count`` members' floats (scalars differ per member).
        """
        if not self.rows:
            return
        assert len(self.rows) == min(count, 2), "add members 0 and 1 of the stack first"
        self.floats = [float(f) for f in floats]
        self.total = self.tiles[0] * count
        self.tiles = [self.tiles[0]] * count
        if count > 2:
            first = torch.tensor(self.rows[0], dtype=torch.int64)
            step = torch.tensor(self.rows[1], dtype=torch.int64) - first
            self.rows = first + torch.arange(count, dtype=torch.int64)[:, None] * step

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(problem table, tile table, float table) on ``device``, from one host-to-device copy."""
        rows = self.rows if isinstance(self.rows, torch.Tensor) else torch.tensor(self.rows, dtype=torch.int64)
        g = rows.shape[0]
        tile_member = torch.repeat_interleave(torch.arange(g, dtype=torch.int64),
                                              torch.tensor(self.tiles, dtype=torch.int64))
        floats = torch.tensor(self.floats, dtype=torch.float64).view(torch.int64)
        parts = [rows.reshape(-1), tile_member, floats]
        # each part starts 16-byte aligned, as Triton assumes of its pointer arguments
        parts = [torch.cat([p, p.new_zeros(p.numel() % 2)]) for p in parts]
        buf = torch.cat(parts).to(device)
        a, b = parts[0].numel(), parts[0].numel() + parts[1].numel()
        return buf[:a], buf[a:b], buf[b:].view(torch.float64)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# (kernel kind, epilogue, dtype, size bucket) -> the config timed fastest in this process
_CHOSEN: dict[tuple, triton.Config] = {}


def choose_config(key: tuple, configs: list[triton.Config], run: Callable[[triton.Config], None]) -> triton.Config:
    """The fastest of ``configs`` for ``key``, timed once per process; the first one in the interpreter.

    Hand-rolled instead of ``triton.autotune`` because the tile table depends
    on the config's block sizes, so each config needs its own table.
    """
    if interpreting() or len(configs) == 1:
        return configs[0]
    chosen = _CHOSEN.get(key)
    if chosen is None:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        times = []
        for cfg in configs:
            try:
                times.append(do_bench(lambda: run(cfg), warmup=5, rep=25))
            except OutOfResources:
                times.append(float("inf"))
        chosen = _CHOSEN[key] = configs[times.index(min(times))]
    return chosen


def launch_options(cfg: triton.Config) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class RowsMember:
    """One member seen as rows: x2 and y2 2-D, w/b or None, y_shape the output's shape,
    its epilogue tensor operands and scalars."""

    __slots__ = ("x2", "w", "b", "y2", "y_shape", "operands", "floats")

    def __init__(self, x2, w, b, y2, y_shape, operands, floats):
        self.x2, self.w, self.b, self.y2 = x2, w, b, y2
        self.y_shape, self.operands, self.floats = y_shape, operands, floats


def launcher(kernel, template, steps, members, add_member, uniform, floats, device, **constexprs):
    """The function that launches ``kernel`` once for a config: (1) builds the per-call
    problem table from ``members`` (``uniform=R``: R equal rows after the given ones),
    (2) copies it to the device, (3) launches one program per tile."""

    def run(cfg) -> None:
        launch = Launch(template, steps)
        for m in members:
            add_member(launch, m, cfg)
        if uniform is not None:
            launch.extend_uniform(uniform, floats)
        if launch.total == 0:
            return
        table, tiles, float_table = launch.tables(device)
        # Triton launches on the current device: make it the tensors' own (cuda:1 from a
        # thread whose current device is cuda:0 would otherwise read foreign memory).
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            kernel[(launch.total,)](table, tiles, float_table, **constexprs, **launch_options(cfg))

    return run
