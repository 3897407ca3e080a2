"""match: propose fusion groups across tenants.

Three parts, kept apart (like torch.fx's CapabilityBasedPartitioner):
``compatible`` says which ops may share a group, ``propose_groups`` aligns the
tenants' sequences of fusable ops, ``merge_groups`` turns aligned columns into
groups.

The alignment is order-preserving: each tenant's fusable ops appear in the
columns in that tenant's own (topological) order, so running the columns in
order runs every tenant in an order it already allowed. A path between two
groups always goes forward in column order, hence no cycle. Tenants are
aligned one by one against the columns built so far (progressive multiple
sequence alignment with a Needleman-Wunsch table, no gap cost); ties prefer a
match, so identical tenants align on the diagonal and fuse every fusable op.

Before/after (two MLP tenants)::

    a:lin1 -> a:relu -> a:lin2          g0 = {a:lin1, b:lin1}
    b:lin1 -> b:relu -> b:lin2    ->    g1 = {a:relu, b:relu}
                                        g2 = {a:lin2, b:lin2}
"""

from __future__ import annotations

from stfuse import ir
from stfuse.ir import FusedOp, Ref

from . import optable



def class_key(g, k) -> tuple:
    """Ops with equal class keys are compatible."""
    a = g.nodes[k]
    key = (a["op_class"], a["dtype"], str(g.graph["tenants"][a["tenant"]].device))
    if a["op_class"] == "pointwise":
        _, step, _ = optable.pointwise_step(g, k)
        key += (str(step),)
    return key


def uniform_key(g, k) -> tuple:
    """Ops with equal uniform keys have equal shapes and parameters at every common batch."""
    a = g.nodes[k]

    def arg_key(v):
        if isinstance(v, Ref):
            return g.nodes[v.key]["sig"]
        if isinstance(v, float) and a["op_class"] == "pointwise":
            return "scalar"  # members may use different constants
        return v if not isinstance(v, list) else tuple(v)

    return (a["sig"],) + tuple(arg_key(v) for v in a["args"])


def compatible(g, a: str, b: str) -> bool:
    return class_key(g, a) == class_key(g, b)


def _score_fn(g, keys):
    ck = {k: class_key(g, k) for k in keys}
    uk = {k: uniform_key(g, k) for k in keys}

    def score(a, b):
        if ck[a] != ck[b]:
            return 0
        return optable.OP_CLASSES[ck[a][0]].match_weight + (uk[a] == uk[b])

    return score


def fusable_sequence(g, tenant) -> list[str]:
    return [k for k in ir.tenant_order(g, tenant) if g.nodes[k]["op_class"] in optable.FUSABLE]


def align(columns, seq, score):
    """Columns merged with seq by the best-scoring order-preserving alignment."""
    n, m = len(columns), len(seq)
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        rep = columns[i - 1][0]
        row, prev = best[i], best[i - 1]
        for j in range(1, m + 1):
            s = score(rep, seq[j - 1])
            row[j] = max(prev[j], row[j - 1], prev[j - 1] + s if s else -1)
    merged = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            s = score(columns[i - 1][0], seq[j - 1])
            if s and best[i][j] == best[i - 1][j - 1] + s:
                merged.append(columns[i - 1] + [seq[j - 1]])
                i, j = i - 1, j - 1
                continue
        if i > 0 and best[i][j] == best[i - 1][j]:
            merged.append(columns[i - 1])
            i -= 1
        else:
            merged.append([seq[j - 1]])
            j -= 1
    return merged[::-1]


def propose_groups(g) -> list[list[str]]:
    """Aligned columns of fusable ops, one member per tenant at most, in a valid order."""
    seqs = [fusable_sequence(g, t) for t in g.graph["tenants"]]
    score = _score_fn(g, [k for s in seqs for k in s])
    columns: list[list[str]] = []
    for seq in seqs:
        columns = align(columns, seq, score) if columns else [[k] for k in seq]
    return columns


def merge_groups(g, columns) -> object:
    """A new graph whose groups are the columns with two or more members."""
    g = g.copy()
    groups = {}
    for col in columns:
        if len(col) < 2:
            continue
        gid = f"g{len(groups)}"
        groups[gid] = FusedOp(gid, g.nodes[col[0]]["op_class"], tuple(col))
        for k in col:
            g.nodes[k]["group"] = gid
    g.graph["groups"] = groups
    return g


def match_groups(g):
    """Propose and merge fusion groups across tenants; returns a new graph."""
    return merge_groups(g, propose_groups(g))
