"""One Dynamo graph as the backend compiles it: its options, its specialisations
(``Member``: one traced tenant per set of weights and data shapes), and the
callable (``CompiledGraph``) handed back to Dynamo."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from stfuse import config
from stfuse.api import compile_tenants
from stfuse.errors import StfuseError
from stfuse.frontend import TenantGraph, trace_tenant
from stfuse.program import FusedProgram

from .fallbacks import frame_code
from .group import Group
from .inputs import accepts, input_layout, mutates_state, static_unless_sized, tenant_module
from .registry import _LOCK, MAX_MODELS, MAX_SPECIALIZATIONS, OPTIONS, _names

log = logging.getLogger("stfuse.backend")


@dataclass(frozen=True)
class Options:
    group: "Group | None" = None
    strict: bool = False
    verify: bool = False
    passes: bool = True  # False: stfuse's passes are off (the graph goes to codegen as it is)
    codegen: str = config.BACKEND_CODEGEN  # "inductor" or "direct" (kernels/bind.py)


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
    passes = options.get("passes", True)
    if not isinstance(passes, bool):
        raise StfuseError(f"stfuse backend: option 'passes' takes True or False, got {passes!r}")
    codegen = config.codegen_mode(options.get("codegen"), config.BACKEND_CODEGEN)
    if group is not None and not passes:
        raise StfuseError("stfuse backend: option 'group' needs the passes (passes=True): "
                          "models are fused with each other by them")
    return Options(group, bool(options.get("strict", False)), bool(options.get("verify", False)),
                   passes, codegen)


class Member:
    """One specialisation of a compiled graph: its state tensors (by identity and
    version), scalar constants, traced tenant, and (alone) its own program."""

    def __init__(self, name: str, state, scalars, tg: TenantGraph, verify: bool, codegen: str = "direct"):
        self.name = name
        self.codegen = codegen
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
                    self._program = compile_tenants({self.name: self.tg}, self.verify, codegen=self.codegen)
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
        self.code = frame_code()  # the function Dynamo compiled, as its warnings name it
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
            m = Member(name, state, scalars, tg, self.options.verify, self.options.codegen)
            m.program  # noqa: B018 - compiled now, so a graph the passes reject never joins a group
            ms.append(m)
            if self.options.group is not None:
                self.options.group.add(m)
            return m


