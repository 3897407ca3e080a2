"""group_siblings: intra-tenant groups of independent ops (Q/K/V, parallel branches,
experts), their invariants, and that cross-tenant grouping is left as it was."""

import networkx as nx
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stfuse
from stfuse import ir
from stfuse.errors import StfuseError
from stfuse.frontend import trace_tenant
from stfuse.ir import FusedOp
from stfuse.passes import pipeline
from stfuse.passes.horizontal import group_siblings, levels

from conftest import check_tenants, float64_reference
from stfuse.tolerances import assert_close


class Attention(nn.Module):
    """Separate Q, K, V projections of one input (the layout of BERT and most HF models)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2)
                   for t in (self.q(x), self.k(x), self.v(x)))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(B, S, D))


class Inception(nn.Module):
    """Four branches from one input: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; pool -> 1x1."""

    def __init__(self, c=8, o=4):
        super().__init__()
        self.b1, self.b2a, self.b3a, self.b4 = (nn.Conv2d(c, o, 1) for _ in range(4))
        self.b2b, self.b3b = nn.Conv2d(o, o, 3, padding=1), nn.Conv2d(o, o, 5, padding=2)

    def forward(self, x):
        r = torch.relu
        return torch.cat([r(self.b1(x)), r(self.b2b(r(self.b2a(x)))), r(self.b3b(r(self.b3a(x)))),
                          r(self.b4(nn.functional.max_pool2d(x, 3, 1, 1)))], 1)


class Experts(nn.Module):
    """A dense mixture: every expert MLP sees the input, a softmax gate weighs them."""

    def __init__(self, d=16, hidden=24, n=4):
        super().__init__()
        self.gate = nn.Linear(d, n)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                     for _ in range(n))

    def forward(self, x):
        w = torch.softmax(self.gate(x), -1)
        return sum(w[..., i:i + 1] * e(x) for i, e in enumerate(self.experts))


CASES = {
    "attention": (Attention, lambda b: torch.randn(b, 5, 16)),
    "inception": (Inception, lambda b: torch.randn(b, 8, 7, 7)),
    "experts": (Experts, lambda b: torch.randn(b, 16)),
}


def _graph(models, args):
    return ir.build({str(i): trace_tenant(str(i), m, a) for i, (m, a) in enumerate(zip(models, args))})


def _passes_until(g, last: str):
    for p in pipeline.PASSES:
        g = p(g)
        ir.verify(g)
        if p.__name__ == last:
            return g
    raise AssertionError(last)


def _member_names(g, grp) -> list[str]:
    return [g.nodes[m]["name"] for m in grp.members]


@pytest.mark.parametrize("case", list(CASES))
def test_single_model_siblings_fuse_and_match_eager(case):
    torch.manual_seed(0)
    make, data = CASES[case]
    model = make().eval()
    x = data(2)
    fused = stfuse.compile([model], [(x,)])
    groups = fused.plan.groups
    members = {gid: [fused.graph.nodes[m]["target"] for m in grp.members] for gid, grp in groups.items()}
    if case == "attention":
        # exactly the three projections: the output projection depends on them
        assert [len(grp.members) for grp in groups.values()] == [3], fused.plan.summary()
        assert all(t is torch.ops.aten.linear.default for t in members[next(iter(groups))])
    elif case == "inception":
        first = [grp for grp in groups.values() if grp.op_class == "conv2d"]
        assert first and len(first[0].members) == 4, fused.plan.summary()  # b1, b2a, b3a, b4
    else:
        linear = sorted(len(grp.members) for grp in groups.values() if grp.op_class == "linear")
        assert linear == [4, 4], fused.plan.summary()  # fc1 and fc2 of every expert
    assert all(len({fused.graph.nodes[m]["tenant"] for m in grp.members}) == 1 for grp in groups.values())
    assert fused.plan.stats["launches_after"] < fused.plan.stats["launches_before"]
    check_tenants(fused, [model], [(x,)])
    y = data(3)  # another batch size, no recompiling
    assert_close(fused(y)[0], float64_reference(model, (y,)))


def test_verify_after_every_pass_and_purity():
    torch.manual_seed(0)
    models = [Attention().eval(), Inception().eval(), Experts().eval()]
    args = [(CASES[c][1](2),) for c in CASES]
    g = _graph(models, args)
    for p in pipeline.PASSES:
        before = {k: dict(a) for k, a in g.nodes(data=True)}
        groups_before = dict(g.graph["groups"])
        g2 = p(g)
        ir.verify(g2)
        assert {k: dict(a) for k, a in g.nodes(data=True)} == before, f"{p.__name__} mutated its input"
        assert g.graph["groups"] == groups_before
        g = g2


def test_same_level_members_have_no_path_and_levels_rise_along_edges():
    torch.manual_seed(0)
    g = _passes_until(_graph([Inception().eval()], [(torch.randn(2, 8, 7, 7),)]), "group_siblings")
    lv = levels(g)
    for a, b in g.edges:
        assert lv[a] <= lv[b]
    for grp in g.graph["groups"].values():
        assert len({lv[m] for m in grp.members}) == 1
        for a in grp.members:
            for b in grp.members:
                assert a == b or not nx.has_path(g, a, b)
    assert nx.is_directed_acyclic_graph(ir.quotient(g))


def test_chain_and_dependent_ops_stay_apart():
    """lin2 reads lin1 and lin3 reads both: no two of them may share a group."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            a = self.l1(x)
            return self.l3(self.l2(a) + a)

    g = _passes_until(_graph([Chain()], [(torch.randn(2, 8),)]), "group_siblings")
    assert g.graph["groups"] == {}


