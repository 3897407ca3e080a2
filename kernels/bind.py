"""Binding: the one step from the canonical program to what runs on a device.

Lowering (passes/lower.py) emits one canonical program: aten ops plus the
``stfuse::`` custom ops, which can be printed, exported and saved. ``bind``
turns it into the program that runs, for compiled and loaded programs alike:

- CPU: every ``stfuse::`` op calls its torch reference kernel directly, and the
  aten ops lowering itself adds (stack, unbind, unsqueeze) call their torch
  functions: the same kernels the dispatcher would pick, without its boxing
  (about 3 us per call, most of a batch-1 MLP's budget). Linears on the
  program's weights, fused (stacked_linear) or a tenant's own (aten.linear),
  run oneDNN's GEMM on weights reordered here, once, where kernels/cpu_gemm.py
  says it is faster (2.2x on the project's AMD EPYC at transformer sizes); a
  gelu after such a linear becomes oneDNN's post-op. Convs likewise, fused
  (stacked_conv2d) or a tenant's own (aten.conv2d), run oneDNN's conv on weights
  reordered here, channels-last, relu as post-op (kernels/cpu_conv.py), their
  outputs made contiguous where a reader or the caller could see the layout.
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
import warnings

import torch
from torch.fx.graph_module import _copy_attr

from . import cpu_conv, cpu_gemm, reference
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


def _weight(gm, node) -> torch.Tensor | None:
    """The tensor gm holds for a get_attr node, else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    t = functools.reduce(lambda obj, part: getattr(obj, part, None), node.target.split("."), gm)
    return t if isinstance(t, torch.Tensor) else None


def _const_attr(gm, graph, near: torch.fx.Node, hint: str, value) -> torch.fx.Node:
    """A get_attr of ``value`` (any object: oneDNN's packed weights) set on gm under a
    fresh name, inserted before ``near``."""
    name = hint
    while hasattr(gm, name):
        name += "_"
    object.__setattr__(gm, name, value)
    with graph.inserting_before(near), warnings.catch_warnings():
        # fx warns of a get_attr that is no parameter, buffer or submodule: a plain
        # attribute is what the bound program reads anyway (_plain_attributes)
        warnings.simplefilter("ignore", UserWarning)
        return graph.get_attr(name)


def _bind_stacked_linear(gm, graph, n: torch.fx.Node, gemm: str) -> None:
    """stacked_linear -> stacked_linear_kn on weight views taken once ([R, K, N], [R, 1, N]):
    two tensor calls fewer per group call (~2 us on the 2-core CPU: 4 x 256 x 256,
    batch 1, 10.3 -> 8.3 us); with ``gemm`` "onednn", cpu_gemm.stacked_linear, which
    also holds every member's oneDNN-packed weight and bias."""
    if OPS["stacked_linear"].reference is not reference.stacked_linear:
        return  # the table's kernel was replaced (a test's broken kernel): call it as it is
    x, w, b, *rest = n.args
    wt = _view_attr(gm, graph, w, "kn", lambda t: t.transpose(1, 2))
    b1 = None if b is None else _view_attr(gm, graph, b, "col", lambda t: t.unsqueeze(1))
    if wt is None or (b is not None and b1 is None):
        return
    n.target, n.args = reference.stacked_linear_kn, (x, wt, b1, *rest)
    W, B = _weight(gm, w), _weight(gm, b)
    if gemm == "onednn" and W is not None and W.dim() == 3 and cpu_gemm.packable(W[0]):
        packed = _const_attr(gm, graph, n, f"{w.target}_onednn", tuple(cpu_gemm.pack(wi) for wi in W))
        biases = _const_attr(gm, graph, n, f"{w.target}_onednn_b",
                             tuple(B) if B is not None else (None,) * W.shape[0])
        least = cpu_gemm.min_numel(W.shape[2], W.shape[1], W.shape[0])
        n.target, n.args = cpu_gemm.stacked_linear, (x, wt, b1, packed, biases, least, *rest)


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
            w = _weight(gm, node)
            packed[node] = None if w is None or pack_weight(w) is w else _view_attr(gm, gm.graph, node, "cl", pack_weight)
        return packed[node] or node

    ops = {torch.ops.stfuse.grouped_conv2d.default, torch.ops.stfuse.stacked_conv2d.default}
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in ops:
            w = n.args[1]
            n.args = (n.args[0], [pack(v) for v in w] if isinstance(w, (list, tuple)) else pack(w), *n.args[2:])
    if packed:
        gm.recompile()


