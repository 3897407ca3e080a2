"""rows: whether a tenant's rows are independent along the batch dim (an analysis, not a pass).

The runtime may concatenate several requests of one tenant along dim 0 and
split the output back only when every output row depends on its own input row
alone. That is false for ``y - y.mean(0)``, a softmax over dim 0, batch-norm in
training mode, ``x + torch.arange(x.shape[0])``, ``x[0]``, ``torch.cat([x, y])``
... so it is decided per tenant from its annotated graph, conservatively: each
op must be a row of ``RULES`` (op -> check) and pass its check; any other op
that sees batch-dependent data makes the tenant "not independent".

Every node is in one of three states: NONE (independent of the batch:
parameters, constants), ROWS (a tensor whose batch dim ``d`` holds B*k rows,
batch index outermost, every row computed from its own input row), SIZE (an int
computed from the batch size, e.g. ``sym_size(x, 0)``: fine as a shape, never
as a value), IOTA (``arange(B)``, each row's own index, as transformers' mask
code builds it: fine only to pick each row's own row with ``index``). The batch dim of a node comes from annotate's ``sig`` (shapes at
batch 2 and 3): the one dim that changes, by a constant factor k.

Before/after: none (the graph is read, never changed)::

    %x = input [B, 8]         ROWS            %x = input [B, 8]          ROWS
    %m = mean(%x, [0], True)  batch reduced   %l = linear(%x, %w, %b)    ROWS
    %y = sub(%x, %m)          -> mixed        %y = relu(%l)              ROWS
                                              -> rows independent
"""

from __future__ import annotations

import math
import operator

import networkx as nx
import torch

from stfuse import ir
from stfuse.ir import Ref

aten = torch.ops.aten

NONE, ROWS, SIZE, IOTA = "none", "rows", "size", "iota"


class Mixed(Exception):
    """Rows of one batch may influence each other at this node (the message says how)."""


# ------------------------------------------------------------------ batch dims from sig


def _bdim(g, k) -> int:
    """The batch dim of ROWS node k: the one dim whose size is B * k for a constant k."""
    a = g.nodes[k]
    sig = a["sig"]
    if sig is None:
        raise Mixed(f"{a['name']}: no shape to find the batch dim in")
    s2, s3 = sig[:2]  # at batch 2 and 3 (later entries: declared dims, stfuse/dims.py)
    dims = [i for i, (d2, d3) in enumerate(zip(s2, s3)) if d2 != d3]
    if len(dims) != 1:
        raise Mixed(f"{a['name']}: {len(dims)} dims depend on the batch ({s2} at 2, {s3} at 3)")
    d = dims[0]
    if s2[d] % 2 or s3[d] % 3 or s2[d] // 2 != s3[d] // 3:
        raise Mixed(f"{a['name']}: dim {d} is not a whole number of rows per batch entry")
    return d


def _nd(g, k) -> int:
    return len(g.nodes[k]["sig"][0])


def _dims(v, nd) -> list[int] | None:
    """A dim argument as a list of non-negative dims; None for "every dim"."""
    if v is None:
        return None
    v = v if isinstance(v, (list, tuple)) else [v]
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in v):
        raise Mixed(f"dim argument {v!r} is not a list of ints")
    return [d % nd for d in v]


def _rows_args(g, a, state) -> list[str]:
    return [k for k in ir.refs((a["args"], a["kwargs"])) if state[k] == ROWS]


def _arg(a, i, name, default=None):
    if len(a["args"]) > i:
        return a["args"][i]
    return a["kwargs"].get(name, default)


# ------------------------------------------------------------------ checks: one per kind of op


def pointwise(g, k, state):
    """Broadcasting elementwise ops: every ROWS input's batch dim lines up with the output's."""
    out = _bdim(g, k)
    nd = _nd(g, k)
    for r in _rows_args(g, g.nodes[k], state):
        d = _bdim(g, r)
        if _nd(g, r) - d != nd - out or g.nodes[r]["sig"][0][d] != g.nodes[k]["sig"][0][out]:
            raise Mixed(f"{g.nodes[k]['name']}: broadcasts {g.nodes[r]['name']} across the batch")


def same_layout(g, k, state):
    """Ops that move, copy or re-type whole dims (permute, unsqueeze, expand, clone, *_like):
    the output's batch dim is found from its shapes; only its existence is needed."""
    _bdim(g, k)


def reshape(g, k, state):
    """view / reshape / flatten: the elements before the batch dim stay the same in number,
    so each batch entry's block of elements stays whole and in order."""
    a = g.nodes[k]
    src = a["args"][0].key
    d_in, d_out = _bdim(g, src), _bdim(g, k)
    for j in (0, 1):
        if math.prod(g.nodes[src]["sig"][j][:d_in]) != math.prod(a["sig"][j][:d_out]):
            raise Mixed(f"{a['name']}: reshapes across the batch dim")


