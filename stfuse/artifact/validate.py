"""Checks on untrusted artifact data, made before anything is deserialised.

Every byte of an artifact is untrusted (docs/artifact.md, "Threat model"). The
JSON files are parsed by Python's ``json`` and then checked here against a
schema (``conform``); a program's graph is checked node by node against an op
allow-list and a grammar for the symbolic expressions torch hands to sympy, and
then rewritten into a canonical JSON text that is the only thing torch's
deserialiser ever sees. torch never reads a zip archive or a pickle from an
artifact: programs are stored as that JSON text alone.
"""

from __future__ import annotations

import json
import math
import operator
import re

import torch

from stfuse.errors import ArtifactError

# ---------------------------------------------------------------------------- JSON


def parse_json(blob: bytes, where: str):
    """``json.loads`` with every failure (bad UTF-8, bad syntax, nesting so deep that
    the parser recurses out) as an ArtifactError."""
    try:
        return json.loads(blob)
    except RecursionError:
        raise ArtifactError(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{where}: not valid JSON ({err})") from None


class Opt:
    """A schema that also admits null."""

    def __init__(self, schema):
        self.schema = schema


NUM = "number"  # int or float, finite, not bool
SCALAR = "scalar"  # a bool, an integer, a finite number or a string (a constant keyword's value)
_NAMES = {int: "an integer", str: "a string", bool: "a boolean", NUM: "a number",
          SCALAR: "a boolean, number or string"}


def conform(value, schema, where: str) -> None:
    """Check JSON ``value`` against ``schema``: ``int``/``str``/``bool``/``NUM``;
    ``[item]`` a list of items; ``(a, b, c)`` a list of exactly these; ``{"*": item}``
    a map from strings to items; ``{field: schema}`` an object with (at least)
    these fields (a field whose schema is ``Opt`` may be missing); ``Opt(schema)`` that or null. The recursion follows the schema,
    never the data, so its depth is bounded whatever the data holds."""
    if isinstance(schema, Opt):
        if value is None:
            return
        schema = schema.schema
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise ArtifactError(f"{where}: expected a list, got {_kind(value)}")
        for i, v in enumerate(value):
            conform(v, schema[0], f"{where}[{i}]")
    elif isinstance(schema, tuple):
        if not isinstance(value, list) or len(value) != len(schema):
            raise ArtifactError(f"{where}: expected a list of {len(schema)}, got {_kind(value)}")
        for i, (v, s) in enumerate(zip(value, schema)):
            conform(v, s, f"{where}[{i}]")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ArtifactError(f"{where}: expected an object, got {_kind(value)}")
        if "*" in schema:
            for k, v in value.items():
                conform(v, schema["*"], f"{where}[{k!r}]")
        else:
            for k, s in schema.items():
                if k not in value:
                    if isinstance(s, Opt):
                        continue  # an optional field may be missing as well as null
                    raise ArtifactError(f"{where}: missing field {k!r}")
                conform(value[k], s, f"{where}.{k}")
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              if schema == NUM else
              isinstance(value, (bool, str)) or (isinstance(value, (int, float)) and math.isfinite(value))
              if schema == SCALAR else
              isinstance(value, int) and not isinstance(value, bool) if schema is int else
              isinstance(value, schema))
        if not ok:
            want = _NAMES.get(schema) or f"a {schema.__name__}"
            raise ArtifactError(f"{where}: expected {want}, got {_kind(value)}")


