"""Requests on their way into the runtime: the Runtime's settings checked, what a request is,
the input check of submit(), and which tenants' requests may share a launch along dim 0.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Mapping

from stfuse.calls import input_problem
from stfuse.errors import InputError, StfuseError
from stfuse.runtime.batching import as_call, caller_stream, inputs_seen


DEFAULT_SLO_MS = 100.0  # for tenants that slo_ms does not name


def settings(tenants: list[str], slo_ms, slice_ms, **sizes: int) -> dict[str, float]:
    """The Runtime's settings checked (each size an integer >= 1, times finite milliseconds):
    every tenant's SLO in seconds, from one number for all, or {tenant: ms} (others
    DEFAULT_SLO_MS), or None (all DEFAULT_SLO_MS)."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StfuseError(f"Runtime: {name} must be an integer >= 1, got {value!r}")
    _ms("slice_ms", slice_ms, zero_ok=True)
    if isinstance(slo_ms, Mapping):
        unknown = set(slo_ms) - set(tenants)
        if unknown:
            raise StfuseError(f"Runtime: slo_ms names unknown tenant(s) {sorted(unknown)}; tenants are {tenants}")
        return {t: _ms(f"slo_ms[{t!r}]", slo_ms.get(t, DEFAULT_SLO_MS)) / 1e3 for t in tenants}
    ms = _ms("slo_ms", DEFAULT_SLO_MS if slo_ms is None else slo_ms)
    return {t: ms / 1e3 for t in tenants}


def _ms(name: str, value, zero_ok: bool = False) -> float:
    """A time in milliseconds: a finite number > 0 (>= 0 with ``zero_ok``), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero_ok):
        raise StfuseError(f"Runtime: {name} must be a finite number of milliseconds "
                          f"{'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return float(value)


class RequestFuture(Future):
    """A request's Future, which tells the runtime when the caller cancels it (so the worker
    drops it from its queue early). Cheaper than add_done_callback, whose callback ran at
    every set_result: 4 Python calls a request, for what happens only on cancel()."""

    def __init__(self, on_cancel):
        super().__init__()
        self._on_cancel = on_cancel

    def cancel(self) -> bool:
        if super().cancel():
            self._on_cancel()
            return True
        return False


class Request:
    """One queued request: its flat args, rows (dim 0), times, future and CUDA stream."""


    __slots__ = ("tenant", "args", "rows", "arrival", "deadline", "future", "stream", "event")

    def __init__(self, tenant, args, rows, arrival, deadline, future):
        self.tenant, self.args, self.rows = tenant, args, rows
        self.arrival, self.deadline, self.future = arrival, deadline, future
        # CUDA: the submitter's stream and an event on it
        self.stream, self.event = caller_stream(args) if args[0].is_cuda else (None, None)


def same_shape(a: Request, b: Request) -> bool:
    """Whether two requests of one tenant can share a launch along dim 0: every input
    alike after dim 0. A tenant with declared dynamic dims (stfuse/dims.py) gets
    requests of several lengths; padding them to one is the model's business (a mask),
    not the runtime's, so those run in separate launches."""
    return all(x.shape[1:] == y.shape[1:] for x, y in zip(a.args, b.args))


def rows_independent(fused) -> set[str]:
    """The tenants whose requests may be concatenated along dim 0: from the plan's
    ``rows_independent`` (FusedProgram and loaded artifacts); none for a plan without it
    (an older artifact); every tenant for a program without a plan (a test double)."""
    plan = getattr(fused, "plan", None)
    if plan is None:
        return set(fused.tenants)
    rows = plan.stats.get("rows_independent") or {}
    return {t for t in fused.tenants if rows.get(t, False)}


class InputCheck:
    """The one input check of submit() (calls.input_problem): the program's own
    ``check_inputs`` (a few us for plain tensors), or, for a program without one, the
    inputs of its examples or of the tenant's first request that ran (``seen``)."""

    def __init__(self, fused, calls: dict, examples: dict):
        self._check = getattr(fused, "check_inputs", None)
        self._calls = calls
        for t, a in examples.items():
            self._program_check(t, a)
        self._inputs = {t: inputs_seen(a) for t, a in examples.items()}

    def __call__(self, tenant: str, args: tuple) -> None:
        if self._check is not None:
            self._program_check(tenant, args)
            return
        inputs = self._inputs.get(tenant)
        if inputs is None:
            return
        problem = (f"tenant {tenant!r}: expected {len(inputs)} argument(s), got {len(args)}"
                   if len(args) != len(inputs) else input_problem(tenant, inputs, args)[0])
        if problem is not None:
            raise InputError(problem)

    def seen(self, tenant: str, args: tuple) -> None:
        """A request of ``tenant`` ran with ``args``: later ones are checked against them."""
        if tenant not in self._inputs:
            self._inputs[tenant] = inputs_seen(args)

    def _program_check(self, tenant: str, args: tuple) -> None:
        """The program's own check_inputs, with any failure as an InputError."""
        if self._check is None:
            return
        spec = self._calls.get(tenant)
        try:
            self._check(tenant, args if spec is None else as_call(args, spec))
        except StfuseError:
            raise
        except Exception as exc:
            raise InputError(f"tenant {tenant!r}: {exc}") from exc
