"""horizontal: group independent same-class ops within one tenant.

match_groups fuses across tenants, one member per tenant. Inside one model,
independent operators of one class can share a launch too: the Q, K and V
projections of attention (three linears reading one input), the parallel
branches of an inception block, the experts of a mixture. This pass runs after
drop_unprofitable and groups the fusable ops left ungrouped (never matched, or
in a cross-tenant group the cost pass dropped); groups already kept stay
exactly as they are. Each proposed group is priced like a cross-tenant one (cost.best_split, in
the graph's tuning mode): kept whole, split into equal-shape subgroups, or dropped.

Which ops may share a group (the three parts kept apart, as in match):

- supported: ungrouped calls of a fusable op class (optable.FUSABLE);
- compatible: one tenant and equal ``match.class_key`` (op class, dtype,
  device, pointwise step); shapes may differ (the grouped kernels take
  per-member shapes, and the cost pass splits or drops what does not pay);
- independent: equal *level* on the quotient graph (existing groups
  contracted), where

      level(v) = max over inputs u of  level(u) + (1 if u is fusable or a group else 0)

  Every edge leaving a fusable op or a group raises the level, every other
  edge keeps or raises it. So two ops of one level have no path between them,
  and contracting sets of equal-level ops cannot close a cycle: a cycle would
  have to leave one of the new groups (level + 1) and come back to it. The
  quotient check at the end is a guard, not the mechanism.

Deterministic: buckets are formed by (tenant, level, class key), numbered in
order of (tenant, level, first member's position); members keep tenant order;
a bucket split by the cost pass numbers its parts ``h<i>.<j>``.

Before/after (one attention block; views and the softmax are not fusable)::

    q = linear(x, wq)                    h0 = {q, k, v}    linear, one [3, ...] launch
    k = linear(x, wk)              ->
    v = linear(x, wv)
    o = linear(attn(q, k, v), wo)        o stays alone (its level is higher)
"""

from __future__ import annotations

import networkx as nx

from stfuse import ir
from stfuse.errors import StfuseError
from stfuse.ir import FusedOp

from . import optable
from .cost import Pricer, best_split, record, tuning_record
from .match import class_key

PREFIX = "h"  # intra-tenant group ids: h0, h1, ... (cross-tenant ones are g0, g1, ...)


def levels(g) -> dict[str, int]:
    """Level of every node of g (see the module docstring); members of a group share its level."""
    groups = g.graph["groups"]
    q = ir.quotient(g)

    def raises(qn: str) -> bool:
        return qn.startswith(ir.GROUP_PREFIX) or g.nodes[qn]["op_class"] in optable.FUSABLE

    level: dict[str, int] = {}
    for qn in nx.topological_sort(q):
        level[qn] = max((level[u] + raises(u) for u in q.predecessors(qn)), default=0)
    out = {k: level[k] for k in g.nodes if k in level}
    for gid, grp in groups.items():
        for k in grp.nodes():
            out[k] = level[ir.GROUP_PREFIX + gid]
    return out


def candidates(g) -> list[str]:
    """Ungrouped fusable calls, in (tenant, position) order."""
    out = []
    for t in g.graph["tenants"]:
        out += [k for k in ir.tenant_order(g, t)
                if g.nodes[k]["kind"] == "call" and g.nodes[k]["group"] is None
                and g.nodes[k]["op_class"] in optable.FUSABLE]
    return out


def propose_sibling_groups(g) -> list[tuple[str, ...]]:
    """Member tuples of the intra-tenant groups (two or more members each), in a fixed order."""
    lv = levels(g)
    buckets: dict[tuple, list[str]] = {}
    for k in candidates(g):
        buckets.setdefault((g.nodes[k]["tenant"], lv[k], class_key(g, k)), []).append(k)
    tenant_index = {t: i for i, t in enumerate(g.graph["tenants"])}
    found = [tuple(ks) for ks in buckets.values() if len(ks) >= 2]
    found.sort(key=lambda ks: (tenant_index[g.nodes[ks[0]]["tenant"]], lv[ks[0]],
                               g.nodes[ks[0]]["pos"], ks[0]))
    return found


def group_siblings(g):
    """Add the intra-tenant groups of independent same-class ops whose prices say they
    pay (cost.best_split, in the graph's tuning mode); returns a new graph."""
    if g.graph.get("matched_chosen"):
        return g  # every group as matched, as check_program chose before (program_check.chosen_before): no siblings
    g = g.copy()
    groups = dict(g.graph["groups"])
    pricer = Pricer(g)
    tuning = tuning_record(g, pricer)
    for i, proposed in enumerate(propose_sibling_groups(g)):
        parts, prices = best_split(g, proposed, pricer)
        tuning["groups"].update(record(f"{PREFIX}{i}", proposed, parts, prices))
        for j, members in enumerate(parts):
            gid = f"{PREFIX}{i}" if len(parts) == 1 else f"{PREFIX}{i}.{j}"
            if gid in groups:
                raise StfuseError(f"group_siblings: group id {gid} already taken")
            groups[gid] = FusedOp(gid, g.nodes[members[0]]["op_class"], members)
            for k in members:
                g.nodes[k]["group"] = gid
    pricer.close(tuning)
    if not nx.is_directed_acyclic_graph(ir.quotient(g, groups)):
        raise StfuseError("group_siblings: same-level groups closed a cycle (the level rule is broken)")
    g.graph["groups"] = groups
    g.graph["tuning"] = tuning
    return g
