"""The fused operators as torch.library custom ops ``stfuse::<name>``.

One table row per operator: its schema, its torch reference (the CPU kernel),
and its fake implementation (shapes only, so fused programs can be traced,
exported and compiled). CUDA tensors go to the Triton implementation in
``kernels/triton_ops.py`` when Triton is importable, else to the reference.

The ops are defined with ``torch.library.Library`` rather than the
``@custom_op`` decorator: the decorator's per-call checks cost about 7 us a
call on this 2-core CPU (20 us against 14 us for a 4x256x256 baddbmm, measured
with a timeit loop), which is the whole saving of fusing two small GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from . import reference

_EPI = "str epilogue, Tensor[] ext, float[] scalars"


@dataclass(frozen=True)
class OpDef:
    schema: str
    reference: Callable
    fake: Callable


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _fake_grouped_linear(x, w, b, epilogue, ext, scalars):
    return [xi.new_empty(*xi.shape[:-1], wi.shape[0]) for xi, wi in zip(x, w)]


def _fake_stacked_linear(x, w, b, epilogue, ext, scalars):
    return x.new_empty(*x.shape[:-1], w.shape[1])


def _fake_grouped_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars):
    out = []
    for i, (xi, wi) in enumerate(zip(x, w)):
        s, p, d = stride[2 * i:2 * i + 2], padding[2 * i:2 * i + 2], dilation[2 * i:2 * i + 2]
        hw = [_conv_out(xi.shape[2 + j], wi.shape[2 + j], s[j], p[j], d[j]) for j in range(2)]
        out.append(xi.new_empty(xi.shape[0], wi.shape[0], *hw))
    return out


def _fake_stacked_conv2d(x, w, b, stride, padding, dilation, groups, epilogue, ext, scalars):
    hw = [_conv_out(x.shape[3 + j], w.shape[3 + j], stride[j], padding[j], dilation[j]) for j in range(2)]
    return x.new_empty(x.shape[0], x.shape[1], w.shape[1], *hw)


def _fake_grouped_same(x, *args):
    return [xi.new_empty(xi.shape) for xi in x]


def _fake_stacked_same(x, *args):
    return x.new_empty(x.shape)


OPS: dict[str, OpDef] = {
    "grouped_linear": OpDef(
        f"(Tensor[] x, Tensor[] w, Tensor?[] b, {_EPI}) -> Tensor[]",
        reference.grouped_linear, _fake_grouped_linear),
    "stacked_linear": OpDef(
        f"(Tensor x, Tensor w, Tensor? b, {_EPI}) -> Tensor",
        reference.stacked_linear, _fake_stacked_linear),
    "grouped_conv2d": OpDef(
        "(Tensor[] x, Tensor[] w, Tensor?[] b, int[] stride, int[] padding, int[] dilation, "
        f"int[] groups, {_EPI}) -> Tensor[]",
        reference.grouped_conv2d, _fake_grouped_conv2d),
    "stacked_conv2d": OpDef(
        "(Tensor x, Tensor w, Tensor? b, int[2] stride, int[2] padding, int[2] dilation, "
        f"int groups, {_EPI}) -> Tensor",
        reference.stacked_conv2d, _fake_stacked_conv2d),
    "grouped_layer_norm": OpDef(
        f"(Tensor[] x, Tensor?[] w, Tensor?[] b, float[] eps, {_EPI}) -> Tensor[]",
        reference.grouped_layer_norm, _fake_grouped_same),
    "stacked_layer_norm": OpDef(
        f"(Tensor x, Tensor? w, Tensor? b, float eps, {_EPI}) -> Tensor",
        reference.stacked_layer_norm, _fake_stacked_same),
    "grouped_group_norm": OpDef(
        f"(Tensor[] x, Tensor?[] w, Tensor?[] b, int[] num_groups, float[] eps, {_EPI}) -> Tensor[]",
        reference.grouped_group_norm, _fake_grouped_same),
    "stacked_group_norm": OpDef(
        f"(Tensor x, Tensor? w, Tensor? b, int num_groups, float eps, {_EPI}) -> Tensor",
        reference.stacked_group_norm, _fake_stacked_same),
    "grouped_pointwise": OpDef(
        f"(Tensor[] x, {_EPI}) -> Tensor[]",
        reference.grouped_pointwise, _fake_grouped_same),
    "stacked_pointwise": OpDef(
        f"(Tensor x, {_EPI}) -> Tensor",
        reference.stacked_pointwise, _fake_stacked_same),
}


@lru_cache(maxsize=None)
def triton_impl(name: str) -> Callable | None:
    """The Triton implementation of op ``name``, or None where Triton is missing.

    Imported on first use, so that importing stfuse never imports Triton.
    """
    try:
        from . import triton_ops
    except ImportError:
        return None
    return triton_ops.IMPLS.get(name)


def _as_declared(out):
    """The kernel's outputs in the layout the fakes declare (contiguous). Compilers trust
    the fake: Inductor indexes a stacked conv's channels-last output [R, B, O, H, W]
    (reference.stacked_conv2d) with contiguous strides, and its size/stride assert
    failed. The direct programs call the kernels themselves (kernels/bind.py), keeping
    those layouts; only dispatched calls pay this copy."""
    if isinstance(out, torch.Tensor):
        return out.contiguous()
    return [y.contiguous() for y in out]


def _cpu_kernel(name: str, ref: Callable) -> Callable:
    def kernel(*args):
        return _as_declared(ref(*args))

    kernel.__name__ = f"{name}_cpu"
    return kernel


def _cuda_kernel(name: str, ref: Callable) -> Callable:
    def kernel(*args):
        return _as_declared((triton_impl(name) or ref)(*args))

    kernel.__name__ = f"{name}_cuda"
    return kernel


def _registered() -> bool:
    try:
        torch.ops.stfuse.grouped_linear  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


# Defined once per process, even if this file is imported under a second name.
_lib = torch.library.Library("stfuse", "FRAGMENT")
for _name, _op in ({} if _registered() else OPS).items():
    _lib.define(_name + _op.schema)
    _lib.impl(_name, _cpu_kernel(_name, _op.reference), "CPU")
    _lib.impl(_name, _cuda_kernel(_name, _op.reference), "CUDA")
    torch.library.register_fake(f"stfuse::{_name}", _op.fake, lib=_lib)


def op(name: str) -> torch._ops.OpOverload:
    """The registered overload, e.g. ``op("stacked_linear")`` is ``torch.ops.stfuse.stacked_linear.default``."""
    return getattr(torch.ops.stfuse, name).default
