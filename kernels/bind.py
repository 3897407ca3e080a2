"""Binding: the one step from the canonical program to what runs on a device.

Lowering (passes/lower.py) emits one canonical program: aten ops plus the
``stfuse::`` custom ops, which can be printed, exported and saved. ``bind``
turns it into the program that runs, for compiled and loaded programs alike:

- CPU: every ``stfuse::`` op calls its torch reference kernel directly, and the
  aten ops lowering itself adds (stack, unbind, unsqueeze) call their torch
  functions: the same kernels the dispatcher would pick, without its boxing
  (about 3 us per call, most of a batch-1 MLP's budget).
- CUDA: the program as it is; the custom ops dispatch to their Triton kernels.

Before/after (CPU)::

    %s = aten.stack.default([%x0, %x1])          %s = torch.stack([%x0, %x1])
    %y = stfuse.stacked_linear.default(%s, ...)  %y = reference.stacked_linear(%s, ...)
"""

from __future__ import annotations

import copy

import torch

from .ops import OPS

aten = torch.ops.aten

def unbind_contiguous(x: torch.Tensor, dim: int = 0):
    """``torch.unbind`` of a stacked value, each member laid out as its own model
    would have it: a stacked channels-last conv output (kernels/reference.py) is
    made contiguous once, where it leaves the stacked chain, so the tenant's
    next ops (a ``view`` that flattens channels, say) see what eager gives."""
    return torch.unbind(x if x.is_contiguous() else x.contiguous(), dim)


# aten overloads lowering emits around fused groups -> the torch function that runs the same kernel.
_CPU_FUNCTIONS = {aten.stack.default: torch.stack, aten.unbind.int: unbind_contiguous,
                  aten.unsqueeze.default: torch.unsqueeze}


def _cpu_target(target):
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "stfuse":
        return OPS[target.name().split("::")[1]].reference
    return _CPU_FUNCTIONS.get(target, target)


def bind(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """The program that runs ``gm`` on ``device`` (a new module sharing gm's weights;
    gm itself is not changed)."""
    if device.type != "cpu":
        return gm
    graph = copy.deepcopy(gm.graph)
    for n in graph.nodes:
        if n.op == "call_function":
            n.target = _cpu_target(n.target)
    return torch.fx.GraphModule(gm, graph)
