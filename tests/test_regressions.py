"""Regression tests for failures seen on real model families (issue 11).

Each test reproduces one failure with a small hand-written model (and, where it
reproduces, the transformers model it was seen in), and checks every tenant
against its float64 eager reference at several batch sizes: the rule is that a
model that runs in eager never crashes and never returns a wrong value through
stfuse.
"""

import pytest
import torch
import torch.nn as nn

import stfuse

from conftest import assert_close, float64_reference


def _check_batches(models, example_batch, call_batches, make_input):
    """Compile at ``example_batch``, call at each of ``call_batches``; every tenant
    within tolerance of its float64 reference (shapes included)."""
    fused = stfuse.compile(models, [(make_input(i, example_batch),) for i in range(len(models))])
    for b in call_batches:
        xs = [make_input(i, b) for i in range(len(models))]
        outs = fused(*xs)
        outs = outs if len(models) > 1 else [outs]
        for i, (m, x, out) in enumerate(zip(models, xs, outs)):
            assert_close(out, float64_reference(m, (x,)), msg=f"tenant {i} at batch {b}")
    return fused


# --- 1. an elementwise op between an activation and a per-channel parameter ----------


class ChannelScale(nn.Module):
    """The minimal case from the issue: ``l(w * x) * w`` with ``w`` of shape [C]."""

    def __init__(self, d=64):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.l = nn.Linear(d, d)

    def forward(self, x):
        return self.l(self.w * x) * self.w


class RMSNormScale(nn.Module):
    """RMSNorm (Llama/T5 style: ``weight * x``), a layer scale and a division by a
    0-d buffer (DeBERTa-v2's ``/ scale``)."""

    def __init__(self, d=64):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.gamma = nn.Parameter(torch.randn(d) * 0.1)
        self.l = nn.Linear(d, d)
        self.register_buffer("scale", torch.tensor(3.0))

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        h = self.weight * (x * torch.rsqrt(var + 1e-6))
        return x + self.gamma * self.l(h) / self.scale


class ConvLayerScale(nn.Module):
    """ConvNeXt-style layer scale on an NCHW activation: ``gamma[C, 1, 1] * conv(x)``."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        return x + self.gamma * self.conv(x)


@pytest.mark.parametrize("tenants", [2, 3])
@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("model", [ChannelScale, RMSNormScale])
def test_per_channel_parameter_times_activation(model, rank, tenants):
    torch.manual_seed(rank * 10 + tenants)
    models = [model() for _ in range(tenants)]
    inner = (5, 64) if rank == 3 else (64,)
    fused = _check_batches(models, 2, [1, 2, 3, tenants],
                           lambda i, b: torch.randn(b, *inner))
    assert fused.plan.stats["fused_groups"] > 0


def test_per_channel_parameter_compiled_at_batch_one():
    torch.manual_seed(0)
    models = [ChannelScale() for _ in range(2)]
    _check_batches(models, 1, [1, 2, 3], lambda i, b: torch.randn(b, 5, 64))


def test_layer_scale_on_conv_output():
    torch.manual_seed(0)
    models = [ConvLayerScale() for _ in range(2)]
    _check_batches(models, 2, [1, 2, 3], lambda i, b: torch.randn(b, 8, 6, 6))
