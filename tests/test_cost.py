"""passes/cost.py: the cost model that drops groups whose one launch does not pay."""

import torch

import stfuse
from stfuse import zoo
from stfuse.passes.cost import DEVICES, estimate


def test_cost_model_drops_group_of_huge_unequal_gemms():
    # A mixed group on CPU pays a per-member loop and saves no launches worth it.
    torch.manual_seed(0)
    models = [zoo.mlp(32, 64, 8, depth=1), zoo.mlp(24, 64, 8, depth=1)]
    fused = stfuse.compile(models, [(torch.randn(2, 32),), (torch.randn(2, 24),)])
    assert fused.plan.stats["fused_groups"] == 0
    fused_us, separate_us = estimate(
        fused.graph, ["0:linear", "1:linear"], DEVICES["cuda"])
    assert fused_us < separate_us  # on a GPU the same group pays off
