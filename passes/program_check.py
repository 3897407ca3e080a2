"""program_check: tune="measure"'s whole-program check (check_program), the choice of
every group as matched that it caches for drop_unprofitable (chosen_before), and
codegen="auto"'s timing (choose_codegen).

The groups a plan keeps each won their own timing (passes/tune.py); the program they
make is timed as a whole against the tenants' own ops run apart, and against every
group as matched where groups were dropped. Keys and timings come from passes/tune.py
and kernels/timing.py, and are cached like a group's.
"""

from __future__ import annotations

import functools
import gc
import hashlib

import torch

from stfuse import dims
from stfuse.calls import call_problem
from stfuse.frontend import example_args, with_batch
from stfuse.kernels import timing
from stfuse.kernels.bind import bind

from .fold_epilogues import fold_epilogues
from .lower import lower
from .schedule import schedule
from .tune import candidate_key, device_of, mode, program_key, tensor_key


def _unfused(g, clone_packed: bool = False):
    """g with every group dissolved, scheduled and lowered: the tenants' own ops, one
    tenant's after another's in schedule order. ``clone_packed``: parameters that are
    views of packed weights get storage of their own, so the packed copies can go."""
    g = g.copy()
    storages = {t.untyped_storage().data_ptr() for e in g.graph.get("packed", {}).values() for t in e.values()}
    for k, a in g.nodes(data=True):
        a["group"] = None
        if clone_packed and a["kind"] == "param" and a["value"].untyped_storage().data_ptr() in storages:
            g.nodes[k]["value"] = a["value"].clone(memory_format=torch.contiguous_format)
    g.graph["groups"] = {}
    return lower(schedule(g))


def _flat_examples(g) -> list | None:
    """The tenants' example tensors, flat, in program input order, at one batch size and one
    size per declared dim name: the stacked program (what lower builds and check_program
    times) takes no other call. Examples of other sizes (tenants compiled at batch 2 and 3,
    or at sequence lengths 8 and 5 of one "seq") are resized along those dims, repeating
    their rows cyclically (frontend.with_batch, dims.resize); None where a tenant cannot
    take the common size (a fixed batch that differs, a size outside its traced range)."""
    tenants = list(g.graph["tenants"].values())
    fixed = {tg.batch for tg in tenants if not tg.dynamic}
    if len(fixed) > 1:
        return None
    batch = fixed.pop() if fixed else max(tg.batch for tg in tenants)
    calls = [example_args(tg) for tg in tenants]
    sizes: dict[str, int] = {}
    for call, tg in zip(calls, tenants):
        for name, size in dims.sizes(tg.inputs, call_problem(tg.name, tg.in_spec, tg.inputs, call,
                                                             tg.constants)[0]).items():
            sizes[name] = max(sizes.get(name, 0), size)
    out = []
    for call, tg in zip(calls, tenants):
        ranges = {**tg.dim_ranges, **({"batch": tg.batch_range} if tg.dynamic else {})}
        want = {**{n: sizes[n] for n in tg.dim_ranges}, **({"batch": batch} if tg.dynamic else {})}
        if any(n < ranges[k][0] or (ranges[k][1] is not None and n > ranges[k][1]) for k, n in want.items()):
            return None
        if tg.dynamic and tg.batch != batch:
            call = with_batch(call, batch, tg.batch)
        call = dims.resize(call, tg.inputs, sizes)
        out += call_problem(tg.name, tg.in_spec, tg.inputs, call, tg.constants)[0]
    return out


def _collector_paused(fn):
    """fn run with Python's cyclic collector off, back on (if it was) when fn returns.

    The programs a check lowers, binds and times are reference cycles (fx graphs and
    their modules) that die when it ends. Collections run while they were alive moved
    them to the old generation, where only a full collection frees them: ResNet-50/8 x4's
    check left ~25k objects there, enough to set off a full collection of the heap
    (0.3 s) in the measured compile and in none of the modelled ones. Paused, they stay
    young, and the first collection after the check frees them. Like timeit's: a pause
    taken mid-sample would spoil it too. (The candidates of drop_unprofitable are not
    paused: their packed weights would pile up until the pass ends.)"""
    @functools.wraps(fn)
    def paused(*args):
        collecting = gc.isenabled()
        gc.disable()
        try:
            return fn(*args)
        finally:
            if collecting:
                gc.enable()
    return paused


