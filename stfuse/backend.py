"""The torch.compile backend "stfuse": the pass pipeline on Dynamo graphs.

    model = torch.compile(model, backend="stfuse")          # registered by entry point
    model = torch.compile(model, backend=stfuse.backend,    # or the callable itself
                          options={"group": "tenants"})     # fused with other models

Dynamo hands over one FX graph per compiled frame (several for a model with
graph breaks, another one after a recompile). Each becomes a CompiledGraph:

1. At compile time its placeholders are sorted once, by the Dynamo source they
   came from: *state* (parameters, buffers, module attributes, globals), *data*
   (the call's own tensors), *sizes* (SymInt inputs of dynamic shapes, each
   read back from a dim of a data tensor) and other *scalars* (baked in as
   constants, one specialisation per value).
2. On a call, the state tensors seen at call time pick the specialisation.
   Dynamo shares one compiled graph between modules of one class (their
   parameters are graph inputs), so one CompiledGraph may serve several models;
   keying on the module object would run the wrong weights. A new state, or data
   the traced program does not accept (another non-batch shape), traces the
   graph again as one stfuse tenant: a module whose parameters and buffers are
   those state tensors, traced by the frontend with the call's data.
3. Alone, the tenant's FusedProgram runs it, with intra-graph groups (Q/K/V,
   parallel branches, experts: passes/horizontal.py). In a Group, tenants of
   every graph compiled into the group form one multi-tenant program, and calls
   go through the group's stfuse.runtime.Runtime, which fuses calls from
   several threads that arrive within one slice; a lone call runs by itself
   once the slice expires.
4. Whatever stfuse cannot trace or run goes to the Dynamo graph itself, run
   eagerly: never an error (unless ``strict``). So do calls while autograd
   records (a parameter or input requires grad and grad mode is on): the fused
   program is inference-only.

Options (``torch.compile(..., options={...})``), documented in docs/backend.md:
``group`` (a name or a Group), ``strict`` (raise instead of running eagerly),
``verify`` (ir.verify after every pass).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .api import compile_tenants
from .dynamo_inputs import accepts, input_layout, mutates_state, static_unless_sized, tenant_module
from .errors import InputError, StfuseError
from .frontend import TenantGraph, trace_tenant
from .program import FusedProgram

log = logging.getLogger(__name__)

OPTIONS = ("group", "strict", "verify")
# Traced programs per set of weights of a compiled graph (other data shapes, scalars);
# further shapes of those weights run eagerly.
MAX_SPECIALIZATIONS = 8
# Live weight sets per compiled graph. Dynamo shares one graph between all models of one
# class and shape (their weights are graph inputs), so each model is one weight set:
# a cap of 8 in all made the 9th model of a class run eagerly (issue 11, item 8).
MAX_MODELS = 256

# One lock for everything that traces, compiles or changes membership (rare);
# calls that find their program take no lock. The registries have their own lock,
# which backend() takes while Dynamo compiles: never held while tracing.
_LOCK = threading.RLock()
_REGISTRY_LOCK = threading.Lock()
_GRAPHS: list[weakref.ref] = []
_GROUPS: dict[str, "Group"] = {}
_names = itertools.count()


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    group: "Group | None" = None
    strict: bool = False
    verify: bool = False


def parse_options(options: Mapping[str, Any] | None) -> Options:
    """The backend's options from ``torch.compile(..., options=...)``; unknown keys raise."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise StfuseError(f"stfuse backend: unknown option(s) {unknown}; options are {list(OPTIONS)}")
    group = options.get("group")
    if isinstance(group, str):
        group = Group.get(group)
    elif group is not None and not isinstance(group, Group):
        raise StfuseError("stfuse backend: option 'group' takes a group name or a stfuse.Group, "
                          f"got {type(group).__name__}")
    return Options(group, bool(options.get("strict", False)), bool(options.get("verify", False)))


# --------------------------------------------------------------------------- members


