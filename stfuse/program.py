"""FusedProgram: the compiled multi-tenant program.

``fused(x1, x2)`` runs every tenant; ``fused.run({name: args})`` any subset.
Programs for a subset (and for calls whose tenants differ in batch size) are
lowered from the same scheduled graph on first use and cached: no re-tracing,
no passes re-run.

The calling convention (input checks, program choice per call, output
unflattening) lives in ``TenantCalls`` and reads only ``TenantSpec``s, so a
program loaded from an artifact (stfuse/artifact/loaded.py) shares it exactly.
The plan (groups, stats, summary, drawing) is stfuse/plan.py.
"""

from __future__ import annotations

import logging
import operator
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree

from . import config, dims
from .errors import InputError, StfuseError
from .calls import InputSpec, call_of, call_problem, input_problem
from .frontend import TenantGraph
from .kernels.bind import bind
from .plan import Plan

log = logging.getLogger(__name__)
_VERSION = operator.attrgetter("_version")


@dataclass(frozen=True)
class TenantSpec:
    """What calling one tenant needs: its flat input specs and pytree specs.

    ``TenantSpec.of`` takes them from a traced TenantGraph; an artifact's
    manifest records the same fields, so a loaded program checks inputs and
    rebuilds outputs exactly as the compiled one does.
    """

    name: str
    inputs: tuple[InputSpec, ...]  # flat user inputs, in call order
    in_spec: Any  # pytree spec of the call, (args tuple, kwargs dict) (calls.call_parts)
    out_spec: Any  # pytree spec of the model's output
    batch: int  # example batch size
    dynamic: bool  # batch size may change between calls
    batch_range: tuple = (1, None)  # (low, high or None): batch sizes the traced graph holds for
    # Declared dynamic dims (stfuse/dims.py): name -> (low, high or None), checked per call
    dim_ranges: dict = field(default_factory=dict)
    # Keywords that are not tensors, which every call passes with these values (calls.split_constants)
    constants: dict = field(default_factory=dict)

    @classmethod
    def of(cls, tg: TenantGraph) -> TenantSpec:
        return cls(tg.name, tuple(tg.inputs), tg.in_spec, tg.out_spec, tg.batch, tg.dynamic,
                   tuple(tg.batch_range), dict(tg.dim_ranges), dict(tg.constants))

    @property
    def plain(self) -> bool:
        """Whether the tenant is called with positional tensors alone (no keywords, no
        nesting, no constants): what the fast paths of calls, the runtime and the serve
        protocol take as they come."""
        return not self.constants and self.in_spec == pytree.tree_structure(((None,) * len(self.inputs), {}))

    def in_range(self, batch: int) -> bool:
        low, high = self.batch_range
        return not self.dynamic or (low <= batch and (high is None or batch <= high))

    def describe_range(self) -> str:
        low, high = self.batch_range
        return f"[{low}, {'inf' if high is None else high}]"


def varying_dims(specs: Mapping[str, TenantSpec], active) -> list[tuple[int, ...]]:
    """Per flat input of a program over ``active`` tenants, the dims that may differ
    between calls: dim 0 of a dynamic tenant's batched inputs, and declared dims
    (what kernels/inductor.py marks dynamic)."""
    return [((0,) if s.batched and spec.dynamic else ()) + tuple(d for d, _ in s.dims)
            for spec in (specs[t] for t in active) for s in spec.inputs]


def _plain_leaves(fast, a) -> tuple[tuple, int] | None:
    """(leaves, batch) of one tenant's call ``a`` (a tensor, or a tuple of them) where it
    fits the tenant's fast spec (TenantCalls._fast_spec) exactly, else None: the caller
    then takes the full check, which explains what is wrong."""
    inputs, low, high, _ = fast
    leaves = (a,) if type(a) is torch.Tensor else a if type(a) is tuple else ()
    if len(leaves) != len(inputs):
        return None
    batch = None
    for x, (dtype, device, rest, ndim) in zip(leaves, inputs):
        if type(x) is not torch.Tensor:
            return None
        shape = x.shape
        if not (len(shape) == ndim and x.dtype is dtype and shape[1:] == rest and x.device == device):
            return None
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            return None
    return (leaves, batch) if low <= batch <= high else None


