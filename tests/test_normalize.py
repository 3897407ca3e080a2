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


class _GeluNew(torch.nn.Module):
    """GPT-2's gelu_new as written in transformers, after a linear; ``extra`` also reads
    an intermediate (then the pattern is not the whole story and must stay)."""

    def __init__(self, extra=False, coeff=0.044715):
        super().__init__()
        self.l, self.extra, self.coeff = torch.nn.Linear(8, 8), extra, coeff

    def forward(self, x):
        import math

        x = self.l(x)
        inner = math.sqrt(2.0 / math.pi) * (x + self.coeff * torch.pow(x, 3.0))
        y = 0.5 * x * (1.0 + torch.tanh(inner))
        return (y, inner) if self.extra else y


@pytest.mark.parametrize("extra,coeff,fused", [(False, 0.044715, True), (True, 0.044715, False),
                                               (False, 0.05, False)])
def test_normalize_tanh_gelu_to_one_gelu(extra, coeff, fused):
    """The eight ops of gelu_new become one gelu(approximate="tanh"), and the program still
    matches eager; not where an intermediate is read elsewhere or a constant differs."""
    import stfuse
    from conftest import check_tenants

    torch.manual_seed(0)
    models, args = [_GeluNew(extra, coeff)], [(torch.randn(3, 8),)]
    g = normalize(tenant_graph(models, args))
    gelus = [a["kwargs"] for _, a in g.nodes(data=True) if a["kind"] == "call"
             and a["target"] is torch.ops.aten.gelu.default]
    tanhs = [k for k, a in g.nodes(data=True) if a["kind"] == "call" and a["target"] is torch.ops.aten.tanh.default]
    assert (gelus == [{"approximate": "tanh"}] and not tanhs) if fused else (not gelus and len(tanhs) == 1)
    check_tenants(stfuse.compile(models, args), models, args)
