"""The calling convention (stfuse/program.py TenantCalls, calls.call_parts): every
call form of a tenant, keyword inputs through fused(...) and run, and what bad calls say."""

from collections import UserDict

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.errors import InputError
from stfuse.calls import call_parts

from conftest import assert_close, bert_call, float64_call_reference, vit_call

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixed():
    """A BERT tenant called with keywords, a ViT tenant with ``pixel_values=``, and a plain MLP."""
    models = {"bert": zoo.hf_model("bert", 0)[0], "vit": zoo.hf_model("vit", 1)[0], "mlp": zoo.mlp(8, 16, 4)}
    examples = {"bert": bert_call(2, 8), "vit": vit_call(2), "mlp": torch.randn(2, 8)}
    return models, stfuse.compile(models, examples)


def test_call_parts_rule():
    x, y = torch.zeros(1), torch.ones(1)
    assert call_parts(x) == ((x,), {})
    assert call_parts((x, y)) == ((x, y), {})
    assert call_parts({"a": x}) == ((), {"a": x})
    assert call_parts(UserDict(a=x)) == ((), {"a": x})  # a tokenizer's BatchEncoding is a UserDict
    assert call_parts(((x,), {"a": y})) == ((x,), {"a": y})
    # A tuple and a dict as two positional arguments: wrapped as (args, {}).
    assert call_parts((((x,), {"a": y}), {})) == (((x,), {"a": y}), {})
    assert call_parts([x, y]) == (([x, y],), {})  # a list is one positional argument


@pytest.mark.parametrize("form", ["dict", "pair", "reordered"])
def test_keyword_tenants_in_every_call_form(mixed, form):
    models, fused = mixed
    bert, vit = bert_call(3, 8, seed=5), vit_call(3, seed=5)
    if form == "pair":
        bert, vit = ((), bert), ((), vit)
    elif form == "reordered":  # keys in another order than the example's
        bert = dict(reversed(list(bert.items())))
    x = torch.randn(3, 8)
    outs = fused(bert, vit, x)
    assert type(outs[0]) is type(models["bert"](**bert_call(1, 8)))  # a ModelOutput comes back as one
    for name, call, out in zip(fused.tenants, (bert, vit, x), outs):
        assert_close(out, float64_call_reference(models[name], call), msg=f"tenant {name}")
    sub = fused.run({"vit": vit, "bert": bert})
    assert_close(sub["bert"], outs[0])
    assert_close(sub["vit"], outs[1])


def test_plain_positional_tenants_keep_the_fast_path(mixed):
    _, fused = mixed
    assert fused._fast_in["mlp"] is not None
    assert fused._fast_in["bert"] is None and fused._fast_in["vit"] is None


@pytest.mark.parametrize("call,match", [
    (lambda c: {"input_ids": c["input_ids"]}, r"tenant 'bert': missing keyword argument\(s\) 'attention_mask'"),
    (lambda c: {**c, "token_type_ids": c["input_ids"]},
     r"tenant 'bert': unknown keyword argument\(s\) 'token_type_ids' \(the program was traced without them"),
    (lambda c: {**c, "attention_mask": c["attention_mask"].float()},
     r"tenant 'bert', keyword argument 'attention_mask': expected dtype torch.int64, got Tensor\[2, 8\] float32"),
    (lambda c: {**c, "input_ids": c["input_ids"][:, :5]},
     r"tenant 'bert', keyword argument 'input_ids': expected shape Tensor\[B, 8\] int64 on cpu, got Tensor\[2, 5\]"),
    (lambda c: (c["input_ids"], c["attention_mask"]),
     r"tenant 'bert': missing keyword argument\(s\) 'input_ids', 'attention_mask'; 2 positional argument\(s\) "
     r"where it takes 0; expected \(input_ids=Tensor\[B, 8\] int64 on cpu, attention_mask=Tensor\[B, 8\]"),
])
def test_bad_keyword_calls_name_the_tenant_and_the_key(mixed, call, match):
    _, fused = mixed
    with pytest.raises(InputError, match=match):
        fused.run({"bert": call(bert_call(2, 8))})


def test_keywords_for_a_positional_tenant_say_what_it_takes(mixed):
    _, fused = mixed
    with pytest.raises(InputError, match=r"tenant 'mlp': unknown keyword argument\(s\) 'x' .*; 0 positional "
                                         r"argument\(s\) where it takes 1; expected \(Tensor\[B, 8\] float32"):
        fused.run({"mlp": {"x": torch.randn(2, 8)}})


def test_a_bare_tensor_fills_a_one_input_keyword_tenant(mixed):
    models, fused = mixed
    call = vit_call(2, seed=3)
    out = fused.run({"vit": call["pixel_values"]})["vit"]
    assert_close(out, float64_call_reference(models["vit"], call))