def _kind(value) -> str:
    text = json.dumps(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


_FILE = {"bytes": int, "sha256": str}
_INPUT = {"name": str, "shape": [int], "batched": bool, "dtype": str, "value_range": Opt((int, int)),
          "dims": Opt([(int, str)])}  # declared dynamic dims, (dim, name); absent before format 3
_TENANT = {"name": str, "batch": int, "dynamic": bool, "device": str, "inputs": [_INPUT],
           "in_spec": str, "out_spec": str, "batch_range": (int, Opt(int)),
           "dim_ranges": Opt({"*": (int, Opt(int))}),
           "constants": Opt({"*": SCALAR})}  # constant keywords (calls.split_constants); absent before
_PROGRAM = {"file": str, "tenants": [str], "stacked": bool, "counts": [int], "weights": [str],
            "kernels": [(str, str)]}
_VIEW = {"storage": str, "offset": int, "shape": [int], "stride": [int], "dtype": str}
MANIFEST_SCHEMA = {
    "format": str, "format_version": int, "versions": {"*": Opt(str)}, "tenants": [_TENANT],
    "programs": {"*": _PROGRAM}, "tensors": {"*": _VIEW}, "storages": {"*": {"dtype": str, "numel": int}},
    "kernel_hashes": {"*": str}, "files": {"*": _FILE}}

_STATS = {k: int for k in ("tenants", "ops", "fusable_ops", "fused_ops", "fused_groups",
                           "launches_before", "launches_after")} | {
    "coverage": NUM, "flops": NUM, "rows_independent": Opt({"*": bool}),
    "self_check": Opt({"unfused": [str], "reasons": {"*": str}, "still_differ": [str]}),
    "tuning": Opt({"mode": str, "margin": NUM,
                   "groups": {"*": {"fused_us": Opt(NUM), "apart_us": Opt(NUM), "decision": str, "source": str}},
                   "program": Opt({"fused_us": NUM, "apart_us": NUM, "decision": str, "source": str}),
                   "unsaved": Opt(str)}),
    # codegen="auto"'s measurement (passes/program_check.choose_codegen; no times where nothing was timed)
    "codegen": Opt({"inductor_us": Opt(NUM), "direct_us": Opt(NUM), "decision": str, "source": str})}
PLAN_SCHEMA = {
    "stats": _STATS,
    "passes": [{"name": str, "ms": NUM, "nodes": int, "groups": int}],
    "groups": [{"id": str, "op_class": str, "members": [(str, str, Opt([int]))], "epilogue": str,
                "folded": [[str]]}],
    "tenants": {"*": {"nodes": [{"id": str, "label": str, "op_class": str, "group": Opt(str)}],
                      "edges": [(int, int)]}},
}


def plan_record(record, where: str) -> dict:
    """A plan.json record that Plan, its summary and its drawing can use as it is."""
    conform(record, PLAN_SCHEMA, where)
    for t, graph in record["tenants"].items():
        n = len(graph["nodes"])
        if any(not (0 <= i < n) for e in graph["edges"] for i in e):
            raise ArtifactError(f"{where}: tenant {t!r} has an edge to a node it does not have")
    ids = [g["id"] for g in record["groups"]]
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{where}: group ids are not unique")
    return record


# ---------------------------------------------------------------------------- weight views

def view_fits(view: dict, numel: int) -> bool:
    """A view (offset, shape, stride) whose every element lies in a storage of ``numel``."""
    shape, stride, offset = view["shape"], view["stride"], view["offset"]
    if len(shape) != len(stride) or offset < 0 or min(shape, default=0) < 0 or min(stride, default=0) < 0:
        return False
    if not all(shape):
        return offset <= numel  # an empty view reads nothing
    return offset + sum((s - 1) * st for s, st in zip(shape, stride)) < numel


# ---------------------------------------------------------------------------- programs

_TOKEN = re.compile(r"\s+|\d+(\.\d+)?([eE][-+]?\d+)?|'[A-Za-z_][A-Za-z0-9_]*'|[A-Za-z_][A-Za-z0-9_]*"
                    r"|\*\*|//|[=!<>]=|[-+*/%<>(),=\[\].]")
_SYMBOL = re.compile(r"[a-z]+\d+")
# Names torch's serialised sympy expressions use (srepr form), and nothing else.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt", "TruncToFloat", "RoundToInt",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "oo", "zoo", "nan",
    "true", "false", "True", "False", "None", "integer", "positive", "nonnegative", "negative",
    "real", "finite", "zero", "nonzero", "even", "odd"}


