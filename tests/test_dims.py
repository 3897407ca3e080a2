"""Declared dynamic dims (stfuse/dims.py): BERT-style tenants at several sequence lengths
and ViT-style tenants at several image sizes, per call and across calls, mixed with
fixed-shape tenants, against the float64 reference; ranges and sizes checked per call;
artifacts keep the dims."""

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.errors import InputError, StfuseError, TraceError

from conftest import assert_close, bert_call, float64_call_reference, vit_call

pytest.importorskip("transformers")

SEQ = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}


class ViTAnySize(torch.nn.Module):
    """ViTModel with its position table interpolated to the image size."""

    def __init__(self, seed):
        super().__init__()
        self.vit = zoo.hf_model("vit", seed)[0]

    def forward(self, pixel_values):
        return self.vit(pixel_values=pixel_values, interpolate_pos_encoding=True)


@pytest.fixture(scope="module")
def mixed():
    """Two BERTs with a dynamic sequence, two ViTs with a dynamic (square) image side, and a
    fixed-shape MLP; the ViTs trace at 24 (at 16 their patches equal their positions, and
    the model skips the interpolation: see test_a_path_export_kept_no_guard_for)."""
    models = {"b0": zoo.hf_model("bert", 0)[0], "b1": zoo.hf_model("bert", 1)[0],
              "v0": ViTAnySize(0).eval(), "v1": ViTAnySize(1).eval(), "mlp": zoo.mlp(8, 16, 4)}
    examples = {"b0": bert_call(2, 8), "b1": bert_call(2, 8, seed=1), "v0": vit_call(2, 24),
                "v1": vit_call(2, 24, seed=1), "mlp": torch.randn(2, 8)}
    side = {"pixel_values": {2: "side", 3: "side"}}
    fused = stfuse.compile(models, examples, dynamic={"b0": SEQ, "b1": SEQ, "v0": side, "v1": side})
    return models, fused


def _check(models, fused, calls):
    outs = fused.run(calls)
    for t, call in calls.items():
        assert_close(outs[t], float64_call_reference(models[t], call), msg=f"tenant {t}")


# lengths (b0, b1), image sides (v0, v1) and batches: equal sizes stack, others run grouped
CASES = [((8, 8), (24, 24), 2), ((13, 13), (16, 16), 3), ((5, 29), (24, 32), 2), ((64, 2), (40, 16), 1)]


@pytest.mark.parametrize("lengths,sides,batch", CASES, ids=[f"L{c[0]}-S{c[1]}-B{c[2]}" for c in CASES])
def test_lengths_and_image_sizes_per_call(mixed, lengths, sides, batch):
    models, fused = mixed
    calls = {"b0": bert_call(batch, lengths[0], seed=3), "b1": bert_call(batch, lengths[1], seed=4),
             "v0": vit_call(batch, sides[0], seed=5), "v1": vit_call(batch, sides[1], seed=6),
             "mlp": torch.randn(batch, 8)}
    _check(models, fused, calls)


def test_lengths_change_between_calls_without_tracing_again(mixed):
    models, fused = mixed
    for length in (3, 17, 40):
        _check(models, fused, {"b0": bert_call(2, length, seed=length)})
    assert fused.respecialised == {} and fused.outside_range_calls == {}
    assert fused.plan.stats["fused_groups"] > 0 and fused.plan.stats["self_check"]["unfused"] == []
    # programs are keyed by subset and stacked-or-not, never by size: one for b0 alone
    assert [k for k in fused._programs if k[0] == ("b0",)] == [(("b0",), True)]


def test_llama_tenants_at_several_lengths():
    """Decoder tenants (rotary positions, causal mask built from the length) with a
    dynamic sequence, beside a fixed-shape tenant: per call, and across calls."""
    models = {"l0": zoo.hf_model("llama", 0)[0], "l1": zoo.hf_model("llama", 1)[0], "mlp": zoo.mlp(8, 16, 4)}
    fused = stfuse.compile(models, {"l0": bert_call(2, 8), "l1": bert_call(2, 8, seed=1), "mlp": torch.randn(2, 8)},
                           dynamic={"l0": SEQ, "l1": SEQ})
    assert fused.plan.stats["fused_groups"] > 0
    for lengths, batch in (((8, 8), 2), ((5, 19), 1), ((12, 12), 3)):
        _check(models, fused, {"l0": bert_call(batch, lengths[0], seed=3), "l1": bert_call(batch, lengths[1], seed=4),
                               "mlp": torch.randn(batch, 8)})
    assert fused.respecialised == {} and fused.outside_range_calls == {}


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_decoders_fused_whole_at_mixed_lengths(family):
    """GPT-2 (learned positions) and Qwen2 (rotary, grouped-query attention) with every
    group kept (tune="off"): lengths that differ between tenants in one call, and a
    length shared by both."""
    import transformers as T

    def model(seed):
        torch.manual_seed(seed)
        if family == "gpt2":
            cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                               bos_token_id=0, eos_token_id=0)
            return T.GPT2Model(cfg).eval()
        cfg = T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=100, max_position_embeddings=64, use_cache=False)
        return T.Qwen2Model(cfg).eval()

    models = {"a": model(0), "b": model(1)}
    fused = stfuse.compile(models, {"a": bert_call(2, 8), "b": bert_call(2, 8, seed=1)},
                           dynamic={"a": SEQ, "b": SEQ}, tune="off")
    assert fused.plan.stats["fused_groups"] > 0
    for lengths, batch in (((5, 21), 1), ((13, 13), 3)):
        _check(models, fused, {"a": bert_call(batch, lengths[0], seed=7), "b": bert_call(batch, lengths[1], seed=8)})


