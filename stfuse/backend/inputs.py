"""Dynamo graphs as stfuse tenants: which graph inputs are model state, call data
or sizes, and the module that the frontend traces for one set of state tensors.

Used by the torch.compile backend (stfuse/backend/graph.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from stfuse import ir
from stfuse.errors import StfuseError
from stfuse.calls import input_problem
from stfuse.frontend import TenantGraph


@dataclass(frozen=True)
class Slot:
    """Where one graph input comes from when the graph runs as a stfuse tenant.

    kind "state": the i-th state tensor (a parameter or buffer of the tenant
    module); "data": the i-th data tensor (a tenant input); "size": dim ``dim``
    of data tensor i (a SymInt input); "scalar": the i-th scalar, a constant.
    """

    kind: str
    index: int
    dim: int | None = None


def _is_state(node: torch.fx.Node, example) -> bool:
    """A parameter, buffer or attribute of something (a module), or a global: not the call's own data."""
    from torch._dynamo.source import AttrSource, GenericAttrSource, GlobalSource, NNModuleSource
    from torch._guards import ChainedSource

    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    while isinstance(source, ChainedSource):
        if isinstance(source, (AttrSource, GenericAttrSource, NNModuleSource)):
            return True
        source = source.base
    return isinstance(source, GlobalSource)


def _symbol(v):
    node = getattr(v, "node", None)
    return getattr(node, "expr", None)


def input_layout(gm: torch.fx.GraphModule, example_inputs) -> list[Slot]:
    """One Slot per placeholder of a Dynamo graph; raises StfuseError for inputs stfuse cannot take."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        raise StfuseError(f"{len(phs)} placeholders but {len(example_inputs)} example inputs")
    kinds = []
    for n, ex in zip(phs, example_inputs):
        if isinstance(ex, torch.Tensor):
            kinds.append("state" if _is_state(n, ex) else "data")
        elif isinstance(ex, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
            kinds.append("scalar")
        else:
            raise StfuseError(f"graph input {n.name} is a {type(ex).__name__}")
    # A SymInt input equal to a dim of a data tensor is read from that tensor.
    dims = {}
    data = [n for n, kind in zip(phs, kinds) if kind == "data"]
    for j, n in enumerate(data):
        value = n.meta.get("example_value")
        for d, size in enumerate(value.shape if isinstance(value, torch.Tensor) else ()):
            if _symbol(size) is not None:
                dims.setdefault(str(_symbol(size)), (j, d))
    slots, counts = [], {"state": 0, "data": 0, "scalar": 0}
    for ex, kind in zip(example_inputs, kinds):
        if kind == "scalar" and isinstance(ex, torch.SymInt) and str(_symbol(ex)) in dims:
            j, d = dims[str(_symbol(ex))]
            slots.append(Slot("size", j, d))
            continue
        slots.append(Slot(kind, counts[kind]))
        counts[kind] += 1
    return slots


def tenant_module(gm: torch.fx.GraphModule, slots: list[Slot], state, scalars) -> torch.fx.GraphModule:
    """A Dynamo graph as a module to trace as one tenant: state tensors become its
    parameters and buffers, data tensors its inputs (one named argument each, so
    torch.export can make dim 0 dynamic), sizes are read from the data, scalars are
    constants."""
    root = torch.nn.Module()
    root.graph_module = gm
    graph = torch.fx.Graph()
    data = [graph.placeholder(f"data{i}") for i in range(sum(s.kind == "data" for s in slots))]
    args = []
    for s in slots:
        if s.kind == "state":
            t = state[s.index]
            if isinstance(t, torch.nn.Parameter):
                root.register_parameter(f"state{s.index}", t)
            else:
                root.register_buffer(f"state{s.index}", t)
            args.append(graph.get_attr(f"state{s.index}"))
        elif s.kind == "data":
            args.append(data[s.index])
        elif s.kind == "size":
            args.append(graph.call_method("size", (data[s.index], s.dim)))
        else:
            args.append(scalars[s.index])
    graph.output(graph.call_module("graph_module", tuple(args)))
    return torch.fx.GraphModule(root, graph, class_name="TenantModule")


def accepts(tg: TenantGraph, data: tuple) -> bool:
    """Whether the tenant's program takes these data tensors: calls.input_problem, the
    check FusedProgram.check_inputs makes, and the tenant's batch range."""
    if len(data) != len(tg.inputs):
        return False
    problem, batch = input_problem(tg.name, tg.inputs, data)
    if problem is not None:
        return False
    low, high = tg.batch_range
    return batch is None or not tg.dynamic or (low <= batch and (high is None or batch <= high))


def static_unless_sized(tg: TenantGraph, slots: list[Slot]) -> TenantGraph:
    """A graph without SymInt inputs is static: Dynamo guards its shapes and often bakes
    the batch size into it (``expand(2, 8)``), where export may still see a dynamic
    batch. Its tenant is then static too (annotate takes the example shapes instead of
    probing other batch sizes, and calls must match the example)."""
    if any(s.kind == "size" for s in slots) or not tg.dynamic:
        return tg
    tg.dynamic = False
    tg.inputs = [dataclasses.replace(spec, batched=False) for spec in tg.inputs]
    return tg


def mutates_state(tg: TenantGraph) -> bool:
    """Whether the traced graph writes in place to a parameter or buffer."""
    user = {spec.name for spec in tg.inputs}
    return any(m.op == "placeholder" and m.name not in user
               for n in tg.gm.graph.nodes if n.op == "call_function"
               for m in ir.mutated_args(n))
