"""Requests in and out of one launch: input checks, concatenation along dim 0, padding, output splitting,
and the start-up latency profile measured on example inputs."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from stfuse.errors import InputError, StfuseError
from stfuse.calls import InputSpec, call_of, call_problem
from stfuse.runtime.profile import LatencyProfile


class Unsplittable(StfuseError):
    """A batched output has a tensor leaf without the batch dimension, so it cannot be split per request."""


def inputs_seen(args: tuple) -> tuple[InputSpec, ...]:
    """A tenant's inputs as seen in ``args`` (batched on dim 0): what requests to a program
    without its own ``check_inputs`` must match, checked by calls.input_problem."""
    return tuple(InputSpec(f"arg{i}", tuple(a.shape), a.dtype, a.device, True) for i, a in enumerate(args))


def call_specs(fused) -> dict:
    """{tenant: TenantSpec} of the tenants whose calls are not plain positional tensors
    (keyword inputs, nested args): their requests travel as flat tuples of tensors
    (``as_args``) and are rebuilt into calls for each launch (``as_call``)."""
    return {t: s for t, s in getattr(fused, "specs", {}).items()
            if not s.plain}


def as_call(args: tuple, spec) -> Any:
    """A request's flat tensors as the call its tenant takes (``spec``: see call_specs)."""
    return args if spec is None else call_of(args, spec.in_spec, spec.constants)


def as_args(tenant: str, args: Any, max_batch: int | None, spec=None) -> tuple:
    """Normalise to a tuple of tensors sharing one batch size and device, or raise InputError.
    With the tenant's ``spec`` (call_specs), any call form is taken: its tensors in call order."""
    if spec is None and type(args) is torch.Tensor and args.dim() \
            and 1 <= args.shape[0] <= (max_batch or args.shape[0]):
        return (args,)  # one plain tensor, the common request: none of the checks below can fail
    if spec is not None:
        leaves, problem = call_problem(tenant, spec.in_spec, spec.inputs, args, spec.constants)
        if problem is not None:
            raise InputError(problem)
        args = tuple(leaves)
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, (tuple, list)):
        args = tuple(args)
    else:
        raise InputError(f"tenant {tenant!r}: expected a Tensor or a tuple of Tensors, got {type(args).__name__}")
    if not args:
        raise InputError(f"tenant {tenant!r}: expected at least one argument, got none")
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise InputError(f"tenant {tenant!r}, argument {i}: expected a Tensor, got {type(a).__name__}")
        if a.dim() == 0:
            raise InputError(f"tenant {tenant!r}, argument {i}: expected a batch dimension (dim 0), got a 0-d tensor")
        if a.shape[0] != args[0].shape[0]:
            raise InputError(f"tenant {tenant!r}, argument {i}: batch size {a.shape[0]} differs from "
                             f"argument 0's {args[0].shape[0]}")
        if a.device != args[0].device:
            raise InputError(f"tenant {tenant!r}, argument {i}: on {a.device}, argument 0 on {args[0].device}")
    rows = args[0].shape[0]
    if rows < 1 or (max_batch is not None and rows > max_batch):
        raise InputError(f"tenant {tenant!r}: batch size must be between 1 and max_batch={max_batch}, got {rows}")
    return args


def concat(requests: Sequence[tuple], rows: int | None = None) -> tuple:
    """Several requests' argument tuples as one, concatenated along dim 0; with `rows`, padded
    to that many rows by repeating the last one (a valid input by construction), in the same
    torch.cat (a second one per tenant cost 10-20 us a launch on the 2-core CPU)."""
    have = sum(args[0].shape[0] for args in requests) if rows is not None else 0
    if have >= (rows or 0):
        if len(requests) == 1:
            return requests[0]
        return tuple(torch.cat([args[i] for args in requests]) for i in range(len(requests[0])))
    last = requests[-1]
    return tuple(torch.cat([args[i] for args in requests]
                           + [last[i][-1:].expand(rows - have, *last[i].shape[1:])]) for i in range(len(last)))


