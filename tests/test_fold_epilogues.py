"""passes/fold_epilogues.py: bias / activation / residual successors folded into a group."""

import networkx as nx
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stfuse
from stfuse import ir, zoo
from stfuse.frontend import trace_tenant
from stfuse.ir import FusedOp
from stfuse.passes import pipeline
from stfuse.passes.fold_epilogues import fold_epilogues
from stfuse.passes.match import match_groups


def test_epilogue_folds_bias_activation_residual():
    torch.manual_seed(0)
    models = [zoo.resnet(8, 1), zoo.resnet(8, 1)]
    fused = stfuse.compile(models, [(torch.randn(2, 3, 8, 8),)] * 2)
    epilogues = {grp.epilogue for grp in fused.plan.groups.values()}
    assert "relu" in epilogues and "add:tensor,relu" in epilogues


class _ResidualFromSibling(torch.nn.Module):
    """out = lin1(x) + lin2(x): the residual comes from an independent linear."""

    def __init__(self, d=8):
        super().__init__()
        self.lin1, self.lin2 = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x):
        return self.lin1(x) + self.lin2(x)


class _ChainThroughAdd(torch.nn.Module):
    """out = lin2(lin1(x) + x): lin2 reads what lin1's add computes."""

    def __init__(self, d=8):
        super().__init__()
        self.lin1, self.lin2 = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x):
        return self.lin2(self.lin1(x) + x)


def _linear_groups(models, x):
    """The tenants' graph after match_groups, with the lin1s grouped and the lin2s grouped."""
    g = ir.build({str(i): trace_tenant(str(i), m, (x,)) for i, m in enumerate(models)})
    for p in pipeline.PASSES[:pipeline.PASSES.index(match_groups) + 1]:
        g = p(g)
    g = g.copy()
    linears = sorted((k for k, a in g.nodes(data=True) if a["op_class"] == "linear"),
                     key=lambda k: (g.nodes[k]["tenant"], g.nodes[k]["pos"]))
    first = tuple(k for k in linears if g.nodes[k]["pos"] == min(g.nodes[j]["pos"] for j in linears
                                                                 if g.nodes[j]["tenant"] == g.nodes[k]["tenant"]))
    second = tuple(k for k in linears if k not in first)
    groups = {"g0": FusedOp("g0", "linear", first), "g1": FusedOp("g1", "linear", second)}
    ir.set_groups(g, groups)
    return g


def test_a_fold_that_would_close_a_cycle_is_refused():
    """Tenant 0's add reads its lin2 (group g1); tenant 1's lin2 reads its add. Folding
    both adds into g0 (the lin1s) would make g0 read g1 and g1 read g0."""
    torch.manual_seed(0)
    g = _linear_groups([_ResidualFromSibling(), _ChainThroughAdd()], torch.randn(2, 8))
    assert not ir.on_cycle(g, g.graph["groups"], list(g.nodes))
    out = fold_epilogues(g)
    ir.verify(out)
    assert nx.is_directed_acyclic_graph(ir.quotient(out))
    assert out.graph["groups"]["g0"].epilogue == ""  # the fold was refused
    assert ir.on_cycle(g, {**g.graph["groups"], "g0": _fold_adds(g, g.graph["groups"]["g0"])},
                       g.graph["groups"]["g0"].members)


def _fold_adds(g, grp):
    adds = tuple((ir.users(g, m)[0],) for m in grp.members)
    return FusedOp(grp.id, grp.op_class, grp.members, "add:tensor", adds, tuple(() for _ in adds))


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 14), st.lists(st.tuples(st.integers(0, 13), st.integers(0, 13)), max_size=30),
       st.lists(st.integers(0, 3), min_size=14, max_size=14))
def test_on_cycle_agrees_with_the_quotient_graph(n, edges, colour):
    """Random DAGs and random groups (nodes of one colour > 0): some node of a cycle of the
    quotient is on_cycle, and no node outside every cycle is."""
    g = nx.DiGraph()
    g.add_nodes_from(str(i) for i in range(n))
    g.add_edges_from((str(a), str(b)) for a, b in edges if a < b < n)
    groups = {}
    for c in (1, 2, 3):
        members = tuple(str(i) for i in range(n) if colour[i] == c)
        if len(members) >= 2:
            groups[f"c{c}"] = FusedOp(f"c{c}", "linear", members)
    q = ir.quotient(g, groups)
    owner = {k: ir.GROUP_PREFIX + gid for gid, grp in groups.items() for k in grp.members}
    cyclic = {v for c in nx.simple_cycles(q) for v in c}
    for k in g.nodes:
        assert ir.on_cycle(g, groups, [k]) == (owner.get(k, k) in cyclic)
