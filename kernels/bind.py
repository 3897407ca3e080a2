"""Binding: the one step from the canonical program to what runs on a device.

Lowering (passes/lower.py) emits one canonical program: aten ops plus the
``stfuse::`` custom ops, which can be printed, exported and saved. ``bind``
turns it into the program that runs, for compiled and loaded programs alike:

- CPU: every ``stfuse::`` op calls its torch reference kernel directly, and the
  aten ops lowering itself adds (stack, unbind, unsqueeze) call their torch
  functions: the same kernels the dispatcher would pick, without its boxing
  (about 3 us per call, most of a batch-1 MLP's budget).
- CUDA: the custom ops dispatch to their Triton kernels, grouped GEMMs over the
  program's weights run as planned sites (kernels/arena.py), and the whole program
  replays as a CUDA graph per input signature (kernels/graphs.py).
- codegen="inductor" (either device): the canonical program compiled by
  torch.compile's Inductor on its first call (kernels/inductor.py), the
  ``stfuse::`` ops extern calls inside it; the program bound as above runs
  where Inductor fails.

Before/after (CPU)::

    %s = aten.stack.default([%x0, %x1])          %s = torch.stack([%x0, %x1])
    %y = stfuse.stacked_linear.default(%s, ...)  %y = reference.stacked_linear(%s, ...)
"""

from __future__ import annotations

import copy
import functools

import torch

from . import reference
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


def _stfuse_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "stfuse":
        return target.name().split("::")[1]
    return None


def _cpu_target(target):
    name = _stfuse_name(target)
    return OPS[name].reference if name is not None else _CPU_FUNCTIONS.get(target, target)


def _view_attr(gm, graph, node: torch.fx.Node, suffix: str, view) -> torch.fx.Node | None:
    """A get_attr of ``view(gm.<node's attr>)`` (a view, or a repacked copy), registered on
    gm under a new name, or None when ``node`` is not a weight of gm."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    name = f"{node.target.replace('.', '_')}_{suffix}"
    while hasattr(gm, name):  # a fresh name: never another tensor's
        name += "_"
    gm.register_buffer(name, view(functools.reduce(getattr, node.target.split("."), gm)))
    with graph.inserting_before(node.next):
        return graph.get_attr(name)


def _bind_stacked_linear(gm, graph, n: torch.fx.Node) -> None:
    """stacked_linear -> stacked_linear_kn on weight views taken once ([R, K, N], [R, 1, N]):
    two tensor calls fewer per group call (~2 us on the 2-core CPU: 4 x 256 x 256,
    batch 1, 10.3 -> 8.3 us)."""
    if OPS["stacked_linear"].reference is not reference.stacked_linear:
        return  # the table's kernel was replaced (a test's broken kernel): call it as it is
    x, w, b, *rest = n.args
    wt = _view_attr(gm, graph, w, "kn", lambda t: t.transpose(1, 2))
    b1 = None if b is None else _view_attr(gm, graph, b, "col", lambda t: t.unsqueeze(1))
    if wt is not None and (b is None or b1 is not None):
        n.target, n.args = reference.stacked_linear_kn, (x, wt, b1, *rest)


def _pack_conv_weights(gm: torch.fx.GraphModule) -> None:
    """CUDA: fp16/bf16 conv weights the program owns, repacked channels_last once here, so
    the Triton conv loads them as 16-byte vectors (W_C_UNIT; kernels/triton_conv.py says
    why half-precision convs run channels_last). The copy sits beside gm's weight (gm is
    not changed): those weights take twice their memory on the device.

    Before/after::

        %w0 = get_attr[conv_w0]                      %w0 = get_attr[conv_w0]
        grouped_conv2d(%x, [%w0], ...)       ->      %w0_cl = get_attr[conv_w0_cl]
                                                     grouped_conv2d(%x, [%w0_cl], ...)
    """
    from .triton_conv import pack_weight

    packed = {}

    def pack(node):
        if node not in packed:
            w = _attr_of(gm, node)
            packed[node] = None if w is None or pack_weight(w) is w else _view_attr(gm, gm.graph, node, "cl", pack_weight)
        return packed[node] or node

    ops = {torch.ops.stfuse.grouped_conv2d.default, torch.ops.stfuse.stacked_conv2d.default}
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in ops:
            w = n.args[1]
            n.args = (n.args[0], [pack(v) for v in w] if isinstance(w, (list, tuple)) else pack(w), *n.args[2:])
    if packed:
        gm.recompile()


def _attr_of(gm, node) -> torch.Tensor | None:
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    return functools.reduce(getattr, node.target.split("."), gm)


# CPU specialisations of a bound op, by op name: each rewrites the node in place.
_CPU_SPECIALISE = {"stacked_linear": _bind_stacked_linear}


def bind(gm: torch.fx.GraphModule, device: torch.device, codegen: str = "direct", dynamic=(),
         graphs: bool = True) -> torch.nn.Module:
    """The program that runs ``gm`` on ``device`` (a new module sharing gm's weights;
    gm itself is not changed): ``forward(*flat inputs)``. ``codegen``: "direct" (above)
    or "inductor" (kernels/inductor.py), with ``dynamic`` per flat input the dims that
    vary between calls. On CUDA, direct: grouped GEMMs over the program's own weights
    planned (kernels/arena.py), and with ``graphs`` (unless STFUSE_CUDA_GRAPHS=0) the
    whole program replayed as a CUDA graph per input signature (kernels/graphs.py)."""
    if codegen == "inductor":
        from .inductor import InductorProgram

        return InductorProgram(gm, bind(gm, device, graphs=False), list(dynamic))
    if codegen != "direct":
        raise ValueError(f"codegen must be 'direct' or 'inductor', got {codegen!r}")
    if device.type != "cpu":
        from stfuse.config import cuda_graphs

        from .arena import plan_sites
        from .graphs import GraphedProgram

        planned, _ = plan_sites(gm)
        _pack_conv_weights(planned)
        return GraphedProgram(planned, device) if graphs and cuda_graphs() else planned
    graph = copy.deepcopy(gm.graph)
    bound = torch.fx.GraphModule(gm, graph)
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        name = _stfuse_name(n.target)
        n.target = _cpu_target(n.target)
        if name in _CPU_SPECIALISE:
            _CPU_SPECIALISE[name](bound, graph, n)
    graph.eliminate_dead_code()
    bound.recompile()
    _plain_attributes(bound)
    return bound


def _plain_attributes(gm: torch.fx.GraphModule) -> None:
    """Move the tensors the program reads (``self.<name>``) out of the module's buffer
    table into plain attributes: a buffer read goes through ``Module.__getattr__``
    (1.2 us on the 2-core CPU, against 0.05 us for an instance attribute), and a
    batch-1 program reads two per fused group. The bound program is for running:
    it has no buffers or state dict of its own (the canonical program keeps those)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(gm._buffers):
        tensor = gm._buffers.pop(name)
        if name in read:  # else a weight only the replaced form of an op read
            object.__setattr__(gm, name, tensor)
