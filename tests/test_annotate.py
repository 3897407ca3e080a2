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


# model -> the op class of its one norm call (optable.OP_CLASSES rows' ``accepts``)
NORMS = {
    "group_norm": (torch.nn.GroupNorm(2, 4), (2, 4, 3, 3), "group_norm"),
    "group_norm_3d": (torch.nn.GroupNorm(4, 4, affine=False), (2, 4, 5), "group_norm"),
    "layer_norm": (torch.nn.LayerNorm(5), (2, 3, 5), "layer_norm"),
    "layer_norm_2_dims": (torch.nn.LayerNorm((3, 5)), (2, 3, 5), "other"),  # over more than the last dim
}


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_op_classes(name):
    model, shape, want = NORMS[name]
    g = annotate(normalize(tenant_graph([model], [(torch.randn(shape),)])))
    classes = [a["op_class"] for _, a in g.nodes(data=True) if a["kind"] == "call"]
    assert classes == [want]


def test_a_fusable_call_with_keyword_arguments_stays_unfused():
    """Lowering passes a member's positional args to the fused op: a keyword argument
    would be dropped, so the call is not fused at all."""
    g = normalize(tenant_graph([torch.nn.GroupNorm(2, 4)], [(torch.randn(2, 4, 3),)]))
    g = g.copy()
    k = next(k for k, a in g.nodes(data=True) if a["kind"] == "call")
    g.nodes[k]["args"], g.nodes[k]["kwargs"] = g.nodes[k]["args"][:4], {"eps": 0.5}
    assert [a["op_class"] for _, a in annotate(g).nodes(data=True) if a["kind"] == "call"] == ["other"]
