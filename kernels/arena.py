"""Memory planned per program call: a grouped op's outputs in one arena, its launch kept.

A grouped GEMM of R members (tenants at different batch sizes, or of different
shapes) does per call, unplanned: R output allocations, R member records, a
signature of every member's shapes, strides and addresses, a plan lookup,
then the launch. At R=118 that was 585 us of host work (benchmarks/
bench_host_overhead.py, launch stubbed), ~5 us per member, where the fused
kernel itself should take ~50-140 us on an H100/H200.

``plan_sites`` (the CUDA binding, kernels/bind.py) turns each
``stfuse::grouped_linear`` of a program whose weights are the program's own
into a ``GroupedLinearSite``: the weights, biases, epilogue and scalars are
fixed at binding, and per (thread, stream) the site keeps

- one arena per set of member shapes: all members' outputs in one block, each
  16-byte aligned, the views made once. The same tensors come back on every
  call with those shapes, so the next op's members do not move either;
- the last call's launch (tables on the device, config, constexprs) and what
  it launched over: the input tensors themselves and their addresses.

A call whose inputs are the very tensors of the last call, at the same
addresses (an op reading the arena of the op before it: every op of a
planned chain but the first), launches what it kept: R identity checks and R
address reads, no table work, no allocation. Any other call takes the full
path (checks, members, ``launch.launcher``: tables patched through pinned
memory where addresses moved) into the arena of its shapes.

Before/after (bound program)::

    %ys = stfuse.grouped_linear.default([%x0, %x1], [%w0, %w1], [%b0, %b1], "relu", [], [])
    ->  %ys = grouped_linear_site_0([%x0, %x1], [])
    %out = clone(%ys[1])          # where an output may alias the arena

Why this is sound: an export-traced program is functional (no op writes an
intermediate in place), so an input that is the same tensor at the same
address holds what it held when its producer last wrote it; a program output
that may alias an arena is cloned before it leaves (the next call overwrites
the arena); arenas are per thread and per CUDA stream, so two requests in
flight never share one. The last call's inputs stay referenced until the next
call. While a CUDA graph captures (kernels/graphs.py), a site runs unplanned:
the graph's own pool is its arena.
"""

from __future__ import annotations

import functools
import operator
import threading

import torch

from . import launch, reference, triton_gemm
from .triton_common import supported

_PTR = torch.Tensor.data_ptr
_MAX_ARENAS = 8  # member shape sets kept per (thread, stream); more are dropped, oldest first
_MAX_STATES = 16  # (thread, stream) pairs kept per site


class _State:
    """One (thread, stream)'s arenas and last launch."""

    __slots__ = ("arenas", "x", "ext", "addresses", "tf32", "launch", "ys", "sig")

    def __init__(self):
        self.arenas: dict[tuple, list[torch.Tensor]] = {}
        self.x = None  # the last launch's inputs; None: nothing to launch again


