"""The op table: which ATen ops belong to which op class, and what they cost.

Rules are rows, not if-chains: ``OP_CLASS`` maps an overload to its class,
``UNARY_STEPS`` / ``BINARY_STEPS`` map pointwise overloads to epilogue steps,
and ``OP_CLASSES`` holds one row per fusable class (match weight, parameter
positions, FLOPs, the grouped/stacked ops' other arguments). Every pass asks this module.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from stfuse.ir import Ref
from stfuse.kernels.epilogue import Step

aten = torch.ops.aten

OP_CLASS = {
    aten.linear.default: "linear",
    aten.conv2d.default: "conv2d",
    aten.layer_norm.default: "layer_norm",
    aten.group_norm.default: "group_norm",
}

# Ops that launch no kernel: metadata, views and shape arithmetic.
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.flatten.using_ints, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.chunk.default, aten.sym_size.int, aten.alias.default,
    aten.detach.default, aten._assert_tensor_metadata.default, aten.narrow.default,
    operator.getitem,
}

UNARY_STEPS = {
    aten.relu.default: "relu",
    aten.silu.default: "silu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
}

# overload -> (step when the full-size operand comes first, step when it comes second)
BINARY_STEPS = {
    aten.add.Tensor: ("add", "add"),
    aten.sub.Tensor: ("sub", "rsub"),
    aten.mul.Tensor: ("mul", "mul"),
    aten.div.Tensor: ("div", "rdiv"),
}

def _is_float(t) -> bool:
    return isinstance(t, torch.dtype) and t.is_floating_point


def pointwise_step(g, k):
    """``(main Ref, Step, operand)`` if node k is a fusable pointwise op, else None.

    The main operand is the input with the output's shape; the operand is a Ref
    (tensor step), a float (scalar step) or None (unary step).
    """
    a = g.nodes[k]
    target, args, kwargs = a["target"], a["args"], a["kwargs"]
    out_shape, out_sig, out_dtype = a["shape"], a["sig"], a["dtype"]
    if out_shape is None or not _is_float(out_dtype) or not args or not isinstance(args[0], Ref):
        return None

    def full(v):
        # A tensor input with exactly the output's shape and dtype at EVERY batch size:
        # the sig, not just the example shape. Compiled at batch 1, a [1, S, C] position
        # embedding has the shape of the [B, S, C] sum, but is no main operand at batch 8
        # (stacking it with another tenant's [8, S, C] main, or adding in place onto it,
        # crashed).
        return (isinstance(v, Ref) and g.nodes[v.key]["shape"] == out_shape
                and g.nodes[v.key]["sig"] == out_sig and g.nodes[v.key]["dtype"] == out_dtype)

    if target in UNARY_STEPS and not kwargs and len(args) == 1 and full(args[0]):
        return args[0], Step(UNARY_STEPS[target]), None
    if target is aten.gelu.default and full(args[0]) and len(args) == 1:
        approx = kwargs.get("approximate", "none")
        return args[0], Step("gelu" if approx == "none" else "gelu_tanh"), None
    if target is aten.pow.Tensor_Scalar and full(args[0]) and isinstance(args[1], (int, float)):
        return args[0], Step("pow", "scalar"), float(args[1])
    if target in BINARY_STEPS and len(args) == 2 and kwargs.get("alpha", 1) == 1:
        lhs, rhs = args
        first, second = BINARY_STEPS[target]
        if full(lhs) and isinstance(rhs, (int, float)) and not isinstance(rhs, bool):
            return lhs, Step(first, "scalar"), float(rhs)
        if full(lhs) and _same_dtype_tensor(g, rhs, out_dtype):
            return lhs, Step(first, "tensor"), rhs
        if full(rhs) and _same_dtype_tensor(g, lhs, out_dtype):
            return rhs, Step(second, "tensor"), lhs
    return None


def _same_dtype_tensor(g, v, dtype) -> bool:
    return isinstance(v, Ref) and g.nodes[v.key]["dtype"] == dtype and g.nodes[v.key]["shape"] is not None


def classify(g, k) -> str:
    a = g.nodes[k]
    if a["kind"] != "call":
        return a["kind"]
    target = a["target"]
    if target in VIEW_OPS:
        return "view"
    cls = OP_CLASS.get(target)
    if cls is not None:
        fits = a["shape"] is not None and _is_float(a["dtype"]) and OP_CLASSES[cls].accepts(a["args"], a["kwargs"])
        return cls if fits else "other"
    return "pointwise" if pointwise_step(g, k) is not None else "other"


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def arg_or(args, i, default=None):
    """``args[i]``, or ``default`` where the call left that argument out."""
    return args[i] if len(args) > i else default


def _pair(v) -> list[int]:
    v = [v] if isinstance(v, int) else list(v)
    return v * 2 if len(v) == 1 else v


def _conv_extras(rows) -> dict:
    stride, padding, dilation, groups = [], [], [], []
    for r in rows:
        stride += _pair(arg_or(r, 3, 1))
        padding += _pair(arg_or(r, 4, 0))
        dilation += _pair(arg_or(r, 5, 1))
        groups.append(arg_or(r, 6, 1))
    return {"conv": (stride, padding, dilation, groups)}


def _weight_shape(g, a, i=1):
    return g.nodes[a["args"][i].key]["shape"]


@dataclass(frozen=True)
class OpClass:
    """Everything the passes know about one fusable op class: one row of OP_CLASSES.

    Its kernels (``stfuse::grouped_<name>`` / ``stacked_<name>``: reference, fake,
    Triton) are rows of kernels/ops.py; adding an op class is a row here, its
    ATen ops in OP_CLASS, and its kernels there.
    """

    name: str
    match_weight: int  # what fusing two such ops is worth (match.py): GEMMs save most
    params: tuple[int, int] | None  # positions of (weight, bias) in a member's args; None: none
    flops: Callable  # (g, node attrs, output numel) -> FLOPs of one call
    extras: Callable = lambda rows: {}  # members' other arguments (conv stride, eps), by role
    # the non-tensor arguments of the grouped and the stacked op, from ``extras``
    grouped_extras: Callable = lambda extras: ()
    stacked_extras: Callable = lambda extras: ()
    # (args, kwargs) -> whether the kernels take this call; any other stays the tenant's own op.
    # Lowering reads members' args only, so a keyword argument is refused rather than dropped.
    accepts: Callable = lambda args, kwargs: not kwargs
    # (members' weights) -> one [R, ...] tensor, laid out for the stacked kernel that reads it
    pack_weight: Callable = torch.stack

    def uniform(self, extras: dict) -> bool:
        """Whether the members' other arguments allow one stacked call."""
        return all(len({repr(v) for v in values}) <= 1 for values in _per_member(extras))