class Member:
    """One specialisation of a compiled graph: its state tensors (by identity and
    version), scalar constants, traced tenant, and (alone) its own program."""

    def __init__(self, name: str, state, scalars, tg: TenantGraph, verify: bool):
        self.name = name
        self.refs = [weakref.ref(t) for t in state]
        self.versions = [t._version for t in state]
        self.scalars = scalars
        self.tg = tg
        self.verify = verify
        self._program: FusedProgram | None = None
        # A graph that updates its own state in place (BatchNorm's num_batches_tracked
        # in training) bumps the versions on every call; those runs refresh them.
        self.mutates_state = mutates_state(tg)

    def current(self, state) -> bool:
        """Same tensors, unchanged in place since tracing (or since this member's last run)."""
        return all(r() is t and t._version == v for r, t, v in zip(self.refs, state, self.versions))

    def ran(self, state) -> None:
        if self.mutates_state:
            self.versions = [t._version for t in state]

    @property
    def program(self) -> FusedProgram:
        """The tenant compiled alone (on first use)."""
        if self._program is None:
            with _LOCK:
                if self._program is None:
                    self._program = compile_tenants({self.name: self.tg}, self.verify)
        return self._program

    def run_alone(self, data: tuple):
        return self.program(data)[0]  # one tenant: its args as one tuple