def arena_outputs(shapes, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Contiguous tensors of ``shapes`` in one allocation, each starting 16-byte aligned."""
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    sizes = [functools.reduce(operator.mul, s, 1) for s in shapes]
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += -(-n // align) * align
    buf = torch.empty(total, dtype=dtype, device=device)
    return [buf[a:a + n].view(s) for a, n, s in zip(starts, sizes, shapes)]


class GroupedLinearSite:
    """``stfuse::grouped_linear`` with its weights, epilogue and scalars bound: ``site(x, ext)``."""

    def __init__(self, w, b, epilogue: str, scalars, name: str = "grouped_linear_site"):
        self.w, self.b = list(w), list(b)
        self.epilogue, self.scalars = epilogue, [float(s) for s in scalars]
        self._states: dict[tuple, _State] = {}
        self.__name__ = self.__qualname__ = name  # how torch.fx names it in the program's code
        # calls that launched what the last call kept, as it was / with x moved (tests read them)
        self.launches_again = self.moved_launches = 0

    def __call__(self, x: list, ext: list) -> list:
        device = x[0].device if x else None
        key = (threading.get_ident(), _stream_of(device))
        st = self._states.get(key)
        if (st is not None and st.x is not None and len(x) == len(st.x) and all(map(operator.is_, x, st.x))
                and all(map(operator.is_, ext, st.ext)) and [*map(_PTR, x), *map(_PTR, ext)] == st.addresses
                and torch.backends.cuda.matmul.allow_tf32 == st.tf32 and not launch.tuning_now()):
            st.launch()
            self.launches_again += 1
            return st.ys
        if st is not None and st.x is not None and len(x) == len(st.x):
            moved = self._moved(x, ext, st)
            if moved is not None:
                return moved
        return self._call(x, ext, key, st)

    def _moved(self, x: list, ext: list, st: _State) -> list | None:
        """The kept launch for inputs of the same shapes, strides, dtypes and devices at other
        addresses (the program's first op, reading the tenants' inputs): the x cells of its
        table patched and copied; None where that does not apply."""
        if not (st.launch.now and all(map(operator.is_, ext, st.ext)) and [(t.shape, t.stride(), t.dtype, t.device) for t in x] == st.sig
                and torch.backends.cuda.matmul.allow_tf32 == st.tf32 and not launch.tuning_now()):
            return None
        now = list(st.launch.now)
        now[::len(now) // len(x)] = addresses = list(map(_PTR, x))  # x leads each member's addresses
        moved = st.launch.moved(now)
        if moved is None:
            return None
        moved()
        st.x, st.launch = list(x), moved
        st.addresses[:len(x)] = addresses
        self.moved_launches += 1
        return st.ys

    def _call(self, x: list, ext: list, key: tuple, st: _State | None) -> list:
        args = (x, self.w, self.b, self.epilogue, ext, self.scalars)
        if not x or not (supported([*x, *self.w, *self.b]) and all(t.device == x[0].device for t in ext)):
            return reference.grouped_linear(*args)  # as the dispatcher does (kernels/triton_ops.py)
        if _capturing(x[0].device):
            return triton_gemm.grouped_linear(*args)
        if st is None:
            if len(self._states) >= _MAX_STATES:
                self._states.clear()
            st = self._states[key] = _State()
        shapes = tuple((*t.shape[:-1], w.shape[0]) for t, w in zip(x, self.w))
        ys = st.arenas.get((x[0].dtype, shapes))
        if ys is None:
            if len(st.arenas) >= _MAX_ARENAS:
                del st.arenas[next(iter(st.arenas))]
            ys = st.arenas[x[0].dtype, shapes] = arena_outputs(shapes, x[0].dtype, x[0].device)
        kept = []
        triton_gemm.grouped_linear(*args, out=ys, plan=kept)
        # the table holds x's own address (rows are a view of it) and ext's (no dtype cast)
        views = all(t.dim() == 2 or t.is_contiguous() for t in x) and all(t.dtype == x[0].dtype for t in ext)
        if kept and kept[0].reusable and views and not launch.tuning_now():
            st.x, st.ext, st.launch, st.ys = list(x), list(ext), kept[0], ys
            st.addresses = [*map(_PTR, x), *map(_PTR, ext)]
            st.sig = [(t.shape, t.stride(), t.dtype, t.device) for t in x]
            st.tf32 = torch.backends.cuda.matmul.allow_tf32
        else:
            st.x = None
        return ys


def _stream_of(device: torch.device | None):
    """The current CUDA stream of ``device`` (None off CUDA): arenas are per stream."""
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _attr(gm: torch.nn.Module, node) -> torch.Tensor | None:
    """The tensor a get_attr node reads, or None where ``node`` is not one."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    return functools.reduce(getattr, node.target.split("."), gm)


def _may_alias(n: torch.fx.Node) -> bool:
    """Whether ``n``'s result may share memory with an input: an aten op's schema says;
    any other callable is assumed to (getitem of a list returns its element)."""
    if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in n.target._schema.returns)
    return n.op in ("call_function", "call_method", "call_module")


def plan_sites(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[GroupedLinearSite]]:
    """``gm`` with each grouped_linear over its own weights bound to a site, and every
    output that may alias a site's arena cloned; a new module sharing gm's weights
    (gm is not changed). Returns it and its sites."""
    import copy

    graph = copy.deepcopy(gm.graph)
    bound = torch.fx.GraphModule(gm, graph)
    target = torch.ops.stfuse.grouped_linear.default
    sites, arena = [], set()
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is target:
            x, w, b, epilogue, ext, scalars = n.args
            ws = [_attr(bound, v) for v in w]
            bs = [None if v is None else _attr(bound, v) for v in b]
            if any(t is None for t in ws) or any(t is None for v, t in zip(b, bs) if v is not None):
                continue  # a weight computed in the program: the op runs as it is
            site = GroupedLinearSite(ws, bs, epilogue, scalars, name=f"grouped_linear_site_{len(sites)}")
            sites.append(site)
            n.target, n.args = site, (x, ext)
            arena.add(n)
        elif any(a in arena for a in n.all_input_nodes) and _may_alias(n):
            arena.add(n)
    out = next(n for n in graph.nodes if n.op == "output")
    if sites:
        clone = torch.ops.aten.clone.default
        with graph.inserting_before(out):
            leaves = [graph.call_function(clone, (v,)) if isinstance(v, torch.fx.Node) and v in arena else v
                      for v in out.args[0]]
        out.args = (tuple(leaves),)
    graph.eliminate_dead_code()  # the weights' get_attr nodes the sites took over
    bound.recompile()
    return bound, sites
