"""passes/match.py: aligning tenants' fusable ops into cross-tenant groups."""

import torch

from stfuse.passes.annotate import annotate
from stfuse.passes.match import match_groups
from stfuse.passes.normalize import normalize

from conftest import tenant_graph


def test_match_aligns_around_extra_ops():
    """Tenant b has an extra linear in the middle; alignment still fuses the rest in order."""
    a = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8),
                            torch.nn.Linear(8, 8))
    g = tenant_graph([a, b], [(torch.randn(2, 8),)] * 2)
    for p in (normalize, annotate, match_groups):
        g = p(g)
    members = sorted(grp.members for grp in g.graph["groups"].values())
    assert members == [("0:linear", "1:linear"), ("0:linear_1", "1:linear_3")]
