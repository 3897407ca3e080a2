"""Public API: compile forms, run subsets, dynamic batch, plan, and every bad input."""

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.errors import InputError, StfuseError, TraceError

from conftest import BranchOnBatch, check_tenants, float64_reference
from stfuse.tolerances import assert_close


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    models = {"a": zoo.mlp(16, 32, 4), "b": zoo.mlp(16, 32, 4)}
    fused = stfuse.compile(models, example_inputs={"a": (torch.randn(3, 16),), "b": torch.randn(3, 16)})
    return models, fused


def test_list_form_names_tenants_by_index():
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 2), zoo.mlp(8, 16, 2)]
    args = [(torch.randn(2, 8),), (torch.randn(2, 8),)]
    fused = stfuse.compile(models, args)
    assert fused.tenants == ["0", "1"]
    check_tenants(fused, models, args)


def test_plan_stats_and_summary(pair):
    _, fused = pair
    s = fused.plan.stats
    for k in ("tenants", "ops", "fusable_ops", "fused_ops", "fused_groups",
              "launches_before", "launches_after", "coverage"):
        assert k in s
    assert s["tenants"] == 2 and s["coverage"] == 1.0
    assert s["launches_after"] < s["launches_before"]
    text = fused.plan.summary()
    assert "linear" in text and "coverage" in text


def test_run_subset_and_dynamic_batch(pair):
    models, fused = pair
    x = torch.randn(5, 16)
    out = fused.run({"b": x})
    assert list(out) == ["b"]
    assert_close(out["b"], float64_reference(models["b"], (x,)))
    # Different batch sizes per tenant in one call (the grouped, unstacked path).
    xa, xb = torch.randn(1, 16), torch.randn(7, 16)
    ya, yb = fused(xa, xb)
    assert_close(ya, float64_reference(models["a"], (xa,)))
    assert_close(yb, float64_reference(models["b"], (xb,)))


def test_wrong_number_of_tenants(pair):
    _, fused = pair
    with pytest.raises(InputError, match="expected 2 arguments"):
        fused(torch.randn(3, 16))


def test_keyword_arguments_are_refused(pair):
    _, fused = pair
    with pytest.raises(InputError, match=r"got keyword argument\(s\) \['foo'\]"):
        fused(torch.randn(3, 16), torch.randn(3, 16), foo=1)


def test_unknown_tenant(pair):
    _, fused = pair
    with pytest.raises(InputError, match="unknown tenant 'c'"):
        fused.run({"c": torch.randn(3, 16)})


def test_wrong_shape(pair):
    _, fused = pair
    with pytest.raises(InputError, match=r"tenant 'a', argument 0 .*expected shape Tensor\[B, 16\]"):
        fused(torch.randn(3, 15), torch.randn(3, 16))


def test_wrong_dtype(pair):
    _, fused = pair
    with pytest.raises(InputError, match="tenant 'b', argument 0 .*expected dtype torch.float32.*float64"):
        fused(torch.randn(3, 16), torch.randn(3, 16, dtype=torch.float64))


def test_wrong_arg_count_for_tenant(pair):
    _, fused = pair
    with pytest.raises(InputError, match=r"tenant 'a': 2 positional argument\(s\) where it takes 1; expected \(Tensor\[B, 16\]"):
        fused.run({"a": (torch.randn(3, 16), torch.randn(3, 16))})


def test_not_a_tensor(pair):
    _, fused = pair
    with pytest.raises(InputError, match="tenant 'a', argument 0"):
        fused.run({"a": ("text",)})


def test_wrong_device(pair):
    _, fused = pair
    meta = torch.empty(3, 16, device="meta")
    with pytest.raises(InputError, match="expected device cpu"):
        fused(meta, torch.randn(3, 16))


def test_empty_model_list():
    with pytest.raises(StfuseError, match="at least one model"):
        stfuse.compile([], [])


def test_mismatched_examples():
    with pytest.raises(StfuseError, match="2 models but 1 example"):
        stfuse.compile([zoo.mlp(), zoo.mlp()], [(torch.randn(1, 64),)])


def test_dict_examples_must_name_tenants():
    with pytest.raises(StfuseError, match=r"missing \['b'\], unknown \['c'\]"):
        stfuse.compile({"a": zoo.mlp(), "b": zoo.mlp()},
                       {"a": torch.randn(1, 64), "c": torch.randn(1, 64)})