def _reduce_dim_at(pos, name="dim"):
    def check(g, k, state):
        a = g.nodes[k]
        src = a["args"][0].key
        nd = _nd(g, src)
        dims = _dims(_arg(a, pos, name), nd)
        if dims is None or _bdim(g, src) in dims or (dims == [] and nd > 0):
            raise Mixed(f"{a['name']}: {a['target']} works across the batch dim")
        if a["sig"] is not None:  # tuple outputs (max.dim) are checked at their getitem
            _bdim(g, k)
    check.__name__ = f"reduce_dim_at_{pos}"
    return check


def _not_along_batch(pos, name="dim", default=0):
    """select / narrow / split / chunk / unbind / index_select / cat: not along the batch dim."""
    def check(g, k, state):
        a = g.nodes[k]
        rows = _rows_args(g, a, state)
        for r in rows:
            if _dims(_arg(a, pos, name, default), _nd(g, r))[0] == _bdim(g, r):
                raise Mixed(f"{a['name']}: {a['target']} along the batch dim")
        if a["sig"] is not None:
            _bdim(g, k)
    return check


def slice_(g, k, state):
    """slice along the batch dim only when it keeps every row."""
    a = g.nodes[k]
    src = a["args"][0].key
    d = _bdim(g, src)
    along = _dims(_arg(a, 1, "dim", 0), _nd(g, src))[0] == d
    if along and (a["sig"] is None or _arg(a, 4, "step", 1) != 1
                  or any(a["sig"][j][d] != g.nodes[src]["sig"][j][d] for j in (0, 1))):
        raise Mixed(f"{a['name']}: slices the batch dim")
    _bdim(g, k)


def _leading(batch_dims_before_last):
    """Ops whose last ``n`` dims mix (linear: 1; matmul, attention, pooling: 2): the batch
    dim of every ROWS operand is before them."""
    def check(g, k, state):
        a = g.nodes[k]
        for r in _rows_args(g, a, state):
            if _bdim(g, r) >= _nd(g, r) - batch_dims_before_last:
                raise Mixed(f"{a['name']}: {a['target']} mixes the batch dim of {g.nodes[r]['name']}")
        if a["sig"] is not None:
            _bdim(g, k)
    return check


def matmul(g, k, state):
    """matmul / bmm: rows of the left operand against a batch-independent right operand, or
    the batch among the batch dims (all but the last two) of a batched matmul."""
    a = g.nodes[k]
    left = a["args"][0]
    rows = _rows_args(g, a, state)
    if isinstance(left, Ref) and rows == [left.key]:
        if _bdim(g, left.key) >= _nd(g, left.key) - 1:
            raise Mixed(f"{a['name']}: {a['target']} contracts the batch dim")
    else:
        _leading(2)(g, k, state)
    _bdim(g, k)


def first_operand_only(g, k, state):
    """linear / mm / addmm / embedding: rows come from the data operand alone; the
    weight must not depend on the batch."""
    a = g.nodes[k]
    data = a["args"][1] if a["target"] in (aten.addmm.default, aten.embedding.default) else a["args"][0]
    for r in _rows_args(g, a, state):
        if not (isinstance(data, Ref) and r == data.key):
            raise Mixed(f"{a['name']}: {a['target']} reads the batch through its weight")
    d = _bdim(g, data.key)
    if a["target"] is not aten.embedding.default and d >= _nd(g, data.key) - 1:
        raise Mixed(f"{a['name']}: {a['target']} contracts the batch dim")
    _bdim(g, k)


def channels_first(g, k, state):
    """conv / batch_norm (eval) / group_norm: batch at dim 0 of a batched (N, C, ...) input,
    every other operand independent of the batch."""
    a = g.nodes[k]
    rows = _rows_args(g, a, state)
    data = a["args"][0]
    if rows != [data.key] or _bdim(g, data.key) != 0:
        raise Mixed(f"{a['name']}: {a['target']} does not keep the batch at dim 0 of its input")
    if a["sig"] is not None:
        _bdim(g, k)


def batch_norm(g, k, state):
    a = g.nodes[k]
    training = _arg(a, 5, "training", False)
    if training is not False:
        raise Mixed(f"{a['name']}: batch norm with batch statistics (training)")
    channels_first(g, k, state)


