"""The calling convention of a tenant, and THE input validator.

A tenant's call (example inputs, ``fused(...)``, ``run``, the runtime's
``submit``, a loaded artifact) is ``call_parts``: a Tensor is the one positional
argument, a tuple is positional arguments, a dict (any Mapping) is keyword
arguments, and a pair ``(tuple, dict)`` is ``(args, kwargs)``. A model whose
positional arguments are one tuple and one dict takes them as
``((the_tuple, the_dict), {})``. ``call_problem`` and ``input_problem`` check a
call against a tenant's flat ``InputSpec``s; every entry point uses them.

A keyword whose value is a bool, int, float or str (``return_dict=False``,
``use_cache=False``) is a constant of the program (``split_constants``): the
model is traced with it bound, and every call must pass the same value.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class InputSpec:
    """One flat user input of a tenant."""

    name: str  # placeholder name in the tenant graph
    shape: tuple[int, ...]  # at the example batch
    dtype: torch.dtype
    device: torch.device
    batched: bool  # dim 0 is this tenant's batch dim
    keyword: str | None = None  # the keyword argument it is passed as (None: positional)
    dims: tuple[tuple[int, str], ...] = ()  # declared dynamic dims, (dim, name) (stfuse/dims.py)

    def where(self, tenant: str, i: int) -> str:
        """The input as error messages name it: by keyword, else by flat position."""
        if self.keyword is not None:
            return f"tenant {tenant!r}, keyword argument {self.keyword!r}"
        return f"tenant {tenant!r}, argument {i} ({self.name})"

    def describe(self) -> str:
        named = dict(self.dims)
        dims = ["B" if (i == 0 and self.batched) else named.get(i, str(d)) for i, d in enumerate(self.shape)]
        return f"Tensor[{', '.join(dims)}] {str(self.dtype).removeprefix('torch.')} on {self.device}"


def describe_value(t) -> str:
    """A call argument as error messages show it."""
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"[:80]
    return (f"Tensor[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')} "
            f"on {t.device}")


def call_parts(value) -> tuple[tuple, dict]:
    """One tenant's call argument as ``(args, kwargs)``: THE rule (module docstring).

    A Mapping is keyword arguments (a tokenizer's BatchEncoding is one); a tuple of
    exactly a tuple and a Mapping is ``(args, kwargs)``; any other tuple is
    positional arguments; anything else is the one positional argument."""
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[0], tuple) and isinstance(value[1], Mapping):
            return value[0], dict(value[1])
        return value, {}
    return (value,), {}


CONSTANT_TYPES = (bool, int, float, str)


def split_constants(name: str, kwargs: dict) -> tuple[dict, dict]:
    """(the keyword arguments that hold tensors, the constant ones): a keyword whose value
    is a bool, int, float or str is a constant the program is traced and compiled for.
    Raises ValueError for a float that is not finite (no call could match it, and an
    artifact's JSON cannot hold it)."""
    constants = {k: v for k, v in kwargs.items() if type(v) in CONSTANT_TYPES}
    for k, v in constants.items():
        if type(v) is float and not math.isfinite(v):
            raise ValueError(f"tenant {name!r}: keyword argument {k!r} is {v!r}; a constant keyword "
                             "must be a finite number, a bool or a string")
    return {k: v for k, v in kwargs.items() if k not in constants}, constants


def same_constant(value, constant) -> bool:
    """Whether a call's keyword value is the program's constant: same type and value
    (True is not 1, and 1 is not 1.0: the model may branch on either)."""
    return type(value) is type(constant) and value == constant


def call_of(leaves, in_spec, constants: Mapping | None = None) -> tuple[tuple, dict]:
    """The call ``(args, kwargs)`` a tenant takes, from its flat tensors: the inverse of
    ``call_problem`` (the constant keywords put back)."""
    args, kwargs = pytree.tree_unflatten(list(leaves), in_spec)
    return (args, {**kwargs, **constants}) if constants else (args, kwargs)


def input_keywords(in_spec) -> list[str | None]:
    """Per flat input of a call spec (the pytree spec of ``(args, kwargs)``), the keyword
    argument it is passed as (``"input_ids"``, ``"past['k']"``), or None for positional."""
    paths, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten([0] * in_spec.num_leaves, in_spec))
    return [f"{path[1].key}{pytree.keystr(path[2:])}" if path[0].idx == 1 else None
            for path, _ in paths]


def describe_call(inputs, in_spec, constants: Mapping | None = None) -> str:
    """The call a tenant takes, as error messages show it: ``(Tensor[B, 8] ...)``,
    ``input_ids=Tensor[B, S] ..., return_dict=False``."""
    args, kwargs = pytree.tree_unflatten([s.describe() for s in inputs], in_spec)
    parts = [pytree.tree_map(str, a) for a in args] + [f"{k}={v}" for k, v in kwargs.items()]
    parts += [f"{k}={v!r}" for k, v in (constants or {}).items()]
    return f"({', '.join(map(str, parts))})"


def call_problem(name: str, in_spec, inputs, value,
                 constants: Mapping | None = None) -> tuple[list | None, str | None]:
    """The flat inputs of one tenant's call ``value`` in call-spec order (kwargs in
    the order the tenant was traced with), or why its structure does not fit:
    (leaves, None) or (None, problem). A bare Tensor fills a one-input tenant
    whatever its structure, unless it has ``constants`` (keyword: value, which every
    call must pass: ``split_constants``). Values are checked afterwards by
    ``input_problem``."""
    if isinstance(value, torch.Tensor) and in_spec.num_leaves == 1 and not constants:
        return [value], None
    args, kwargs = call_parts(value)
    constants = constants or {}
    want_args, want_kwargs = pytree.tree_unflatten([None] * in_spec.num_leaves, in_spec)
    want = f"expected {describe_call(inputs, in_spec, constants)}"
    part = []
    if missing := [k for k in (*want_kwargs, *constants) if k not in kwargs]:
        part.append(f"missing keyword argument(s) {', '.join(map(repr, missing))}")
    if unknown := [k for k in kwargs if k not in want_kwargs and k not in constants]:
        part.append(f"unknown keyword argument(s) {', '.join(map(repr, unknown))} (the program "
                    "was traced without them: add them to its example inputs)")
    if other := [f"{k}={kwargs[k]!r}" for k, c in constants.items()
                 if k in kwargs and not same_constant(kwargs[k], c)]:
        part.append(f"keyword argument(s) {', '.join(other)}, where the program was compiled for "
                    f"{', '.join(f'{k}={c!r}' for k, c in constants.items())} (a keyword that is not "
                    "a tensor is a constant of the program: compile again for another value)")
    if len(args) != len(want_args):
        part.append(f"{len(args)} positional argument(s) where it takes {len(want_args)}")
    if part:
        return None, f"tenant {name!r}: {'; '.join(part)}; {want}"
    leaves, spec = pytree.tree_flatten((args, {k: kwargs[k] for k in want_kwargs}))
    if spec != in_spec:  # same arguments, other nesting inside them
        got = [describe_value(a) for a in leaves]
        return None, f"tenant {name!r}: {want}, got {len(leaves)} input(s) nested otherwise: {got}"
    return leaves, None


def input_problem(name: str, inputs, leaves, dim_ranges=None) -> tuple[str | None, int | None]:
    """THE input check: why the flat ``leaves`` do not fit a tenant's ``inputs``
    (InputSpecs; None when they do), and their batch size (None: no batched input).
    Declared dims (stfuse/dims.py) may take any size, one per name, inside
    ``dim_ranges`` ({name: (low, high or None)}) where given.

    Used by FusedProgram and loaded programs (``check_inputs``, which the runtime
    calls too) and by the torch.compile backend (which picks a specialisation)."""
    batch, named = None, {}
    for i, (x, s) in enumerate(zip(leaves, inputs)):
        where = s.where(name, i)
        if not isinstance(x, torch.Tensor):
            return f"{where}: expected {s.describe()}, got {describe_value(x)}", None
        if x.dtype != s.dtype:
            return f"{where}: expected dtype {s.dtype}, got {describe_value(x)}", None
        if x.device != s.device:
            return f"{where}: expected device {s.device}, got {describe_value(x)}", None
        free = {0} if s.batched else set()
        free.update(d for d, _ in s.dims)
        if x.dim() != len(s.shape) or any(x.shape[d] != n for d, n in enumerate(s.shape) if d not in free):
            return f"{where}: expected shape {s.describe()}, got {describe_value(x)}", None
        if s.batched:
            if x.shape[0] < 1:
                return f"{where}: batch size {x.shape[0]}: an empty batch has nothing to run", None
            if batch is not None and x.shape[0] != batch:
                return (f"{where}: batch size {x.shape[0]} differs from the tenant's other inputs "
                        f"({batch})"), None
            batch = x.shape[0]
        for d, dim in s.dims:
            size = x.shape[d]
            if named.setdefault(dim, (size, where))[0] != size:
                return (f"{where}: dim {d} ({dim}) is {size}, but {dim} is {named[dim][0]} in "
                        f"{named[dim][1].split(', ', 1)[1]}"), None
            low, high = (dim_ranges or {}).get(dim, (0, None))
            if size < low or (high is not None and size > high):
                return (f"{where}: dim {d} ({dim}) is {size}, outside the range [{low}, "
                        f"{'inf' if high is None else high}] the program was traced for"), None
    return None, batch


def tenant_name_problem(name) -> str | None:
    """Why ``name`` cannot name a tenant (None: it can): any non-empty string without
    ':' (the node-key separator) and without control characters."""
    if not isinstance(name, str) or not name:
        return "tenant names are non-empty strings"
    if ":" in name:
        return "tenant names cannot contain ':'"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "tenant names cannot contain control characters"
    return None
