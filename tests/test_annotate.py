"""passes/annotate.py: shapes (extrapolated from two probe batches), dtypes, op classes and FLOPs."""

import pytest
import torch

from stfuse.passes.annotate import annotate
from stfuse.passes.normalize import normalize

from conftest import tenant_graph


@pytest.mark.parametrize("batch", [1, 5])
def test_linear_shapes_dtypes_and_flops_match_eager(batch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5))
    g = annotate(normalize(tenant_graph([model], [(torch.randn(batch, 17),)])))
    linears = sorted((a["pos"], a) for _, a in g.nodes(data=True) if a["op_class"] == "linear")
    assert [a["shape"] for _, a in linears] == [(batch, 33), (batch, 5)]
    # the batch-dependence signature: the shapes at the probe batches 2 and 3
    assert [a["sig"] for _, a in linears] == [((2, 33), (3, 33)), ((2, 5), (3, 5))]
    assert all(a["dtype"] == torch.float32 for _, a in linears)
    assert [a["flops"] for _, a in linears] == [2 * batch * 33 * 17, 2 * batch * 5 * 33]