def safe_expr(text) -> bool:
    """A symbolic expression made of numbers, operators, symbols like ``s16`` and the
    sympy names above only (torch passes it to ``sympy.sympify``, which evaluates)."""
    pos = 0
    while isinstance(text, str) and pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return False
        tok = m.group()
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _SYMPY_NAMES and not _SYMBOL.fullmatch(tok):
            return False
        if len(tok) == 1 and not tok.isalnum() and not tok.isspace() and tok not in "(),=+-*/%<>":
            return False
        pos = m.end()
    return isinstance(text, str)


# Python callables a program may call, besides aten and stfuse ops (symbolic size arithmetic).
OPERATOR_OK = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
               operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
               operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
               operator.not_, math.ceil, math.floor, math.trunc, torch.sym_float, torch.sym_int,
               torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_ite}
ATEN_REFUSED = {"from_file", "_print"}  # read host files / print: never part of an inference graph
_CALLABLE_NAMES = {f"{f.__module__}.{f.__name__}" for f in OPERATOR_OK}
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.[A-Za-z_][A-Za-z0-9_]*")
_STFUSE = re.compile(r"torch\.ops\.stfuse\.([A-Za-z_][A-Za-z0-9_]*)\.default")
# Argument kinds of torch's serialised graph: data only. Refused: nested graphs (higher-order
# ops), custom objects (pickled script objects) and operators passed as values.
_ARGS_OK = {"as_none", "as_tensor", "as_tensors", "as_int", "as_ints", "as_float", "as_floats",
            "as_string", "as_strings", "as_sym_int", "as_sym_ints", "as_scalar_type",
            "as_memory_format", "as_layout", "as_device", "as_bool", "as_bools", "as_sym_bool",
            "as_sym_bools", "as_optional_tensors", "as_optional_tensor", "as_sym_float",
            "as_sym_floats", "as_int_lists", "as_float_lists", "as_complex", "as_expr", "as_name",
            "as_nested_tensors"}
_VERIFIERS = {"", "ATEN", "TRAINING"}
_PROGRAM_SCHEMA = {
    "graph_module": {"graph": {"nodes": [{"target": str, "inputs": [{"arg": dict}], "outputs": [dict]}],
                               "inputs": [dict], "outputs": [dict], "custom_obj_values": dict},
                     "signature": {"input_specs": [dict], "output_specs": [dict]},
                     "module_call_graph": list},
    "range_constraints": {"*": {"min_val": Opt(int), "max_val": Opt(int)}},
    "verifiers": [str], "schema_version": {"major": int, "minor": int}}


def target_allowed(target: str, stfuse_ops) -> bool:
    """A serialised node target inside the allow-list: an aten op (not a refused one), a
    registered stfuse op, or one of OPERATOR_OK, as torch's serialiser names them."""
    if m := _ATEN.fullmatch(target):
        return m.group(1) not in ATEN_REFUSED
    if m := _STFUSE.fullmatch(target):
        return m.group(1) in stfuse_ops
    return target in _CALLABLE_NAMES


def _walk(obj):
    """Every (key, value) pair in nested JSON, iteratively (no recursion on the data)."""
    stack = [(None, obj)]
    while stack:
        key, v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.items())
        elif isinstance(v, list):
            stack.extend((key, x) for x in v)
        yield key, v


