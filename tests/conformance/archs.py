"""The conformance tier's architectures: one table row per transformers model family
(and a few stfuse.zoo models for ops no small transformers config covers well).

Each row builds a tiny model with random weights from a config (no model hub) and
its inputs at any batch size and, where the model takes a sequence, any length.
``ARCHS[name] = Arch(family, make_model, make_inputs, lengths)``:
``make_model(seed)`` returns the model in eval mode, ``make_inputs(batch, length, seed)``
a tuple of positional args; ``lengths`` are the sequence lengths tested (``(None,)``
where the input size is fixed by the config, as for images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VOCAB = 100
TEXT_LENGTHS = (8, 5)  # two sequence lengths; 5 is odd on purpose
SEEDS = (0, 1)  # two tenants of one architecture, different random weights
EXAMPLE_BATCH = 2  # same-architecture sets compile here and are called at CALL_BATCHES
CALL_BATCHES = (1, 2, 3)  # 2 = the example batch = the tenant count (where misaligned stacks hide)


@dataclass(frozen=True)
class Arch:
    family: str  # "decoder", "encoder", "vision" or "audio"
    make_model: Callable[[int], torch.nn.Module]
    make_inputs: Callable[[int, int | None, int], tuple]
    lengths: tuple = (None,)


def _model(cls_name: str, cfg_name: str, **cfg):
    """make_model for transformers.<cls_name>(transformers.<cfg_name>(**cfg));
    a dotted cls_name names a class outside transformers' top level."""
    def make(seed: int) -> torch.nn.Module:
        import importlib

        import transformers as T

        torch.manual_seed(seed)
        config = getattr(T, cfg_name)(**cfg)
        module, _, name = cls_name.rpartition(".")
        cls = getattr(importlib.import_module(module) if module else T, name)
        return _lively(cls(config)).eval()
    return make


def _zoo(fn_name: str, **kwargs):
    """make_model for ``stfuse.zoo.<fn_name>(**kwargs)``, initialised like the transformers rows."""
    def make(seed: int) -> torch.nn.Module:
        from stfuse import zoo

        torch.manual_seed(seed)
        return _lively(getattr(zoo, fn_name)(**kwargs)).eval()
    return make