class CompiledGraph:
    """What the backend returns to Dynamo for one graph: a callable with the graph's signature."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, options: Options):
        self.gm = gm
        self.options = options
        self.index = next(_names)
        self.members: dict[tuple, list[Member]] = {}
        # dynamo_fallbacks: Dynamo refused to compile this graph's code again (its recompile
        # limit); the calls that needed a new graph then run eagerly without reaching stfuse.
        self.stats = {"calls": 0, "stfuse_calls": 0, "eager_calls": 0, "traces": 0, "dynamo_fallbacks": 0}
        self.code = _frame_code()  # the function Dynamo compiled, as its warnings name it
        self.eager_reason: str | None = None
        self._warned: set[str] = set()
        try:
            self.slots = input_layout(gm, example_inputs)
        except Exception as err:  # noqa: BLE001 - any graph stfuse cannot take runs eagerly
            self.slots = []
            self._give_up(err)
        self._state = [i for i, s in enumerate(self.slots) if s.kind == "state"]
        self._data = [i for i, s in enumerate(self.slots) if s.kind == "data"]
        self._scalar = [i for i, s in enumerate(self.slots) if s.kind == "scalar"]

    @property
    def programs(self) -> list[FusedProgram]:
        """Every program this graph runs in: its members' own, and their groups'."""
        out = []
        for ms in self.members.values():
            for m in ms:
                if m._program is not None:
                    out.append(m._program)
        group = self.options.group
        if group is not None and group.program is not None:
            out.append(group.program)
        return out

    def _give_up(self, err: BaseException) -> None:
        if self.options.strict:
            raise err if isinstance(err, StfuseError) else StfuseError(
                f"stfuse backend: {type(err).__name__}: {err}") from err
        self.eager_reason = f"{type(err).__name__}: {err}"
        log.warning("stfuse backend: graph %d runs eagerly: %s", self.index, self.eager_reason)

    def _eager(self, args, why: str | None = None):
        self.stats["eager_calls"] += 1
        if why is not None and why not in self._warned:
            self._warned.add(why)
            log.warning("stfuse backend: graph %d runs eagerly %s", self.index, why)
        return self.gm(*args)

    def __call__(self, *args):
        self.stats["calls"] += 1
        if self.eager_reason is not None:
            return self._eager(args)
        if torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self._eager(args, "while autograd records; call it under torch.no_grad() "
                                     "or torch.inference_mode() to run the fused program")
        state = [args[i] for i in self._state]
        data = tuple(args[i] for i in self._data)
        scalars = tuple(args[i] for i in self._scalar)
        try:
            member = self._member(state, data, scalars)
        except Exception as err:  # noqa: BLE001 - untraceable: the graph runs as it is
            self._give_up(err)
            self._leave_group()
            return self._eager(args)
        if member is None:
            return self._eager(args, f"beyond {MAX_SPECIALIZATIONS} traced shapes for one model's "
                                     f"weights, or {MAX_MODELS} models")
        try:
            group = self.options.group
            out = group.call(member, data) if group is not None else member.run_alone(data)
        except Exception as err:  # noqa: BLE001 - a failing program: run the graph itself
            if self.options.strict:
                raise
            self._give_up(err)
            self._leave_group()
            return self._eager(args)
        member.ran(state)
        self.stats["stfuse_calls"] += 1
        return out

    def _drop_freed(self) -> None:
        """Forget members whose weights were freed (their models are gone)."""
        for key, ms in list(self.members.items()):
            if any(r() is None for m in ms for r in m.refs):
                for m in ms:
                    if self.options.group is not None:
                        self.options.group.remove(m)
                del self.members[key]

    def _leave_group(self) -> None:
        group = self.options.group
        if group is not None:
            for ms in self.members.values():
                for m in ms:
                    group.remove(m)

    def _member(self, state, data, scalars) -> Member | None:
        key = (tuple(id(t) for t in state), scalars)
        for m in tuple(self.members.get(key, ())):
            if m.current(state) and accepts(m.tg, data):
                return m
        with _LOCK:
            ms = self.members.setdefault(key, [])
            stale = [m for m in ms if not m.current(state)]
            for m in stale:  # the same tensor ids now mean other (or updated) tensors
                ms.remove(m)
                if self.options.group is not None:
                    self.options.group.remove(m)
            for m in ms:
                if accepts(m.tg, data):
                    return m
            self._drop_freed()
            if len(ms) >= MAX_SPECIALIZATIONS or len(self.members) > MAX_MODELS:
                return None
            name = f"graph{self.index}_{self.stats['traces']}"
            module = tenant_module(self.gm, self.slots, state, scalars)
            tg = static_unless_sized(trace_tenant(name, module, data), self.slots)
            # The members hold weights by weakref only (models may go away); a call outside
            # the batch range this trace holds for is another specialisation (accepts()).
            tg.model = None
            self.stats["traces"] += 1
            m = Member(name, state, scalars, tg, self.options.verify)
            m.program  # noqa: B018 - compiled now, so a graph the passes reject never joins a group
            ms.append(m)
            if self.options.group is not None:
                self.options.group.add(m)
            return m


# --------------------------------------------------------------------------- groups


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
    through a stfuse.runtime.Runtime with ``policy`` (default "space-time"):
    calls from several threads arriving within ``slice_ms`` of each other run as
    one fused launch; a lone call runs by itself once the slice expires. While
    the group has one tenant, its calls run at once. ``slo_ms`` (one latency target
    for every tenant) is passed to the runtime and its policy.

    Creating a Group registers it under its name (replacing an earlier one for
    graphs compiled afterwards); ``options={"group": name}`` uses the group of
    that name, or creates one with default settings.
    """

    def __init__(self, name: str, slice_ms: float = 2.0, *, policy: str = "slice",
                 slo_ms: float | None = None):
        if not isinstance(name, str) or not name:
            raise StfuseError(f"a group needs a non-empty name, got {name!r}")
        if slice_ms < 0:
            raise StfuseError(f"group {name!r}: slice_ms must be >= 0, got {slice_ms}")
        from stfuse.runtime.policies import POLICIES

        if policy not in POLICIES:
            raise StfuseError(f"group {name!r}: unknown policy {policy!r}; expected one of {POLICIES}")
        self.name, self.slice_ms, self.policy, self.slo_ms = name, float(slice_ms), policy, slo_ms
        self.members: dict[str, Member] = {}
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

    def add(self, member: Member) -> None:
        with _LOCK:
            self.members[member.name] = member

    def remove(self, member: Member) -> None:
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
                                    any(self.members[n].verify for n in names))
            _warm(fused)
            slo = self.slo_ms if self.slo_ms is not None else DEFAULT_SLO_MS
            big = 2**31 - 1  # one request per tenant per launch (below): rows are never capped
            # A Dynamo graph promises nothing about its rows: one request per tenant per launch.
            policy = OneRequestEach(make_scheduler(
                self.policy, list(names), slice_s=self.slice_ms / 1e3, max_batch=big,
                profile=LatencyProfile({}, {}), slo_s={n: slo / 1e3 for n in names}))
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

    def call(self, member: Member, data: tuple):
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


