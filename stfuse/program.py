"""FusedProgram: the compiled multi-tenant program, and its Plan.

``fused(x1, x2)`` runs every tenant; ``fused.run({name: args})`` any subset.
Programs for a subset (and for calls whose tenants differ in batch size) are
lowered from the same scheduled graph on first use and cached: no re-tracing,
no passes re-run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import InputError
from .frontend import TenantGraph


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"[:80]
    return (f"Tensor[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')} "
            f"on {t.device}")


class Plan:
    """What the compiler decided: fusion groups, schedule, and statistics."""

    def __init__(self, graph, history):
        self.graph = graph
        self.history = history  # [PassRecord]: name, ms, nodes, groups per pass
        self.stats = self._stats()

    @property
    def groups(self) -> dict:
        return self.graph.graph["groups"]

    def _stats(self) -> dict:
        from stfuse.passes import optable

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
        g = self.graph
        rows = [("group", "op", "tenants", "shapes", "epilogue")]
        for gid, grp in self.groups.items():
            tenants = ",".join(g.nodes[m]["tenant"] for m in grp.members)
            shapes = " ".join("x".join(map(str, g.nodes[m]["shape"] or ())) for m in grp.members)
            rows.append((gid, grp.op_class, tenants, shapes, grp.epilogue or "-"))
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


class FusedProgram:
    """Compiled tenants; call with one argument per tenant, or ``run`` a subset."""

    def __init__(self, graph, history):
        self.graph = graph
        self._tenants: dict[str, TenantGraph] = graph.graph["tenants"]
        self.plan = Plan(graph, history)
        self._canonical = graph.graph["program"]
        self._names = tuple(self._tenants)
        # On CPU the programs that run call the ops' CPU kernels directly (lower.py).
        self._direct = all(tg.device.type == "cpu" for tg in self._tenants.values())
        self._programs: dict[tuple, tuple] = {}
        if not self._direct:
            self._programs[(self._names, True)] = self._canonical
        # One-tensor tenants are checked without pytree work, and one-tensor outputs
        # skip unflattening: a few us per call, the whole budget of a batch-1 MLP.
        self._fast_in = {n: self._fast_spec(tg) for n, tg in self._tenants.items()}
        self._single_out = {n: tg.out_spec.is_leaf() for n, tg in self._tenants.items()}
        self._dynamic = {n for n, tg in self._tenants.items() if tg.dynamic}

    @staticmethod
    def _fast_spec(tg):
        if tg.in_spec != pytree.tree_flatten((None,))[1] or not tg.inputs[0].batched:
            return None
        s = tg.inputs[0]
        return s.dtype, s.device, torch.Size(s.shape[1:]), len(s.shape)

    @property
    def tenants(self) -> list[str]:
        return list(self._names)

    @property
    def program(self) -> torch.fx.GraphModule:
        """The fx program running every tenant at one batch size, calling stfuse:: ops."""
        return self._canonical[0]

    def __call__(self, *args):
        if len(args) != len(self._names):
            raise InputError(f"expected {len(self._names)} arguments, one per tenant "
                             f"{self.tenants}, got {len(args)}")
        return self._execute(self._names, args)

    def run(self, inputs: dict) -> dict:
        """Run any subset of tenants: {name: Tensor or tuple of args} -> {name: output}."""
        if not isinstance(inputs, dict) or not inputs:
            raise InputError("run() takes a non-empty dict {tenant name: args}")
        for name in inputs:
            if name not in self._tenants:
                raise InputError(f"unknown tenant {name!r}; tenants are {self.tenants}")
        active = tuple(t for t in self._names if t in inputs)
        return dict(zip(active, self._execute(active, [inputs[t] for t in active])))

    def _execute(self, active: tuple, args) -> list:
        flat, batches = [], set()
        for name, a in zip(active, args):
            leaves, batch = self.check_inputs(name, a)
            flat += leaves
            if name in self._dynamic:
                batches.add(batch)
        stacked = len(batches) <= 1
        gm, counts = self._programs.get((active, stacked)) or self._program(active, stacked)
        with torch.no_grad():
            out = gm.forward(*flat)
        results, i = [], 0
        for name, n in zip(active, counts):
            if self._single_out[name]:
                results.append(out[i])
            else:
                results.append(pytree.tree_unflatten(list(out[i:i + n]), self._tenants[name].out_spec))
            i += n
        return results

    def _program(self, active: tuple, stacked: bool):
        key = (active, stacked)
        if key not in self._programs:
            from stfuse.passes.lower import lower_program

            self._programs[key] = lower_program(self.graph, active, stacked, direct=self._direct)
        return self._programs[key]

    def check_inputs(self, name: str, args: Any) -> tuple[list, int]:
        """Validate one tenant's args; returns (flat tensors, batch size) or raises InputError."""
        if name not in self._tenants:
            raise InputError(f"unknown tenant {name!r}; tenants are {self.tenants}")
        tg = self._tenants[name]
        fast = self._fast_in[name]
        if type(args) is torch.Tensor and fast is not None:
            dtype, device, rest, ndim = fast
            if (args.dtype is dtype and args.dim() == ndim and args.shape[1:] == rest
                    and args.shape[0] >= 1 and args.device == device):
                return [args], args.shape[0]
            leaves, spec = [args], tg.in_spec  # the checks below say what is wrong
        elif isinstance(args, torch.Tensor) and len(tg.inputs) == 1:
            leaves, spec = [args], tg.in_spec
        else:
            args = args if isinstance(args, tuple) else (args,)
            leaves, spec = pytree.tree_flatten(args)
        if spec != tg.in_spec:
            raise InputError(f"tenant {name!r}: expected {tg.in_spec.num_leaves} input(s) "
                             f"{[s.describe() for s in tg.inputs]}, got {len(leaves)}: "
                             f"{[_describe(x) for x in leaves]}")
        batch = None
        for i, (x, s) in enumerate(zip(leaves, tg.inputs)):
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
        return leaves, batch if batch is not None else tg.batch

    def __repr__(self) -> str:
        s = self.plan.stats
        return (f"FusedProgram(tenants={self.tenants}, groups={s['fused_groups']}, "
                f"launches {s['launches_before']}->{s['launches_after']})")
