"""The host side of a Triton launch: problem tables built once per member signature, configs
chosen without timing on a request.

A launch needs three device tables (see ``Launch``): the problem table (sizes,
addresses, strides per member), the tile table (tile -> member row) and the
float table (per-member scalars). Everything in them but the addresses is
fixed by the members' shapes, strides and scalars, so ``launcher`` keeps one
``_Plan`` per (kernel, constexprs, config, member signature):

- first call (a miss): rows built in Python as before, copied to the device;
  the plan records which cells hold addresses and the addresses it saw;
- later calls (hits): the members' addresses are read (one ``data_ptr`` each)
  and compared with the plan's. Equal (a program that reuses its buffers, or a
  stack whose inputs did not move): the device tables are launched as they
  are, with no copy at all. Different: the moved addresses are added to a copy
  of the host table, staged in pinned memory and copied with
  ``non_blocking=True``, ordered on the current stream. Nothing on the call
  path waits for the device.

Alignment for vector loads (``VEC``) and 32-bit indexing (``IDX``) are decided
here too: strides and spans at a miss, addresses on every call (one OR over
them: 16-byte alignment of all is the low 4 bits of their OR).

Configs are never timed on a request: ``choose_config`` takes the one tuned
for its key in an explicit warm-up (``with tuning(): fused(*inputs)``), timing
the kernel alone on tables built beforehand, or else the launcher's heuristic
pick. Keys leave the batch out (a new batch size never triggers tuning).
"""

from __future__ import annotations

import array
import contextlib
import functools
import operator
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from . import codegen

_I32_MAX = 2**31 - 1


class Launch:
    """The problem and tile tables of one launch, built row by row (a plan's miss path)."""

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

    def host_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(problem table [g, C], tile table, float table as int64 bits) on the host."""
        rows = self.rows if isinstance(self.rows, torch.Tensor) else torch.tensor(self.rows, dtype=torch.int64)
        # tile -> row by a search over the rows' first tiles (torch.repeat_interleave with a
        # tensor of repeats took 13 ms here for 118 rows)
        ends = torch.tensor(self.tiles, dtype=torch.int64).cumsum(0)
        tile_member = torch.searchsorted(ends, torch.arange(self.total, dtype=torch.int64), right=True)
        floats = torch.tensor(self.floats, dtype=torch.float64).view(torch.int64)
        return rows.reshape(rows.shape[0], len(self.columns)), tile_member, floats


def to_device(parts: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """int64 host tensors as device tensors from one copy: pinned staging and a non-blocking
    copy on CUDA (the caching host allocator keeps the staging block until the copy is done)."""
    cuda = device.type == "cuda"
    if not cuda and len(parts) == 1:
        return list(parts)
    # each part starts 16-byte aligned, as Triton assumes of its pointer arguments
    flat = [p.reshape(-1) for p in parts]
    sizes = [f.numel() + f.numel() % 2 for f in flat]
    buf = torch.zeros(sum(sizes), dtype=torch.int64, pin_memory=cuda)
    at = 0
    for f, n in zip(flat, sizes):
        buf[at:at + f.numel()] = f
        at += n
    if cuda:
        staging, buf = buf, buf.to(device, non_blocking=True)
        if _CAPTURED is not None:  # a captured copy reads this staging memory on every replay
            _CAPTURED.extend((staging, buf))
    out, at = [], 0
    for p, n in zip(parts, sizes):
        out.append(buf[at:at + p.numel()].view(p.shape))
        at += n
    return out


def member_tensors(m) -> tuple:
    """The tensors a member's table row points into, by column: x, w, b, y, e0, e1, ..."""
    return (m.x, m.w, m.b, m.y, *m.operands)