def test_inputs_show_their_named_dims_and_ranges(mixed):
    _, fused = mixed
    spec = fused.specs["b0"]
    assert [s.describe() for s in spec.inputs] == ["Tensor[B, seq] int64 on cpu"] * 2
    assert spec.dim_ranges == {"seq": (2, 64)}  # BERT's 64 positions bound it
    assert fused.specs["v0"].dim_ranges["side"][0] >= 2


@pytest.mark.parametrize("call,match", [
    (bert_call(2, 65), r"tenant 'b0', keyword argument 'input_ids': dim 1 \(seq\) is 65, outside the range \[2, 64\]"),
    (bert_call(2, 1), r"dim 1 \(seq\) is 1, outside the range \[2, 64\]"),
    ({**bert_call(2, 8), "attention_mask": torch.ones(2, 6, dtype=torch.long)},
     r"tenant 'b0', keyword argument 'attention_mask': dim 1 \(seq\) is 6, but seq is 8 in keyword argument "
     r"'input_ids'"),
])
def test_sizes_outside_the_range_or_disagreeing_are_named(mixed, call, match):
    _, fused = mixed
    with pytest.raises(InputError, match=match):
        fused.run({"b0": call})


def test_an_undeclared_size_change_is_still_an_input_error():
    models = [zoo.hf_model("bert", 0)[0], zoo.hf_model("bert", 1)[0]]
    fused = stfuse.compile(models, [bert_call(2, 8), bert_call(2, 8)], dynamic=[SEQ, None])
    _check(dict(zip(fused.tenants, models)), fused, {"0": bert_call(2, 12), "1": bert_call(2, 8)})
    with pytest.raises(InputError, match=r"tenant '1', keyword argument 'input_ids': expected shape "
                                         r"Tensor\[B, 8\] int64 on cpu, got Tensor\[2, 12\]"):
        fused.run({"1": bert_call(2, 12)})


def test_dynamic_dims_beside_a_constant_keyword():
    """transformers' ViT at other image sizes takes interpolate_pos_encoding=True, a
    constant keyword (calls.split_constants): the checks that resize the call along the
    declared dims leave it in place (they crashed on it before)."""
    vit = zoo.hf_model("vit", 0)[0]
    example = {**vit_call(2, 24), "interpolate_pos_encoding": True}
    fused = stfuse.compile([vit], [example], dynamic=[{"pixel_values": {2: "side", 3: "side"}}])
    call = {**vit_call(3, 32, seed=2), "interpolate_pos_encoding": True}
    assert_close(fused.run({"0": call})["0"], float64_call_reference(vit, call))


def test_a_path_export_kept_no_guard_for_is_refused_at_compile():
    """Traced at 16, a ViT's patches equal its positions and it returns the table as it
    is: export keeps no guard, and the graph crashed at 32. The compile-time check (the
    graph against the model at other sizes) refuses it, naming the dim."""
    with pytest.raises(TraceError, match=r"tenant '0': traced at side=16, the graph does not give the model's "
                                         r"output at side=32"):
        stfuse.compile([ViTAnySize(0).eval()], [vit_call(2, 16)], dynamic=[{"pixel_values": {2: "side", 3: "side"}}])


@pytest.mark.parametrize("dynamic,match", [
    ({"ids": {1: "seq"}}, r"tenant '0': dynamic names input 'ids', which its example does not pass"),
    ({"input_ids": {0: "seq"}}, r"dims 1 to 1 may vary \(dim 0, the batch, is dynamic already\)"),
    ({"input_ids": {1: "s q"}}, r"a dim's name is an identifier"),
    ({"input_ids": {1: "seq"}, "attention_mask": {1: "len"}},
     r"dims named 'seq' and 'len' must be equal in this model; give them one name"),
])
def test_bad_declarations_are_trace_errors(dynamic, match):
    with pytest.raises(TraceError, match=match):
        stfuse.compile([zoo.hf_model("bert")[0]], [bert_call(2, 8)], dynamic=[dynamic])


def test_dynamic_names_known_tenants():
    with pytest.raises(StfuseError, match=r"dynamic names unknown tenant\(s\) \['x'\]"):
        stfuse.compile({"a": zoo.mlp(8, 16, 4)}, {"a": torch.randn(2, 8)}, dynamic={"x": {}})


def test_artifact_keeps_the_dims(mixed, tmp_path):
    pytest.importorskip("safetensors")
    models, fused = mixed
    names = ("b0", "b1", "mlp")
    sub = stfuse.compile({t: models[t] for t in names}, {"b0": bert_call(2, 8), "b1": bert_call(2, 8),
                                                         "mlp": torch.randn(2, 8)}, dynamic={"b0": SEQ, "b1": SEQ})
    sub.save(tmp_path / "dyn")
    prog = stfuse.load(tmp_path / "dyn")
    assert prog.specs["b0"].dim_ranges == {"seq": (2, 64)}
    assert prog.specs["b0"].inputs[0].describe() == "Tensor[B, seq] int64 on cpu"
    for lengths in ((8, 8), (11, 11), (5, 30)):
        calls = {"b0": bert_call(2, lengths[0], seed=1), "b1": bert_call(2, lengths[1], seed=2),
                 "mlp": torch.randn(2, 8)}
        outs = prog.run(calls)
        for t in names:
            assert_close(outs[t], float64_call_reference(models[t], calls[t]), msg=f"tenant {t} at {lengths}")
    with pytest.raises(InputError, match=r"dim 1 \(seq\) is 65, outside the range \[2, 64\]"):
        prog.run({"b0": bert_call(2, 65)})
