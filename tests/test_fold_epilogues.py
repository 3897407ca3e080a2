"""passes/fold_epilogues.py: bias / activation / residual successors folded into a group."""

import torch

import stfuse
from stfuse import zoo


def test_epilogue_folds_bias_activation_residual():
    torch.manual_seed(0)
    models = [zoo.resnet(8, 1), zoo.resnet(8, 1)]
    fused = stfuse.compile(models, [(torch.randn(2, 3, 8, 8),)] * 2)
    epilogues = {grp.epilogue for grp in fused.plan.groups.values()}
    assert "relu" in epilogues and "add:tensor,relu" in epilogues