def _signature(members, uniform) -> tuple[tuple, list[int]]:
    """(what a plan depends on besides addresses, the addresses), in one pass over the members:
    every member tensor's shape and strides, and the member's other parameters. For a stack
    its first member's addresses, and its first two members' shapes and steps stand for all."""
    sig, addresses = [], []
    for i, m in enumerate(members):
        for t in (m.x, m.w, m.b, m.y, *m.operands):
            if t is None:
                sig.append(None)
                addresses.append(0)
            else:
                sig.append((t.shape, t.stride()))
                addresses.append(t.data_ptr())
        sig.append(m.extra)
    if uniform:
        per = len(addresses) // len(members)
        if len(members) > 1:  # the stack's steps: member 1's addresses against member 0's
            sig.extend(a - b for a, b in zip(addresses[per:], addresses[:per]))
        addresses = addresses[:per]
    return (tuple(sig), uniform), addresses


def _span_ok(t: torch.Tensor | None) -> bool:
    """Whether every element offset of ``t`` (from its address) fits in int32."""
    return t is None or sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0) <= _I32_MAX


class _Plan:
    """One launch's device tables and what it takes to reuse them (see the module docstring)."""

    __slots__ = ("total", "host", "device_tables", "cells", "addresses", "uniform", "_at")

    def __init__(self, launch: Launch, addresses, row_of, uniform, device, ptr_columns):
        host, tiles, floats = launch.host_tables()
        self.total, self.host, self.uniform, self.addresses = launch.total, host, uniform, addresses
        table, tiles, floats = to_device([host, tiles, floats], device)
        self.device_tables = [table, tiles, floats.view(torch.float64)]
        # (rows, columns, address index) of every address cell; None: rebuild the table per call
        self.cells = self._locate(row_of, ptr_columns)
        self._at = torch.tensor(addresses, dtype=torch.int64)

    def _locate(self, row_of, ptr_columns):
        """Where each member address sits in the table, checked against the table itself
        (an operand copied for the launch points elsewhere: then the plan cannot be reused)."""
        per = len(ptr_columns)
        rows, cols, index = [], [], []
        for i, row in enumerate(row_of[:len(self.addresses) // per]):
            for k, col in enumerate(ptr_columns):
                if row is not None and col is not None:
                    rows.append(row)
                    cols.append(col)
                    index.append(i * per + k)
        rows, cols = torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)
        index = torch.tensor(index, dtype=torch.int64)
        if not torch.equal(self.host[rows, cols], torch.tensor(self.addresses, dtype=torch.int64)[index]):
            return None
        if self.uniform:  # every row of a stack moves with its first: (column, address index) pairs
            return list(zip(cols.tolist(), index.tolist()))
        return rows, cols, index

    def tables(self, now: list[int], device) -> list[torch.Tensor]:
        """The device tables for members at addresses ``now`` (same signature as the plan's)."""
        if now == self.addresses:
            return self.device_tables
        if self.uniform:  # a stack moves as a whole: one row of deltas, built in Python, broadcast
            row = array.array("q", bytes(8 * self.host.shape[1]))
            for col, i in self.cells:
                row[col] = now[i] - self.addresses[i]
            # through a buffer: 1.5 us less than torch.tensor(list) on the 2-core CPU
            host = self.host + torch.frombuffer(row, dtype=torch.int64)
        else:
            rows, cols, index = self.cells
            delta = torch.tensor(now, dtype=torch.int64) - self._at
            host = self.host.clone()
            host[rows, cols] += delta[index]
        return [to_device([host], device)[0], *self.device_tables[1:]]


class _Entry:
    """What one member signature fixes: its constexpr flags, whether offsets need int64, a
    stack's steps between members (bytes, per tensor), and its plans by config."""

    __slots__ = ("fixed", "idx64", "steps", "plans")

    def __init__(self, fixed: dict, idx64: bool, steps: list[int]):
        self.fixed, self.idx64, self.steps, self.plans = fixed, idx64, steps, {}


class Stack:
    """A stacked op's members before they are built: its whole tensors (x, w, b, y, operands,
    each member r at ``[r]``) and the members' other parameters stand for them, so a call
    that finds its plan never builds the member views (``build()`` returns them)."""

    __slots__ = ("tensors", "extra", "build")

    def __init__(self, tensors: Sequence, extra, build: Callable[[], list]):
        self.tensors, self.extra, self.build = tensors, extra, build

    def signature(self) -> tuple[tuple, list[int]]:
        sig = [None if t is None else (t.shape, t.stride()) for t in self.tensors]
        return (tuple(sig), self.extra), [0 if t is None else t.data_ptr() for t in self.tensors]


# While a CUDA graph captures (kernels/graphs.py): every table a launch reads and every
# pinned staging block a copy reads, kept alive with the graph (its replays read them)
_CAPTURED: list | None = None


@contextlib.contextmanager
def keep_captured(keep: list):
    """Inside: the tables and staging blocks launches use are appended to ``keep``."""
    global _CAPTURED
    old, _CAPTURED = _CAPTURED, keep
    try:
        yield keep
    finally:
        _CAPTURED = old


# (kernel, constexprs, device, signature, floats) -> _Entry; bounded (cleared when full)
_ENTRIES: dict[tuple, _Entry] = {}
_MAX_ENTRIES = 512


def plan_count() -> int:
    return sum(len(e.plans) for e in _ENTRIES.values())


@functools.lru_cache(maxsize=None)
def _pointer_columns(template: codegen.KernelTemplate, steps, per: int) -> tuple[int | None, ...]:
    """The table column of each member tensor's address (x, w, b, y, e0, ...), None if absent."""
    columns = codegen.table_columns(template, steps)
    names = ("x", "w", "b", "y", *(f"e{k}" for k in range(per - 4)))
    return tuple(columns.index(n) if n in columns else None for n in names)


def launcher(kernel, template, steps, members, add_member, uniform, floats, device, flags=None,
             **constexprs) -> Callable[[triton.Config], None]:
    """``run(cfg)``: launches ``kernel`` over ``members`` with ``cfg``, its tables from a plan
    or built now. ``run.prepare(cfg)`` does all of it but the launch, returned as a function
    of no arguments (a warm-up times that alone). ``run.consts`` are the constexprs this call
    launches with (VEC among them: choose the config list by them; a caller may narrow them,
    in place, before running).

    ``members``: a list, or a ``Stack`` with ``uniform=R`` (the first two of R equal-shape
    members are built only when a plan is); ``floats``: then all R members' scalars.
    ``flags(members)``: constexprs that follow from the members' shapes and strides,
    computed once per signature; its ``VEC`` (the vector width the strides and sizes allow)
    is used where the addresses are aligned too, else 1.
    """
    built = members if isinstance(members, list) else None

    def get_members() -> list:
        nonlocal built
        if built is None:
            built = members.build()
        return built

    if built is None:
        sig, now = members.signature()
        sig = ("stack", sig, uniform)
    else:
        sig, now = _signature(built, uniform)
    flat_floats = tuple(floats) if uniform else tuple(f for m in built for f in m.floats)
    base = (id(kernel), tuple(constexprs.items()), device, sig, flat_floats)
    entry = _ENTRIES.get(base)
    if entry is None:
        ms = get_members()
        if len(_ENTRIES) >= _MAX_ENTRIES:
            _ENTRIES.clear()
        # a stack's members sit at its first one's addresses plus multiples of these steps
        steps_between = []
        if uniform and len(ms) > 1:
            first, second = (_signature(ms[i:i + 1], None)[1] for i in (0, 1))
            steps_between = [b - a for a, b in zip(first, second)]
        entry = _ENTRIES[base] = _Entry(flags(ms) if flags else {},
                                        not all(_span_ok(t) for m in ms for t in member_tensors(m)), steps_between)
    aligned = functools.reduce(operator.or_, now + entry.steps, 0) % 16 == 0
    consts = dict(constexprs, **entry.fixed)
    if "VEC" in kernel.arg_names:
        consts["VEC"] = consts.get("VEC", 1) if aligned else 1
    if "IDX" in kernel.arg_names:
        consts["IDX"] = tl.int64 if entry.idx64 else tl.int32

    def prepare(cfg: triton.Config) -> Callable[[], None]:
        plan = entry.plans.get(id(cfg))
        keep = None
        if plan is not None:
            table, tiles, float_table = plan.tables(now, device)
        else:
            ms = get_members()
            launch, row_of = Launch(template, steps), []
            for m in ms:
                before = len(launch.rows)
                add_member(launch, m, cfg)
                row_of.append(before if len(launch.rows) > before else None)
            if uniform is not None:
                launch.extend_uniform(uniform, floats)
            if launch.total == 0:
                return _nothing
            ptr_columns = _pointer_columns(template, steps, len(member_tensors(ms[0])))
            plan, keep = _Plan(launch, now, row_of, uniform, device, ptr_columns), launch.keep
            # a plan made while a graph captures has tables that only its replays fill
            if plan.cells is not None and _CAPTURED is None:
                entry.plans[id(cfg)] = plan
            table, tiles, float_table = plan.device_tables
        return _launch_of(kernel, plan, (table, tiles, float_table), consts, launch_options(cfg), device, keep, now)

    def run(cfg: triton.Config) -> None:
        prepare(cfg)()

    run.prepare, run.consts = prepare, consts
    return run


def _launch_of(kernel, plan: _Plan, tables, consts: dict, options: dict, device, keep, now) -> Callable[[], None]:
    """``launch_now()``: ``kernel`` over ``tables``; its ``moved(now)`` is the same launch for
    the same members at addresses ``now`` (a list as ``_signature`` gives), its ``reusable``
    whether launching it again is sound while they stay where they are."""
    table, tiles, float_table = tables
    grid = (plan.total,)

    def launch_now() -> None:
        _ = keep  # the temporaries the table points into live until the launch is queued
        if _CAPTURED is not None:  # a CUDA graph replays these tables: they must outlive it
            _CAPTURED.extend(tables)
        # Triton launches on the current device: make it the tensors' own (cuda:1 from a
        # thread whose current device is cuda:0 would otherwise read foreign memory).
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            kernel[grid](table, tiles, float_table, **consts, **options)

    def moved(now2: list[int]) -> Callable[[], None] | None:
        """None where ``now2`` loses the 16-byte alignment this launch's VEC promised."""
        if consts.get("VEC", 1) > 1 and functools.reduce(operator.or_, now2, 0) % 16:
            return None
        return _launch_of(kernel, plan, plan.tables(now2, device), consts, options, device, None, now2)

    # the same members at the same addresses may launch it again (kernels/arena.py)
    # where the table points at the members themselves (a plan's condition), not at a
    # temporary copied for this call, and no graph captures it (its tables fill on replay)
    launch_now.reusable = plan.cells is not None and _CAPTURED is None
    launch_now.moved, launch_now.now = moved, now
    return launch_now


def _nothing() -> None:
    """The launch of members with no work."""


_nothing.reusable, _nothing.now = True, None
_nothing.moved = lambda now: _nothing


def launch_options(cfg: triton.Config) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# key (kernel kind, epilogue, dtype, flags, size classes; no batch) -> the config a warm-up timed fastest
_TUNED: dict[tuple, triton.Config] = {}
_TUNING = False


@contextlib.contextmanager
def tuning():
    """Launches inside time every candidate config for their key (kernel alone, tables built
    first) and keep the fastest for later calls: an explicit warm-up, never a request."""
    global _TUNING
    old, _TUNING = _TUNING, True
    try:
        yield
    finally:
        _TUNING = old


def tuning_now() -> bool:
    """Whether an explicit warm-up (``tuning()``) is timing configs now."""
    return _TUNING


def choose_config(key: tuple, configs: list[triton.Config], run, default: int = 0) -> triton.Config:
    """The config tuned for ``key`` in a warm-up, else ``configs[default]`` (the launcher's
    heuristic pick). Times configs only inside ``tuning()`` and on a GPU: ``run.prepare(cfg)``
    (the launch alone, tables built before) where ``run`` has it, else ``run(cfg)``."""
    chosen = _TUNED.get(key)
    if chosen is not None:
        return chosen
    if not _TUNING or len(configs) == 1 or not torch.cuda.is_available():
        return configs[default]
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    times = []
    for cfg in configs:
        try:
            launch = run.prepare(cfg) if hasattr(run, "prepare") else (lambda c=cfg: run(c))
            times.append(do_bench(launch, warmup=5, rep=25))
        except OutOfResources:
            times.append(float("inf"))
    chosen = _TUNED[key] = configs[times.index(min(times))]
    return chosen