def layer_norm(g, k, state):
    a = g.nodes[k]
    src = a["args"][0].key
    if _bdim(g, src) >= _nd(g, src) - len(a["args"][1]):
        raise Mixed(f"{a['name']}: normalises over the batch dim")
    channels_free = [r for r in _rows_args(g, a, state) if r != src]
    if channels_free:
        raise Mixed(f"{a['name']}: its weight depends on the batch")
    if a["sig"] is not None:
        _bdim(g, k)


def pad(g, k, state):
    a = g.nodes[k]
    src = a["args"][0].key
    if _bdim(g, src) >= _nd(g, src) - len(a["args"][1]) // 2:
        raise Mixed(f"{a['name']}: pads the batch dim")
    _bdim(g, k)


def index_own_row(g, k, state):
    """``src[iota[:, None, ...], idx, ...]``: row b reads src's row b (batch at dim 0) and
    index tensors that line up with the iota (transformers' masks: ``padding_mask[b, pos]``)."""
    a = g.nodes[k]
    src, indices = a["args"][0], a["args"][1]
    first = indices[0] if indices else None
    if not (isinstance(first, Ref) and state[first.key] == IOTA and state[src.key] == ROWS
            and _bdim(g, src.key) == 0):
        raise Mixed(f"{a['name']}: indexes across the batch")
    lead = _nd(g, first.key) - _bdim(g, first.key)
    for v in indices[1:]:
        if isinstance(v, Ref) and state[v.key] != NONE and (
                state[v.key] != ROWS or _nd(g, v.key) - _bdim(g, v.key) != lead):
            raise Mixed(f"{a['name']}: an index does not line up with the batch")
    if _bdim(g, k) != 0:
        raise Mixed(f"{a['name']}: indexes across the batch")


def getitem(g, k, state):
    """An element of a checked tuple (split, max.dim, native_layer_norm, ...)."""
    if g.nodes[k]["sig"] is not None:
        _bdim(g, k)


def _packets(*names):
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


_POINTWISE = _packets(
    "add", "sub", "rsub", "mul", "div", "pow", "neg", "exp", "exp2", "log", "log2", "log1p", "expm1",
    "sqrt", "rsqrt", "abs", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "erf", "erfc",
    "sin", "cos", "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "where", "masked_fill",
    "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu", "softplus", "mish",
    "reciprocal", "sign", "floor", "ceil", "round", "trunc", "frac", "fmod", "remainder",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "logical_xor",
    "bitwise_not", "bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__",
    "__invert__", "lerp", "addcmul", "addcdiv",
    "floor_divide", "square", "isnan", "isinf", "nan_to_num", "dropout", "copy",
    "add_", "sub_", "mul_", "div_", "relu_", "clamp_", "masked_fill_", "copy_", "neg_", "exp_",
    "sigmoid_", "tanh_", "gelu_", "silu_", "hardtanh_", "hardswish_", "pow_", "fill_", "zero_",
)
_SAME_LAYOUT = _packets(
    "permute", "transpose", "t", "movedim", "unsqueeze", "squeeze", "expand", "expand_as", "alias",
    "detach", "clone", "contiguous", "_to_copy", "to", "type_as", "lift_fresh_copy", "zeros_like",
    "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
    "zeros", "ones", "empty", "full", "stack", "repeat_interleave",
)
_RESHAPE = _packets("view", "reshape", "_unsafe_view", "flatten", "unflatten")

