"""passes/ungroup.py: the self-check's fallback, taking tenants' nodes out of every group."""

import torch

from stfuse import zoo
from stfuse.passes import pipeline
from stfuse.passes.fold_epilogues import fold_epilogues
from stfuse.passes.ungroup import ungroup

from conftest import tenant_graph


def _grouped(n):
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 4) for _ in range(n)]
    g = tenant_graph(models, [(torch.randn(3, 8),)] * n)
    for p in pipeline.PASSES[:pipeline.PASSES.index(fold_epilogues)]:
        g = p(g)
    return g


def test_ungroup_removes_one_tenant_and_keeps_the_others_fused():
    g = _grouped(3)
    before = {gid: grp.members for gid, grp in g.graph["groups"].items()}
    assert before and all(len(m) == 3 for m in before.values())
    g2 = ungroup(["1"])(g)
    assert {gid: grp.members for gid, grp in g.graph["groups"].items()} == before  # input untouched
    assert {gid: grp.members for gid, grp in g2.graph["groups"].items()} == {
        gid: tuple(m for m in members if not m.startswith("1:")) for gid, members in before.items()}
    for k, a in g2.nodes(data=True):
        if a["tenant"] == "1":
            assert a["group"] is None, k
        elif any(k in members for members in before.values()):
            assert a["group"] is not None, k


def test_a_group_left_with_one_member_is_dropped():
    g2 = ungroup(["0"])(_grouped(2))
    assert g2.graph["groups"] == {}
    assert all(a["group"] is None for _, a in g2.nodes(data=True))