class TenantCalls:
    """The calling convention of a multi-tenant program, from TenantSpecs alone.

    ``fused(x1, x2)`` runs every tenant, ``run({name: args})`` any subset;
    ``check_inputs`` validates one tenant's args. One tenant's argument takes any
    form of calls.call_parts: a Tensor, a tuple of args, a dict of kwargs, or
    an (args, kwargs) pair. A subclass sets ``_specs``
    (name -> TenantSpec, tenant order) through ``_init_calls`` and implements
    ``_program(active, stacked) -> (module, output counts per tenant)``, where
    ``module.forward(*flat inputs)`` returns the flat outputs.
    """

    def _init_calls(self, specs: dict[str, TenantSpec]) -> None:
        self._specs = specs
        self._names = tuple(specs)
        self._programs: dict[tuple, tuple] = {}
        # One-tensor tenants are checked without pytree work, and one-tensor outputs
        # skip unflattening: a few us per call, the whole budget of a batch-1 MLP.
        self._fast_in = {n: self._fast_spec(s) for n, s in specs.items()}
        self._single_out = {n: s.out_spec.is_leaf() for n, s in specs.items()}

    @staticmethod
    def _fast_spec(spec: TenantSpec):
        """For a tenant that takes plain batched tensors (one, or a tuple): per input
        (dtype, device, shape after dim 0, rank), and the batch range; else None."""
        n = len(spec.inputs)
        if not n or not spec.plain:
            return None
        if not all(s.batched and not s.dims for s in spec.inputs):
            return None  # no inputs: no batch to read (it crashed the fast paths at call time)
        low, high = spec.batch_range if spec.dynamic else (1, None)
        return ([(s.dtype, s.device, torch.Size(s.shape[1:]), len(s.shape)) for s in spec.inputs],
                low, high or float("inf"), spec.dynamic)

    def _fast_flat(self, active: tuple, args) -> tuple[list, bool] | None:
        """The common call, checked in one pass: every tenant in ``active`` takes plain
        tensors, gets them (one tensor, or a tuple) with the traced dtype, device and
        shape after dim 0, at a batch size its graph holds for. Returns (flat inputs,
        whether the dynamic tenants share one batch size, so the stacked program runs);
        None sends the call through the general path, which checks and explains. 3.4 us
        for four MLP tenants, against 5.6 for four check_inputs calls."""
        flat, batch0, stacked = [], None, True
        fast_in = self._fast_in
        for name, a in zip(active, args):
            fast = fast_in.get(name)
            checked = None if fast is None else _plain_leaves(fast, a)
            if checked is None:
                return None
            leaves, batch = checked
            flat += leaves
            if fast[3]:  # a dynamic tenant
                if batch0 is None:
                    batch0 = batch
                elif batch != batch0:
                    stacked = False
        return flat, stacked

    @property
    def tenants(self) -> list[str]:
        return list(self._names)

    @property
    def specs(self) -> Mapping[str, TenantSpec]:
        """Each tenant's calling convention (inputs, pytree specs, batch range), read-only."""
        return MappingProxyType(self._specs)

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise InputError(f"a fused program takes one positional argument per tenant "
                             f"{self.tenants}, got keyword argument(s) {sorted(kwargs)}; "
                             "use run({tenant: args}) to name tenants")
        if len(args) != len(self._names):
            raise InputError(f"expected {len(self._names)} arguments, one per tenant "
                             f"{self.tenants}, got {len(args)}")
        return self._execute(self._names, args)

    def run(self, inputs: dict) -> dict:
        """Run any subset of tenants: {name: call} -> {name: output}, where a call is a
        Tensor, a tuple of args, a dict of kwargs or an (args, kwargs) pair."""
        if not isinstance(inputs, dict) or not inputs:
            raise InputError("run() takes a non-empty dict {tenant name: args}")
        for name in inputs:
            if name not in self._specs:
                raise InputError(f"unknown tenant {name!r}; tenants are {self.tenants}")
        active = tuple(t for t in self._names if t in inputs)
        return dict(zip(active, self._execute(active, [inputs[t] for t in active])))

    def _execute(self, active: tuple, args) -> list:
        fast = self._fast_flat(active, args)
        if fast is None:
            return self._execute_checked(active, args)
        flat, stacked = fast
        return self._run_program(active, flat, stacked)

    def _execute_checked(self, active: tuple, args) -> list:
        # stacked: every dynamic tenant at one batch size, and tenants sharing a declared
        # dim's name at one size of it; else fused groups run grouped (passes/lower.py).
        flat, batch0, stacked, outside, named = [], None, True, {}, {}
        for i, (name, a) in enumerate(zip(active, args)):
            leaves, batch = self.check_inputs(name, a)
            spec = self._specs[name]
            if not spec.in_range(batch):
                outside[i] = leaves
                continue
            flat += leaves
            if spec.dynamic:
                if batch0 is None:
                    batch0 = batch
                elif batch != batch0:
                    stacked = False
            if spec.dim_ranges:
                for dim, size in dims.sizes(spec.inputs, leaves).items():
                    if named.setdefault(dim, size) != size:
                        stacked = False
        if outside:  # the traced graph does not hold at this batch size: those tenants run apart
            inside = [i for i in range(len(active)) if i not in outside]
            results = self._execute(tuple(active[i] for i in inside), [args[i] for i in inside]) if inside else []
            done = dict(zip(inside, results))
            done.update({i: self._outside_range(active[i], args[i], leaves) for i, leaves in outside.items()})
            return [done[i] for i in range(len(active))]
        return self._run_program(active, flat, stacked)

    def _run_program(self, active: tuple, flat: list, stacked: bool) -> list:
        gm, counts = self._programs.get((active, stacked)) or self._program(active, stacked)
        # no_grad without its context manager object: 0.9 us less per call
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            out = gm.forward(*flat)
        finally:
            torch._C._set_grad_enabled(grad)
        if len(out) == len(active) and all(self._single_out[n] for n in active):
            return list(out)  # one tensor per tenant: nothing to unflatten
        results, i = [], 0
        for name, n in zip(active, counts):
            if self._single_out[name]:
                results.append(out[i])
            else:
                results.append(pytree.tree_unflatten(list(out[i:i + n]), self._specs[name].out_spec))
            i += n
        return results

    def _program(self, active: tuple, stacked: bool):
        raise NotImplementedError

    def _can_run_outside_range(self, name: str) -> bool:
        """Whether a call of ``name`` outside its batch range can still run correctly."""
        return False

    def _outside_range(self, name: str, args, leaves: list):
        """One tenant's output for a call outside its batch range (see FusedProgram)."""
        raise NotImplementedError

    def check_inputs(self, name: str, args: Any) -> tuple[list, int]:
        """Validate one tenant's args; returns (flat tensors, batch size) or raises InputError."""
        if name not in self._specs:
            raise InputError(f"unknown tenant {name!r}; tenants are {self.tenants}")
        ts = self._specs[name]
        fast = self._fast_in[name]
        if fast is not None:  # plain tensors: checked without pytree work (a few us per call)
            checked = _plain_leaves(fast, args)
            if checked is not None:
                return list(checked[0]), checked[1]
        leaves, problem = call_problem(name, ts.in_spec, ts.inputs, args, ts.constants)
        if problem is not None:
            raise InputError(problem)
        problem, batch = input_problem(name, ts.inputs, leaves, ts.dim_ranges)
        if problem is not None:
            raise InputError(problem)
        if batch is not None and not ts.in_range(batch) and not self._can_run_outside_range(name):
            arg = next(i for i, s in enumerate(ts.inputs) if s.batched)
            raise InputError(f"{ts.inputs[arg].where(name, arg)}: batch size {batch} "
                             f"is outside the range {ts.describe_range()} the program was traced for "
                             "(the model depends on its batch size there), and the model is not "
                             "available to trace again or to run eagerly")
        return leaves, batch if batch is not None else ts.batch


