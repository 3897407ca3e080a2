"""stfuse/selfcheck.py: the compile-time self-check runs unfused what it cannot show
correct (issue 11, item 9)."""

import dataclasses

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.kernels import ops

from conftest import check_tenants


def _break(monkeypatch, name, shift):
    """A fused kernel with a bug: its output off by ``shift`` (on the CPU path)."""
    good = ops.OPS[name]

    def wrong(*args, **kwargs):
        out = good.reference(*args, **kwargs)
        return [o + shift for o in out] if isinstance(out, (list, tuple)) else out + shift

    monkeypatch.setitem(ops.OPS, name, dataclasses.replace(good, reference=wrong))


def test_a_correct_plan_passes_the_check_unchanged():
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 4), zoo.mlp(8, 16, 4)]
    fused = stfuse.compile(models, [torch.randn(3, 8), torch.randn(3, 8)])
    assert fused.plan.stats["self_check"] == {"unfused": [], "reasons": {}, "still_differ": []}
    assert fused.plan.stats["coverage"] == 1.0


def test_a_wrong_fused_kernel_leaves_its_tenants_unfused(monkeypatch):
    _break(monkeypatch, "stacked_linear", 1.0)
    torch.manual_seed(0)
    # c and d fuse through convs only (stacked_conv2d, not broken): they must keep their fusion
    convs = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))  # noqa: E731
    models = {"a": zoo.mlp(8, 16, 4), "b": zoo.mlp(8, 16, 4), "c": convs().eval(), "d": convs().eval()}
    args = {"a": torch.randn(3, 8), "b": torch.randn(3, 8), "c": torch.randn(3, 3, 8, 8), "d": torch.randn(3, 3, 8, 8)}
    fused = stfuse.compile(models, args)
    check = fused.plan.stats["self_check"]
    assert check["unfused"] == ["a", "b"] and check["still_differ"] == []
    assert "batch 3" in check["reasons"]["a"]
    # a and b are out of every group; c and d keep theirs
    groups = sorted(grp.members for grp in fused.plan.groups.values())
    assert groups == [("c:conv2d", "d:conv2d"), ("c:conv2d_1", "d:conv2d_1")]
    assert "ungroup_tenants" in [r.name for r in fused.plan.history]
    check_tenants(fused, list(models.values()), [(a,) for a in args.values()])


def test_a_kernel_wrong_only_at_another_batch_size_is_caught(monkeypatch):
    """Rows concatenated to another batch size: a kernel right at the example batch only."""
    good = ops.OPS["stacked_linear"]

    def wrong_unless_3(x, *rest):
        out = good.reference(x, *rest)
        return out if x.shape[1] == 3 else out * 2

    monkeypatch.setitem(ops.OPS, "stacked_linear", dataclasses.replace(good, reference=wrong_unless_3))
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 4), zoo.mlp(8, 16, 4)]
    args = [torch.randn(3, 8), torch.randn(3, 8)]
    fused = stfuse.compile(models, args)
    assert fused.plan.stats["self_check"]["unfused"] == ["0", "1"]
    assert "batch 6" in fused.plan.stats["self_check"]["reasons"]["0"]
    x = torch.randn(5, 8)
    check_tenants(fused, models, [(x,), (x,)])


def test_no_less_accurate_accepts_rounding_and_refuses_a_wrong_value():
    """The second criterion: fused as close to the float64 truth as the float32 graph
    itself (within a factor of 2); a value off by more than rounding fails."""
    from stfuse.selfcheck import no_less_accurate

    torch.manual_seed(0)
    truth = torch.randn(4, 8, dtype=torch.float64) * 400
    graph32 = [(truth + 3e-4).float()]
    assert no_less_accurate([(truth - 2e-4).float()], graph32, [truth])
    assert not no_less_accurate([(truth + 1e-2).float()], graph32, [truth])
    assert not no_less_accurate([(truth + 3e-4).float()], graph32, None)  # no float64 reference
    nan = (truth - 2e-4).float()
    nan[0, 0] = float("nan")
    assert not no_less_accurate([nan], graph32, [truth])
    assert not no_less_accurate([torch.tensor([1, 2])], [torch.tensor([1, 3])], [torch.tensor([1, 3])])


def test_resnet_rounding_is_not_taken_for_a_wrong_kernel():
    """ResNet-50-shaped tenants (transformers ResNetModel, activations up to ~400): with
    eval BatchNorm folded into the convs, the fused outputs were 1.9e-4 from float64 and
    the tenant's own float32 graph 2.3e-4, both past the 1e-4 float32 tolerance, so the
    check ran a correct tenant unfused (even with no fusion: still_differ)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3],
                                    layer_type="bottleneck")
    models, args = [], []
    for seed in (100, 101):  # benchmarks/bench_models.py's resnet50 set, --quick, batch 4
        torch.manual_seed(seed)
        models.append(transformers.ResNetModel(cfg).eval())
        args.append((torch.randn(4, 3, 64, 64),))
    fused = stfuse.compile(models, args, tune="off")
    assert fused.plan.stats["self_check"]["unfused"] == []
    assert fused.plan.stats["fused_groups"] > 0