def split(output: Any, sizes: list[int]) -> list:
    """Split every tensor leaf of a batched output along dim 0; other leaves are shared.
    A plain tensor (one output) is split with no pytree work: one torch call for all requests,
    against a tree_unflatten per request."""
    total = sum(sizes)
    if type(output) is torch.Tensor and output.dim() and output.shape[0] == total:
        return list(output.split(sizes))
    leaves, spec = pytree.tree_flatten(output)
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0 or leaf.shape[0] != total:
                raise Unsplittable(f"output leaf of shape {tuple(leaf.shape)} has no batch dimension of {total}")
            parts.append(leaf.split(sizes))
        else:
            parts.append([leaf] * len(sizes))
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(len(sizes))]


def caller_stream(args: tuple):
    """(the submitting thread's current CUDA stream, an event recorded on it now) for CUDA
    inputs, else (None, None): the launch waits for the event (the inputs may still be
    being written on that stream), and the outputs are recorded as used on that stream."""
    first = args[0]
    if not first.is_cuda:
        return None, None
    stream = torch.cuda.current_stream(first.device)
    return stream, stream.record_event()


def wait_for_callers(requests) -> None:
    """Make the launching thread's current stream wait for every request's caller event
    (Request.event: None for CPU inputs)."""
    for r in requests:
        if r.event is not None:
            torch.cuda.current_stream(r.args[0].device).wait_event(r.event)


def hand_over(out, stream) -> None:
    """Outputs allocated on the runtime's stream, read on the caller's: tell the caching
    allocator (record_stream), so their memory is not reused while the caller's stream
    may still read them."""
    if stream is None:
        return
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(stream)


def adopt_intra_op_threads() -> None:
    """Give the calling thread the process's intra-op thread count (torch.get_num_threads()).

    A new thread starts with OpenMP's default team size (every core), whatever
    torch.set_num_threads said in the thread that called it, and keeps it until
    its first at::parallel_for: a single-tenant linear (oneDNN) on the runtime's
    worker then ran on 2 OpenMP threads while torch reported 1. Measured on the
    2-core machine with other processes busy: a [32, 64] x [64, 256] linear took
    3.9 ms of CPU (23.8 ms wall, the team spinning at its barrier) on a fresh
    thread against 13 us (55 us) on one that called this; in the runtime, under
    "batch", 368 us of worker CPU per request against 13 us for "space-time",
    whose stacked launches happened to set the team size first."""
    torch.set_num_threads(torch.get_num_threads())


def synchronize(inputs: Mapping[str, Any]) -> None:
    """Wait for the device that ``inputs`` ({tenant: flat tuple or call}) are on."""
    # a keyword tenant's call is ((), {name: tensor}): its first leaf, not its first element
    first = pytree.tree_leaves(next(iter(inputs.values())))[0]
    if first.is_cuda:
        torch.cuda.current_stream(first.device).synchronize()


def normalise_examples(tenants: Sequence[str], example_inputs, specs=None) -> dict[str, tuple]:
    """{tenant: flat tuple of tensors} from a dict or a list in tenant order (``specs``:
    call_specs of the program, for tenants called with keywords)."""
    if isinstance(example_inputs, Mapping):
        unknown = set(example_inputs) - set(tenants)
        if unknown:
            raise InputError(f"example_inputs: unknown tenant(s) {sorted(unknown)}; tenants are {list(tenants)}")
        items = dict(example_inputs)
    else:
        if len(example_inputs) != len(tenants):
            raise InputError(f"example_inputs: {len(example_inputs)} entries for the tenants {list(tenants)}")
        items = dict(zip(tenants, example_inputs))
    specs = specs or {}
    return {t: as_args(t, a, None, specs.get(t)) for t, a in items.items()}