# --------------------------------------------------------------------------- Dynamo's fallbacks


def _frame_code() -> str | None:
    """The function Dynamo is compiling, as its own warnings name it: 'name' (file:line)."""
    try:
        from torch._guards import TracingContext

        code = TracingContext.try_get().traced_code[0]
        return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"
    except Exception:  # noqa: BLE001 - called outside Dynamo (tests, direct use)
        return None


class _DynamoFallbacks(logging.Filter):
    """Sees Dynamo's "hit config.recompile_limit" warning and, for a function compiled with
    stfuse, counts it on that function's graphs and warns once on the stfuse.backend logger.

    Dynamo guards parameter shapes, so models of one class but other sizes each get their
    own graph; past ``torch._dynamo.config.recompile_limit`` graphs of one function, Dynamo
    runs further calls that match none of them eagerly, without calling any backend: stfuse
    cannot count those calls, only that it happened.
    """

    def __init__(self):
        super().__init__()
        self.warned: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if str(record.msg).startswith("torch._dynamo hit config.") and len(record.args) >= 3:
                self._seen(str(record.args[0]), record.args[1], str(record.args[2]))
        except Exception:  # noqa: BLE001, S110 - never break Dynamo's logging
            pass
        return True

    def _seen(self, limit: str, value, code: str) -> None:
        mine = [cg for cg in graphs() if cg.code == code]
        if not mine:
            return
        for cg in mine:
            cg.stats["dynamo_fallbacks"] += 1
        if code not in self.warned:
            self.warned.add(code)
            log.warning("stfuse backend: torch._dynamo hit its %s (%s) for %s: calls that need another "
                        "graph (another model size or input shape) now run eagerly without stfuse. Dynamo "
                        "compiles one graph per parameter shape: set torch._dynamo.config."
                        "force_parameter_static_shapes and force_nn_module_property_static_shapes to "
                        "False to share one graph across sizes, or raise torch._dynamo.config.%s "
                        "(docs/backend.md)", limit, value, code, limit)


_FALLBACKS = _DynamoFallbacks()


def _watch_dynamo() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _FALLBACKS not in logger.filters:
        logger.addFilter(_FALLBACKS)


# --------------------------------------------------------------------------- the backend


def backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None,
            mode: str | None = None, **kwargs):
    """The Dynamo backend: ``torch.compile(model, backend="stfuse", options={...})``.

    Dynamo calls it as ``backend(gm, example_inputs, options=...)`` (and ``mode=``
    when torch.compile names one; stfuse ignores the mode). Options may also come as
    keyword arguments. Returns a CompiledGraph, callable like ``gm``.
    """
    opts = parse_options({**dict(options or {}), **kwargs})
    _watch_dynamo()
    cg = CompiledGraph(gm, example_inputs, opts)
    with _REGISTRY_LOCK:
        _GRAPHS[:] = [r for r in _GRAPHS if r() is not None]
        _GRAPHS.append(weakref.ref(cg))
    return cg


def graphs() -> list[CompiledGraph]:
    """Live compiled graphs, oldest first (for inspection: ``graphs()[-1].programs[0].plan``)."""
    return [cg for cg in (r() for r in _GRAPHS) if cg is not None]


def totals() -> dict:
    """Counters summed over the live compiled graphs: calls, stfuse_calls, eager_calls, traces,
    dynamo_fallbacks (times Dynamo stopped compiling a function of these graphs), graphs."""
    out = {k: 0 for k in ("calls", "stfuse_calls", "eager_calls", "traces", "dynamo_fallbacks")}
    cgs = graphs()
    for cg in cgs:
        for k in out:
            out[k] += cg.stats[k]
    out["graphs"] = len(cgs)
    return out


def reset() -> None:
    """Forget compiled graphs and close and unregister every group."""
    with _REGISTRY_LOCK:
        groups = list(_GROUPS.values())
        _GROUPS.clear()
        _GRAPHS.clear()
    for grp in groups:
        grp.close()


__all__ = ["backend", "Group", "CompiledGraph", "graphs", "totals", "reset", "OPTIONS", "MAX_SPECIALIZATIONS",
           "MAX_MODELS"]
