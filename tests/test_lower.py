"""passes/lower.py: one stfuse:: call per fused group (stacked when members are uniform and
share a batch size, else grouped), every unfused call as traced, and the program computes
each tenant's outputs."""

import pytest
import torch

from stfuse import zoo
from stfuse.passes import pipeline
from stfuse.passes.lower import lower, lower_program

from conftest import float64_reference, tenant_graph
from stfuse.tolerances import assert_close


def _scheduled(models, args):
    g = tenant_graph(models, args)
    for p in pipeline.PASSES[:pipeline.PASSES.index(lower)]:
        g = p(g)
    return g


def _stfuse_calls(gm):
    return [n.target.name() for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("stfuse.")]


@pytest.mark.parametrize("stacked", [True, False])
def test_one_stfuse_call_per_group_and_outputs_match_eager(stacked):
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 4) for _ in range(3)]
    args = [(torch.randn(3, 8),) for _ in models]
    g = _scheduled(models, args)
    groups = g.graph["groups"]
    assert groups
    gm, counts = lower_program(g, tuple(g.graph["tenants"]), stacked=stacked)
    calls = _stfuse_calls(gm)
    assert len(calls) == len(groups)
    form = "stacked_" if stacked else "grouped_"
    assert all(c.startswith("stfuse::" + form) for c in calls), calls
    with torch.no_grad():
        outs = gm(*[a for tenant_args in args for a in tenant_args])
    assert counts == [1, 1, 1] and len(outs) == 3  # one flat output per tenant, in tenant order
    for m, a, out in zip(models, args, outs):
        assert_close(out, float64_reference(m, a))