def measure_profile(fused, example_inputs, max_batch: int = 32, reps: int = 5,
                    warmup: int = 3) -> LatencyProfile:
    """Time launches on example-size inputs: each tenant alone at 2 and at max_batch rows, then all
    tenants fused at 2 rows each and at unequal sizes (2, 3, ..., n + 1 rows).

    A launch is timed as the runtime's worker makes it from one-row requests:
    concatenated, one fused.run, the outputs split and each request's Future
    resolved. That per-request work is most of a small model's per-row cost
    (4 x mlp-small on the 2-core CPU: fused.run costs 2 us a row, a launch 6-9
    us a request), and planning with fused.run alone left the profile 2-6x
    short, by a factor that differed between tenant sets with the batch sizes
    each happened to launch: the corrections (LatencyProfile.observe) then
    steered the space-time policy away from fusing. Two requests, not one,
    at the small end: a member with several requests pays a concatenation
    and a split (about 20 us a tenant there), which a one-row launch skips;
    measured at one row each, a 4-tenant launch was priced at 14 us more
    than one tenant's, and took 100 us more.

    The fastest of `reps` timed launches after `warmup` untimed ones per
    setting, so (warmup + reps) * (2n + 2) launches for n tenants. The warm-up
    matters: on CPU the first few calls after start-up or after a new tenant
    subset is lowered take 10-60 ms against 0.05 ms later (4 small MLPs, 2
    cores). The fastest rather than the median, because on a shared machine
    whole runs of calls can be preempted; what launches really take under load
    is learnt by LatencyProfile.observe. The fit is the linear model of
    LatencyProfile.
    """
    tenants = list(fused.tenants)
    specs = call_specs(fused)
    ex = normalise_examples(tenants, example_inputs, specs)

    def rows(t, b):  # b one-row requests
        return [tuple(a[:1].clone() for a in ex[t]) for _ in range(b)]

    def timed(requests):
        times = []
        for i in range(warmup + reps):
            futures = {t: [Future() for _ in reqs] for t, reqs in requests.items()}
            start = time.perf_counter()
            inputs = {t: concat(reqs) for t, reqs in requests.items()}
            outs = fused.run({t: as_call(a, specs.get(t)) for t, a in inputs.items()})
            synchronize(inputs)
            for t, futs in futures.items():
                for f, out in zip(futs, split(outs[t], [1] * len(futs)) if len(futs) > 1 else [outs[t]]):
                    f.set_result(out)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return min(times)

    fixed, per_row = {}, {}
    low, big = {}, {}
    for t in ex:
        # A tenant traced for a bounded batch range (a loaded artifact refuses more) is
        # timed at the top of its range.
        spec = getattr(fused, "specs", {}).get(t)
        high = spec.batch_range[1] if spec is not None and spec.dynamic else None
        big[t] = max_batch if high is None else max(1, min(max_batch, high))
        low[t] = min(2, big[t])
        small = timed({t: rows(t, low[t])})
        per_row[t] = max(0.0, (timed({t: rows(t, big[t])}) - small) / (big[t] - low[t])) if big[t] > low[t] else 0.0
        fixed[t] = max(small - per_row[t] * low[t], 1e-6)
    fused_fixed, uneven_fixed = {}, {}
    if len(ex) > 1:
        group = frozenset(ex)
        together = timed({t: rows(t, low[t]) for t in ex})
        fused_fixed[group] = max(together - sum(per_row[t] * low[t] for t in ex), 1e-6)
        sizes = {t: min(big[t], low[t] + i) for i, t in enumerate(ex)}
        uneven = timed({t: rows(t, b) for t, b in sizes.items()})
        work = sum(per_row[t] * b for t, b in sizes.items())
        uneven_fixed[group] = max(uneven - fused_fixed[group] - work, 0.0)
    return LatencyProfile(fixed, per_row, fused_fixed, uneven_fixed)