@_collector_paused
def check_program(g):
    """tune="measure": time the lowered program against the tenants' own ops run apart
    (the same graph with no groups, lowered), and, where groups were dropped or split,
    the winner of that pair against every group as matched (drop_unprofitable keeps
    them as ``g.graph["matched"]``); return the fastest. ``g.graph["tuning"]["program"]``
    records the times and the decision ("fused", "apart" or "matched": that one only
    where it wins by MARGIN, as a group must).

    Groups won their own timings by a margin; this catches what timing them one by one
    misses (stacking copies between groups, caches, a group's outputs unstacked, the
    layout a run-apart member hands on). ResNet-50/8 x4 at batch 1 on the 2-core CPU:
    39 of 130 conv groups lost their own timings, and the program without them took
    2.6-3.3 ms against 2.5-2.6 ms with every group fused.

    Before/after (fused 420 us, apart 400 us)::

        groups {g0, g1}, program: stacked_linear ...  ->  groups {}, program: aten.linear ...
    """
    if g.graph.get("matched_chosen"):  # drop_unprofitable took the cached choice (chosen_before)
        return _forget_matched(g)
    matched = g.graph.get("matched")
    if mode(g) != "measure" or not (g.graph["groups"] or matched is not None):
        return _forget_matched(g)
    device = device_of(g)
    inputs = _flat_examples(g)
    if inputs is None:  # no one call the stacked program takes: its groups stand as they won
        return _forget_matched(g)
    keys = [tensor_key(x) for x in inputs]
    cache = timing.TimingCache(device)
    fused = g.graph["program"][0]
    # The fused program and what its groups replace determine the unfused one: no need
    # to lower that (~20 ms for the demo) to look the pair up.
    replaced = [str(g.nodes[k]["target"]) for grp in g.graph["groups"].values() for k in grp.nodes()]
    record, source = {}, "cached"
    bound = {}

    def run(name: str, program=None):
        """A call of the program ``name`` ("fused"; "apart": the tenants' own ops, lowered
        here; "matched": ``program``), bound once whichever timings need it (binding
        ResNet-50/8 x4's apart program took ~70 ms on the 2-core CPU)."""
        if name not in bound:
            if program is None:
                program = fused if name == "fused" else _unfused(g).graph["program"][0]
            bound[name] = (program, bind(program, device))
        return lambda: bound[name][1].forward(*inputs)

    if g.graph["groups"]:
        key = "program:" + program_key([(fused.graph, fused)], keys, replaced)
        hit = cache.get(key)
        if hit is None or not {"fused_us", "apart_us"} <= hit.keys():
            hit = dict(zip(("fused_us", "apart_us"), timing.time_pair(
                run("fused"), run("apart"), device, what="program")))
            source = "measured"
            cache.put(key, hit)
        record = {"fused_us": hit["fused_us"], "apart_us": hit["apart_us"]}
        decision = "fused" if hit["fused_us"] < hit["apart_us"] else "apart"
    else:
        decision = "apart"  # every group lost its own timing: the program runs the tenants apart
    out = None
    if matched is not None:
        # keyed before lowering (matched_key): a hit lowers nothing (lowering the matched
        # program took 0.1-0.3 s of a warm compile), and where it chose "matched",
        # drop_unprofitable took it already (chosen_before)
        key = g.graph["matched_key"]
        hit = cache.get(key)
        every = None
        if hit is None or not {"matched_us", "plan_us"} <= hit.keys():
            every = _every_matched(matched)
            hit = dict(zip(("matched_us", "plan_us"), timing.time_pair(
                run("matched", every.graph["program"][0]), run(decision), device, what="program-matched",
                decide_at=1 - g.graph["tuning"]["margin"])))
            source = "measured"
        record["matched_us"] = hit["matched_us"]
        record.setdefault(f"{decision}_us", hit["plan_us"])
        # by the margin the groups were judged by (cost.MARGIN, in the tuning record)
        if hit["matched_us"] < (1 - g.graph["tuning"]["margin"]) * hit["plan_us"]:
            decision, out = "matched", every if every is not None else _every_matched(matched)
        cache.put(key, {**record, "plan_us": hit["plan_us"], "matched": float(decision == "matched")})
    cache.flush()
    if out is None:
        out = g.copy() if decision == "fused" else _unfused(g, clone_packed=True)
    if decision in bound and bound[decision][0] is out.graph["program"][0]:
        # the program timed is the one that will run: hand it over bound, with its packed
        # weights (binding it again repacked them: ~80 ms of the mixed set's compile)
        out.graph["bound"] = bound[decision]
    tuning = dict(g.graph.get("tuning") or {})
    tuning["program"] = {**record, "decision": decision, "source": source}
    tuning["unsaved"] = tuning.get("unsaved") or cache.unsaved
    out.graph["tuning"] = tuning
    return _forget_matched(out)


