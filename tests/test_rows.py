"""passes/rows.py: which tenants' rows are independent along the batch dim (issue 11, item 7)."""

import pytest
import torch
import torch.nn as nn

import stfuse
from stfuse import zoo
from stfuse.passes.rows import row_mixing

from conftest import Center


class Attention(nn.Module):
    """view/transpose/matmul/softmax/layer_norm/flatten: the batch stays apart."""

    def __init__(self):
        super().__init__()
        self.q, self.ln = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        b, s, d = x.shape
        q = self.q(x).view(b, s, 2, 4).transpose(1, 2)
        a = torch.softmax(q @ q.transpose(-1, -2) / 2, dim=-1) @ q
        return self.ln(a.transpose(1, 2).reshape(b, s, d)).flatten(1)


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.c(x))), 1).flatten(1)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ROW_WISE = {  # name -> (model, example row shape)
    "mlp": (lambda: zoo.mlp(8, 16, 8), (8,)),
    "attention": (Attention, (5, 8)),
    "cnn": (Cnn, (3, 9, 9)),
    "softmax_rows": (lambda: Fn(lambda x: torch.softmax(x, -1)), (8,)),
    "cat_features": (lambda: Fn(lambda x: torch.cat([x, x * 2], 1)), (8,)),
    "batch_major_reshape": (lambda: Fn(lambda x: (x.reshape(-1, 4) * 2).reshape(x.shape[0], 8)), (8,)),
    "sized_zeros": (lambda: Fn(lambda x: x + x.new_zeros(x.shape[0], 8)), (8,)),
    "roll_and_pad_features": (lambda: Fn(lambda x: nn.functional.pad(x.roll(2, 1), (1, 1))), (8,)),
}
MIXING = {  # name -> (model, example row shape, what the reason names)
    "mean_over_batch": (Center, (8,), "mean"),
    "softmax_over_batch": (lambda: Fn(lambda x: torch.softmax(x, 0)), (8,), "softmax"),
    "row_positions": (lambda: Fn(lambda x: x + torch.arange(x.shape[0])[:, None]), (8,), "row positions"),
    "times_batch_size": (lambda: Fn(lambda x: x * x.shape[0]), (8,), "batch size"),
    "first_row": (lambda: Fn(lambda x: x - x[0]), (8,), "select"),
    "batch_norm_training": (lambda: Fn(lambda x: nn.functional.batch_norm(x, None, None, training=True)),
                            (8,), "training"),
    "cat_batches": (lambda: Fn(lambda x: torch.cat([x, x * 2])), (8,), "cat"),
    "gram": (lambda: Fn(lambda x: x @ x.t()), (8,), ""),
    "flip": (lambda: Fn(lambda x: x.flip(0)), (8,), "flip"),
    "roll_over_batch": (lambda: Fn(lambda x: x.roll(1, 0)), (8,), "roll"),
    "cumsum_over_batch": (lambda: Fn(lambda x: x.cumsum(0)), (8,), "cumsum"),
    "filled_with_batch_size": (lambda: Fn(lambda x: x + torch.full((x.shape[0], 1), x.shape[0])), (8,),
                               "batch size"),
    "transposed_reshape": (lambda: Fn(lambda x: x.t().reshape(x.shape[0], 8)), (8,), "reshape"),
}


@pytest.fixture(scope="module")
def verdicts():
    torch.manual_seed(0)
    table = {**{n: (f, s) for n, (f, s) in ROW_WISE.items()}, **{n: (f, s) for n, (f, s, _) in MIXING.items()}}
    models = {n: f().eval() for n, (f, _) in table.items()}
    examples = {n: torch.randn(4, *s) for n, (_, s) in table.items()}
    fused = stfuse.compile(models, examples)
    return models, fused


@pytest.mark.parametrize("name", sorted(ROW_WISE))
def test_row_wise_models_are_independent_and_really_are(verdicts, name):
    models, fused = verdicts
    assert row_mixing(fused.graph, name) is None
    assert fused.plan.stats["rows_independent"][name] is True
    x = torch.randn(5, *ROW_WISE[name][1])
    with torch.no_grad():  # the claim, checked in eager: rows alone equal rows together
        together = models[name](x)
        alone = torch.cat([models[name](x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MIXING))
def test_models_that_mix_rows_are_not_independent(verdicts, name):
    _, fused = verdicts
    why = row_mixing(fused.graph, name)
    assert why is not None and MIXING[name][2] in why
    assert fused.plan.stats["rows_independent"][name] is False


def test_a_graph_fixed_to_its_batch_size_is_not_independent():
    """A view to the example batch size: annotate finds no shapes at other batch sizes,
    so nothing can be proven about rows."""
    model = Fn(lambda x: x.view(4, 2, 4).sum(1))
    fused = stfuse.compile([model.eval()], [torch.randn(4, 8)])
    assert "no shape" in row_mixing(fused.graph, "0")
    assert fused.plan.stats["rows_independent"] == {"0": False}