def test_cross_tenant_groups_unchanged():
    """Identical tenants fuse across tenants exactly as match_groups made them; no
    intra-tenant group is added (every fusable op is already grouped)."""
    torch.manual_seed(0)
    models = [Attention().eval() for _ in range(3)]
    args = [(torch.randn(2, 5, 16),) for _ in models]
    matched = _passes_until(_graph(models, args), "match_groups")
    grouped = group_siblings(matched)
    assert grouped.graph["groups"] == matched.graph["groups"]
    fused = stfuse.compile(models, args)
    assert all(len({fused.graph.nodes[m]["tenant"] for m in grp.members}) == 3
               for grp in fused.plan.groups.values())
    assert fused.plan.stats["coverage"] == 1.0


def test_leftovers_of_mixed_tenants_group_within_their_tenant_and_subsets_run():
    torch.manual_seed(0)
    models = {"attn": Attention().eval(), "moe": Experts().eval()}
    args = {"attn": (torch.randn(2, 5, 16),), "moe": (torch.randn(3, 16),)}
    fused = stfuse.compile(models, args)
    intra = [grp for grp in fused.plan.groups.values()
             if len({fused.graph.nodes[m]["tenant"] for m in grp.members}) == 1]
    assert {fused.graph.nodes[grp.members[0]]["tenant"] for grp in intra} == {"attn", "moe"}
    for name in models:  # each tenant alone: the intra groups run without the other tenant
        out = fused.run({name: args[name]})
        assert_close(out[name], float64_reference(models[name], args[name]))
    outs = fused(args["attn"][0], args["moe"][0])
    for name, out in zip(fused.tenants, outs):
        assert_close(out, float64_reference(models[name], args[name]))


def test_deterministic():
    torch.manual_seed(0)
    model, x = Inception().eval(), torch.randn(2, 8, 7, 7)
    plans = [pipeline.run(_graph([model], [(x,)]))[0] for _ in range(2)]
    assert plans[0].graph["groups"] == plans[1].graph["groups"]
    assert plans[0].graph["schedule"] == plans[1].graph["schedule"]


def test_verify_rejects_a_member_reading_another():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    g = _passes_until(_graph([Two()], [(torch.randn(2, 4),)]), "annotate")
    a, b = [k for k, d in g.nodes(data=True) if d["op_class"] == "linear"]
    g.graph["groups"] = {"h0": FusedOp("h0", "linear", (a, b))}
    g.nodes[a]["group"] = g.nodes[b]["group"] = "h0"
    with pytest.raises(StfuseError, match="depends on"):
        ir.verify(g)


class Branchy(nn.Module):
    """Random parallel branches of linear / relu / scale ops off one input, summed."""

    def __init__(self, branches, width=8):
        super().__init__()
        self.branches = branches
        self.layers = nn.ModuleList(nn.ModuleList(nn.Linear(width, width) if op == "linear" else nn.Identity()
                                                  for op in ops) for ops in branches)

    def forward(self, x):
        out = 0
        for ops, layers in zip(self.branches, self.layers):
            v = x
            for op, layer in zip(ops, layers):
                v = layer(v) if op == "linear" else torch.relu(v) if op == "relu" else v * 0.5
            out = out + v
        return out


branch = st.lists(st.sampled_from(["linear", "linear", "relu", "scale"]), min_size=1, max_size=4)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(branches=st.lists(branch, min_size=2, max_size=4), seed=st.integers(0, 2**16))
def test_random_branches_verify_and_match_eager(branches, seed):
    torch.manual_seed(seed)
    model, x = Branchy(branches), torch.randn(3, 8)
    g = _graph([model], [(x,)])
    for p in pipeline.PASSES:
        g = p(g)
        ir.verify(g)
    fused = stfuse.compile([model], [(x,)])
    check_tenants(fused, [model], [(x,)])