def program(blob: bytes, where: str, stfuse_ops) -> bytes:
    """The canonical JSON text of a serialised ExportedProgram, after every check that
    needs no deserialising; raises ArtifactError for anything outside what stfuse writes.

    What comes back is built from the checked data alone: node metadata (stack traces,
    module paths, ``source_fn_stack`` names that torch would resolve) and ``guards_code``
    (which ``ExportedProgram.module()`` would ``exec``) are dropped, since stfuse checks
    inputs itself and runs the graph module directly.
    """
    model = parse_json(blob, where)
    conform(model, _PROGRAM_SCHEMA, where)
    gm = model["graph_module"]
    for node in gm["graph"]["nodes"]:
        if not target_allowed(node["target"], stfuse_ops):
            raise ArtifactError(f"{where}: a node calls {node['target'][:80]!r}, outside the ops "
                                "a program may call")
    for key, value in _walk(gm):
        if isinstance(key, str) and key.startswith("as_") and key not in _ARGS_OK:
            raise ArtifactError(f"{where}: refused argument kind {key[:40]!r}")
        if key == "expr_str" and not safe_expr(value):
            raise ArtifactError(f"{where}: refused symbolic expression {str(value)[:80]!r}")
    if gm["graph"]["custom_obj_values"]:
        raise ArtifactError(f"{where}: holds custom objects; refused")
    sig = gm["signature"]
    if any(list(s) != ["user_input"] for s in sig["input_specs"]) or any(
            list(s) != ["user_output"] for s in sig["output_specs"]):
        raise ArtifactError(f"{where}: takes parameters, buffers, constants or tokens, or mutates "
                            "its inputs; a saved program takes every tensor as an input")
    for sym in model["range_constraints"]:
        if not _SYMBOL.fullmatch(sym):
            raise ArtifactError(f"{where}: refused symbol name {sym[:40]!r}")
    if not set(model["verifiers"]) <= _VERIFIERS:
        raise ArtifactError(f"{where}: unknown verifier {model['verifiers']}")
    for node in gm["graph"]["nodes"]:
        node["metadata"] = {}
    gm["metadata"] = {}
    model["guards_code"] = []
    return json.dumps(model).encode()


def check_graph(gm: torch.fx.GraphModule, n_inputs: int, where: str) -> None:
    """The deserialised graph, once more at the fx level: only call_function nodes of
    allowed targets, stfuse epilogues that parse, and exactly ``n_inputs`` inputs."""
    from stfuse.kernels import epilogue

    placeholders = 0
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "placeholder":
            placeholders += 1
        elif n.op == "output":
            continue
        elif n.op != "call_function":
            raise ArtifactError(f"{where}: refused {n.op} node {n.name}")
        elif isinstance(t, torch._ops.OpOverload) and t.namespace == "stfuse":
            args = dict(zip((a.name for a in t._schema.arguments), n.args))
            try:
                epilogue.parse(args.get("epilogue", ""))
            except (ValueError, TypeError, AttributeError) as err:
                raise ArtifactError(f"{where}: node {n.name}: bad epilogue ({err})") from err
        elif isinstance(t, torch._ops.OpOverload) and t.namespace == "aten":
            if t.name().split("::")[1] in ATEN_REFUSED:
                raise ArtifactError(f"{where}: refused op {t}")
        elif not (callable(t) and t in OPERATOR_OK):
            raise ArtifactError(f"{where}: node {n.name} calls {t!r}, outside the ops a program may call")
    if placeholders != n_inputs:
        raise ArtifactError(f"{where}: takes {placeholders} inputs, the manifest says {n_inputs}")


def check_weights(gm: torch.fx.GraphModule, weights: list, where: str) -> None:
    """Each weight has the shape and dtype the program was exported with (its leading inputs)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (n, w) in enumerate(zip(inputs, weights)):
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != w.dtype or len(val.shape) != w.dim() or any(
                not isinstance(d, int) or d != s for d, s in zip(val.shape, w.shape)):
            want = f"{val.dtype}{list(val.shape)}" if isinstance(val, torch.Tensor) else repr(val)
            raise ArtifactError(f"{where}: weight {i} is {w.dtype}{list(w.shape)}, the program "
                                f"takes {want}")
