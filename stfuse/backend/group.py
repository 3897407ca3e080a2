"""Groups: models compiled into one named group are tenants of one fused program,
called through a stfuse.runtime.Runtime that fuses calls sharing a time slice."""

from __future__ import annotations

import logging
import threading

import torch

from stfuse import config
from stfuse.api import compile_tenants
from stfuse.errors import InputError, StfuseError
from stfuse.program import FusedProgram

from .registry import _GROUPS, _LOCK, _REGISTRY_LOCK

log = logging.getLogger("stfuse.backend")


class _Counted:
    """The group's program as the runtime sees it, counting launches and fused launches."""

    def __init__(self, fused: FusedProgram, group: "Group"):
        self.fused, self.group = fused, group
        self.tenants = fused.tenants
        self.check_inputs = fused.check_inputs

    def run(self, inputs: dict) -> dict:
        out = self.fused.run(inputs)
        with self.group._stats_lock:
            self.group._stats["launches"] += 1
            self.group._stats["fused_launches"] += len(inputs) > 1
        return out


def _warm(fused: FusedProgram) -> None:
    """Run every tenant together and each alone once, on zeros of the example shapes.

    FusedProgram lowers a subset's program on its first call; without this the
    first launches are slow outliers (tens of ms), which a policy that learns
    from launch times (space-time) would take for the cost of fusing.
    """
    inputs = {n: tuple(torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in tg.inputs)
              for n, tg in fused.tenant_graphs.items()}
    try:
        fused.run(inputs)
        for n, args in inputs.items():
            fused.run({n: args})
    except Exception as err:  # noqa: BLE001 - best effort: zeros may not suit every model
        log.info("stfuse group warm-up skipped: %s: %s", type(err).__name__, err)


