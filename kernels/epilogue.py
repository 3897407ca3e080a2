"""Epilogues: chains of pointwise steps applied to a fused operator's output.

An epilogue is written as a string so that it can sit in a torch.library schema,
e.g. ``"add:tensor,gelu,mul:scalar"``: add a per-member tensor (a residual or a
bias), apply gelu, multiply by a per-member scalar. Steps run left to right on
the operator's output ``y``.

Operands, per member, in step order:
- ``tensor`` steps take the next tensor of that member from ``ext``
  (broadcastable to ``y``'s shape, same dtype); member i's k-th tensor is
  ``ext[i * n_tensor + k]`` (or ``ext[k][i]`` once stacked);
- ``scalar`` steps take the next float of that member from ``scalars``
  (``scalars[i * n_scalar + k]``), so members may use different constants.

The tables below are the only place that knows what a step computes: the torch
reference here, and the Triton code generator reads ``TRITON_UNARY`` /
``TRITON_BINARY``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

OPERANDS = ("none", "tensor", "scalar")

# step name -> torch function of y
UNARY = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

# step name -> torch function of (y, operand)
BINARY = {
    "add": lambda y, o: y + o,
    "sub": lambda y, o: y - o,
    "rsub": lambda y, o: o - y,
    "mul": lambda y, o: y * o,
    "div": lambda y, o: y / o,
    "rdiv": lambda y, o: o / y,
    "pow": lambda y, o: torch.pow(y, o),
}

# In-place forms, used when y is a fresh buffer the operator owns (it saves one
# allocation per step on the CPU path).
INPLACE = {
    "relu": torch.relu_,
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "add": torch.Tensor.add_,
    "sub": torch.Tensor.sub_,
    "mul": torch.Tensor.mul_,
    "div": torch.Tensor.div_,
}

# The same steps as Triton expressions over fp32 values `y` and `o`; the code
# generator substitutes them into its templates.
TRITON_UNARY = {
    # eager relu keeps NaN; tl.maximum by default need not (PTX max.f32 returns the
    # other operand: NaN -> 0), so it is asked to propagate it.
    "relu": "tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)",
    "gelu": "0.5 * y * (1.0 + _erf(y * 0.7071067811865476))",
    "gelu_tanh": "0.5 * y * (1.0 + _tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))",
    "silu": "y / (1.0 + tl.exp(-y))",
    "sigmoid": "1.0 / (1.0 + tl.exp(-y))",
    "tanh": "_tanh(y)",
}
TRITON_BINARY = {
    "add": "y + o",
    "sub": "y - o",
    "rsub": "o - y",
    "mul": "y * o",
    "div": "y / o",
    "rdiv": "o / y",
    "pow": "_pow(y, o)",
}


@dataclass(frozen=True)
class Step:
    op: str
    operand: str = "none"  # one of OPERANDS

    def __post_init__(self) -> None:
        if self.operand not in OPERANDS:
            raise ValueError(f"epilogue operand must be one of {OPERANDS}, got {self.operand!r}")
        table = UNARY if self.operand == "none" else BINARY
        if self.op not in table:
            raise ValueError(f"unknown epilogue step {self.op!r} with operand {self.operand!r}")
        if self.op == "pow" and self.operand != "scalar":
            raise ValueError("pow takes a scalar exponent only")

    def __str__(self) -> str:
        return self.op if self.operand == "none" else f"{self.op}:{self.operand}"


@lru_cache(maxsize=None)
def parse(spec: str) -> tuple[Step, ...]:
    """``"add:tensor,relu"`` -> ``(Step("add", "tensor"), Step("relu"))``; ``""`` -> ``()``."""
    steps = []
    for part in filter(None, spec.split(",")):
        op, _, operand = part.partition(":")
        steps.append(Step(op, operand or "none"))
    return tuple(steps)


def format_steps(steps) -> str:
    return ",".join(str(s) for s in steps)


def counts(steps) -> tuple[int, int]:
    """(tensor operands, scalar operands) per member."""
    return (sum(s.operand == "tensor" for s in steps), sum(s.operand == "scalar" for s in steps))


def apply(y: torch.Tensor, steps, tensors, scalars, inplace: bool = False) -> torch.Tensor:
    """Reference epilogue: ``tensors`` and ``scalars`` are this member's operands in step order.

    Scalars may be floats or tensors broadcastable to ``y`` (the stacked path passes
    one [R, 1, ...] tensor per scalar step). ``inplace`` says ``y`` is a fresh
    buffer that may be overwritten; later steps always write in place where a
    form exists, since the first step's result is fresh.
    """
    ti = si = 0
    for s in steps:
        fn = INPLACE.get(s.op) if inplace else None
        if s.operand == "none":
            y = (fn or UNARY[s.op])(y)
        else:
            if s.operand == "tensor":
                o, ti = tensors[ti], ti + 1
            else:
                o, si = scalars[si], si + 1
            y = fn(y, o) if fn is not None else BINARY[s.op](y, o)
        inplace = True
    return y


def member_operands(steps, ext, scalars, i):
    """Member i's (tensors, scalars) from the flat per-member-major lists of a grouped op."""
    nt, ns = counts(steps)
    return ext[i * nt:(i + 1) * nt], scalars[i * ns:(i + 1) * ns]