def test_bad_tenant_name():
    with pytest.raises(StfuseError, match="tenant names"):
        stfuse.compile({"a:b": zoo.mlp()}, {"a:b": torch.randn(1, 64)})


def test_not_a_module():
    with pytest.raises(TraceError, match="tenant '0': expected a torch.nn.Module"):
        stfuse.compile([lambda x: x], [torch.randn(2)])


def test_models_on_different_devices():
    m2 = zoo.mlp(4, 4, 2).to("meta")
    with pytest.raises(StfuseError, match="one device"):
        stfuse.compile([zoo.mlp(4, 4, 2), m2], [torch.randn(2, 4), torch.empty(2, 4, device="meta")])


class Untraceable(torch.nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent Python control flow defeats both tracers
            return x * 2
        return x


def test_untraceable_model_names_tenant_and_reason():
    with pytest.raises(TraceError, match="tenant 'bad' cannot be traced: torch.export failed"):
        stfuse.compile({"bad": Untraceable()}, {"bad": torch.randn(2, 3)})


def test_plan_kernels_print_generated_triton_source(pair):
    pytest.importorskip("triton")
    _, fused = pair
    sources = fused.plan.kernels()
    assert set(sources) == set(fused.plan.groups)
    assert all("@triton.jit" in src for src in sources.values())
    # the group's epilogue is in its kernel: relu after the first linear
    assert any("tl.maximum" in src for src in sources.values())


class BufferCounter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # state that changes per call: cannot be replayed
        return self.lin(x)


def test_model_mutating_its_buffer_is_refused():
    with pytest.raises(StfuseError, match=r"tenant '0': .*overwrites parameter/buffer"):
        stfuse.compile([BufferCounter()], [torch.randn(2, 4)])


def test_batch_branch_outside_traced_range_is_traced_again():
    torch.manual_seed(0)
    models = {"br": BranchOnBatch().eval(), "mlp": zoo.mlp(8, 16, 8)}
    fused = stfuse.compile(models, example_inputs={"br": torch.randn(4, 8), "mlp": torch.randn(4, 8)})
    assert fused.specs["br"].batch_range == (1, 4)
    assert fused.specs["mlp"].batch_range == (1, None)
    for batch in (8, 3, 12, 1, 5):  # both branches, each traced once
        x, y = torch.randn(batch, 8), torch.randn(batch, 8)
        out_br, out_mlp = fused(x, y)
        assert_close(out_br, float64_reference(models["br"], (x,)), msg=f"batch {batch}")
        assert_close(out_mlp, float64_reference(models["mlp"], (y,)), msg=f"batch {batch}")
        assert_close(fused.run({"br": x})["br"], float64_reference(models["br"], (x,)))
    assert len(fused.respecialised["br"]) == 1  # [5, inf) traced once, at the first call at 8
    assert fused.outside_range_calls["br"] == 6
    assert "mlp" not in fused.outside_range_calls


def test_batch_branch_runs_eagerly_when_it_cannot_be_traced_again(monkeypatch):
    torch.manual_seed(0)
    model = BranchOnBatch().eval()
    fused = stfuse.compile([model], [torch.randn(4, 8)])
    monkeypatch.setattr(type(fused), "MAX_RESPECIALISATIONS", 0)
    x = torch.randn(8, 8)
    assert_close(fused(x)[0], float64_reference(model, (x,)))
    assert fused.respecialised["0"] == []


class BranchOnBatchOfOne(torch.nn.Module):
    """Export assumes batch >= 2 and records no guard for it: the branch at 1 is hidden."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.l(x)
        return y * 2 if x.shape[0] > 1 else y * 3


def test_batch_branch_at_one_is_found_and_runs_apart():
    torch.manual_seed(0)
    model = BranchOnBatchOfOne().eval()
    fused = stfuse.compile([model, zoo.mlp(8, 16, 8)], [torch.randn(4, 8), torch.randn(4, 8)])
    assert fused.specs["0"].batch_range == (2, None)
    assert fused.specs["1"].batch_range == (1, None)
    for batch in (1, 3, 1):
        x = torch.randn(batch, 8)
        assert_close(fused.run({"0": x})["0"], float64_reference(model, (x,)), msg=f"batch {batch}")
    assert fused.outside_range_calls == {"0": 2}
    assert fused.respecialised == {"0": []} and fused._eager_batches == {"0": {1}}  # traced once only
