"""The torch.compile backend "stfuse": the pass pipeline on Dynamo graphs.

    model = torch.compile(model, backend="stfuse")          # registered by entry point
    model = torch.compile(model, backend=stfuse.backend,    # or the callable itself
                          options={"group": "tenants"})     # fused with other models

Dynamo hands over one FX graph per compiled frame (several for a model with
graph breaks, another one after a recompile). Each becomes a CompiledGraph:

1. At compile time its placeholders are sorted once, by the Dynamo source they
   came from: *state* (parameters, buffers, module attributes, globals), *data*
   (the call's own tensors), *sizes* (SymInt inputs of dynamic shapes, each
   read back from a dim of a data tensor) and other *scalars* (baked in as
   constants, one specialisation per value).
2. On a call, the state tensors seen at call time pick the specialisation.
   Dynamo shares one compiled graph between modules of one class (their
   parameters are graph inputs), so one CompiledGraph may serve several models;
   keying on the module object would run the wrong weights. A new state, or data
   the traced program does not accept (another non-batch shape), traces the
   graph again as one stfuse tenant: a module whose parameters and buffers are
   those state tensors, traced by the frontend with the call's data.
3. Alone, the tenant's FusedProgram runs it, with intra-graph groups (Q/K/V,
   parallel branches, experts: passes/horizontal.py). In a Group, tenants of
   every graph compiled into the group form one multi-tenant program, and calls
   go through the group's stfuse.runtime.Runtime, which fuses calls from
   several threads that arrive within one slice; a lone call runs by itself
   once the slice expires.
4. Whatever stfuse cannot trace or run goes to the Dynamo graph itself, run
   eagerly: never an error (unless ``strict``). So do calls while autograd
   records (a parameter or input requires grad and grad mode is on): the fused
   program is inference-only.

Each program then runs with ``codegen`` (kernels/bind.py): "inductor" (the
default here) hands the lowered program to Inductor, which generates code for
the aten ops around stfuse's fused ops; "direct" runs them one by one.

Options (``torch.compile(..., options={...})``), documented in docs/backend.md:
``group`` (a name or a Group), ``strict`` (raise instead of running eagerly),
``verify`` (ir.verify after every pass), ``passes`` (False: no stfuse passes, the
Dynamo graph goes to ``codegen`` as it is: Inductor, or run as it is for
"direct"), ``codegen`` ("inductor", "direct" or "auto"; default STFUSE_CODEGEN,
else "inductor").
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .fallbacks import watch_dynamo
from .graph import CompiledGraph, Member, Options, parse_options
from .group import Group
from .registry import _GRAPHS, _GROUPS, _REGISTRY_LOCK, MAX_MODELS, MAX_SPECIALIZATIONS, OPTIONS, graphs, register

ModelGroup = Group  # the backend's group of models (ir.FusedOp is a fused group of ops)


def backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None,
            mode: str | None = None, **kwargs):
    """The Dynamo backend: ``torch.compile(model, backend="stfuse", options={...})``.

    Dynamo calls it as ``backend(gm, example_inputs, options=...)`` (and ``mode=``
    when torch.compile names one; stfuse ignores the mode). Options may also come as
    keyword arguments. Returns a CompiledGraph, callable like ``gm``.
    """
    opts = parse_options({**dict(options or {}), **kwargs})
    if not opts.passes:  # stfuse's half off: the graph as it is, to codegen
        if opts.codegen != "direct":  # "auto" has no stfuse program to time: Inductor
            return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)
        return gm
    watch_dynamo()
    cg = CompiledGraph(gm, example_inputs, opts)
    register(cg)
    return cg


def totals() -> dict:
    """Counters summed over the live compiled graphs: calls, stfuse_calls, eager_calls, traces,
    dynamo_fallbacks (times Dynamo stopped compiling a function of these graphs), graphs."""
    out = {k: 0 for k in ("calls", "stfuse_calls", "eager_calls", "traces", "dynamo_fallbacks")}
    cgs = graphs()
    for cg in cgs:
        for k in out:
            out[k] += cg.stats[k]
    out["graphs"] = len(cgs)
    return out


def reset() -> None:
    """Forget compiled graphs and close and unregister every group."""
    with _REGISTRY_LOCK:
        groups = list(_GROUPS.values())
        _GROUPS.clear()
        _GRAPHS.clear()
    for grp in groups:
        grp.close()


__all__ = ["backend", "Group", "ModelGroup", "CompiledGraph", "Member", "Options", "graphs", "totals", "reset",
           "OPTIONS", "MAX_SPECIALIZATIONS", "MAX_MODELS"]
