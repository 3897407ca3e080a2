"""stfuse.compile: trace tenants, run the pass pipeline, return a FusedProgram."""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Sequence

import torch

from . import config, ir
from .errors import StfuseError, TraceError
from .calls import tenant_name_problem
from .frontend import trace_tenant
from .program import FusedProgram

log = logging.getLogger(__name__)


def _named(models, example_inputs) -> tuple[dict, dict]:
    if isinstance(models, Mapping):
        names = list(models)
        if example_inputs is None or not isinstance(example_inputs, Mapping):
            raise StfuseError("named tenants need example_inputs as a dict {name: args}")
        missing = [n for n in names if n not in example_inputs]
        extra = [n for n in example_inputs if n not in models]
        if missing or extra:
            raise StfuseError(f"example_inputs must name exactly the tenants {names}: "
                              f"missing {missing}, unknown {extra}")
        return dict(models), {n: example_inputs[n] for n in names}
    if isinstance(models, torch.nn.Module) or not isinstance(models, Sequence):
        raise StfuseError("stfuse.compile takes a list or dict of models, "
                          f"got {type(models).__name__}")
    if example_inputs is None or isinstance(example_inputs, Mapping) or not isinstance(
            example_inputs, Sequence):
        raise StfuseError("a list of models needs example_inputs as a list, one entry per model")
    if len(example_inputs) != len(models):
        raise StfuseError(f"got {len(models)} models but {len(example_inputs)} example inputs")
    names = [str(i) for i in range(len(models))]
    return dict(zip(names, models)), dict(zip(names, example_inputs))


def _check_names(names) -> None:
    for n in names:
        if problem := tenant_name_problem(n):
            raise StfuseError(f"{problem}, got {n!r}")


def _dynamic(names: list, dynamic) -> dict:
    """{tenant: {input: {dim: name}}} from ``dynamic`` (a dict by tenant, or a list in
    tenant order with None for tenants without declared dims)."""
    if dynamic is None:
        return {}
    if isinstance(dynamic, Mapping):
        unknown = [t for t in dynamic if t not in names]
        if unknown:
            raise StfuseError(f"dynamic names unknown tenant(s) {unknown}; tenants are {names}")
        return dict(dynamic)
    if isinstance(dynamic, Sequence) and not isinstance(dynamic, str) and len(dynamic) == len(names):
        return {t: d for t, d in zip(names, dynamic) if d}
    raise StfuseError("dynamic takes {tenant: {input: {dim: name}}}, or a list in tenant order")


def compile(models: Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module],
            example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
            dynamic: Sequence[Any] | Mapping[str, Any] | None = None,
            tune: str | None = None, codegen: str | None = None) -> FusedProgram:
    """Compile tenant models into one fused program.

    ``models``: a list (tenants named "0", "1", ...) or a dict {name: model}.
    ``example_inputs``: per tenant a Tensor, a tuple of positional args, a dict of
    keyword args or an ``(args, kwargs)`` pair (calls.call_parts), in the same
    list/dict form as ``models``. Calls take the same forms. Models are traced in
    eval mode.
    ``dynamic``: per tenant, the dims other than the batch that vary per call,
    ``{input: {dim: name}}`` with an input named by keyword or positional index
    (stfuse/dims.py), e.g. ``{"bert": {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}}``.
    ``tune``: how fusion groups are chosen (passes/tune.py): "measure" times each
    candidate group and the whole program on the device (cached per device and
    shape), "model" prices them with the analytic cost model, "off" keeps every
    group the matcher forms. Default: STFUSE_TUNE, else "measure".
    ``codegen``: what runs the fused program (kernels/bind.py): "direct" calls stfuse's
    kernels and the tenants' aten ops one by one; "inductor" hands the program to
    torch.compile's Inductor on its first call (kernels/inductor.py): it generates code
    for the aten ops between stfuse's fused ops, which stay one call each; "auto" times
    both on the example inputs at compile time (an Inductor compile inside this call;
    cached per device and program) and keeps the faster, recorded in
    ``plan.stats["codegen"]``. Default: STFUSE_CODEGEN, else "direct"
    (config.DEFAULT_CODEGEN says why).
    """
    tune = config.tune_mode(tune)
    codegen = config.codegen_mode(codegen)
    models, examples = _named(models, example_inputs)
    if not models:
        raise StfuseError("stfuse.compile needs at least one model")
    _check_names(models)
    declared = _dynamic(list(models), dynamic)
    tenants = {}
    for name, model in models.items():
        tenants[name] = trace_tenant(name, model, examples[name], declared.get(name))
    return compile_tenants(tenants, tune=tune, codegen=codegen)


def _graph(tenants: dict, tune: str):
    g = ir.build(tenants)
    g.graph["tune"] = tune
    return g


def compile_tenants(tenants: dict, verify: bool = False, tune: str | None = None,
                    codegen: str | None = None) -> FusedProgram:
    """The FusedProgram of already traced tenants (name -> TenantGraph): the pass
    pipeline over their multi-tenant graph. ``verify`` runs ir.verify after every pass;
    ``tune`` and ``codegen`` as for ``compile``.

    Then the self-check (stfuse/selfcheck.py): a tenant whose fused outputs differ from
    its traced graph's on its example inputs is taken out of every fusion group and the
    pipeline runs again; ``plan.stats["self_check"]`` records it. The self-check runs
    the direct programs (it checks stfuse's grouping, and compiles nothing); the
    program returned runs with ``codegen``."""
    from stfuse.passes import pipeline
    from stfuse.passes.program_check import choose_codegen

    from . import selfcheck

    devices = {n: tg.device for n, tg in tenants.items()}
    if len(set(devices.values())) > 1:
        raise StfuseError(f"all tenants must be on one device, got {devices}")
    tune = config.tune_mode(tune)
    codegen = config.codegen_mode(codegen)
    again = functools.partial(compile_tenants, tune=tune, codegen=codegen)  # a tenant traced again for another batch range
    graph, history = pipeline.run(_graph(tenants, tune), verify=verify)
    fused = FusedProgram(graph, history, again)  # codegen "direct" until checked
    bad = selfcheck.mismatches(fused) if graph.graph["groups"] else {}
    still = {}
    if bad:
        log.warning("stfuse: tenant(s) %s run unfused: their fused outputs differ from their own "
                    "traced graphs (%s)", sorted(bad), "; ".join(f"{t}: {w}" for t, w in bad.items()))
        graph, history = pipeline.run(_graph(tenants, tune), passes=pipeline.passes_without_fusing(bad),
                                      verify=verify)
        fused = FusedProgram(graph, history, again)
        still = selfcheck.mismatches(fused)
    # unfused: tenants taken out of fusion; still_differ: tenants that differ unfused too
    fused.plan.stats["self_check"] = {"unfused": sorted(bad), "reasons": dict(bad),
                                      "still_differ": sorted(still)}
    if codegen == "auto":  # the Inductor program timed here is the one that runs, if it won
        fused.set_codegen("inductor")
        choice = choose_codegen(fused.graph, fused.program, fused.program.direct)
        fused.plan.stats["codegen"] = choice
        if choice["decision"] == "direct":
            fused.set_codegen("direct")
    else:
        fused.set_codegen(codegen)
    return fused


__all__ = ["compile", "TraceError"]
