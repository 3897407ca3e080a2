"""passes/normalize.py: canonical forms (BN folded, dropout dropped, addmm -> linear)."""

import pytest
import torch

from stfuse import zoo
from stfuse.passes.normalize import normalize

from conftest import tenant_graph


def test_normalize_folds_batchnorm_and_drops_dropout():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    g = normalize(tenant_graph([model], [(torch.randn(2, 3, 5, 5),)]))
    targets = {str(a["target"]) for _, a in g.nodes(data=True) if a["kind"] == "call"}
    assert "aten.batch_norm.default" not in targets and "aten.dropout.default" not in targets
    assert "aten.conv2d.default" in targets


def test_normalize_addmm_to_linear():
    pytest.importorskip("transformers")
    model, args = zoo.hf_model("gpt2")
    g = normalize(tenant_graph([model], [args]))
    targets = [str(a["target"]) for _, a in g.nodes(data=True) if a["kind"] == "call"]
    assert "aten.addmm.default" not in targets and targets.count("aten.linear.default") == 8
