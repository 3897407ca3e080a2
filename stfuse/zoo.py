"""Small tenant models bundled for the demo, the tests and the benchmarks.

Plain torch.nn models here; ``hf_model`` builds transformers models from small
configs with random weights (transformers is an optional, test-only dependency).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def mlp(d_in: int = 64, width: int = 256, d_out: int = 10, depth: int = 3) -> nn.Module:
    layers, d = [], d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def cnn(channels: int = 16, classes: int = 10, in_ch: int = 3) -> nn.Module:
    """Conv-BatchNorm-ReLU stack with a linear head."""
    return nn.Sequential(
        nn.Conv2d(in_ch, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1), nn.BatchNorm2d(channels * 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels * 2, classes),
    )


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def resnet(channels: int = 16, blocks: int = 2, classes: int = 10) -> nn.Module:
    """A ResNet-style residual CNN."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        *[ResidualBlock(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes),
    )


class GroupNormBlock(nn.Module):
    """A diffusion-UNet-style residual block: GroupNorm-SiLU-conv twice, plus the input."""

    def __init__(self, c: int, groups: int, affine: bool = True):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c, affine=affine), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c, affine=affine), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv1(nn.functional.silu(self.norm1(x)))
        return x + self.conv2(nn.functional.silu(self.norm2(y)))


def gn_cnn(channels: int = 16, groups: int = 4, blocks: int = 1, affine: bool = True,
           classes: int = 10) -> nn.Module:
    """A residual CNN normalised with GroupNorm (``groups`` channel groups) instead of BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.GroupNorm(groups, channels, affine=affine), nn.ReLU(),
        *[GroupNormBlock(channels, groups, affine) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes),
    )


class Encoder(nn.Module):
    """A pre-norm transformer encoder layer stack written out (attention via SDPA)."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, ff: int = 128):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
            "ln2": nn.LayerNorm(d), "fc1": nn.Linear(d, ff), "fc2": nn.Linear(ff, d),
        }) for _ in range(layers))

    def forward(self, x):
        B, S, D = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(D, dim=-1)
            q, k, v = (t.reshape(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
            a = nn.functional.scaled_dot_product_attention(q, k, v)
            x = x + blk["proj"](a.transpose(1, 2).reshape(B, S, D))
            x = x + blk["fc2"](nn.functional.gelu(blk["fc1"](blk["ln2"](x))))
        return x


def hf_model(family: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """(model in eval mode, example args) of a small transformers model with random weights."""
    model, args = _hf_model(family, seed)
    return model.eval(), args


def _hf_model(family: str, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    if family == "bert":
        cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, vocab_size=100, max_position_embeddings=64)
        return T.BertModel(cfg), (torch.randint(0, 100, (2, 8)),)
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                           use_cache=False, bos_token_id=0, eos_token_id=0)
        return T.GPT2Model(cfg), (torch.randint(0, 100, (2, 8)),)
    if family == "vit":
        cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=16, patch_size=8)
        return T.ViTModel(cfg), (torch.randn(2, 3, 16, 16),)
    if family == "llama":
        cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=100, max_position_embeddings=64, use_cache=False)
        return T.LlamaModel(cfg), (torch.randint(0, 100, (2, 8)),)
    if family == "resnet":
        cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
        return T.ResNetModel(cfg), (torch.randn(2, 3, 32, 32),)
    raise ValueError(f"unknown family {family!r}")
