"""passes/schedule.py: one deterministic topological order of groups and unfused calls."""

import torch

from stfuse import ir, zoo
from stfuse.passes import pipeline
from stfuse.passes.schedule import schedule

from conftest import tenant_graph


def test_every_call_runs_once_after_its_inputs():
    torch.manual_seed(0)
    models = [zoo.resnet(8, 1), zoo.resnet(8, 1), zoo.mlp(16, 32, 4)]
    args = [(torch.randn(2, 3, 8, 8),)] * 2 + [(torch.randn(2, 16),)]
    g = tenant_graph(models, args)
    for p in pipeline.PASSES[:pipeline.PASSES.index(schedule) + 1]:
        g = p(g)
    groups = g.graph["groups"]
    assert groups, "nothing was fused: the order of groups is not tested"
    step = {}
    for i, s in enumerate(g.graph["schedule"]):
        keys = groups[s.group].nodes() if s.group is not None else (s.node,)
        for k in keys:
            assert k not in step, f"{k} scheduled twice"
            step[k] = i
    calls = {k for k, a in g.nodes(data=True) if a["kind"] == "call"}
    assert calls <= set(step)
    for k in calls:
        for src in ir.refs((g.nodes[k]["args"], g.nodes[k]["kwargs"])):
            if src in step:
                same_stage = step[src] == step[k]  # a folded epilogue reads its group's own output
                assert step[src] < step[k] or same_stage, f"{k} runs before its input {src}"
