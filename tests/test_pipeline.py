"""passes/pipeline.py: ir.verify after every pass, purity (no pass mutates its input),
determinism, and random DAGs through the whole pipeline against eager."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stfuse
from stfuse import ir, zoo
from stfuse.passes import pipeline

from conftest import check_tenants, tenant_graph


def _run_verified(g):
    snapshots = []
    for p in pipeline.PASSES:
        before = {k: dict(a) for k, a in g.nodes(data=True)}
        g2 = p(g)
        ir.verify(g2)
        # Pure: the input graph is unchanged.
        assert {k: dict(a) for k, a in g.nodes(data=True)}.keys() == before.keys()
        for k, a in g.nodes(data=True):
            assert a == before[k], f"{p.__name__} mutated {k}"
        snapshots.append(g2)
        g = g2
    return g


def test_verify_after_every_pass_and_purity():
    torch.manual_seed(0)
    models = [zoo.resnet(8, 1), zoo.resnet(8, 1), zoo.Encoder(32, 2, 1, 64)]
    args = [(torch.randn(2, 3, 8, 8),), (torch.randn(2, 3, 8, 8),), (torch.randn(2, 4, 32),)]
    _run_verified(tenant_graph(models, args))


def test_deterministic():
    torch.manual_seed(0)
    models = [zoo.cnn(8), zoo.cnn(8), zoo.mlp(16, 32, 4)]
    args = [(torch.randn(2, 3, 8, 8),)] * 2 + [(torch.randn(2, 16),)]
    plans = [pipeline.run(tenant_graph(models, args))[0] for _ in range(2)]
    assert plans[0].graph["groups"] == plans[1].graph["groups"]
    assert plans[0].graph["schedule"] == plans[1].graph["schedule"]


# --- property test: random DAGs of linear / conv / pointwise ops ----------------

class RandomNet(torch.nn.Module):
    """A random DAG: each step applies an op to one earlier value (maybe adding another)."""

    def __init__(self, plan, width):
        super().__init__()
        self.plan = plan
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(width, width) if kind == "linear" else torch.nn.Identity()
            for kind, _, _ in plan)

    def forward(self, x):
        values = [x]
        for (kind, src, other), layer in zip(self.plan, self.layers):
            v = values[src % len(values)]
            if kind == "linear":
                v = layer(v)
            elif kind == "relu":
                v = torch.relu(v)
            elif kind == "tanh":
                v = torch.tanh(v)
            elif kind == "scale":
                v = v * 0.5
            else:  # add another earlier value: a residual
                v = v + values[other % len(values)]
            values.append(v)
        return values[-1]


step = st.tuples(st.sampled_from(["linear", "linear", "relu", "tanh", "scale", "add"]),
                 st.integers(0, 8), st.integers(0, 8))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(plans=st.lists(st.lists(step, min_size=1, max_size=7), min_size=2, max_size=4),
       seed=st.integers(0, 2**16), same=st.booleans())
def test_random_dags_verify_and_match_eager(plans, seed, same):
    torch.manual_seed(seed)
    if same:
        plans = [plans[0]] * len(plans)
    models = [RandomNet(p, 8) for p in plans]
    args = [(torch.randn(2, 8),) for _ in models]
    _run_verified(tenant_graph(models, args))
    fused = stfuse.compile(models, args)
    check_tenants(fused, models, args)
