"""Declared dynamic dims: sizes other than the batch that vary per call.

``stfuse.compile(..., dynamic={"bert": {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}})``
declares, per tenant, which dims of which inputs vary: an input is named by its
keyword (``"input_ids"``) or by its positional index (``0``), and each dim by a
name. The batch (dim 0) is dynamic already and is never declared. A tenant
traces with those dims symbolic (``Dim.DYNAMIC``: export fails, naming the dim,
where the model fixes it), and every call checks them against the range export
kept (``VR[2, 64]`` for BERT's positions: [2, 64]).

Names matter across tenants: two tenants whose inputs share a name and have equal
sizes for it in a call (and equal batches) may run their fused groups stacked, as
one batched kernel; otherwise the groups run grouped, one member per tenant at
its own shape (passes/lower.py, program.py ``_execute``).

Before/after (one tenant's InputSpecs)::

    input_ids       Tensor[B, 8] int64     ->   Tensor[B, seq] int64   dims ((1, "seq"),)
    attention_mask  Tensor[B, 8] int64          Tensor[B, seq] int64   dims ((1, "seq"),)
                                                dim_ranges {"seq": (2, 64)}
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.utils._pytree as pytree

from .errors import TraceError


def declared(tenant: str, args: tuple, kwargs: dict, dynamic) -> list[tuple]:
    """Per flat input of the call (args, kwargs), its declared dims ``((dim, name), ...)``,
    from a tenant's ``dynamic`` entry {input: {dim: name}}; raises TraceError for a
    declaration that names no top-level tensor input, dim 0, a dim the input lacks,
    a name that is not a non-empty string, or an example size below 2 (export
    specialises sizes 0 and 1)."""
    paths, _ = pytree.tree_flatten_with_path((args, kwargs))
    keys = [(path[1].idx if path[0].idx == 0 else path[1].key) if len(path) == 2 else None
            for path, _ in paths]
    if not dynamic:
        return [()] * len(keys)
    if not isinstance(dynamic, Mapping):
        raise TraceError(f"tenant {tenant!r}: dynamic takes {{input: {{dim: name}}}}, got "
                         f"{type(dynamic).__name__}")
    leaves = pytree.tree_leaves((args, kwargs))
    out = [()] * len(keys)
    for key, dims in dynamic.items():
        if key not in keys:
            names = [k for k in keys if k is not None]
            raise TraceError(f"tenant {tenant!r}: dynamic names input {key!r}, which its example "
                             f"does not pass as a tensor; its inputs are {names}")
        i = keys.index(key)
        x = leaves[i]
        if not isinstance(x, torch.Tensor) or not isinstance(dims, Mapping):
            raise TraceError(f"tenant {tenant!r}: dynamic[{key!r}] takes {{dim: name}} for a tensor input")
        for d, name in dims.items():
            where = f"tenant {tenant!r}: dynamic[{key!r}][{d!r}]"
            if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d < x.dim():
                raise TraceError(f"{where}: dims 1 to {x.dim() - 1} may vary (dim 0, the batch, "
                                 "is dynamic already)")
            if not isinstance(name, str) or not name.isidentifier():
                raise TraceError(f"{where}: a dim's name is an identifier such as 'seq', got {name!r}")
            if x.shape[d] < 2:
                raise TraceError(f"{where}: the example's size is {x.shape[d]}; trace at 2 or more "
                                 "(export fixes sizes 0 and 1)")
        out[i] = tuple(sorted(dims.items()))
    return out


def export_shapes(leaf_dims: list[tuple]) -> list[dict]:
    """Per flat input, the export spec of its declared dims ({dim: Dim.DYNAMIC})."""
    from torch.export import Dim

    return [{d: Dim.DYNAMIC for d, _ in dims} for dims in leaf_dims]


def ranges(tenant: str, ep, leaf_dims: list[tuple]) -> dict[str, tuple[int, int | None]]:
    """{name: (low, high or None)}: the range export kept for each declared dim's symbol
    (intersected over the dims of one name; a low below 2 is 2, as export assumes).

    Refused with TraceError: a dim export traced as an expression (``2 * s0``) rather
    than a free symbol, and two names for one symbol (the model needs them equal, and
    calls would be checked as if they were free). One name for dims the model keeps
    apart is fine: calls must give them one size."""
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    out: dict[str, tuple] = {}
    symbols: dict = {}
    for val, dims in zip(vals, leaf_dims):
        for d, name in dims:
            size = val.shape[d]
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is None or not expr.is_Symbol:
                raise TraceError(f"tenant {tenant!r}: dim {d} ({name}) is traced as {size}, not as a "
                                 "free size; the model ties it to other sizes")
            if symbols.setdefault(expr, name) != name:
                raise TraceError(f"tenant {tenant!r}: dims named {symbols[expr]!r} and {name!r} must be "
                                 "equal in this model; give them one name")
            vr = ep.range_constraints.get(expr)
            low = max(2, int(vr.lower) if vr is not None and finite(vr.lower) else 2)
            high = int(vr.upper) if vr is not None and finite(vr.upper) else None
            old_low, old_high = out.get(name, (low, high))
            out[name] = (max(low, old_low), high if old_high is None else
                         old_high if high is None else min(high, old_high))
    return out


def finite(v) -> bool:
    import sympy
    from torch.utils._sympy.numbers import int_oo

    return v not in (int_oo, -int_oo, sympy.oo, -sympy.oo)


def check_holds(tg, model, call, graph_matches) -> None:
    """Raise TraceError where the graph traced at the example does not give the model's
    own output with a declared dim at another size: a size up (down at the top of the
    range) and twice the example (inside the range).

    Export keeps guards on sizes as ranges, but not every guard: a ViT whose example
    has as many patches as it has positions returns its position table uninterpolated,
    and export kept no guard for ``patches == positions``, so the graph crashed at any
    other image size. A test, not a proof: paths that agree at these sizes pass.
    ``graph_matches(tg, model, call)`` (frontend.graph_matches) runs both and compares."""
    example = {name: s.shape[d] for s in tg.inputs for d, name in s.dims}
    for name, (low, high) in tg.dim_ranges.items():
        top = (1 << 30) if high is None else high
        for size in sorted({_two_sizes([example[name]], low, high)[1], min(2 * example[name], top)}):
            if size != example[name] and not graph_matches(tg, model, resize(call, tg.inputs, {name: size})):
                raise TraceError(
                    f"tenant {tg.name!r}: traced at {name}={example[name]}, the graph does not give the "
                    f"model's output at {name}={size} (the model takes another path there, and export "
                    f"kept no guard for it); trace at another size, or leave {name} fixed")


def sizes(inputs, leaves) -> dict[str, int]:
    """{name: size} of a call's declared dims (the call already checked)."""
    return {name: x.shape[d] for x, s in zip(leaves, inputs) for d, name in s.dims}


