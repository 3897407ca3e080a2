"""ungroup: take given tenants' nodes out of every fusion group (the self-check's fallback).

Used only when stfuse/selfcheck.py found a tenant whose fused outputs differ
from its own traced graph: the pipeline runs again with this pass after
group_siblings, so that tenant's ops run as its own ops. A group left with one
member is dropped; the other tenants keep their fusion.

Before/after, ungrouping tenant "b"::

    groups = {g0: linear [a:l1, b:l1, c:l1], g1: linear [a:l2, b:l2]}
    -> groups = {g0: linear [a:l1, c:l1]}       (g1 had one member left)
"""

from __future__ import annotations

from stfuse.ir import FusedOp

from .program_check import MATCHED_ATTRS


def ungroup(tenants):
    """The pass that takes ``tenants``' members out of every group."""
    tenants = frozenset(tenants)

    def ungroup_tenants(g):
        g = g.copy()
        kept = {}
        for gid, grp in g.graph["groups"].items():
            members = tuple(m for m in grp.members if g.nodes[m]["tenant"] not in tenants)
            if len(members) >= 2:
                kept[gid] = FusedOp(gid, grp.op_class, members)  # before fold_epilogues: nothing folded yet
            for k in grp.nodes():
                if k not in members or len(members) < 2:
                    g.nodes[k]["group"] = None
        g.graph["groups"] = kept
        for a in MATCHED_ATTRS:  # check_program must not offer those tenants' groups again: it decides anew
            g.graph.pop(a, None)
        return g

    return ungroup_tenants
