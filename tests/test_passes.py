"""The pass pipeline: ir.verify after every pass, purity, determinism, and each
pass's job on a small case."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stfuse
from stfuse import ir, zoo
from stfuse.frontend import trace_tenant
from stfuse.passes import pipeline
from stfuse.passes.cost import DEVICES, estimate

from conftest import check_tenants


def _graph(models, args):
    return ir.build({str(i): trace_tenant(str(i), m, a) for i, (m, a) in enumerate(zip(models, args))})


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
    _run_verified(_graph(models, args))


def test_deterministic():
    torch.manual_seed(0)
    models = [zoo.cnn(8), zoo.cnn(8), zoo.mlp(16, 32, 4)]
    args = [(torch.randn(2, 3, 8, 8),)] * 2 + [(torch.randn(2, 16),)]
    plans = [pipeline.run(_graph(models, args))[0] for _ in range(2)]
    assert plans[0].graph["groups"] == plans[1].graph["groups"]
    assert plans[0].graph["schedule"] == plans[1].graph["schedule"]


def test_normalize_folds_batchnorm_and_drops_dropout():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    g = pipeline.PASSES[0](_graph([model], [(torch.randn(2, 3, 5, 5),)]))
    targets = {str(a["target"]) for _, a in g.nodes(data=True) if a["kind"] == "call"}
    assert "aten.batch_norm.default" not in targets and "aten.dropout.default" not in targets
    assert "aten.conv2d.default" in targets


def test_normalize_addmm_to_linear():
    pytest.importorskip("transformers")
    model, args = zoo.hf_model("gpt2")
    g = pipeline.PASSES[0](_graph([model], [args]))
    targets = [str(a["target"]) for _, a in g.nodes(data=True) if a["kind"] == "call"]
    assert "aten.addmm.default" not in targets and targets.count("aten.linear.default") == 8


def test_match_aligns_around_extra_ops():
    """Tenant b has an extra linear in the middle; alignment still fuses the rest in order."""
    a = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8),
                            torch.nn.Linear(8, 8))
    g = _graph([a, b], [(torch.randn(2, 8),)] * 2)
    for p in pipeline.PASSES[:3]:
        g = p(g)
    members = sorted(grp.members for grp in g.graph["groups"].values())
    assert members == [("0:linear", "1:linear"), ("0:linear_1", "1:linear_3")]


def test_epilogue_folds_bias_activation_residual():
    torch.manual_seed(0)
    models = [zoo.resnet(8, 1), zoo.resnet(8, 1)]
    fused = stfuse.compile(models, [(torch.randn(2, 3, 8, 8),)] * 2)
    epilogues = {grp.epilogue for grp in fused.plan.groups.values()}
    assert "relu" in epilogues and "add:tensor,relu" in epilogues


def test_cost_model_drops_group_of_huge_unequal_gemms():
    # A mixed group on CPU pays a per-member loop and saves no launches worth it.
    torch.manual_seed(0)
    models = [zoo.mlp(32, 64, 8, depth=1), zoo.mlp(24, 64, 8, depth=1)]
    fused = stfuse.compile(models, [(torch.randn(2, 32),), (torch.randn(2, 24),)])
    assert fused.plan.stats["fused_groups"] == 0
    fused_us, separate_us = estimate(
        fused.graph, ["0:linear", "1:linear"], DEVICES["cuda"])
    assert fused_us < separate_us  # on a GPU the same group pays off


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
    _run_verified(_graph(models, args))
    fused = stfuse.compile(models, args)
    check_tenants(fused, models, args)