def _per_member(extras: dict):
    """Each role's per-member values (conv's four lists hold 2 ints per member for stride...)."""
    for role, values in extras.items():
        if role == "conv":
            stride, padding, dilation, groups = values
            yield [tuple(stride[i:i + 2]) + tuple(padding[i:i + 2]) + tuple(dilation[i:i + 2])
                   for i in range(0, len(stride), 2)]
            yield groups
        else:
            yield values


def _pack_linear_weight(values) -> torch.Tensor:
    """Stored [R, K, N] and viewed as [R, N, K]: baddbmm reads the contiguous [R, K, N]
    (7.4 us against 10.4 us for 4 x 256 x 256 at batch 1 on the 2-core CPU), and
    F.linear on a member's [N, K] view is just as fast."""
    return torch.stack([v.t() for v in values]).transpose(1, 2)


def _pack_conv_weight(values) -> torch.Tensor:
    """On CPU, channels-last per member ([R, O, kh, kw, C] in memory): the one grouped
    conv2d over R members then runs channels-last end to end
    (kernels/reference.stacked_conv2d), 1.3-2.2x faster than NCHW on the 2-core CPU
    (R=4, batch 1, 16-64 channels; even at 256). The Triton kernels take strides, but
    keep the layout they are tuned for.

    Not for kernels of 8 x 8 and more (ViT's patch embedding: kernel = stride = 16):
    channels-last took 23 ms against 0.8 ms NCHW for 4 x [1, 3, 64, 64] -> 768, and
    31 ms against 5.7 ms at 224 x 224 (one thread of the 2-core CPU; 8 x 8 stride 8:
    0.9 against 0.3 ms), while a 7 x 7 stem still gains (10.5 against 21 ms)."""
    if values[0].device.type != "cpu" or values[0].shape[2] * values[0].shape[3] >= 64:
        return torch.stack(values)
    return torch.stack([v.permute(0, 2, 3, 1) for v in values]).permute(0, 1, 4, 2, 3)


OP_CLASSES: dict[str, OpClass] = {c.name: c for c in (
    OpClass("linear", match_weight=4, params=(1, 2),
            flops=lambda g, a, out: 2 * out * _weight_shape(g, a)[1],
            pack_weight=_pack_linear_weight),
    OpClass("conv2d", match_weight=4, params=(1, 2),
            flops=lambda g, a, out: 2 * out * math.prod(_weight_shape(g, a)[1:4]),
            pack_weight=_pack_conv_weight,
            extras=_conv_extras,
            grouped_extras=lambda e: e["conv"],
            stacked_extras=lambda e: (e["conv"][0][:2], e["conv"][1][:2], e["conv"][2][:2], e["conv"][3][0])),
    OpClass("layer_norm", match_weight=2, params=(2, 3), flops=lambda g, a, out: 8 * out,
            extras=lambda rows: {"eps": [float(arg_or(r, 4, 1e-5)) for r in rows]},
            grouped_extras=lambda e: (e["eps"],), stacked_extras=lambda e: (e["eps"][0],),
            # normalisation over more than the last dim stays unfused
            accepts=lambda args, kwargs: not kwargs and len(args[1]) == 1),
    # group_norm(x [N, C, *], num_groups, weight [C] | None, bias [C] | None, eps, cudnn_enabled)
    OpClass("group_norm", match_weight=2, params=(2, 3), flops=lambda g, a, out: 8 * out,
            extras=lambda rows: {"num_groups": [int(r[1]) for r in rows],
                                 "eps": [float(arg_or(r, 4, 1e-5)) for r in rows]},
            grouped_extras=lambda e: (e["num_groups"], e["eps"]),
            stacked_extras=lambda e: (e["num_groups"][0], e["eps"][0])),
    OpClass("pointwise", match_weight=1, params=None, flops=lambda g, a, out: out),
)}
FUSABLE = tuple(OP_CLASSES)


def flops(g, k, op_class: str) -> int:
    a = g.nodes[k]
    row = OP_CLASSES.get(op_class)
    return row.flops(g, a, _numel(a["shape"])) if row is not None else 0