def _bind_linear(gm, graph, n: torch.fx.Node, gemm: str) -> None:
    """aten.linear on one of the program's 2-D float32 weights -> cpu_gemm.linear, which
    holds the weight packed for oneDNN (``gemm`` "onednn"; else left as it is)."""
    w = _weight(gm, n.args[1]) if len(n.args) >= 2 else None
    if gemm != "onednn" or n.kwargs or w is None or not cpu_gemm.packable(w):
        return
    x, wnode, *b = n.args
    packed = _const_attr(gm, graph, n, f"{wnode.target}_onednn", cpu_gemm.pack(w))
    least = cpu_gemm.min_numel(w.shape[1], w.shape[0])
    n.target, n.args = cpu_gemm.linear, (x, wnode, b[0] if b else None, packed, least)


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _fold_gelu(graph) -> None:
    """cpu_gemm.linear whose one reader is ``gelu`` (through at most one view, as GPT-2's
    Conv1D restores the batch dims between) -> cpu_gemm.linear_gelu: gelu becomes
    oneDNN's post-op (gelu of a view is the view of the gelu)."""
    for n in list(graph.nodes):
        if n.target is not cpu_gemm.linear or len(n.users) != 1:
            continue
        u, view = next(iter(n.users)), None
        if u.op == "call_function" and u.target in _VIEWS and u.args[0] is n and len(u.users) == 1:
            view, u = u, next(iter(u.users))
        if u.op != "call_function" or u.target is not aten.gelu.default or u.args[0] is not (view or n):
            continue
        approximate = u.kwargs.get("approximate", u.args[1] if len(u.args) > 1 else "none")
        if set(u.kwargs) - {"approximate"} or approximate not in ("none", "tanh"):
            continue
        n.target, n.args = cpu_gemm.linear_gelu, (*n.args, approximate)
        u.replace_all_uses_with(view or n)
        graph.erase_node(u)


def _bind_conv(gm, graph, n: torch.fx.Node, gemm: str) -> None:
    """aten.conv2d on one of the program's 4-D float32 weights -> cpu_conv.conv, which
    holds the weight packed for oneDNN's conv (``gemm`` "onednn"; else left as it is)."""
    w = _weight(gm, n.args[1]) if len(n.args) >= 2 else None
    conv = cpu_conv.params(n.args[3:]) if not n.kwargs else None
    if gemm != "onednn" or w is None or conv is None or not cpu_conv.packable(w):
        return
    packed = _const_attr(gm, graph, n, f"{n.args[1].target}_onednn", cpu_conv.pack(w, *conv))
    n.target, n.args = cpu_conv.conv, (n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else None, *conv, packed,
                                       cpu_conv.min_numel(w, conv[0], conv[3]))


def _bind_grouped_linear(gm, graph, n: torch.fx.Node, gemm: str) -> None:
    """grouped_linear -> cpu_gemm.grouped_linear, holding each member's packed weight
    (``gemm`` "onednn"; members whose weight is not the program's own, or not packable,
    stay on aten)."""
    if OPS["grouped_linear"].reference is not reference.grouped_linear or gemm != "onednn":
        return
    x, w, b, *rest = n.args
    ws = [_weight(gm, wi) for wi in w]
    if not any(cpu_gemm.packable(wi) for wi in ws):
        return
    packed = _const_attr(gm, graph, n, f"{w[0].target}_grouped_onednn",
                         tuple(cpu_gemm.pack(wi) if cpu_gemm.packable(wi) else None for wi in ws))
    least = tuple(cpu_gemm.min_numel(wi.shape[1], wi.shape[0]) if cpu_gemm.packable(wi) else 0 for wi in ws)
    n.target, n.args = cpu_gemm.grouped_linear, (x, w, b, packed, least, *rest)


def _bind_grouped_conv(gm, graph, n: torch.fx.Node, gemm: str) -> None:
    """grouped_conv2d -> cpu_conv.grouped_conv2d, holding each member's packed weight where
    cpu_conv.conv would for that member alone (``gemm`` "onednn")."""
    if OPS["grouped_conv2d"].reference is not reference.grouped_conv2d or gemm != "onednn":
        return
    x, w, b, stride, padding, dilation, groups, *rest = n.args
    ws = [_weight(gm, wi) for wi in w]
    convs = [([stride[2 * i], stride[2 * i + 1]], [padding[2 * i], padding[2 * i + 1]],
              [dilation[2 * i], dilation[2 * i + 1]], groups[i]) for i in range(len(ws))]
    bound = [cpu_conv.packable(wi) for wi in ws]
    if not any(bound):
        return
    packed = _const_attr(gm, graph, n, f"{w[0].target}_grouped_onednn",
                         tuple(cpu_conv.pack(wi, *c) if ok else None for wi, c, ok in zip(ws, convs, bound)))
    least = tuple(cpu_conv.min_numel(wi, c[0], c[3]) if ok else 0 for wi, c, ok in zip(ws, convs, bound))
    n.target, n.args = cpu_conv.grouped_conv2d, (*n.args, packed, least)


def _bind_stacked_conv(gm, graph, n: torch.fx.Node, gemm: str) -> None:
    """stacked_conv2d on the program's float32 weights -> cpu_conv.stacked_conv2d, which
    holds them packed for oneDNN as one grouped conv's weight (``gemm`` "onednn")."""
    if OPS["stacked_conv2d"].reference is not reference.stacked_conv2d or gemm != "onednn":
        return
    x, w, b, stride, padding, dilation, groups, *rest = n.args
    W, B = _weight(gm, w), _weight(gm, b)
    if W is None or W.dim() != 5 or not cpu_conv.packable(W[0]) or (b is not None and B is None):
        return
    W4 = W.reshape(-1, *W.shape[2:])
    packed = _const_attr(gm, graph, n, f"{w.target}_onednn",
                         cpu_conv.pack(W4, list(stride), list(padding), list(dilation), groups * W.shape[0]))
    bias = None if B is None else _const_attr(gm, graph, n, f"{b.target}_onednn", B.reshape(-1))
    n.target, n.args = cpu_conv.stacked_conv2d, (*n.args, packed, bias)


