"""Tenants' views and attention run once over stacked values (passes/stacked_calls.py),
and only where every member does the same thing: numerics against each tenant's eager
float64 output, and the program text says what ran stacked."""

import pytest
import torch
import torch.nn.functional as F

import stfuse
from stfuse import zoo

from conftest import bert_call, check_tenants, float64_call_reference
from stfuse.tolerances import assert_close


def _sdpa_calls(fused) -> int:
    return sum(n.target is torch.ops.aten.scaled_dot_product_attention.default
               for n in fused.canonical_program.graph.nodes)


class Attention(torch.nn.Module):
    """One self-attention block: qkv projection, heads split by view + transpose, sdpa
    with a mask buffer ([1, 1, S, S]: broadcast over the batch) or none."""

    def __init__(self, dim=24, heads=2, seq=5, masked=True, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        mask = torch.rand(1, 1, seq, seq) > 0.3
        mask[..., 0] = True  # every query sees one key (an all-masked row is NaN in eager too)
        self.register_buffer("mask", mask if masked else None)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_transformers_tenants_attend_once_per_layer(family):
    """Same-architecture HF tenants fused whole: one sdpa per layer for all tenants, the
    activations stacked once, and every tenant's output as its eager one (at the example
    batch and at another)."""
    pytest.importorskip("transformers", reason="transformers is in the test extra")
    pairs = [zoo.hf_model(family, seed=i) for i in range(3)]
    models, args = [m for m, _ in pairs], [a for _, a in pairs]
    fused = stfuse.compile(models, args, tune="off")
    layers = models[0].config.num_hidden_layers
    assert _sdpa_calls(fused) == layers, fused.canonical_program.code
    check_tenants(fused, models, args)
    check_tenants(fused, models, [tuple(torch.cat([a, a[:1]]) for a in x) for x in args])


def test_bert_tenants_with_different_padding_masks_stay_apart_in_their_rows():
    """Stacked attention takes each member's own mask: BERT tenants padded differently
    (the masks differ in value) match their eager outputs."""
    pytest.importorskip("transformers", reason="transformers is in the test extra")
    models = {f"b{i}": zoo.hf_model("bert", seed=i)[0] for i in range(2)}
    calls = {"b0": bert_call(3, 8, seed=0), "b1": bert_call(3, 8, seed=1)}
    calls["b1"]["attention_mask"][:, 5:] = 0  # b1 pads its last 3 positions everywhere
    fused = stfuse.compile(models, calls, tune="off")
    assert _sdpa_calls(fused) == 2
    outs = fused.run(calls)
    for t, m in models.items():
        assert_close(outs[t].last_hidden_state, float64_call_reference(m, calls[t]).last_hidden_state, msg=t)


def test_tenants_whose_heads_differ_attend_apart():
    """Equal projections but 2 heads against 4: the head views differ, so nothing after
    the stacked projection runs stacked, and each tenant's attention is its own."""
    torch.manual_seed(0)
    models = [Attention(heads=2), Attention(heads=4)]
    args = [(torch.randn(3, 5, 24),), (torch.randn(3, 5, 24),)]
    fused = stfuse.compile(models, args, tune="off")
    assert any(grp.op_class == "linear" and len(grp.members) == 2 for grp in fused.plan.groups.values())
    assert _sdpa_calls(fused) == 2
    check_tenants(fused, models, args)


@pytest.mark.parametrize("masked,causal", [(True, False), (False, True), (False, False)])
def test_attention_masks_broadcast_over_the_batch(masked, causal):
    """A [1, 1, S, S] mask of each tenant is stacked and expanded to the batch; is_causal
    and no mask pass through; batches 3 and 1 with one compiled program."""
    torch.manual_seed(1)
    models = [Attention(masked=masked, causal=causal) for _ in range(3)]
    args = [(torch.randn(3, 5, 24),) for _ in models]
    fused = stfuse.compile(models, args, tune="off")
    assert _sdpa_calls(fused) == 1
    check_tenants(fused, models, args)
    check_tenants(fused, models, [(a[0][:1],) for a in args])


def test_tenants_whose_masks_differ_in_kind_attend_apart():
    """One tenant masks with a tensor, the other is causal: the calls differ, so each
    runs its own attention."""
    torch.manual_seed(2)
    models = [Attention(masked=True), Attention(masked=False, causal=True)]
    args = [(torch.randn(2, 5, 24),) for _ in models]
    fused = stfuse.compile(models, args, tune="off")
    assert _sdpa_calls(fused) == 2
    check_tenants(fused, models, args)


def test_a_tenant_reading_a_stacked_view_gets_its_own():
    """A member of a stacked view also read by a tenant's own op (here: an output) is the
    member's own view of its row, whatever layout the stacked value has."""
    torch.manual_seed(3)

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(8, 12), torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.l1(x).view(x.shape[0], 3, 4).transpose(0, 1)
            return self.l2(h), h

    models = [Heads() for _ in range(2)]
    args = [(torch.randn(2, 8),) for _ in models]
    fused = stfuse.compile(models, args, tune="off")
    assert "aten.transpose" in fused.canonical_program.code
    check_tenants(fused, models, args)