def probes(tenant_graphs) -> dict[str, dict[str, tuple[int, int]]]:
    """{tenant: {name: (base, other)}}: two sizes per declared dim that the tenant holds
    for. Tenants declaring one name share them where their ranges overlap (the base is
    the smallest example size, moved into every range), so they compare their shapes
    there (passes/annotate.py's sig); the self-check runs there too. Where ranges share
    no size, each tenant takes its own (such tenants never share a size, so never stack)."""
    by_name: dict[str, list] = {}
    for tg in tenant_graphs:
        ex = {name: s.shape[d] for s in tg.inputs for d, name in s.dims}  # example sizes
        for name, (low, high) in tg.dim_ranges.items():
            by_name.setdefault(name, []).append((tg.name, ex[name], low, high))
    out: dict[str, dict] = {}
    for name, rows in by_name.items():
        shared = _two_sizes([r[1] for r in rows], max(r[2] for r in rows),
                            min((r[3] for r in rows if r[3] is not None), default=None))
        for tenant, example, low, high in rows:
            out.setdefault(tenant, {})[name] = shared or _two_sizes([example], low, high)
    return out


def _two_sizes(examples, low: int, high: int | None) -> tuple[int, int] | None:
    """(base, other) inside [low, high]: the smallest example moved inside, and the next
    size up (down at the top); None where the range is empty."""
    if high is not None and high < low:
        return None
    base = max(min(examples), low) if high is None else min(max(min(examples), low), high)
    other = base + 1 if high is None or base < high else base - 1
    return base, other if other >= low else base


def resize(call, inputs, new: Mapping[str, int]):
    """A tenant's call (args, kwargs) in its spec's order, with each declared dim named in
    ``new`` resized to that size, entries repeating cyclically (token ids stay token ids).
    Leaves that are not tensors (constant keywords, calls.split_constants) stay as they are."""
    leaves, spec = pytree.tree_flatten(call)
    specs = iter(inputs)
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            for d, name in next(specs).dims:
                if name in new and x.shape[d] != new[name]:
                    x = x.index_select(d, torch.arange(new[name], device=x.device) % x.shape[d])
        out.append(x)
    return pytree.tree_unflatten(out, spec)
