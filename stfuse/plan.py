"""The plan of a compiled program: its fusion groups, stats, pass history, summary
and drawing. A FusedProgram builds it from the scheduled graph; a loaded artifact
from its plan.json record (``Plan.from_record``), so both read and draw alike."""

from __future__ import annotations

import copy

import torch

from . import ir


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
        from .ir import FusedOp

        return {r["id"]: FusedOp(r["id"], r["op_class"], tuple(f"{t}:{n}" for t, n, _ in r["members"]),
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
            # mode, margin, per candidate group {fused_us, apart_us, decision, source} and the
            # whole-program check {fused_us, apart_us, decision, source} (passes/tune.py)
            "tuning": copy.deepcopy(g.graph.get("tuning")),
        }

    def kernels(self) -> dict[str, str]:
        """The generated Triton source of every group's kernel, by group id (CUDA path).

        Rendering needs no GPU; it needs Triton importable only to compile, not to print.
        """
        from stfuse.kernels import codegen

        return {gid: codegen.source_for(f"grouped_{grp.op_class}", grp.epilogue)
                for gid, grp in self.groups.items()}

    def summary(self) -> str:
        """A table of groups (tenants, op, shapes, epilogue, us fused/apart), the totals
        and what tuning decided."""
        tuned = (self.stats.get("tuning") or {}).get("groups") or {}
        rows = [("group", "op", "tenants", "shapes", "epilogue", "us fused/apart")]
        for r in self.record()["groups"]:
            tenants = ",".join(t for t, _, _ in r["members"])
            shapes = " ".join("x".join(map(str, shape or ())) for _, _, shape in r["members"])
            rows.append((r["id"], r["op_class"], tenants, shapes, r["epilogue"] or "-",
                         _prices(tuned.get(r["id"]))))
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(6)]
        lines = ["  ".join(c[:w].ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        s = self.stats
        lines.append("")
        lines.append(f"tenants {s['tenants']}  ops {s['ops']}  fusable {s['fusable_ops']}  "
                     f"fused {s['fused_ops']} in {s['fused_groups']} groups  coverage {s['coverage']:.0%}")
        lines.append(f"launches {s['launches_before']} -> {s['launches_after']}")
        lines += tuning_lines(s.get("tuning"))
        lines.append("passes " + ", ".join(f"{r.name} {r.ms:.0f} ms" for r in self.history))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan({self.stats})"


def _prices(row: dict | None) -> str:
    """"41/63" (us fused / apart; "~" where the cost model priced it), or "-"."""
    if not row or "fused_us" not in row:
        return "-"
    mark = "~" if row.get("source") == "model" else ""
    return f"{mark}{row['fused_us']:.0f}/{row['apart_us']:.0f}"


def tuning_lines(t: dict | None) -> list[str]:
    """What tuning decided, in words: candidates, how they were priced, what was kept,
    and the whole-program check."""
    if not t:
        return []
    if t["mode"] == "off":
        return ["tune off: every group the matcher formed is kept"]
    cands = {gid: r for gid, r in t["groups"].items() if gid.rpartition(".")[0] not in t["groups"]}
    count = {d: sum(r["decision"] == d for r in cands.values()) for d in ("fused", "split", "apart")}
    sources = {src: sum(r.get("source") == src for r in cands.values()) for src in ("measured", "cached", "model")}
    how = ("priced by the cost model" if t["mode"] == "model" else
           f"{sources['measured']} timed, {sources['cached']} from cache, {sources['model']} by the cost model; "
           f"kept if fusing saves over {t['margin']:.0%}")
    lines = [f"tune {t['mode']}: {len(cands)} candidate groups ({how}): {count['fused']} kept, "
             f"{count['split']} split, {count['apart']} run apart"]
    apart = [f"{gid} {_prices(r)}" for gid, r in cands.items() if r["decision"] == "apart"]
    if apart:
        lines.append("  run apart (us fused/apart): " + ", ".join(apart[:12]) + (" ..." if len(apart) > 12 else ""))
    if t.get("unsaved"):
        lines.append(f"  timed while busy ({t['unsaved']}): not cached, the next compile times again")
    p = t.get("program")
    if p:
        times = ", ".join(f"{name} {p[k]:.0f} us" for name, k in (("fused", "fused_us"), ("apart", "apart_us"),
                                                                    ("every group as matched", "matched_us"))
                          if k in p)
        verdict = {"fused": "fused kept" + (f" ({p['apart_us'] / p['fused_us']:.2f}x)" if "apart_us" in p else ""),
                   "apart": "fused is not faster: every tenant runs apart (no groups kept)",
                   "matched": "every group as matched kept (the groups that lost alone pay together)"}[p["decision"]]
        lines.append(f"whole program{' (cached)' if p.get('source') == 'cached' else ''}: {times}: {verdict}")
    return lines


def _short_label(a: dict) -> str:
    """What a node computes, in a word: the op class for fusable ops, else the op's name."""
    if a["kind"] != "call":
        return a["kind"]
    if a["op_class"] not in ("pointwise", "view", "other"):  # a fusable class names itself
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


