"""Tenants' own ops that lowering runs once over a stacked value: views and attention.

A stacked group's output is one [R, ...] tensor (passes/lower.py). Between two
groups each tenant runs its own ops: in a transformer layer the views that split
heads (view, split, transpose) and attention itself. Run per tenant, every layer
unstacks the stacked output and stacks the next group's input again: one copy of
the activations per group, R small calls per view, R attention calls. Where every
member does the same thing to its row of one stacked value, the op runs once on
the stack, dims moved one to the right, and its result stays stacked.

One row per op in ``STACKED``: how a member's call becomes the stacked call. The
passes do not group these ops (nothing to match or price: the stacked call
replaces R calls and copies nothing, except one stack of the members' attention
masks); lowering stacks them where their inputs arrive stacked (``siblings``).
CUDA runs the same aten ops (scaled_dot_product_attention over the flattened
R * B batch); there is no Triton kernel for them.

Before/after (program text, two tenants)::

    y = stacked_linear(...)                    y = stacked_linear(...)
    a = unbind(y)[0]; b = unbind(y)[1]     ->  v = reshape(y, [2, s0, 32, 12, 64])
    va = view(a, [s0, 32, 12, 64])             z = transpose(v, 2, 3)
    vb = view(b, [s1, 32, 12, 64])
    za = transpose(va, 1, 2); zb = ...         (a member's own view runs only where a
                                                tenant's own op reads it)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch

from stfuse.ir import Ref

from .optable import arg_or

aten = torch.ops.aten


def _dim(d: int) -> int:
    """A member's dim in the stacked value: a negative dim counts from the end, unchanged."""
    return d + 1 if d >= 0 else d


@dataclass(frozen=True)
class StackedCall:
    """How R members' calls of one op become one call on their stacked input."""

    target: object  # what the stacked call runs
    args: Callable  # (stacked input, member args, R) -> the stacked call's args
    view: bool = True  # a view (cheap: a member read by its tenant re-runs its own op) or compute
    tensors: tuple[int, ...] = (0,)  # arg positions that must arrive stacked (attention: q, k, v)


def _sizes(x, a, R):
    return (x, [R, *a[1]])


STACKED: dict[object, StackedCall] = {
    # view -> reshape: a stacked value need not be contiguous where each member is
    # (a channels-last stacked conv output); reshape copies only then.
    aten.view.default: StackedCall(aten.reshape.default, _sizes),
    aten.reshape.default: StackedCall(aten.reshape.default, _sizes),
    aten._unsafe_view.default: StackedCall(aten.reshape.default, _sizes),
    aten.transpose.int: StackedCall(aten.transpose.int, lambda x, a, R: (x, _dim(a[1]), _dim(a[2]))),
    aten.permute.default: StackedCall(aten.permute.default,
                                      lambda x, a, R: (x, [0] + [_dim(d) for d in a[1]])),
    aten.unsqueeze.default: StackedCall(aten.unsqueeze.default, lambda x, a, R: (x, _dim(a[1]))),
    aten.squeeze.dim: StackedCall(aten.squeeze.dim, lambda x, a, R: (x, _dim(a[1]))),
    aten.select.int: StackedCall(aten.select.int, lambda x, a, R: (x, _dim(a[1]), a[2])),
    aten.slice.Tensor: StackedCall(aten.slice.Tensor,
                                   lambda x, a, R: (x, _dim(arg_or(a, 1, 0)), *a[2:])),
    aten.split.Tensor: StackedCall(aten.split.Tensor, lambda x, a, R: (x, a[1], _dim(arg_or(a, 2, 0)))),
    aten.flatten.using_ints: StackedCall(aten.flatten.using_ints,
                                         lambda x, a, R: (x, _dim(arg_or(a, 1, 0)), _dim(arg_or(a, 2, -1)))),
    operator.getitem: StackedCall(operator.getitem, lambda x, a, R: (x, a[1])),
    # attention over [R, B, H, S, D]: one call over the R * B flattened batch (sdpa on 5-d
    # inputs takes the math path, 2.8 ms against 0.38 ms for 4 x [1, 12, 32, 64] on the
    # 2-core CPU; per member 1.9 ms); lower.py writes the flatten, the mask and the unflatten.
    aten.scaled_dot_product_attention.default: StackedCall(
        aten.scaled_dot_product_attention.default, None, view=False, tensors=(0, 1, 2)),
}


def _key(g, v):
    """What must agree between members' other arguments: plain values exactly, a
    symbolic size (a Ref) by nothing: the outputs' sigs then say the shapes agree."""
    if isinstance(v, Ref):
        return ("ref", g.nodes[v.key]["sig"]) if g.nodes[v.key]["shape"] is not None else "sym"
    if isinstance(v, (list, tuple)):
        return tuple(_key(g, x) for x in v)
    return v


def call_key(g, k, tensors: tuple[int, ...]):
    """Members with equal keys run the same op with the same arguments on inputs of
    equal shapes; None where one call cannot be proven to do every member's work."""
    a = g.nodes[k]
    args = [v for i, v in enumerate(a["args"]) if i not in tensors]
    has_sym = any(k2 == "sym" for k2 in _flat(_key(g, args)))
    if a["sig"] is None and has_sym:
        return None  # a list output (split) by symbolic sizes: nothing says the chunks agree
    if a["target"] is not aten.scaled_dot_product_attention.default and a["kwargs"]:
        return None
    kwargs = tuple(sorted((n, _key(g, v)) for n, v in a["kwargs"].items()))
    return (a["target"], a["sig"], _key(g, args), kwargs)


def _flat(v):
    if isinstance(v, tuple):
        for x in v:
            yield from _flat(x)
    else:
        yield v


def siblings(g, k, members, taken) -> list[str] | None:
    """For node k reading member j of a stacked value (``members``: its R member keys),
    the R nodes, one per member, that do what k does to their own member (k among
    them); None where a member has none. ``taken``: nodes already emitted or claimed."""
    row = STACKED[g.nodes[k]["target"]]
    key = call_key(g, k, row.tensors)
    if key is None:
        return None
    out = []
    for m in members:
        found = next((n for n in sorted(g.successors(m))
                      if n not in taken and n not in out and g.nodes[n]["kind"] == "call"
                      and g.nodes[n]["target"] is g.nodes[k]["target"]
                      and isinstance(g.nodes[n]["args"][0], Ref) and g.nodes[n]["args"][0].key == m
                      and call_key(g, n, row.tensors) == key), None)
        if found is None:
            return None
        out.append(found)
    return out if k in out else None


def view_source(g, k: str) -> str:
    """The node whose value k views through rows of ``STACKED`` views (k itself if none)."""
    while True:
        a = g.nodes[k]
        row = STACKED.get(a["target"]) if a["kind"] == "call" and not isinstance(a["target"], torch.nn.Module) else None
        if row is None or not row.view or not a["args"] or not isinstance(a["args"][0], Ref):
            return k
        k = a["args"][0].key