class Group:
    """Models compiled into one group are fused with each other.

        group = stfuse.Group("tenants", slice_ms=2.0)
        a = torch.compile(model_a, backend="stfuse", options={"group": group})
        b = torch.compile(model_b, backend="stfuse", options={"group": "tenants"})  # by name

    Every graph specialisation compiled into the group is a tenant of one
    multi-tenant FusedProgram (rebuilt when a tenant joins or leaves). Calls go
    through a stfuse.runtime.Runtime with ``policy`` (default "slice": calls that share a slice are fused; any runtime policy can be named):
    calls from several threads arriving within ``slice_ms`` of each other run as
    one fused launch; a lone call runs by itself once the slice expires. While
    the group has one tenant, its calls run at once. ``slo_ms`` (one latency target
    for every tenant) is passed to the runtime and its policy.
    ``codegen`` ("inductor" or "direct", kernels/bind.py; default STFUSE_CODEGEN,
    else "inductor") runs the group's program: with "inductor", every subset of
    tenants that launches together is compiled on its first launch (the warm-up
    compiles all of them and each alone when the group is built).

    Creating a Group registers it under its name (replacing an earlier one for
    graphs compiled afterwards); ``options={"group": name}`` uses the group of
    that name, or creates one with default settings.
    """

    def __init__(self, name: str, slice_ms: float = 2.0, *, policy: str = "slice",
                 slo_ms: float | None = None, codegen: str | None = None):
        if not isinstance(name, str) or not name:
            raise StfuseError(f"a group needs a non-empty name, got {name!r}")
        if slice_ms < 0:
            raise StfuseError(f"group {name!r}: slice_ms must be >= 0, got {slice_ms}")
        from stfuse.runtime.policies import POLICIES

        if policy not in POLICIES:
            raise StfuseError(f"group {name!r}: unknown policy {policy!r}; expected one of {POLICIES}")
        self.name, self.slice_ms, self.policy, self.slo_ms = name, float(slice_ms), policy, slo_ms
        self.codegen = config.codegen_mode(codegen, config.BACKEND_CODEGEN)
        self.members: dict = {}  # tenant name -> graph.Member
        self.program: FusedProgram | None = None
        self.error: str | None = None  # why the last build failed (members then run alone)
        self._runtime = None
        self._built_for: tuple[str, ...] = ()
        self._stats_lock = threading.Lock()
        self._stats = {"calls": 0, "launches": 0, "fused_launches": 0, "direct_calls": 0, "builds": 0}
        with _REGISTRY_LOCK:
            _GROUPS[name] = self

    @classmethod
    def get(cls, name: str) -> "Group":
        """The group registered under ``name``, created with default settings if there is none."""
        with _REGISTRY_LOCK:
            group = _GROUPS.get(name)
        return group if group is not None else cls(name)

    @property
    def tenants(self) -> list[str]:
        return list(self.members)

    def add(self, member) -> None:
        with _LOCK:
            self.members[member.name] = member

    def remove(self, member) -> None:
        with _LOCK:
            self.members.pop(member.name, None)

    def stats(self) -> dict:
        """Calls, launches, fused launches (one launch serving two or more tenants),
        direct calls (run without the runtime), builds, tenants, the last build error,
        and the runtime's own stats (latencies, SLO misses) under "runtime"."""
        with self._stats_lock:
            out = dict(self._stats)
        out.update(name=self.name, tenants=self.tenants, error=self.error)
        rt = self._runtime
        out["runtime"] = rt.stats() if rt is not None else None
        return out

    def close(self) -> None:
        """Stop the runtime (finishing queued calls); the next call builds it again."""
        with _LOCK:
            rt, self._runtime, self.program, self._built_for = self._runtime, None, None, ()
        if rt is not None:
            rt.close()

    def _current(self):
        """(runtime, program) for the current members, rebuilt if they changed; (None, None)
        while fewer than two members or after a failed build."""
        names = tuple(self.members)
        if names == self._built_for:
            return self._runtime, self.program
        with _LOCK:
            names = tuple(self.members)
            if names != self._built_for:
                self._rebuild(names)
            return self._runtime, self.program

    def _rebuild(self, names: tuple[str, ...]) -> None:
        from stfuse.runtime import DEFAULT_SLO_MS, Runtime
        from stfuse.runtime.policies import OneRequestEach, make_scheduler
        from stfuse.runtime.profile import LatencyProfile

        old, self._runtime, self.program, self.error = self._runtime, None, None, None
        if old is not None:
            old.close()
        # Set last, so that a caller checking without the lock never sees a half-built group.
        if len(names) < 2:
            self._built_for = names
            return
        try:
            fused = compile_tenants({n: self.members[n].tg for n in names},
                                    any(self.members[n].verify for n in names), codegen=self.codegen)
            _warm(fused)
            slo = self.slo_ms if self.slo_ms is not None else DEFAULT_SLO_MS
            big = 2**31 - 1  # one request per tenant per launch (below): rows are never capped
            # A Dynamo graph promises nothing about its rows: one request per tenant per launch.
            policy = OneRequestEach(make_scheduler(
                self.policy, list(names), slice_s=self.slice_ms / 1e3, max_batch=big,
                profile=LatencyProfile({}, {}), slo_s={n: slo / 1e3 for n in names},
                shed=False))  # a model call must return its value, however late: never shed
            self._runtime = Runtime(_Counted(fused, self), policy, slice_ms=self.slice_ms,
                                    slo_ms=slo, max_batch=big)
            self.program = fused
            for n in names:  # calls now run in the group's program: free the members' own
                self.members[n]._program = None
            with self._stats_lock:
                self._stats["builds"] += 1
        except Exception as err:  # noqa: BLE001 - members keep running alone
            self.error = f"{type(err).__name__}: {err}"
            log.warning("stfuse group %r: members run alone: %s", self.name, self.error)
        self._built_for = names

    def call(self, member, data: tuple):
        """Run one member's call, fused with whatever other members' calls share its slice."""
        from stfuse.runtime import RuntimeClosedError

        with self._stats_lock:
            self._stats["calls"] += 1
        for _ in range(3):  # a rebuild may close the runtime between lookup and submit
            rt, fused = self._current()
            if fused is None or member.name not in fused.tenants:
                return member.run_alone(data)
            try:
                future = rt.submit(member.name, data)
            except RuntimeClosedError:
                continue
            except InputError:
                # Inputs the runtime does not batch (no common dim 0, 0-d tensors): run
                # this call by itself through the group's program.
                with self._stats_lock:
                    self._stats["direct_calls"] += 1
                return _Counted(fused, self).run({member.name: data})[member.name]
            return future.result()
        return member.run_alone(data)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, slice_ms={self.slice_ms}, tenants={self.tenants})"
