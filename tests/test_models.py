"""Structure and numerics on model sets: same-architecture pairs and quads, mixes,
and transformers models nobody here wrote (random weights from small configs)."""

import pytest
import torch

import stfuse
from stfuse import zoo

from conftest import check_tenants

SAME_ARCH = {
    "mlp": (lambda: zoo.mlp(32, 64, 8), lambda: torch.randn(3, 32)),
    "cnn": (lambda: zoo.cnn(8), lambda: torch.randn(2, 3, 12, 12)),
    "resnet": (lambda: zoo.resnet(8, blocks=2), lambda: torch.randn(2, 3, 10, 10)),
    "encoder": (lambda: zoo.Encoder(32, heads=2, layers=1, ff=64), lambda: torch.randn(2, 5, 32)),
}


def _randomize_bn(model):
    """BatchNorm with non-trivial running statistics, so folding is really tested."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("arch", list(SAME_ARCH))
def test_same_architecture_fuses_everything(arch, n):
    torch.manual_seed(n)
    make_model, make_input = SAME_ARCH[arch]
    models = [_randomize_bn(make_model()) for _ in range(n)]
    args = [(make_input(),) for _ in range(n)]
    fused = stfuse.compile(models, args)
    s = fused.plan.stats
    assert s["coverage"] == 1.0, fused.plan.summary()
    assert s["launches_after"] < s["launches_before"]
    assert all(len(grp.members) == n for grp in fused.plan.groups.values())
    check_tenants(fused, models, args)


def test_stacked_chain_keeps_one_stack():
    """Same-shape MLPs: inputs are stacked once and stay stacked through every layer."""
    torch.manual_seed(0)
    models = [zoo.mlp(16, 32, 4, depth=4) for _ in range(3)]
    fused = stfuse.compile(models, [(torch.randn(2, 16),)] * 3)
    code = fused.canonical_program.code
    assert code.count("aten.stack") == 1
    assert code.count("stfuse.stacked_linear") == 4
    assert "aten.linear" not in code


@pytest.mark.parametrize("mix", ["mlp_cnn", "mlp_widths", "cnn_encoder"])
def test_heterogeneous_mixes_stay_correct(mix):
    torch.manual_seed(1)
    if mix == "mlp_cnn":
        models = [zoo.mlp(32, 64, 8), zoo.cnn(8)]
        args = [(torch.randn(2, 32),), (torch.randn(2, 3, 12, 12),)]
    elif mix == "mlp_widths":
        models = [zoo.mlp(32, 64, 8), zoo.mlp(32, 96, 8), zoo.mlp(32, 64, 8)]
        args = [(torch.randn(2, 32),)] * 3
    else:
        models = [zoo.cnn(8), zoo.Encoder(32, heads=2, layers=1, ff=64)]
        args = [(torch.randn(2, 3, 12, 12),), (torch.randn(2, 5, 32),)]
    fused = stfuse.compile(models, args)
    check_tenants(fused, models, args)
    if mix == "mlp_widths":
        # The two equal MLPs fuse on every layer; the wider one joins only where shapes allow.
        assert fused.plan.stats["fused_groups"] >= 3


def test_mixed_shapes_grouped_path_on_cuda_cost_model(monkeypatch):
    """With the GPU cost model, unequal members share one grouped launch (CPU numerics)."""
    monkeypatch.setenv("STFUSE_DEVICE_MODEL", "cuda")
    torch.manual_seed(2)
    models = [zoo.mlp(32, 64, 8), zoo.mlp(24, 96, 8)]
    args = [(torch.randn(3, 32),), (torch.randn(5, 24),)]
    fused = stfuse.compile(models, args)
    assert "stfuse.grouped_linear" in fused.canonical_program.code
    assert fused.plan.stats["coverage"] == 1.0
    check_tenants(fused, models, args)


HF_PAIRS = [("bert", "bert"), ("gpt2", "gpt2"), ("vit", "vit"), ("resnet", "resnet"),
            ("bert", "vit"), ("gpt2", "bert"), ("resnet", "vit")]


@pytest.mark.parametrize("fam_a,fam_b", HF_PAIRS)
def test_transformers_pairs(fam_a, fam_b):
    pytest.importorskip("transformers", reason="transformers is in the test extra")
    (m1, a1), (m2, a2) = zoo.hf_model(fam_a, seed=0), zoo.hf_model(fam_b, seed=1)
    fused = stfuse.compile([m1, m2], [a1, a2])
    outs = check_tenants(fused, [m1, m2], [a1, a2])
    with torch.no_grad():
        assert type(outs[0]) is type(m1(*a1))  # a ModelOutput comes back as one
    if fam_a == fam_b:
        assert fused.plan.stats["coverage"] == 1.0, fused.plan.summary()
    # Another batch size than the example, without recompiling.
    b1 = tuple(torch.cat([a, a[:1]]) for a in a1)
    b2 = tuple(torch.cat([a, a, a[:1]]) for a in a2)
    check_tenants(fused, [m1, m2], [b1, b2])


def _group_norm_groups(fused):
    return [grp for grp in fused.plan.groups.values() if grp.op_class == "group_norm"]


def test_group_norm_tenants_stack():
    """Three same-shape GroupNorm CNNs: every group_norm joins a 3-member group, run stacked."""
    torch.manual_seed(3)
    models = [zoo.gn_cnn(8, groups=4, blocks=1) for _ in range(3)]
    args = [(torch.randn(2, 3, 9, 9),) for _ in models]
    fused = stfuse.compile(models, args)
    assert fused.plan.stats["coverage"] == 1.0, fused.plan.summary()
    groups = _group_norm_groups(fused)
    assert len(groups) == 3 and all(len(grp.members) == 3 for grp in groups)
    code = fused.canonical_program.code
    assert code.count("stfuse.stacked_group_norm") == 3 and "aten.group_norm" not in code
    check_tenants(fused, models, args)
    check_tenants(fused, models, [(torch.randn(3, 3, 9, 9),) for _ in models])  # another batch


def test_group_norm_tenants_of_different_shapes_group(monkeypatch):
    """Different widths, images, group counts and eps, affine and not: one grouped launch per
    layer with the GPU cost model (CPU numerics), at the example batch and at mixed batches."""
    monkeypatch.setenv("STFUSE_DEVICE_MODEL", "cuda")
    torch.manual_seed(4)
    models = [zoo.gn_cnn(8, groups=4), zoo.gn_cnn(12, groups=3, affine=False), zoo.gn_cnn(8, groups=8)]
    models[2][1].eps = 1e-3
    sizes = (9, 7, 6)
    fused = stfuse.compile(models, [(torch.randn(2, 3, s, s),) for s in sizes])
    groups = _group_norm_groups(fused)
    assert len(groups) == 3 and all(len(grp.members) == 3 for grp in groups), fused.plan.summary()
    code = fused.canonical_program.code
    assert code.count("stfuse.grouped_group_norm") == 3 and "aten.group_norm" not in code
    check_tenants(fused, models, [(torch.randn(b, 3, s, s),) for b, s in zip((2, 2, 2), sizes)])
    check_tenants(fused, models, [(torch.randn(b, 3, s, s),) for b, s in zip((1, 3, 2), sizes)])
