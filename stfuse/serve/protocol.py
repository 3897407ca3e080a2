"""The Open Inference Protocol (KServe v2) in JSON: datatypes, model metadata, and an
infer request or response as one tenant's call or output.

    request   {"id"?, "inputs": [{"name", "shape", "datatype", "data"}], "outputs"?: [{"name"}]}
    response  {"model_name", "model_version", "id"?, "outputs": [{"name", "shape", "datatype", "data"}]}

Transport-free: server.py answers requests with it, http.py and ray_app.py carry
the bytes. A model is a tenant; its inputs are its flat call inputs, named by
keyword (``input_ids``) or by the traced placeholder (``x``) for positional ones;
its outputs are the leaves of its output, named by their keys (``last_hidden_state``)
or ``output_<i>``. Before/after, a tenant ``mlp`` taking ``x: Tensor[B, 8] float32``::

    {"inputs": [{"name": "x", "shape": [2, 8],      ->  runtime.submit("mlp", Tensor[2, 8] float32)
                 "datatype": "FP32", "data": [...16 numbers]}]}
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.utils._pytree as pytree

from stfuse.calls import call_of
from stfuse.errors import StfuseError

# Protocol datatype -> torch dtype: one row per type the protocol carries (BYTES, strings, has none here).
DATATYPES = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16,
    "INT32": torch.int32, "INT64": torch.int64,
    "FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32, "FP64": torch.float64,
}
DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
VERSION = "1"  # each model (tenant) has one version: the artifact it was loaded from


class ProtocolError(StfuseError):
    """A request the protocol answers with an error: its HTTP ``status`` and a message
    naming the field (``inputs[0].datatype: ...``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def _kind(dtype: torch.dtype) -> str:
    """What JSON values a tensor of ``dtype`` takes: "bool", "int" or "float"."""
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"


def tensor_from_json(entry: Any, where: str, want: torch.dtype) -> torch.Tensor:
    """One request input ``{"name", "shape", "datatype", "data"}`` as a tensor of ``want``,
    or ProtocolError(400) naming the field. ``data`` is flat (row-major) or nested, as the
    protocol allows; an integer input refuses fractions rather than truncating them."""
    if not isinstance(entry, dict):
        raise _bad(f"{where}: expected an object with name, shape, datatype and data, got "
                   f"{type(entry).__name__}")
    for key in ("shape", "datatype", "data"):
        if key not in entry:
            raise _bad(f"{where}.{key}: missing")
    shape, datatype, data = entry["shape"], entry["datatype"], entry["data"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _bad(f"{where}.shape: expected a list of non-negative integers, got {shape!r:.80}")
    if datatype not in DATATYPES:
        raise _bad(f"{where}.datatype: {datatype!r:.40} is not one of {', '.join(DATATYPES)}")
    if DATATYPES[datatype] != want:
        raise _bad(f"{where}.datatype: expected {DATATYPE_OF.get(want, want)}, got {datatype}")
    if not isinstance(data, list):
        raise _bad(f"{where}.data: expected a list of values, got {type(data).__name__}")
    try:
        # float64 holds every JSON number of a float input; other kinds keep their own
        # type, so that 1.5 for an integer input is refused, not truncated to 1
        x = torch.tensor(data, dtype=torch.float64) if want.is_floating_point else torch.tensor(data)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise _bad(f"{where}.data: not a (nested) list of {datatype} values ({err})") from None
    if x.numel() != math.prod(shape):
        raise _bad(f"{where}.data: {x.numel()} values for shape {shape} ({math.prod(shape)} values)")
    if x.numel() and _kind(x.dtype) != _kind(want):
        raise _bad(f"{where}.data: {datatype} takes {_kind(want)} values, got {_kind(x.dtype)} values")
    if x.numel() and _kind(want) == "int" and want != torch.int64:
        info = torch.iinfo(want)
        if x.min() < info.min or x.max() > info.max:
            raise _bad(f"{where}.data: values outside the range of {datatype} [{info.min}, {info.max}]")
    return x.reshape(shape).to(want)


def tensor_to_json(name: str, x: torch.Tensor) -> dict:
    """One response output: the tensor flattened in row-major order."""
    datatype = DATATYPE_OF.get(x.dtype)
    if datatype is None:
        raise ProtocolError(500, f"output {name!r} has dtype {x.dtype}, which the protocol cannot carry")
    x = x.detach().cpu()
    return {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def _leaf_names(spec) -> list[str]:
    """Names of the leaves of a pytree spec: their keys joined by '.' (``logits``,
    ``past.0``), or ``output_<i>`` where no key names them (a tensor, a tuple)."""
    skeleton = pytree.tree_unflatten([torch.empty(0)] * spec.num_leaves, spec)
    names = []
    for i, (path, _) in enumerate(pytree.tree_flatten_with_path(skeleton)[0]):
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        named = any(isinstance(k, (pytree.MappingKey, pytree.GetAttrKey)) for k in path)
        name = ".".join(map(str, keys)) if named else f"output_{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


class TenantProtocol:
    """One model of the protocol: a tenant's TenantSpec (stfuse/program.py) as input and
    output names, metadata, and the decoding and encoding of its infer requests."""

    def __init__(self, spec, outputs: list[dict]):
        self.spec = spec
        self.input_names = [s.keyword or s.name for s in spec.inputs]
        self.output_names = [o["name"] for o in outputs]
        self.outputs = outputs
        # a tenant of plain positional tensors takes them as a tuple: the runtime's fast path
        self._plain = spec.plain

    def metadata(self) -> dict:
        """GET /v2/models/{name}: -1 for the batch (where it varies) and declared dynamic dims."""
        inputs = []
        for name, s in zip(self.input_names, self.spec.inputs):
            free = {d for d, _ in s.dims} | ({0} if s.batched and self.spec.dynamic else set())
            inputs.append({"name": name, "datatype": DATATYPE_OF.get(s.dtype, str(s.dtype)),
                           "shape": [-1 if d in free else n for d, n in enumerate(s.shape)]})
        return {"name": self.spec.name, "versions": [VERSION], "platform": "stfuse",
                "inputs": inputs, "outputs": self.outputs}

    def decode(self, body: bytes) -> tuple[Any, Any, list[str] | None]:
        """An infer request's JSON -> (the call Runtime.submit takes, the request id or None,
        the output names asked for or None: all). Inputs named by keyword go to that keyword;
        the others fill the positional inputs in order (or by name, where their names are
        exactly the positional inputs' names)."""
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise _bad(f"request body: not JSON ({err})") from None
        if not isinstance(req, dict):
            raise _bad(f"request body: expected a JSON object, got {type(req).__name__}")
        entries = req.get("inputs")
        if not isinstance(entries, list) or not entries:
            raise _bad("inputs: expected a non-empty list of {name, shape, datatype, data}")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise _bad(f"inputs[{i}].name: expected a string")
        slots = self._slots(entries)
        leaves = [tensor_from_json(entries[i], f"inputs[{i}] ({entries[i]['name']})", s.dtype)
                  for i, s in zip(slots, self.spec.inputs)]
        # a keyword that is not a tensor (return_dict=False) is the program's constant: put back
        call = (tuple(leaves) if len(leaves) > 1 else leaves[0]) if self._plain else \
            call_of(leaves, self.spec.in_spec, self.spec.constants)
        return call, req.get("id"), self._wanted(req.get("outputs"))

    def _slots(self, entries: list[dict]) -> list[int]:
        """Per flat input of the tenant, the index of the request entry that fills it."""
        names = [e["name"] for e in entries]
        if len(set(names)) != len(names):
            raise _bad(f"inputs: names repeat: {names}")
        keyword = {s.keyword: j for j, s in enumerate(self.spec.inputs) if s.keyword is not None}
        positional = [j for j, s in enumerate(self.spec.inputs) if s.keyword is None]
        slots: dict[int, int] = {}
        rest = []
        for i, name in enumerate(names):
            if name in keyword:
                slots[keyword[name]] = i
            else:
                rest.append(i)
        want = f"model {self.spec.name!r} takes inputs {', '.join(self.input_names)}"
        if missing := [k for k, j in keyword.items() if j not in slots]:
            raise _bad(f"inputs: missing {', '.join(map(repr, missing))}; {want}")
        if len(rest) != len(positional):
            extra = [names[i] for i in rest]
            raise _bad(f"inputs: {len(rest)} positional input(s) {extra} where the model takes "
                       f"{len(positional)}; {want}")
        by_name = {self.input_names[j]: j for j in positional}
        if {names[i] for i in rest} == set(by_name):
            rest = sorted(rest, key=lambda i: positional.index(by_name[names[i]]))
        slots.update(zip(positional, rest))
        return [slots[j] for j in range(len(self.spec.inputs))]

    def _wanted(self, outputs) -> list[str] | None:
        if outputs is None:
            return None
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise _bad("outputs: expected a list of {\"name\": ...}")
        names = [o["name"] for o in outputs]
        if unknown := [n for n in names if n not in self.output_names]:
            raise _bad(f"outputs: unknown output(s) {unknown}; the model's outputs are {self.output_names}")
        return names

    def encode(self, out: Any, request_id: Any = None, wanted: list[str] | None = None) -> dict:
        """A tenant's output -> the infer response: its tensor leaves in order (or those asked for)."""
        leaves = pytree.tree_leaves(out)
        if len(leaves) != len(self.output_names):
            raise ProtocolError(500, f"model {self.spec.name!r} returned {len(leaves)} output leaves, "
                                     f"its metadata lists {len(self.output_names)}")
        named = dict(zip(self.output_names, leaves))
        outputs = [tensor_to_json(n, torch.as_tensor(named[n])) for n in (wanted or self.output_names)]
        response = {"model_name": self.spec.name, "model_version": VERSION, "outputs": outputs}
        if request_id is not None:
            response["id"] = request_id
        return response


def output_metadata(spec, first: Any, second: Any) -> list[dict]:
    """The outputs of GET /v2/models/{name} from two calls that differ in every dim that
    may vary (the batch, declared dims): a dim whose size differs between them is -1."""
    names = _leaf_names(spec.out_spec)
    out = []
    for name, a, b in zip(names, pytree.tree_leaves(first), pytree.tree_leaves(second)):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        shape = [n if a.dim() == b.dim() and n == b.shape[d] else -1 for d, n in enumerate(a.shape)]
        out.append({"name": name, "datatype": DATATYPE_OF.get(a.dtype, str(a.dtype)), "shape": shape})
    return out
