"""epilogue: fold pointwise successors (bias, activation, residual add, scale)
into their group's kernel.

A group absorbs the next pointwise op of every member when, for each member,
that op is the only reader of the member's current output and all members do
the same step (``add:tensor``, ``gelu``, ``mul:scalar``...). The folded ops
leave the group they were matched into. A fold that would make the groups
cyclic (a member's residual computed from another tenant's later group) is
refused. A pointwise group starts its epilogue with its own step.

Before/after (two ResNet blocks)::

    g0 = {a:conv, b:conv}                 g0 = {a:conv, b:conv}
    g1 = {a:add(conv, x), b:add(...)}  ->      epilogue "add:tensor,relu"
    g2 = {a:relu, b:relu}                      operands ((%a:x,), (%b:x,))
"""

from __future__ import annotations

from stfuse import ir
from stfuse.ir import FusedOp

from . import optable


def _next_steps(g, grp: FusedOp):
    """The pointwise successors that can be folded into grp, or None."""
    outs = grp.outputs()
    nodes = set(grp.nodes())
    found = []
    for o in outs:
        users = ir.users(g, o)
        if len(users) != 1 or len(list(g.successors(o))) != 1:
            return None
        u = users[0]
        if g.nodes[u]["op_class"] != "pointwise":
            return None
        main, step, operand = optable.pointwise_step(g, u)
        if main.key != o or (operand is not None and getattr(operand, "key", None) in nodes):
            return None
        found.append((u, step, operand))
    if len({str(step) for _, step, _ in found}) != 1:
        return None
    return found


def own_steps(g, grp: FusedOp) -> FusedOp:
    """A pointwise group's epilogue begins with its members' own step."""
    steps = [optable.pointwise_step(g, k) for k in grp.members]
    operands = tuple(() if operand is None else (operand,) for _, _, operand in steps)
    return FusedOp(grp.id, grp.op_class, grp.members, str(steps[0][1]),
                 tuple(() for _ in grp.members), operands)


def _fold(grp: FusedOp, found) -> FusedOp:
    step = found[0][1]
    epilogue = ",".join(filter(None, [grp.epilogue, str(step)]))
    folded = grp.folded or tuple(() for _ in grp.members)
    operands = grp.operands or tuple(() for _ in grp.members)
    return FusedOp(grp.id, grp.op_class, grp.members, epilogue,
                 tuple(f + (u,) for f, (u, _, _) in zip(folded, found)),
                 tuple(ops + ((operand,) if operand is not None else ())
                       for ops, (_, _, operand) in zip(operands, found)))


def fold_epilogues(g):
    """Fold pointwise successors into every group; returns a new graph."""
    g = g.copy()
    groups = {gid: (own_steps(g, grp) if grp.op_class == "pointwise" else grp)
              for gid, grp in g.graph["groups"].items()}
    for gid in list(groups):
        if gid not in groups:
            continue  # already folded into an earlier group
        while True:
            found = _next_steps(g, groups[gid])
            if found is None:
                break
            trial = dict(groups)
            trial[gid] = _fold(groups[gid], found)
            moved = list(trial[gid].nodes())  # a new cycle runs through a group that changed
            for u, _, _ in found:
                donor = next((d for d, grp in trial.items() if u in grp.members), None)
                if donor is not None and donor != gid:
                    moved += trial[donor].nodes()
                    trial = _release(trial, donor, u)
            if ir.on_cycle(g, trial, moved):
                break
            groups = trial
    ir.set_groups(g, groups)
    return g


def _release(groups: dict, gid: str, node: str) -> dict:
    """groups with member ``node`` taken out of group gid (dissolved below two members)."""
    grp = groups[gid]
    groups = dict(groups)
    keep = [i for i, m in enumerate(grp.members) if m != node]
    del groups[gid]
    if len(keep) >= 2:
        groups[gid] = FusedOp(gid, grp.op_class, tuple(grp.members[i] for i in keep), grp.epilogue,
                            tuple(grp.folded[i] for i in keep), tuple(grp.operands[i] for i in keep))
    return groups

