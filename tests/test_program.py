"""The calling convention (stfuse/program.py TenantCalls, calls.call_parts): every
call form of a tenant, keyword inputs through fused(...) and run, and what bad calls say."""

from collections import UserDict

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.errors import InputError
from stfuse.calls import call_parts

from conftest import assert_close, bert_call, check_tenants, float64_call_reference, vit_call

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


def _two_input_mlp():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)
    return Two().eval()


def test_the_one_pass_check_takes_only_what_the_full_check_accepts():
    """TenantCalls._fast_flat checks the common call in one pass; every call it refuses
    goes through the full check. Each input here is wrong in one way (or right): the
    one-pass check must never accept what the full check refuses, and a call must give
    the same outputs, or the same error, by either path."""
    torch.manual_seed(0)
    models = {"mlp": zoo.mlp(8, 16, 4), "two": _two_input_mlp()}
    fused = stfuse.compile(models, {"mlp": torch.randn(2, 8), "two": (torch.randn(2, 8), torch.randn(2, 6))})
    names = tuple(models)
    good = {"mlp": torch.randn(3, 8), "two": (torch.randn(3, 8), torch.randn(3, 6))}
    bad = [
        {"mlp": torch.randn(3, 8, dtype=torch.float64)},
        {"mlp": torch.randn(3, 9)},
        {"mlp": torch.randn(3, 8, 1)},
        {"mlp": torch.randn(8)},
        {"mlp": torch.tensor(1.0)},
        {"mlp": torch.randn(0, 8)},
        {"mlp": [torch.randn(3, 8)]},
        {"mlp": (torch.randn(3, 8), torch.randn(3, 8))},
        {"two": (torch.randn(3, 8), torch.randn(2, 6))},  # batch sizes differ inside a tenant
        {"two": (torch.randn(3, 8),)},
        {"two": torch.randn(3, 8)},
        {"two": (torch.randn(3, 8), torch.randn(3, 6).to(torch.float16))},
        {"two": (torch.randn(3, 8), "x")},
    ]
    assert fused._fast_flat(names, list(good.values())) is not None
    for change in bad:
        call = {**good, **change}
        assert fused._fast_flat(names, list(call.values())) is None, change
        with pytest.raises(InputError):
            fused(*call.values())
    with pytest.raises(InputError, match=r"tenant 'mlp', argument 0 \(.*\): batch size 0: an empty batch has nothing"):
        fused(torch.randn(0, 8), good["two"])
    # tenants at different batch sizes: accepted, not stacked, and right
    mixed_batch = {"mlp": torch.randn(5, 8), "two": good["two"]}
    flat, stacked = fused._fast_flat(names, list(mixed_batch.values()))
    assert not stacked and len(flat) == 3
    out = fused(*mixed_batch.values())
    assert_close(out[0], models["mlp"](mixed_batch["mlp"]))
    assert_close(out[1], models["two"](*mixed_batch["two"]))


def test_a_call_leaves_grad_mode_as_it_found_it():
    model = zoo.mlp(8, 16, 4)
    fused = stfuse.compile([model], [torch.randn(2, 8)])
    x = torch.randn(2, 8, requires_grad=True)
    (y,) = fused(x)
    assert torch.is_grad_enabled() and not y.requires_grad  # an inference program: no graph kept
    with torch.no_grad():
        fused(x)
        assert not torch.is_grad_enabled()
    with pytest.raises(InputError):
        fused(torch.randn(2, 9))
    assert torch.is_grad_enabled()


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


def _weight_change_tenants():
    """Three tenants whose program has every kind of weight: a stacked group (packed
    copies of the first layers), a grouped one (the last layers differ in width: the
    models' own tensors) and a conv whose BatchNorm folds into new tensors."""
    torch.manual_seed(0)
    mlp = lambda out: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, out))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    models = [mlp(4).eval(), mlp(5).eval(), cnn.eval()]
    args = [(torch.randn(2, 8),), (torch.randn(2, 8),), (torch.randn(2, 3, 6, 6),)]
    return models, args


def test_weights_changed_in_place_are_used_whole():
    """load_state_dict after compile: the next call runs the new weights everywhere, never a
    mix of packed (copied) old weights and the models' own new ones."""
    models, args = _weight_change_tenants()
    fused = stfuse.compile(models, args, tune="off")
    assert fused.plan.stats["fused_groups"] >= 2, fused.plan.summary()
    check_tenants(fused, models, args)
    check_tenants(fused, models, args)
    assert fused.weight_rebuilds == 0  # calling never changes a weight itself
    for m in models:
        m.load_state_dict({k: v + 0.5 if v.is_floating_point() else v for k, v in m.state_dict().items()})
    check_tenants(fused, models, args)
    with torch.no_grad():
        models[1][2].weight.mul_(2.0)  # an in-place edit of one unpacked weight
    check_tenants(fused, models, args)
    assert fused.weight_rebuilds == 2
    assert fused.run({"2": args[2]})["2"].shape == models[2](*args[2]).shape  # subsets lower again


