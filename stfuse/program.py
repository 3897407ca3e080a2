"""FusedProgram: the compiled multi-tenant program, and its Plan.

``fused(x1, x2)`` runs every tenant; ``fused.run({name: args})`` any subset.
Programs for a subset (and for calls whose tenants differ in batch size) are
lowered from the same scheduled graph on first use and cached: no re-tracing,
no passes re-run.

The calling convention (input checks, program choice per call, output
unflattening) lives in ``TenantCalls`` and reads only ``TenantSpec``s, so a
program loaded from an artifact (stfuse/artifact.py) shares it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import threading
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import InputError
from .frontend import InputSpec, TenantGraph


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"[:80]
    return (f"Tensor[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')} "
            f"on {t.device}")


@dataclass(frozen=True)
class TenantSpec:
    """What calling one tenant needs: its flat input specs and pytree specs.

    ``TenantSpec.of`` takes them from a traced TenantGraph; an artifact's
    manifest records the same fields, so a loaded program checks inputs and
    rebuilds outputs exactly as the compiled one does.
    """

    name: str
    inputs: tuple[InputSpec, ...]  # flat user inputs, in call order
    in_spec: Any  # pytree spec of the positional args tuple
    out_spec: Any  # pytree spec of the model's output
    batch: int  # example batch size
    dynamic: bool  # batch size may change between calls
    batch_range: tuple = (1, None)  # (low, high or None): batch sizes the traced graph holds for

    @classmethod
    def of(cls, tg: TenantGraph) -> TenantSpec:
        return cls(tg.name, tuple(tg.inputs), tg.in_spec, tg.out_spec, tg.batch, tg.dynamic,
                   tuple(tg.batch_range))

    def in_range(self, batch: int) -> bool:
        low, high = self.batch_range
        return not self.dynamic or (low <= batch and (high is None or batch <= high))

    def describe_range(self) -> str:
        low, high = self.batch_range
        return f"[{low}, {'inf' if high is None else high}]"


class Plan:
    """What the compiler decided: fusion groups, schedule, and statistics.

    ``record()`` is the same plan as plain JSON data (groups, stats, passes and
    each tenant's graph for drawing); ``Plan.from_record`` rebuilds a Plan from
    it without the graph, which is how a loaded artifact has one.
    """

    def __init__(self, graph, history):
        self.graph = graph
        self.history = history  # [PassRecord]: name, ms, nodes, groups per pass
        self.stats = self._stats()
        self._record: dict | None = None

    @classmethod
    def from_record(cls, record: dict) -> Plan:
        from stfuse.passes.pipeline import PassRecord

        plan = cls.__new__(cls)
        plan.graph = None
        plan.history = [PassRecord(p["name"], p["ms"], p["nodes"], p["groups"]) for p in record["passes"]]
        plan.stats = dict(record["stats"])
        plan._record = record
        return plan

    @property
    def groups(self) -> dict:
        if self.graph is not None:
            return self.graph.graph["groups"]
        from .ir import Group

        return {r["id"]: Group(r["id"], r["op_class"], tuple(f"{t}:{n}" for t, n, _ in r["members"]),
                               r["epilogue"], tuple(tuple(f) for f in r["folded"]))
                for r in self.record()["groups"]}

    def record(self) -> dict:
        """The plan as JSON-serialisable data (see ``plan_record``)."""
        if self._record is None:
            self._record = plan_record(self.graph, self.history, self.stats)
        return self._record

    def draw(self, path, **kwargs):
        """Draw the tenants' graphs side by side with the fused groups across them
        (stfuse/draw.py; needs matplotlib, the ``plot`` extra). Returns the path."""
        from .draw import draw_plan

        return draw_plan(self.record(), path, **kwargs)

    def _stats(self) -> dict:
        from stfuse.passes import optable
        from stfuse.passes.rows import rows_independent

        g = self.graph
        calls = [k for k, a in g.nodes(data=True) if a["kind"] == "call" and a["op_class"] != "view"]
        fusable = [k for k in calls if g.nodes[k]["op_class"] in optable.FUSABLE]
        fused = {k for grp in self.groups.values() for k in grp.nodes()}
        before = sum(1 for tg in g.graph["tenants"].values() for n in tg.gm.graph.nodes
                     if n.op in ("call_function", "call_module") and n.target not in optable.VIEW_OPS)
        after = len(self.groups) + sum(1 for k in calls if k not in fused)
        return {
            "tenants": len(g.graph["tenants"]),
            "ops": len(calls),
            "fusable_ops": len(fusable),
            "fused_ops": len(fused),
            "fused_groups": len(self.groups),
            "launches_before": before,
            "launches_after": after,
            "coverage": round(len(fused) / len(fusable), 4) if fusable else 0.0,
            "flops": sum(g.nodes[k]["flops"] for k in calls),
            # per tenant: may the runtime merge its requests along dim 0 (passes/rows.py)
            "rows_independent": rows_independent(g),
        }

    def kernels(self) -> dict[str, str]:
        """The generated Triton source of every group's kernel, by group id (CUDA path).

        Rendering needs no GPU; it needs Triton importable only to compile, not to print.
        """
        from stfuse.kernels import codegen

        return {gid: codegen.source_for(f"grouped_{grp.op_class}", grp.epilogue)
                for gid, grp in self.groups.items()}

    def summary(self) -> str:
        """A table of groups (tenants, op, shapes, epilogue) and the totals."""
        rows = [("group", "op", "tenants", "shapes", "epilogue")]
        for r in self.record()["groups"]:
            tenants = ",".join(t for t, _, _ in r["members"])
            shapes = " ".join("x".join(map(str, shape or ())) for _, _, shape in r["members"])
            rows.append((r["id"], r["op_class"], tenants, shapes, r["epilogue"] or "-"))
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(5)]
        lines = ["  ".join(c[:w].ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        s = self.stats
        lines.append("")
        lines.append(f"tenants {s['tenants']}  ops {s['ops']}  fusable {s['fusable_ops']}  "
                     f"fused {s['fused_ops']} in {s['fused_groups']} groups  coverage {s['coverage']:.0%}")
        lines.append(f"launches {s['launches_before']} -> {s['launches_after']}")
        lines.append("passes " + ", ".join(f"{r.name} {r.ms:.0f} ms" for r in self.history))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan({self.stats})"


def _short_label(a: dict) -> str:
    """What a node computes, in a word: the op class for fusable ops, else the op's name."""
    if a["kind"] != "call":
        return a["kind"]
    if a["op_class"] in ("linear", "conv2d", "layer_norm"):
        return a["op_class"]
    target = a["target"]
    if isinstance(target, torch.nn.Module):
        return type(target).__name__
    name = getattr(target, "__name__", None) or str(target)
    parts = str(target).split(".") if isinstance(target, torch._ops.OpOverload) else [name]
    return parts[1] if len(parts) >= 2 else parts[0]


def _tenant_units(g, tenant: str) -> dict:
    """One tenant's graph for drawing: units are its inputs, unfused calls (views and
    parameters left out, edges followed through them), its share of each fused group,
    and its output; edges between units."""
    from . import ir

    owner = {k: gid for gid, grp in g.graph["groups"].items() for k in grp.nodes()}
    units, index, feeds = [], {}, {}

    def unit_of(k):
        a = g.nodes[k]
        if k in owner:
            return owner[k]
        if a["kind"] in ("input", "output") or (a["kind"] == "call" and a["op_class"] != "view"):
            return k
        return None  # a parameter or a view: drawn as the edges that pass through it

    for k in ir.tenant_order(g, tenant):
        u = unit_of(k)
        srcs = set()
        for p in g.predecessors(k):
            pu = unit_of(p)
            srcs |= {pu} if pu is not None else feeds.get(p, set())
        if u is None:
            feeds[k] = srcs
            continue
        if u not in index:
            a = g.nodes[k]
            if u in owner.values():
                grp = g.graph["groups"][u]
                label = grp.op_class + "".join(f" +{s.split(':')[0]}" for s in grp.epilogue.split(",") if s)
                units.append({"id": u, "label": label, "op_class": grp.op_class, "group": u})
            else:
                units.append({"id": a["name"], "label": _short_label(a), "op_class": a["op_class"],
                              "group": None})
            index[u] = len(units) - 1
            feeds[u] = set()
        feeds[u] |= srcs - {u}
    edges = sorted({(index[s], index[u]) for u, srcs in feeds.items() if u in index
                    for s in srcs if s in index})
    return {"nodes": units, "edges": [list(e) for e in edges]}


def plan_record(g, history, stats: dict) -> dict:
    """The plan as JSON data: stats, passes, groups (members as [tenant, node, shape])
    and per tenant the graph that stfuse/draw.py draws."""
    groups = []
    for gid, grp in g.graph["groups"].items():
        members = [[g.nodes[m]["tenant"], g.nodes[m]["name"],
                    None if g.nodes[m]["shape"] is None else [int(d) for d in g.nodes[m]["shape"]]]
                   for m in grp.members]
        groups.append({"id": gid, "op_class": grp.op_class, "members": members,
                       "epilogue": grp.epilogue,
                       "folded": [[g.nodes[k]["name"] for k in f] for f in grp.folded]})
    return {
        "stats": dict(stats),
        "passes": [{"name": r.name, "ms": r.ms, "nodes": r.nodes, "groups": r.groups} for r in history],
        "groups": groups,
        "tenants": {t: _tenant_units(g, t) for t in g.graph["tenants"]},
    }


class TenantCalls:
    """The calling convention of a multi-tenant program, from TenantSpecs alone.

    ``fused(x1, x2)`` runs every tenant, ``run({name: args})`` any subset;
    ``check_inputs`` validates one tenant's args. A subclass sets ``_specs``
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
        if spec.in_spec != pytree.tree_flatten((None,))[1] or not spec.inputs[0].batched:
            return None
        s = spec.inputs[0]
        low, high = spec.batch_range if spec.dynamic else (1, None)
        return s.dtype, s.device, torch.Size(s.shape[1:]), len(s.shape), low, high or float("inf")

    @property
    def tenants(self) -> list[str]:
        return list(self._names)

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
        """Run any subset of tenants: {name: Tensor or tuple of args} -> {name: output}."""
        if not isinstance(inputs, dict) or not inputs:
            raise InputError("run() takes a non-empty dict {tenant name: args}")
        for name in inputs:
            if name not in self._specs:
                raise InputError(f"unknown tenant {name!r}; tenants are {self.tenants}")
        active = tuple(t for t in self._names if t in inputs)
        return dict(zip(active, self._execute(active, [inputs[t] for t in active])))

    def _execute(self, active: tuple, args) -> list:
        flat, batch0, stacked, outside = [], None, True, {}
        for i, (name, a) in enumerate(zip(active, args)):
            leaves, batch = self.check_inputs(name, a)
            if not self._specs[name].in_range(batch):
                outside[i] = leaves
                continue
            flat += leaves
            if self._specs[name].dynamic:
                if batch0 is None:
                    batch0 = batch
                elif batch != batch0:
                    stacked = False
        if outside:  # the traced graph does not hold at this batch size: those tenants run apart
            inside = [i for i in range(len(active)) if i not in outside]
            results = self._execute(tuple(active[i] for i in inside), [args[i] for i in inside]) if inside else []
            done = dict(zip(inside, results))
            done.update({i: self._outside_range(active[i], args[i], leaves) for i, leaves in outside.items()})
            return [done[i] for i in range(len(active))]
        gm, counts = self._programs.get((active, stacked)) or self._program(active, stacked)
        with torch.no_grad():
            out = gm.forward(*flat)
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
        if type(args) is torch.Tensor and fast is not None:
            dtype, device, rest, ndim, low, high = fast
            if (args.dtype is dtype and args.dim() == ndim and args.shape[1:] == rest
                    and low <= args.shape[0] <= high and args.device == device):
                return [args], args.shape[0]
            leaves, spec = [args], ts.in_spec  # the checks below say what is wrong
        elif isinstance(args, torch.Tensor) and len(ts.inputs) == 1:
            leaves, spec = [args], ts.in_spec
        else:
            args = args if isinstance(args, tuple) else (args,)
            leaves, spec = pytree.tree_flatten(args)
        if spec != ts.in_spec:
            raise InputError(f"tenant {name!r}: expected {ts.in_spec.num_leaves} input(s) "
                             f"{[s.describe() for s in ts.inputs]}, got {len(leaves)}: "
                             f"{[_describe(x) for x in leaves]}")
        batch = None
        for i, (x, s) in enumerate(zip(leaves, ts.inputs)):
            where = f"tenant {name!r}, argument {i} ({s.name})"
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{where}: expected {s.describe()}, got {_describe(x)}")
            if x.dtype != s.dtype:
                raise InputError(f"{where}: expected dtype {s.dtype}, got {_describe(x)}")
            if x.device != s.device:
                raise InputError(f"{where}: expected device {s.device}, got {_describe(x)}")
            fixed = s.shape[1:] if s.batched else s.shape
            got = tuple(x.shape[1:]) if s.batched else tuple(x.shape)
            if x.dim() != len(s.shape) or got != fixed:
                raise InputError(f"{where}: expected shape {s.describe()}, got {_describe(x)}")
            if s.batched:
                if x.shape[0] < 1 or (batch is not None and x.shape[0] != batch):
                    raise InputError(f"{where}: batch size {x.shape[0]} differs from the "
                                     f"tenant's other inputs ({batch}) or is empty")
                batch = x.shape[0]
        if batch is not None and not ts.in_range(batch) and not self._can_run_outside_range(name):
            arg = next(i for i, s in enumerate(ts.inputs) if s.batched)
            raise InputError(f"tenant {name!r}, argument {arg} ({ts.inputs[arg].name}): batch size {batch} "
                             f"is outside the range {ts.describe_range()} the program was traced for "
                             "(the model depends on its batch size there), and the model is not "
                             "available to trace again or to run eagerly")
        return leaves, batch if batch is not None else ts.batch


class FusedProgram(TenantCalls):
    """Compiled tenants; call with one argument per tenant, or ``run`` a subset."""

    def __init__(self, graph, history):
        self.graph = graph
        self._tenants: dict[str, TenantGraph] = graph.graph["tenants"]
        self.plan = Plan(graph, history)
        self._canonical = graph.graph["program"]
        self._init_calls({n: TenantSpec.of(tg) for n, tg in self._tenants.items()})
        # On CPU the programs that run call the ops' CPU kernels directly (lower.py).
        self._direct = all(tg.device.type == "cpu" for tg in self._tenants.values())
        if not self._direct:
            self._programs[(self._names, True)] = self._canonical
        self._lowering = threading.Lock()
        # Tenants traced again for batch sizes outside their graph's range: name -> [FusedProgram]
        self.respecialised: dict[str, list[FusedProgram]] = {}
        self.outside_range_calls: dict[str, int] = {}  # per tenant, calls outside its traced range
        self._eager_batches: dict[str, set[int]] = {}  # per tenant, batch sizes no trace holds for

    MAX_RESPECIALISATIONS = 4  # per tenant; beyond, calls outside every traced range run eagerly

    @property
    def program(self) -> torch.fx.GraphModule:
        """The fx program running every tenant at one batch size, calling stfuse:: ops."""
        return self._canonical[0]

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
        args = args if isinstance(args, tuple) else (args,)
        with self._lowering:
            progs = self.respecialised.setdefault(name, [])
            prog = next((p for p in progs if p._specs[name].in_range(batch)), None)
            eager = self._eager_batches.setdefault(name, set())
            if prog is None and batch not in eager and len(progs) < self.MAX_RESPECIALISATIONS:
                try:
                    from .api import compile_tenants

                    prog = compile_tenants({name: trace_tenant(name, model, args)})
                    if prog._specs[name].in_range(batch):
                        progs.append(prog)
                    else:  # export traced something that does not hold at this batch either
                        prog = None
                except Exception:  # noqa: BLE001 - the model itself is correct by definition
                    prog = None
                if prog is None:
                    eager.add(batch)  # not traced again: this batch size runs the model itself
        if prog is not None:
            return prog.run({name: args})[name]
        with eval_mode(model), torch.no_grad():
            return model(*args)

    def _program(self, active: tuple, stacked: bool):
        key = (active, stacked)
        with self._lowering:  # the runtime's threads may ask for one subset at once
            if key not in self._programs:
                from stfuse.passes.lower import lower_program

                self._programs[key] = lower_program(self.graph, active, stacked, direct=self._direct)
        return self._programs[key]

    def save(self, path, **kwargs):
        """Write an offline artifact (weights, exported programs, manifest) to directory
        ``path``; ``stfuse.load(path)`` runs it in another process without the models'
        code. Options: see ``stfuse.artifact.save``."""
        from .artifact import save

        return save(self, path, **kwargs)

    def __repr__(self) -> str:
        s = self.plan.stats
        return (f"FusedProgram(tenants={self.tenants}, groups={s['fused_groups']}, "
                f"launches {s['launches_before']}->{s['launches_after']})")


class BoundProgram:
    """A program with its weights bound: ``forward(*flat inputs)``."""

    def __init__(self, gm, weights):
        self.gm, self.weights = gm, tuple(weights)

    def forward(self, *flat):
        return self.gm.forward(*self.weights, *flat)


class ChainedPrograms:
    """Several tenants' own programs run one after another (a subset saved unfused)."""

    def __init__(self, parts):
        self.parts = parts  # [(program, number of flat inputs)]

    def forward(self, *flat):
        out, i = [], 0
        for prog, n in self.parts:
            out.extend(prog.forward(*flat[i:i + n]))
            i += n
        return out


class LoadedProgram(TenantCalls):
    """An artifact loaded by ``stfuse.load`` (stfuse/artifact.py), with the call API of
    FusedProgram: ``prog(x1, x2)``, ``run``, ``tenants``, ``check_inputs``, ``plan``.

    ``programs`` maps (tenants, stacked) to the saved programs. A call on a subset
    with no saved program of its own chains its tenants' single-tenant programs:
    the same values within the tolerance table, without fusion across them."""

    def __init__(self, path, manifest, specs, programs, plan, device):
        self.path, self.manifest, self.device = Path(path), manifest, device
        self.plan = plan
        self._init_calls(specs)
        self._saved = programs  # (tenants, stacked) -> (BoundProgram, counts)
        self._programs.update(programs)

    @property
    def program(self) -> torch.fx.GraphModule:
        """The exported program running every tenant at one batch size."""
        return self._saved[(self._names, True)][0].gm

    def _program(self, active: tuple, stacked: bool):
        key = (active, stacked)
        if key not in self._programs:
            if (active, False) in self._saved:  # a per-tenant-batch program fits any call
                self._programs[key] = self._saved[(active, False)]
            else:
                singles = [self._saved[((t,), True)] for t in active]
                parts = [(prog, len(self._specs[t].inputs)) for t, (prog, _) in zip(active, singles)]
                self._programs[key] = (ChainedPrograms(parts), [c for _, counts in singles for c in counts])
        return self._programs[key]

    def __repr__(self) -> str:
        s = self.plan.stats
        return (f"LoadedProgram({str(self.path)!r}, tenants={self.tenants}, groups={s['fused_groups']}, "
                f"device={self.device})")
