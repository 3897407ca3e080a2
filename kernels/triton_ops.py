"""The Triton implementations of the fused ops: ``IMPLS[name]`` for each op in ``ops.OPS``.

Each takes exactly the reference's arguments (kernels/reference.py) and
returns freshly allocated outputs. Inputs the kernels do not take (a dtype
other than fp32/fp16/bf16, members of mixed dtypes or devices) go to the
torch reference instead, so the CUDA op never gives a wrong answer.
"""

from __future__ import annotations

from typing import Callable

from . import reference, triton_conv, triton_gemm, triton_group_norm, triton_norm
from .triton_common import supported


def _grouped_inputs(x, w=(), b=(), *rest):
    return [*x, *w, *b]


def _stacked_inputs(x, w=None, b=None, *rest):
    return [x, w, b]


def _pointwise_inputs(x, *rest):
    return list(x)


# op name -> (Triton implementation, the inputs that must share one supported dtype and device)
_TABLE: dict[str, tuple[Callable, Callable]] = {
    "grouped_linear": (triton_gemm.grouped_linear, _grouped_inputs),
    "stacked_linear": (triton_gemm.stacked_linear, _stacked_inputs),
    "grouped_conv2d": (triton_conv.grouped_conv2d, _grouped_inputs),
    "stacked_conv2d": (triton_conv.stacked_conv2d, _stacked_inputs),
    "grouped_layer_norm": (triton_norm.grouped_layer_norm, _grouped_inputs),
    "stacked_layer_norm": (triton_norm.stacked_layer_norm, _stacked_inputs),
    "grouped_group_norm": (triton_group_norm.grouped_group_norm, _grouped_inputs),
    "stacked_group_norm": (triton_group_norm.stacked_group_norm, _stacked_inputs),
    "grouped_pointwise": (triton_norm.grouped_pointwise, _pointwise_inputs),
    "stacked_pointwise": (triton_norm.stacked_pointwise, lambda x, *rest: [x]),
}


def _dispatching(name: str, impl: Callable, inputs_of: Callable) -> Callable:
    ref = getattr(reference, name)

    def run(*args):
        # epilogue operands are args[-2]: they are cast to the output dtype, but must be on its device
        inputs = inputs_of(*args)
        present = [t for t in inputs if t is not None]
        same_device = all(t.device == present[0].device for t in args[-2]) if present else False
        if not (supported(inputs) and same_device):
            return ref(*args)
        return impl(*args)

    run.__name__ = f"{name}_triton"
    run.__doc__ = impl.__doc__
    return run


IMPLS: dict[str, Callable] = {name: _dispatching(name, *row) for name, row in _TABLE.items()}