def _fold_conv_relu(graph) -> None:
    """cpu_conv.conv whose one reader is ``relu`` -> conv(..., "relu"): oneDNN's post-op.

    Before/after::

        %c = cpu_conv.conv(%x, ...)          ->     %c = cpu_conv.conv(%x, ..., "relu")
        %r = aten.relu.default(%c)
    """
    for n in list(graph.nodes):
        u = next(iter(n.users)) if n.target is cpu_conv.conv and len(n.users) == 1 else None
        if u is not None and u.op == "call_function" and u.target is aten.relu.default and not u.kwargs:
            n.args = (*n.args, "relu")
            u.replace_all_uses_with(n)
            graph.erase_node(u)


def _contiguous_where_needed(graph) -> None:
    """A bound conv's channels-last output (and what CL_SAFE ops compute from it) made
    contiguous, once, before each reader outside cpu_conv.CL_SAFE and before the output:
    what a tenant's ``view`` and the caller see is eager's layout (kernels/cpu_conv.py).

    Before/after::

        %c = cpu_conv.conv(%x, ...)                  %c = cpu_conv.conv(%x, ...)
        %v = aten.view.default(%c, [1, -1])   ->     %k = %c.contiguous()
                                                     %v = aten.view.default(%k, [1, -1])
    """
    maybe_cl, made = set(), {}
    for n in list(graph.nodes):
        reads = [a for a in n.all_input_nodes if a in maybe_cl]
        if n.op == "call_function" and n.target is unbind_contiguous:
            continue  # its members are contiguous
        if n.op == "call_function" and n.target in cpu_conv.CL_SAFE:
            if n.target in (cpu_conv.conv, cpu_conv.stacked_conv2d) or reads:
                maybe_cl.add(n)
            continue
        for a in reads:
            if a not in made:
                with graph.inserting_after(a):
                    made[a] = graph.call_method("contiguous", (a,))
            n.replace_input_with(a, made[a])


# CPU specialisations of a bound op, by stfuse op name or aten overload: each rewrites
# the node in place, given what CPU linears and convs run on (cpu_gemm.mode).
_CPU_SPECIALISE = {"stacked_linear": _bind_stacked_linear, aten.linear.default: _bind_linear,
                   aten.conv2d.default: _bind_conv, "stacked_conv2d": _bind_stacked_conv,
                   "grouped_linear": _bind_grouped_linear, "grouped_conv2d": _bind_grouped_conv}


def bind(gm, device: torch.device, codegen: str = "direct", dynamic=(),
         graphs: bool = True) -> torch.nn.Module:
    """The program that runs ``gm`` on ``device`` (a new module sharing gm's weights;
    gm itself is not changed): ``forward(*flat inputs)``. ``gm`` is a GraphModule, or a
    (torch.fx.Graph, module holding its attributes) pair that bind consumes: its graph
    is rewritten in place, and no code is generated for it before the rewrites (the
    tuner's throwaway candidate programs: two fx code generations and a graph copy
    saved on each, ~0.7 ms). ``codegen``: "direct" (above)
    or "inductor" (kernels/inductor.py), with ``dynamic`` per flat input the dims that
    vary between calls. On CUDA, direct: grouped GEMMs over the program's own weights
    planned (kernels/arena.py), and with ``graphs`` (unless STFUSE_CUDA_GRAPHS=0) the
    whole program replayed as a CUDA graph per input signature (kernels/graphs.py)."""
    if isinstance(gm, tuple) and (codegen != "direct" or device.type != "cpu"):
        gm = torch.fx.GraphModule(gm[1], gm[0])
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
    graph, gm = gm if isinstance(gm, tuple) else (copy.deepcopy(gm.graph), gm)
    # The module first and its code once, after the rewrites: GraphModule(gm, graph) would
    # generate the code of the graph as it is and again after them (fx code generation was
    # half of binding a timed candidate: 97 binds in ResNet-50/8 x4's cold tuning).
    bound = torch.fx.GraphModule(gm, torch.fx.Graph())
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module"):  # what GraphModule(gm, graph) copies from gm
            _copy_attr(gm, bound, n.target)
    graph.owning_module = bound  # eliminate_dead_code asks it whether a call_module is pure
    gemm = cpu_gemm.mode(device)
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        name = _stfuse_name(n.target)
        rule = _CPU_SPECIALISE.get(name if name is not None else n.target)
        n.target = _cpu_target(n.target)
        if rule is not None:
            rule(bound, graph, n, gemm)
    _fold_gelu(graph)
    _fold_conv_relu(graph)
    _contiguous_where_needed(graph)
    graph.eliminate_dead_code()
    bound.graph = graph  # generates the code
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
