"""schedule: one topological order of stages (fused groups and unfused calls).

Ties break by position in the tenant's own order, then tenant, so tenants
advance in lockstep and a group's members become ready at about the same time;
the order is deterministic.

Before/after::

    groups {g0: a:lin1+b:lin1}         schedule [a:view, b:view, g0, a:sdpa, b:sdpa]
"""

from __future__ import annotations

import networkx as nx

from stfuse import ir
from stfuse.ir import Stage


def schedule(g):
    """Set g.graph["schedule"] to a list of Stage; returns a new graph."""
    g = g.copy()
    q = ir.quotient(g)
    tenant_index = {t: i for i, t in enumerate(g.graph["tenants"])}
    groups = g.graph["groups"]

    def first(qn):
        keys = groups[qn[len(ir.GROUP_PREFIX):]].members if qn.startswith(ir.GROUP_PREFIX) else (qn,)
        return min((g.nodes[k]["pos"], tenant_index[g.nodes[k]["tenant"]], k) for k in keys)

    stages = []
    for qn in nx.lexicographical_topological_sort(q, key=first):
        if qn.startswith(ir.GROUP_PREFIX):
            stages.append(Stage(group=qn[len(ir.GROUP_PREFIX):]))
        elif g.nodes[qn]["kind"] == "call":
            stages.append(Stage(node=qn))
    g.graph["schedule"] = stages
    return g