def _lively(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's default init for every layer, random BatchNorm statistics, and
    noise on every parameter.

    transformers' init (normal, std 0.02) makes deep tiny CNNs output almost nothing
    (MobileNetV2: |y| < 1e-25, EfficientNet: 0), which would make every tolerance
    check vacuous; with this, every model's outputs are of order 0.1 to 10, and
    BatchNorm folding sees non-trivial statistics. The noise makes every parameter
    differ between tenants: deterministic inits (zero attention biases, sinusoidal
    positions, constant layer scales) would hide one tenant reading another's.
    """
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "reset_parameters") and not isinstance(m, torch.nn.Embedding):
                m.reset_parameters()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        for p in model.parameters():
            p.add_(torch.empty_like(p).uniform_(-0.1, 0.1))
    return model


def _tokens(batch, length, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    # ids from 3 up: no pad / bos / eos id, which some models treat specially.
    return (torch.randint(3, VOCAB, (batch, length), generator=g),)


def _tokens_and_mask(batch, length, seed):
    """(input_ids, attention_mask): row i has i % 3 padded positions at its end."""
    (ids,) = _tokens(batch, length, seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, length - i % 3:] = 0
    return ids, mask


def _images(size: int, channels: int = 3):
    def make(batch, _length, seed):
        g = torch.Generator().manual_seed(2000 + seed)
        return (torch.randn(batch, channels, size, size, generator=g),)
    return make


def _features(n_mels: int, frames: int):
    def make(batch, _length, seed):
        g = torch.Generator().manual_seed(3000 + seed)
        return (torch.randn(batch, n_mels, frames, generator=g),)
    return make


def _waveform(batch, length, seed):
    g = torch.Generator().manual_seed(4000 + seed)
    return (torch.randn(batch, length, generator=g),)


def _images_and_noise(size: int, patches: int):
    """(pixel_values, noise): ViTMAE keeps the patches of lowest noise, so the noise is an input."""
    def make(batch, _length, seed):
        g = torch.Generator().manual_seed(5000 + seed)
        return (torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, patches, generator=g))
    return make


def _experts_as_batched_mm() -> dict:
    """MoE experts as one batched matmul over the routed tokens (transformers >= 5's
    ``experts_implementation``); older releases loop over the experts hit, which export
    cannot trace (a data-dependent guard), so the MoE row is left out there."""
    try:
        from transformers.integrations import moe
    except ImportError:
        return {}
    return {"experts_implementation": "batched_mm"} if hasattr(moe, "batched_mm_experts_forward") else {}


_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           vocab_size=VOCAB, max_position_embeddings=64, use_cache=False)
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=64)
_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=8)


def _text(cls_name, cfg_name, family="decoder", mask=True, **cfg):
    """A text model called with (input_ids, attention_mask), or input_ids alone where
    its second positional parameter is not the mask (``mask=False``)."""
    inputs = _tokens_and_mask if mask else _tokens
    return Arch(family, _model(cls_name, cfg_name, **cfg), inputs, TEXT_LENGTHS)


ARCHS: dict[str, Arch] = {
    # --- decoder LMs ---------------------------------------------------------------
    "llama": _text("LlamaModel", "LlamaConfig", **_LM, num_key_value_heads=2),
    "qwen2": _text("Qwen2Model", "Qwen2Config", **_LM, num_key_value_heads=2),
    "mistral": _text("MistralModel", "MistralConfig", **_LM, num_key_value_heads=2),
    "gemma": _text("GemmaModel", "GemmaConfig", **_LM, num_key_value_heads=2, head_dim=8),
    "phi": _text("PhiModel", "PhiConfig", **_LM),
    "gpt2": _text("GPT2Model", "GPT2Config", mask=False, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                  vocab_size=VOCAB, n_positions=64, use_cache=False),
    "gpt_neox": _text("GPTNeoXModel", "GPTNeoXConfig", **_LM),
    "opt": _text("OPTModel", "OPTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=64, word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64,
                 use_cache=False),
    "falcon": _text("FalconModel", "FalconConfig", mask=False, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=VOCAB, use_cache=False),
    "bloom": _text("BloomModel", "BloomConfig", mask=False, hidden_size=32, n_layer=2, n_head=4,
                   vocab_size=VOCAB, use_cache=False),
    # parallel attention + MLP, rotary on part of the head
    "gptj": _text("GPTJModel", "GPTJConfig", mask=False, n_embd=32, n_layer=2, n_head=2, rotary_dim=8,
                  vocab_size=VOCAB, n_positions=64, use_cache=False),
    # multi-query attention (one shared K/V head)
    "gpt_bigcode": _text("GPTBigCodeModel", "GPTBigCodeConfig", mask=False, n_embd=32, n_layer=2, n_head=2,
                         vocab_size=VOCAB, n_positions=64, use_cache=False),
    # logit soft-capping, sliding-window layers, pre- and post-norms
    "gemma2": _text("Gemma2Model", "Gemma2Config", **_LM, num_key_value_heads=1, head_dim=16),
    # encoder-decoder: cross attention, decoder inputs shifted from input_ids
    "bart": _text("BartModel", "BartConfig", "encoder", d_model=32, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False),
    # --- encoders ------------------------------------------------------------------
    "bert": _text("BertModel", "BertConfig", "encoder", **_ENC),
    "roberta": _text("RobertaModel", "RobertaConfig", "encoder", **_ENC),
    "albert": _text("AlbertModel", "AlbertConfig", "encoder", **_ENC, embedding_size=16),
    "deberta_v2": _text("DebertaV2Model", "DebertaV2Config", "encoder", **_ENC,
                        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8),
    "electra": _text("ElectraModel", "ElectraConfig", "encoder", **_ENC, embedding_size=16),
    "distilbert": _text("DistilBertModel", "DistilBertConfig", "encoder", dim=32, n_layers=2,
                        n_heads=4, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64),
    "t5_encoder": _text("T5EncoderModel", "T5Config", "encoder", d_model=32, d_kv=8, d_ff=64,
                        num_layers=2, num_heads=4, vocab_size=VOCAB, use_cache=False),
    "clip_text": _text("CLIPTextModel", "CLIPTextConfig", "encoder", hidden_size=32,
                       intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                       vocab_size=VOCAB, max_position_embeddings=64),
    # span-based dynamic convolution heads next to self-attention
    "convbert": _text("ConvBertModel", "ConvBertConfig", "encoder", **_ENC, embedding_size=32),
    # token mixing by a 2-D FFT (complex intermediates, real part out) instead of attention
    "fnet": _text("FNetModel", "FNetConfig", "encoder", mask=False, hidden_size=32, num_hidden_layers=2,
                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64),
    # the sequence shrinks between blocks (strided mean pooling of queries) and is upsampled
    # back (repeat_interleave) for the decoder: lengths change inside the model
    "funnel": _text("FunnelModel", "FunnelConfig", "encoder", d_model=32, n_head=4, d_head=8, d_inner=64,
                    block_sizes=[1, 1], num_decoder_layers=1, vocab_size=VOCAB),
    # --- vision --------------------------------------------------------------------
    "vit": Arch("vision", _model("ViTModel", "ViTConfig", **_VIT), _images(16)),
    "deit": Arch("vision", _model("DeiTModel", "DeiTConfig", **_VIT), _images(16)),
    "dinov2": Arch("vision", _model("Dinov2Model", "Dinov2Config", **_VIT), _images(16)),
    "beit": Arch("vision", _model("BeitModel", "BeitConfig", **_VIT, use_relative_position_bias=True),
                 _images(16)),
    "swin": Arch("vision", _model("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                                  depths=[2, 1], num_heads=[2, 2], window_size=4), _images(32)),
    "convnext": Arch("vision", _model("ConvNextModel", "ConvNextConfig", num_stages=2,
                                      hidden_sizes=[8, 16], depths=[1, 1]), _images(32)),
    "resnet": Arch("vision", _model("ResNetModel", "ResNetConfig", embedding_size=8,
                                    hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
                   _images(32)),
    "regnet": Arch("vision", _model("RegNetModel", "RegNetConfig", embedding_size=8,
                                    hidden_sizes=[8, 16], depths=[1, 1], groups_width=4),
                   _images(32)),
    "mobilenet_v2": Arch("vision", _model("MobileNetV2Model", "MobileNetV2Config", image_size=32,
                                          depth_multiplier=0.25), _images(32)),
    "mobilevit": Arch("vision", _model("MobileViTModel", "MobileViTConfig", image_size=32,
                                       hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48],
                                       num_attention_heads=2), _images(32)),
    "efficientnet": Arch("vision", _model("EfficientNetModel", "EfficientNetConfig", image_size=32,
                                          width_coefficient=0.1, depth_coefficient=0.1,
                                          hidden_dim=128), _images(32)),
    "levit": Arch("vision", _model("LevitModel", "LevitConfig", image_size=32, hidden_sizes=[16, 24, 32],
                                   num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
                                   mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2]), _images(32)),
    # BiT: weight-standardised convs, GroupNorm (4 groups here) + ReLU
    "bit": Arch("vision", _model("BitModel", "BitConfig", embedding_size=8, hidden_sizes=[8, 16],
                                 depths=[1, 1], num_groups=4), _images(32)),
    # efficient attention (a strided conv shrinks K/V), depthwise conv in the MLP
    "segformer": Arch("vision", _model("SegformerModel", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1],
                                       sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                       mlp_ratios=[2, 2], patch_sizes=[7, 3], strides=[4, 2]), _images(32)),
    # cosine attention with a log-spaced continuous position bias MLP
    "swinv2": Arch("vision", _model("Swinv2Model", "Swinv2Config", image_size=32, patch_size=4, embed_dim=16,
                                    depths=[1, 1], num_heads=[1, 2], window_size=4), _images(32)),
    # average pooling as the token mixer, GroupNorm(1) as the norm
    "poolformer": Arch("vision", _model("PoolFormerModel", "PoolFormerConfig", hidden_sizes=[16, 32],
                                        depths=[1, 1], num_encoder_blocks=2, patch_sizes=[7, 3],
                                        strides=[4, 2], padding=[2, 1]), _images(32)),
    "mobilenet_v1": Arch("vision", _model("MobileNetV1Model", "MobileNetV1Config", image_size=32,
                                          depth_multiplier=0.25), _images(32)),
    # random masking from an input: argsort of the noise, gather of the kept patches (2 of 4)
    "vit_mae": Arch("vision", _model("ViTMAEModel", "ViTMAEConfig", **_VIT, mask_ratio=0.5),
                    _images_and_noise(16, 4)),
    # not transformers: stfuse.zoo's GroupNorm residual CNN (diffusion-UNet-style blocks)
    "gn_cnn": Arch("vision", _zoo("gn_cnn", channels=12, groups=3, blocks=2), _images(16)),
    # --- audio ---------------------------------------------------------------------
    "whisper_encoder": Arch("audio", _model("transformers.models.whisper.modeling_whisper.WhisperEncoder", "WhisperConfig", d_model=32,
                                            encoder_layers=2, encoder_attention_heads=4,
                                            encoder_ffn_dim=64, num_mel_bins=8,
                                            max_source_positions=16, vocab_size=VOCAB),
                            _features(8, 32)),
    # feat_extract_norm="group" (the default): a GroupNorm over the first conv1d's [B, 8, T] output
    "wav2vec2": Arch("audio", _model("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                     num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                     feat_extract_norm="group"),
                     _waveform, (400, 320)),
}

# mixture of experts: top-2 routing per token over 4 experts (softmax, topk; each token's
# expert weights gathered by index, a bmm per token, the top-2 outputs summed by weight)
if _experts_as_batched_mm():
    ARCHS["mixtral"] = _text("MixtralModel", "MixtralConfig", **_LM, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, **_experts_as_batched_mm())


# Mixed-architecture sets: compiled at one batch size, called at others.
MIXES: dict[str, tuple[str, ...]] = {
    "llama+qwen2+mistral": ("llama", "qwen2", "mistral"),
    "gpt2+opt+bloom": ("gpt2", "opt", "bloom"),
    "phi+falcon+gpt_neox": ("phi", "falcon", "gpt_neox"),
    "bert+roberta+electra": ("bert", "roberta", "electra"),
    "distilbert+albert+clip_text": ("distilbert", "albert", "clip_text"),
    "resnet+convnext+regnet": ("resnet", "convnext", "regnet"),
    "vit+deit+swin": ("vit", "deit", "swin"),
    "mobilenet_v2+efficientnet+mobilevit": ("mobilenet_v2", "efficientnet", "mobilevit"),
    "bert+vit+wav2vec2": ("bert", "vit", "wav2vec2"),
    "gptj+gpt_bigcode+gemma2": ("gptj", "gpt_bigcode", "gemma2"),
    "segformer+poolformer+swinv2": ("segformer", "poolformer", "swinv2"),
}

# Known failures, tracked by issue 11 and fixed in passes/ (the tests xfail them
# strictly, so they flip to pass when the fix lands): architecture or mixed set ->
# reason; "<mix>-B<batches>" where only the call with those batch sizes fails (a
# call whose tenants differ in batch size runs unstacked and passes).
KNOWN_FAILURES: dict[str, str] = {}