# op packet -> check. A packet names every overload of the op (add.Tensor, add.Scalar, ...).
RULES = {
    **{p: pointwise for p in _POINTWISE},
    **{p: same_layout for p in _SAME_LAYOUT},
    **{p: reshape for p in _RESHAPE},
    **{p: _reduce_dim_at(1) for p in _packets(
        "sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "logsumexp", "any", "all",
        "argmax", "argmin", "softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod")},
    aten.linalg_vector_norm: _reduce_dim_at(2),
    aten.slice: slice_,
    **{p: _not_along_batch(1) for p in _packets(
        "select", "narrow", "index_select", "unbind", "cat")},
    **{p: _not_along_batch(2) for p in _packets("split", "split_with_sizes", "chunk")},
    aten.diff: _not_along_batch(2, default=-1),
    **{p: first_operand_only for p in _packets("linear", "mm", "addmm", "embedding")},
    **{p: matmul for p in _packets("bmm", "matmul")},
    **{p: _leading(2) for p in _packets(
        "baddbmm", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "max_pool2d",
        "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
        "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d")},
    **{p: _leading(1) for p in _packets(
        "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "_adaptive_avg_pool1d")},
    **{p: channels_first for p in _packets(
        "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
        "group_norm", "native_group_norm", "_native_batch_norm_legit_no_training", "instance_norm")},
    **{p: batch_norm for p in _packets("batch_norm", "_native_batch_norm_legit")},
    **{p: layer_norm for p in _packets("layer_norm", "native_layer_norm")},
    **{p: pad for p in _packets("constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d")},
    aten.roll: _reduce_dim_at(2, "dims"),  # roll along given dims only (none: the flattened tensor)
}

# Integer arithmetic on sizes, and the ops that may take a size as a shape (never as a value).
_SIZE_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
             operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
             torch.sym_max, torch.sym_min, torch.sym_int, torch.sym_not}
_NO_VALUE = _packets("_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
                     "_assert_tensor_metadata")
# op packet -> the argument positions that may hold a size (a shape, a bound, a count)
_TAKES_SIZE = {
    **{p: (1,) for p in _RESHAPE | _packets("expand", "new_zeros", "new_ones", "new_empty", "new_full")},
    **{p: (0,) for p in _packets("zeros", "ones", "empty", "full")},
    **{p: (0, 1, 2, 3) for p in _NO_VALUE},
    aten.slice: (2, 3),
    aten.narrow: (2, 3),
    aten.native_group_norm: (3, 4, 5),
}


_IOTA_KEEPS = _packets("slice", "unsqueeze", "expand", "view", "reshape", "_unsafe_view", "alias",
                       "clone", "contiguous")


def _packet(target):
    return getattr(target, "overloadpacket", target)


# ------------------------------------------------------------------ the analysis


def row_mixing(g, tenant: str) -> str | None:
    """None if the tenant's output rows each depend on their own input row only (the
    runtime may then batch its requests); else the first reason they may not."""
    tg = g.graph["tenants"][tenant]
    if not tg.dynamic:
        return "the batch size is fixed (static tenant)"
    out = next(k for k in ir.tenant_order(g, tenant) if g.nodes[k]["kind"] == "output")
    nodes = nx.ancestors(g, out) | {out}  # what reaches the outputs (dead code cannot mix rows)
    state: dict[str, str] = {}
    try:
        for k in nx.topological_sort(g.subgraph(nodes)):
            a = g.nodes[k]
            if a["kind"] == "param":
                state[k] = NONE
            elif a["kind"] == "input":
                state[k] = ROWS if tg.inputs[a["index"]].batched else NONE
                if state[k] == ROWS:
                    _bdim(g, k)
            elif a["kind"] == "call":
                state[k] = _call_state(g, k, state)
            elif a["kind"] == "output":
                for r in ir.refs(a["args"]):
                    if state[r] != ROWS or _bdim(g, r) != 0 or g.nodes[r]["sig"][0][0] != 2:
                        raise Mixed(f"output {g.nodes[r]['name']} does not have one row per batch entry at dim 0")
    except Mixed as why:
        return str(why)
    return None


def _call_state(g, k, state) -> str:
    a = g.nodes[k]
    ins = [state[r] for r in ir.refs((a["args"], a["kwargs"]))]
    target, packet = a["target"], _packet(a["target"])
    if packet is aten.arange and ins == [SIZE] and len(a["args"]) == 1:
        _bdim(g, k)
        return IOTA
    if SIZE in ins:
        if target is aten.sym_size.int or target in _SIZE_OPS:
            return SIZE
        allowed = _TAKES_SIZE.get(packet, ())
        where = [i for i, v in enumerate(a["args"]) if any(state[r] == SIZE for r in ir.refs(v))]
        if a["kwargs"] and any(state[r] == SIZE for r in ir.refs(a["kwargs"])) or not set(where) <= set(allowed):
            raise Mixed(f"{a['name']}: {target} computes with the batch size")
    if packet in _NO_VALUE:
        return NONE
    if IOTA in ins:
        if packet is aten.index:
            index_own_row(g, k, state)
            return ROWS
        if packet not in _IOTA_KEEPS or ROWS in ins:
            raise Mixed(f"{a['name']}: {target} computes with row positions (arange of the batch size)")
        RULES[packet](g, k, state)
        return IOTA

    if target is aten.sym_size.int:
        src = a["args"][0].key
        return SIZE if state[src] == ROWS and int(a["args"][1]) % _nd(g, src) == _bdim(g, src) else NONE
    if ROWS not in ins and SIZE not in ins:
        return NONE
    if target is operator.getitem:
        getitem(g, k, state)
        return ROWS
    rule = RULES.get(packet)
    if rule is None:
        raise Mixed(f"{a['name']}: {target} is not known to keep rows apart")
    rule(g, k, state)
    return ROWS


def rows_independent(g) -> dict[str, bool]:
    """Per tenant, whether the runtime may concatenate its requests along dim 0."""
    return {t: row_mixing(g, t) is None for t in g.graph["tenants"]}
