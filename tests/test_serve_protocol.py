"""The Open Inference Protocol's JSON, no server: every datatype both ways, flat and nested
data, refused values, how request inputs fill a tenant's call, output names, metadata."""

import json
from dataclasses import replace

import pytest
import torch
import torch.utils._pytree as pytree

from stfuse.calls import InputSpec
from stfuse.program import TenantSpec
from stfuse.serve.protocol import (DATATYPES, ProtocolError, TenantProtocol, output_metadata,
                                   tensor_from_json, tensor_to_json)

VALUES = {"bool": [True, False, True, True, False, True], "int": [0, -3, 7, 100, 1, -128],
          "float": [0.5, -1.25, 3.0, 1e-3, -0.0, 2.0]}


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_datatype_round_trips(datatype):
    dtype = DATATYPES[datatype]
    kind = "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"
    data = [abs(v) for v in VALUES[kind]] if dtype == torch.uint8 else VALUES[kind]
    x = tensor_from_json({"name": "x", "shape": [2, 3], "datatype": datatype, "data": data}, "inputs[0]", dtype)
    assert x.dtype == dtype and x.shape == (2, 3)
    # the JSON numbers are float64 (Python's): one rounding to the input's dtype
    assert torch.equal(x, torch.tensor(data, dtype=torch.float64 if kind == "float" else None)
                       .reshape(2, 3).to(dtype))
    back = tensor_to_json("y", x)
    assert back["datatype"] == datatype and back["shape"] == [2, 3]
    assert torch.equal(torch.tensor(back["data"], dtype=x.dtype if kind != "float" else torch.float64)
                       .to(dtype), x.reshape(-1))


def test_nested_data_is_taken_as_the_protocol_allows():
    entry = {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}
    assert torch.equal(tensor_from_json(entry, "inputs[0]", torch.float32), torch.tensor([[1., 2.], [3., 4.]]))


@pytest.mark.parametrize("entry,want,fragment", [
    ({"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2.5]}, torch.int64, "INT64 takes int values"),
    ({"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2**40]}, torch.int32, "outside the range of INT32"),
    ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, -1]}, torch.uint8, "outside the range of UINT8"),
    ({"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}, torch.bool, "BOOL takes bool values"),
    ({"name": "x", "shape": [2, -1], "datatype": "FP32", "data": [1.0]}, torch.float32, ".shape: expected a list"),
    ({"name": "x", "shape": [3], "datatype": "FP32", "data": [[1.0], [2.0, 3.0]]}, torch.float32, ".data: not a"),
    ({"name": "x", "shape": [2], "datatype": "FP32", "data": "1,2"}, torch.float32, ".data: expected a list"),
    ({"name": "x", "shape": [2], "datatype": "FP16", "data": [1.0, 2.0]}, torch.float32, "expected FP32, got FP16"),
])
def test_refused_values_name_the_field(entry, want, fragment):
    with pytest.raises(ProtocolError, match=fragment.replace("(", r"\(").replace(".", r"\.")) as err:
        tensor_from_json(entry, "inputs[0]", want)
    assert err.value.status == 400 and str(err.value).startswith("inputs[0]")


def _spec(name, inputs, call, out) -> TenantSpec:
    """A TenantSpec as stfuse records it, for a call (args, kwargs) and an output example."""
    return TenantSpec(name, tuple(inputs), pytree.tree_structure(call), pytree.tree_structure(out), 2, True)


def _input(name, shape, keyword=None, dims=(), dtype=torch.float32):
    return InputSpec(name, shape, dtype, torch.device("cpu"), True, keyword, dims)


T = torch.zeros(2, 3)
POSITIONAL = _spec("p", [_input("x", (2, 3)), _input("y", (2, 3))], ((T, T), {}), (T, T))
# flat inputs in call order: positional arguments, then keyword ones
KEYWORD = _spec("k", [_input("z", (2, 3)), _input("ids", (2, 5), "ids", ((1, "seq"),), torch.int64)],
                ((T,), {"ids": T}), {"logits": T, "past": (T, T)})


def _body(*entries) -> bytes:
    return json.dumps({"inputs": [{"name": n, "shape": list(x.shape), "datatype": d, "data": x.reshape(-1).tolist()}
                                  for n, x, d in entries]}).encode()


def test_positional_inputs_fill_in_order_or_by_their_names():
    proto = TenantProtocol(POSITIONAL, [])
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    call, _, _ = proto.decode(_body(("input_0", x, "FP32"), ("input_1", y, "FP32")))
    assert torch.equal(call[0], x) and torch.equal(call[1], y)
    call, _, _ = proto.decode(_body(("y", y, "FP32"), ("x", x, "FP32")))  # the inputs' own names: by name
    assert torch.equal(call[0], x) and torch.equal(call[1], y)


def test_keyword_inputs_go_by_name_and_build_the_call():
    proto = TenantProtocol(KEYWORD, [])
    ids, z = torch.randint(0, 9, (2, 7)), torch.randn(2, 3)
    call, _, _ = proto.decode(_body(("z", z, "FP32"), ("ids", ids, "INT64")))
    args, kwargs = call
    assert torch.equal(args[0], z) and torch.equal(kwargs["ids"], ids)
    with pytest.raises(ProtocolError, match="inputs: missing 'ids'; model 'k' takes inputs z, ids"):
        proto.decode(_body(("z", z, "FP32")))
    with pytest.raises(ProtocolError, match="inputs: names repeat"):
        proto.decode(_body(("z", z, "FP32"), ("z", z, "FP32"), ("ids", ids, "INT64")))


def test_a_tenants_constant_keywords_are_put_back_into_the_call():
    """A keyword that is not a tensor (return_dict=False) cannot travel as an input: the
    call is rebuilt with the program's constants, which Runtime.submit requires."""
    spec = replace(_spec("c", [_input("x", (2, 3))], ((T,), {}), T), constants={"return_dict": False})
    proto = TenantProtocol(spec, [])
    x = torch.randn(2, 3)
    args, kwargs = proto.decode(_body(("x", x, "FP32")))[0]
    assert torch.equal(args[0], x) and kwargs == {"return_dict": False}
    assert [i["name"] for i in proto.metadata()["inputs"]] == ["x"]


def test_metadata_has_minus_one_for_the_batch_and_declared_dims():
    meta = TenantProtocol(KEYWORD, []).metadata()
    assert meta["inputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]
    fixed = TenantSpec("f", (_input("x", (4, 3)),), POSITIONAL.in_spec, POSITIONAL.out_spec, 4, False)
    assert TenantProtocol(fixed, []).metadata()["inputs"][0]["shape"] == [4, 3]


def test_output_names_and_shapes_come_from_the_output_structure():
    first = {"logits": torch.zeros(2, 3), "past": (torch.zeros(2, 4), torch.zeros(5))}
    second = {"logits": torch.zeros(3, 3), "past": (torch.zeros(3, 4), torch.zeros(5))}
    meta = output_metadata(KEYWORD, first, second)
    assert meta == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "past.0", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "past.1", "datatype": "FP32", "shape": [5]}]
    assert [m["name"] for m in output_metadata(POSITIONAL, (T, T), (T, T))] == ["output_0", "output_1"]
    proto = TenantProtocol(KEYWORD, meta)
    resp = proto.encode(first, "id-1", ["past.1"])
    assert resp == {"model_name": "k", "model_version": "1", "id": "id-1",
                    "outputs": [{"name": "past.1", "datatype": "FP32", "shape": [5], "data": [0.0] * 5}]}