def test_weights_replaced_keep_the_compiled_ones():
    """Parameters replaced rather than changed (load_state_dict(assign=True)): the program
    keeps the weights it was compiled with, all of them."""
    models, args = _weight_change_tenants()
    fused = stfuse.compile(models, args, tune="off")
    with torch.no_grad():
        before = [m(*a) for m, a in zip(models, args)]
    for m in models:
        m.load_state_dict({k: v * 3 for k, v in m.state_dict().items()}, assign=True)
    for got, want in zip(fused(*[a[0] for a in args]), before):
        assert_close(got, want)
    assert fused.weight_rebuilds == 0


class NoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.randn(3))

    def forward(self):
        return self.p * 2


def test_tenants_without_inputs_run():
    """Found in review: the one-pass check read the batch of a tenant with no inputs and
    raised TypeError at call time (IndexError before it); such tenants take the full check."""
    models = [NoInputs(), NoInputs()]
    fused = stfuse.compile(models, [(), ()])
    for out, m in zip(fused((), ()), models):
        assert_close(out, m())
    assert_close(fused.run({"1": ()})["1"], models[1]())


# ---------------------------------------------------------------------------- constant keywords


class _Knobs(torch.nn.Module):
    """A model with keywords that are not tensors: what a call's constants select."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, scale=1.0, act="relu", twice=False, repeat=1):
        y = self.lin(x) * scale
        y = torch.relu(y) if act == "relu" else torch.tanh(y)
        for _ in range(repeat):
            y = y * 2 if twice else y
        return y


@pytest.fixture(scope="module")
def knobs():
    """Two tenants of one model class with other constants each, and a BERT tenant with
    return_dict=False and output_hidden_states=True (transformers' usual non-tensor keywords)."""
    torch.manual_seed(0)
    models = {"a": _Knobs().eval(), "b": _Knobs().eval(), "bert": zoo.hf_model("bert", 0)[0]}
    calls = {"a": {"x": torch.randn(2, 8), "scale": 0.5, "act": "tanh"},
             "b": ((torch.randn(2, 8),), {"scale": 2.0, "twice": True, "repeat": 2}),
             "bert": {**bert_call(2, 8), "return_dict": False, "output_hidden_states": True}}
    return models, calls, stfuse.compile(models, calls, tune="off")


def _with(call, **kw):
    args, kwargs = call_parts(call)
    return args, {**kwargs, **kw}


def test_constant_keywords_are_bound_per_tenant(knobs):
    """Each tenant runs with its own constants (the two _Knobs tenants' linears fused in
    one group all the same), and BERT returns the tuple return_dict=False asks for."""
    models, calls, fused = knobs
    assert fused.plan.stats["fused_groups"] >= 1
    assert fused.specs["b"].constants == {"scale": 2.0, "twice": True, "repeat": 2}
    outs = fused.run(calls)
    for name in fused.tenants:
        assert_close(outs[name], float64_call_reference(models[name], calls[name]), msg=f"tenant {name}")
    assert type(outs["bert"]) is tuple and len(outs["bert"][2]) == 3  # hidden states: embeddings + 2 layers
    batch3 = _with(({"x": torch.randn(3, 8)}), scale=0.5, act="tanh")  # another batch size
    assert_close(fused.run({"a": batch3})["a"], float64_call_reference(models["a"], batch3))


@pytest.mark.parametrize("call,match", [
    (lambda c: {"x": c["x"]}, r"tenant 'a': missing keyword argument\(s\) 'scale', 'act'; expected "
                              r"\(x=Tensor\[B, 8\] float32 on cpu, scale=0.5, act='tanh'\)"),
    (lambda c: c["x"], r"tenant 'a': missing keyword argument\(s\) 'x', 'scale', 'act'; 1 positional"),
    (lambda c: {**c, "act": "relu"}, r"tenant 'a': keyword argument\(s\) act='relu', where the program was "
                                     r"compiled for scale=0.5, act='tanh' \(a keyword that is not a tensor is a "
                                     r"constant of the program: compile again for another value\)"),
    (lambda c: {**c, "scale": 1}, r"keyword argument\(s\) scale=1, where"),  # 1 is not 0.5; nor is an int a float
    (lambda c: {**c, "twice": True}, r"unknown keyword argument\(s\) 'twice'"),
])
def test_calls_must_pass_the_constants_compiled_for(knobs, call, match):
    _, calls, fused = knobs
    with pytest.raises(InputError, match=match):
        fused.run({"a": call(calls["a"])})


def test_a_constant_is_the_same_type_and_value():
    from stfuse.calls import same_constant

    assert same_constant(True, True) and same_constant(2, 2) and same_constant("a", "a")
    assert not same_constant(1, True) and not same_constant(True, 1) and not same_constant(2.0, 2)


def test_a_constant_that_is_not_finite_is_a_trace_error():
    from stfuse.errors import TraceError

    with pytest.raises(TraceError, match=r"tenant '0': keyword argument 'scale' is nan; a constant keyword"):
        stfuse.compile([_Knobs().eval()], [{"x": torch.randn(2, 8), "scale": float("nan")}])
