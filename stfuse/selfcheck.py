"""The compile-time self-check: the last line of defence of the correctness rule.

After the pass pipeline, the fused program runs on each tenant's example
inputs (and on those rows repeated to another batch size, and with declared
dynamic dims moved to another size shared by the tenants of one dim name,
stfuse/dims.py) and is compared with
the tenant's own traced graph run eagerly, within the tolerance table. What
cannot be shown correct runs unfused: a tenant whose outputs differ (or whose
call raises) has its members taken out of every fusion group, the pipeline
runs again, and ``plan.stats["self_check"]`` records which tenants and why.

It checks fusion, not tracing: the reference is the traced graph, the same
program stfuse would run for that tenant alone without any fusion. Where the
fused outputs miss the table's tolerance of it, they still pass if they are as
close to the traced graph run in float64 as the float32 graph itself is
(``no_less_accurate``): two float32 roundings, not a wrong kernel.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.utils._pytree as pytree

from . import dims
from .frontend import TenantGraph, example_args, run_graph, with_batch
from .tolerances import assert_close


def traced_outputs(tg: TenantGraph, args: tuple) -> list:
    """The tenant's traced graph run eagerly on ``args``: its flat outputs."""
    return run_graph(tg, args)


def _other_batch(tg: TenantGraph) -> int | None:
    """Another batch size inside the tenant's range (odd, so rows do not pair up), or None."""
    if not tg.dynamic:
        return None
    low, high = tg.batch_range
    for b in (tg.batch + 3, tg.batch + 1, tg.batch - 1):
        if b >= max(low, 1) and (high is None or b <= high) and b != tg.batch:
            return b
    return None


def _reduction_k(fused, tenant: str) -> int:
    """The longest dot product of the tenant's fused linear/conv members: K > LONG_K loosens
    float32 to the long-reduction tolerance of the table."""
    g = fused.graph
    k = 0
    for grp in g.graph["groups"].values():
        for m in grp.members:
            a = g.nodes[m]
            if a["tenant"] != tenant or a["op_class"] not in ("linear", "conv2d"):
                continue
            w = g.nodes[a["args"][1].key]["shape"] if len(a["args"]) > 1 and hasattr(a["args"][1], "key") else None
            if w:
                k = max(k, math.prod(w[1:]))
    return k


def _differs(out, ref, k: int, tf32: bool) -> str | None:
    try:
        assert_close(pytree.tree_leaves(out), ref, k=k, tf32=tf32)
    except AssertionError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        return " ".join(ln for ln in lines if not ln.startswith("Mismatched elements"))[:240]
    return None


def float64_outputs(tg: TenantGraph, call) -> list | None:
    """The tenant's traced graph run in float64 (its floating tensors and inputs cast up):
    the reference the tolerance table is written for. None where the graph does not run
    so (an op pinned to float32, say)."""
    def up(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    wide = dataclasses.replace(
        tg, tensors={n: up(t) for n, t in tg.tensors.items()},
        inputs=[dataclasses.replace(s, dtype=torch.float64) if s.dtype.is_floating_point else s
                for s in tg.inputs])
    try:
        return run_graph(wide, pytree.tree_map(up, call))
    except Exception:  # noqa: BLE001 - no float64 reference for this graph
        return None


def no_less_accurate(out, ref, ref64, factor: float = 2.0) -> bool:
    """Whether ``out`` (the fused outputs) is as close to the float64 truth ``ref64`` as the
    unfused float32 graph's own ``ref`` is, within ``factor``, leaf by leaf (others equal).

    Why a second criterion: two float32 programs that round differently can be further
    apart than the table's float32 tolerance while both are as accurate as float32 allows.
    Seen on ResNet-50-shaped tenants (activations up to ~400; eval BatchNorm folded into
    the convs): fused 1.95e-4 and the traced graph itself 2.28e-4 from float64, both past
    1e-4, so the check ran a correct tenant unfused. The factor leaves room for two
    roundings of one size; a wrong kernel is off by the size of the values, far beyond."""
    if ref64 is None:
        return False
    outs = pytree.tree_leaves(out)
    if not (len(outs) == len(ref) == len(ref64)):
        return False
    for o, r, w in zip(outs, ref, ref64):
        if not isinstance(o, torch.Tensor) or not o.dtype.is_floating_point:
            if not (torch.equal(o, r) if isinstance(o, torch.Tensor) else o == r):
                return False
            continue
        if o.shape != w.shape or not torch.isfinite(o).all():
            return False
        if o.numel() and (o.double() - w.double()).abs().max() > factor * (r.double() - w.double()).abs().max():
            return False
    return True


def mismatches(fused) -> dict[str, str]:
    """{tenant: why} for every tenant whose fused outputs differ from its traced graph's
    (or whose call raises), at the example batch and at another batch size."""
    tenants = fused.tenant_graphs
    checked = {t: tg for t, tg in tenants.items() if tg.method == "export"}
    bad: dict[str, str] = {}
    if not checked:
        return bad
    cases = [{t: example_args(tg) for t, tg in checked.items()}]
    other = {t: with_batch(cases[0][t], b, tg.batch) if (b := _other_batch(tg)) is not None
             else cases[0][t] for t, tg in checked.items()}
    if any(_other_batch(tg) is not None for tg in checked.values()):
        cases.append(other)  # all tenants again: the same program a mixed call lowers
    probes = dims.probes(checked.values())
    if probes:  # tenants sharing a dim name at one other size of it: they stack there
        cases.append({t: dims.resize(cases[0][t], tg.inputs, {n: o for n, (_, o) in probes[t].items()})
                      if t in probes else cases[0][t] for t, tg in checked.items()})
    for inputs in cases:
        try:
            outs = fused.run(inputs)
        except Exception:  # noqa: BLE001 - find the tenants that raise, one at a time
            outs = {}
            for t, args in inputs.items():
                try:
                    outs[t] = fused.run({t: args})[t]
                except Exception as err:  # noqa: BLE001
                    bad.setdefault(t, f"the fused program raises {type(err).__name__}: {err}"[:200])
        for t, out in outs.items():
            if t in bad:
                continue
            tg = checked[t]
            try:
                ref = traced_outputs(tg, inputs[t])
            except Exception:  # noqa: BLE001, S112 - the traced graph does not run alone: nothing to compare
                continue
            why = _differs(out, ref, _reduction_k(fused, t), tg.device.type == "cuda")
            if why is not None and no_less_accurate(out, ref, float64_outputs(tg, inputs[t])):
                why = None  # as accurate as the tenant's own float32 graph: rounding, not a bug
            if why is not None:
                batch = pytree.tree_leaves(inputs[t])[0].shape[0] if tg.inputs else tg.batch
                bad[t] = f"at batch {batch}: {why}"
    return bad