def _every_matched(matched):
    """``matched`` (the graph as match_groups left it) with every group kept, epilogues
    folded, scheduled and lowered."""
    return lower(schedule(fold_epilogues(_forget_matched(matched))))


MATCHED_ATTRS = ("matched", "matched_key", "matched_chosen")  # what drop_unprofitable leaves check_program


def _forget_matched(g):
    if not any(a in g.graph for a in MATCHED_ATTRS):
        return g
    g = g.copy()
    for a in MATCHED_ATTRS:
        g.graph.pop(a, None)
    return g


def matched_key(g, matched) -> str:
    """What check_program's choice between the plan and every group as matched depends
    on, read before epilogues are folded (no lowering): every call and its arguments
    (as candidate_key reads a group's), the groups the plan keeps and those matched,
    and the example inputs. The plan's sibling groups follow from these and the cache."""
    calls = [k for k, a in g.nodes(data=True) if a["kind"] == "call"]
    index = {k: i for i, k in enumerate(calls)}
    kept = sorted(tuple(index[k] for k in grp.members) for grp in g.graph["groups"].values())
    every = sorted(tuple(index[k] for k in grp.members) for grp in matched.graph["groups"].values())
    inputs = [tensor_key(x) for x in _flat_examples(g) or ()]
    text = repr((candidate_key(g, calls), kept, every, inputs))
    return "program-matched-choice:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def chosen_before(g, matched, cache: timing.TimingCache):
    """drop_unprofitable's plan ``g`` where check_program chose every group as matched
    for it before (the cache says so): ``matched`` with ``g``'s tuning record and the
    program decision, marked so that group_siblings and check_program leave it as it
    is; else ``g`` with what check_program needs to decide (``g.graph["matched"]`` and
    its key). Lowering the plan only to look the choice up cost ResNet-50/8 x4 at batch
    1 (2-core CPU) 0.5-0.7 s of a warm compile."""
    key = matched_key(g, matched)
    hit = cache.get(key)
    if hit is not None and hit.get("matched") == 1.0:
        out = matched.copy()
        program = {k: v for k, v in hit.items() if k.endswith("_us") and k != "plan_us"}
        out.graph["tuning"] = {**g.graph["tuning"], "program": {**program, "decision": "matched", "source": "cached"}}
        out.graph["matched_chosen"] = True
        return out
    g.graph["matched"], g.graph["matched_key"] = matched, key
    return g


# ---------------------------------------------------------------------------- the codegen


def choose_codegen(g, inductor, direct) -> dict:
    """codegen="auto": time the full program compiled by Inductor (``inductor``, a
    kernels.inductor.InductorProgram; its first call compiles it) against it run direct
    (``direct``) on the example inputs; "inductor" where it is faster and compiled.
    Cached per device and program like the program check: a cached "direct" compiles
    nothing. Returns {inductor_us, direct_us, decision, source}.
    """
    device = device_of(g)
    fused = g.graph["program"][0]
    inputs = _flat_examples(g)
    if inputs is None:
        return {"decision": "direct", "source": "not timed: no one call the program takes"}
    key = "codegen:" + program_key([(fused.graph, fused)], [tensor_key(x) for x in inputs])
    cache = timing.TimingCache(device)
    hit = cache.get(key)
    if hit is not None and {"inductor_us", "direct_us"} <= hit.keys():
        i_us, d_us, source = hit["inductor_us"], hit["direct_us"], "cached"
    else:
        i_us, d_us = timing.time_pair(lambda: inductor.forward(*inputs), lambda: direct.forward(*inputs),
                                      device, what="codegen")
        source = "measured"
        if inductor.error is None:  # a failed compile timed the direct program twice
            cache.put(key, {"inductor_us": i_us, "direct_us": d_us})
            cache.flush()
    won = i_us < d_us and inductor.error is None
    return {"inductor_us": i_us, "direct_us": d_us, "decision": "inductor" if won else "direct",
            "source": source}