class FusedProgram(TenantCalls):
    """Compiled tenants; call with one argument per tenant, or ``run`` a subset."""

    def __init__(self, graph, history, compile_tenants=None, codegen: str = "direct"):
        """``compile_tenants`` (api.compile_tenants; passed in, so this module does not
        import the compiler back) compiles a tenant traced again for another batch range, and
        the tenants again after their models' weights changed in place.
        ``codegen`` (kernels/bind.py): "direct" or "inductor"."""
        self.codegen = codegen
        self._compile_tenants = compile_tenants
        self._tenants: dict[str, TenantGraph] = graph.graph["tenants"]
        self._init_calls({n: TenantSpec.of(tg) for n, tg in self._tenants.items()})
        self.device = next(iter(self._tenants.values())).device
        self._lowering = threading.Lock()
        self.weight_rebuilds = 0  # times a change to the models' weights rebuilt the program
        self._adopt(graph, Plan(graph, history))
        # Tenants traced again for batch sizes outside their graph's range: name -> [FusedProgram]
        self.respecialised: dict[str, list[FusedProgram]] = {}
        self.outside_range_calls: dict[str, int] = {}  # per tenant, calls outside its traced range
        self._eager_batches: dict[str, set[int]] = {}  # per tenant, batch sizes no trace holds for

    MAX_RESPECIALISATIONS = 4  # per tenant; beyond, calls outside every traced range run eagerly

    def _adopt(self, graph, plan: Plan) -> None:
        """Take ``graph`` (the pipeline's output) as what runs: its plan, its canonical
        program bound to the device (every program that runs is a canonical one bound
        once), and the versions of the weights it was built from."""
        self.graph, self.plan = graph, plan
        self._canonical = graph.graph["program"]
        gm, counts = self._canonical
        # (tenants, stacked) -> (canonical program, counts): what every bound program came from
        self._lowered = {(self._names, True): self._canonical}
        # the program check's, bound to run (passes/program_check.py); taken off the graph so
        # that a later rebind (set_codegen) lets it and its packed weights go
        handed = graph.graph.pop("bound", None)
        bound = handed[1] if handed and handed[0] is gm and self.codegen == "direct" else self._bind(gm, self._names)
        self._programs = {(self._names, True): (bound, counts)}
        # The traced tenants' tensors are views of the models' own parameters and buffers
        # and share their version counters. Packing and BatchNorm folding copy some of
        # them, so a program built before an in-place change (load_state_dict, p.add_())
        # would mix old and new weights; _execute rebuilds it instead. A tenant traced by
        # the fx fallback runs its module itself, always with the current weights.
        self._weights = [t for tg in self._tenants.values() if tg.method == "export"
                         for t in tg.tensors.values()]
        self._versions = list(map(_VERSION, self._weights))

    def _rebuild_if_weights_changed(self) -> None:
        """Compile again from the same traced tenants (their tensors are the models' current
        weights) when any weight changed in place since this program was built. One
        version-counter read per tensor per call; seconds to rebuild, once per change."""
        if list(map(_VERSION, self._weights)) == self._versions:
            return
        with self._lowering:
            if list(map(_VERSION, self._weights)) == self._versions:
                return  # another thread rebuilt it
            if self._compile_tenants is None:
                raise StfuseError("the models' weights changed since this program was built, and "
                                  "it has no compiler to build it again: call stfuse.compile again")
            log.info("stfuse: the models' weights changed since compile; compiling again")
            new = self._compile_tenants(dict(self._tenants))
            self.respecialised.clear()  # compiled from the old weights; traced again on demand
            self._eager_batches.clear()
            self._adopt(new.graph, new.plan)
            self.weight_rebuilds += 1

    def _execute(self, active: tuple, args) -> list:
        self._rebuild_if_weights_changed()
        return super()._execute(active, args)

    def _bind(self, gm, active: tuple):
        return bind(gm, self.device, self.codegen, varying_dims(self._specs, active))

    def set_codegen(self, codegen: str) -> None:
        """Run with ``codegen`` ("direct" or "inductor", kernels/bind.py) from now on: every
        program lowered so far is bound again (Inductor compiles each on its first call)."""
        codegen = config.bound_codegen(codegen)
        if codegen == self.codegen:
            return
        with self._lowering:
            self.codegen = codegen
            self._programs = {key: (self._bind(gm, key[0]), counts) for key, (gm, counts) in self._lowered.items()}

    @property
    def program(self):
        """The program that runs every tenant at one batch size: the canonical program
        bound to the device (kernels/bind.py): with codegen="direct" an fx program that on
        CPU calls the ops' torch kernels, and on CUDA plans its grouped GEMMs and replays
        as CUDA graphs (a GraphedProgram with the same ``graph`` and ``code``;
        docs/cuda.md); with "inductor" a kernels.inductor.InductorProgram (``.canonical``
        is what Inductor compiles, ``.error`` why it was given up on)."""
        return self._programs[(self._names, True)][0]

    @property
    def canonical_program(self) -> torch.fx.GraphModule:
        """The same program before binding: aten and stfuse:: custom ops (what export sees)."""
        return self._canonical[0]

    @property
    def tenant_graphs(self) -> Mapping[str, TenantGraph]:
        """Each tenant's traced graph (frontend.TenantGraph), read-only."""
        return MappingProxyType(self._tenants)

    def _can_run_outside_range(self, name: str) -> bool:
        return self._tenants[name].model is not None

    def _outside_range(self, name: str, args, leaves: list):
        """A call outside the batch range the tenant was traced for (the model branches on
        its batch size): the tenant traced again at this batch size and compiled alone,
        reused for every batch size in the new graph's range; the model itself, in eval
        mode, where tracing fails or too many ranges were traced."""
        from .frontend import eval_mode, trace_tenant

        self.outside_range_calls[name] = self.outside_range_calls.get(name, 0) + 1
        batch = next(x.shape[0] for x, s in zip(leaves, self._specs[name].inputs) if s.batched)
        model = self._tenants[name].model
        call = call_of(leaves, self._specs[name].in_spec, self._specs[name].constants)  # (args, kwargs)
        with self._lowering:
            progs = self.respecialised.setdefault(name, [])
            prog = next((p for p in progs if p.specs[name].in_range(batch)), None)
            eager = self._eager_batches.setdefault(name, set())
            if prog is None and batch not in eager and len(progs) < self.MAX_RESPECIALISATIONS:
                try:
                    dynamic = self._tenants[name].meta.get("dynamic")
                    prog = self._compile_tenants({name: trace_tenant(name, model, call, dynamic)})
                    if prog.specs[name].in_range(batch):
                        progs.append(prog)
                    else:  # export traced something that does not hold at this batch either
                        prog = None
                except Exception:  # noqa: BLE001 - the model itself is correct by definition
                    prog = None
                if prog is None:
                    eager.add(batch)  # not traced again: this batch size runs the model itself
        if prog is not None:
            return prog.run({name: call})[name]
        with eval_mode(model), torch.no_grad():
            return model(*call[0], **call[1])

    def _program(self, active: tuple, stacked: bool):
        key = (active, stacked)
        with self._lowering:  # the runtime's threads may ask for one subset at once
            if key not in self._programs:
                from stfuse.passes.lower import lower_program

                gm, counts = lower_program(self.graph, active, stacked)
                self._lowered[key] = (gm, counts)
                self._programs[key] = (self._bind(gm, active), counts)
        return self._programs[key]

    def save(self, path, **kwargs):
        """Write an offline artifact (weights, exported programs, manifest) to directory
        ``path``; ``stfuse.load(path)`` runs it in another process without the models'
        code. Options: see ``stfuse.artifact.save``."""
        from .artifact import save

        self._rebuild_if_weights_changed()
        return save(self, path, **kwargs)

    def __repr__(self) -> str:
        s = self.plan.stats
        return (f"FusedProgram(tenants={self.tenants}, groups={s['fused_groups']}, "
                f"launches {s['launches_before']}->{s['launches_after']})")
