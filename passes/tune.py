"""tune: measured prices for the cost passes, and the whole-program check.

``stfuse.compile(..., tune=...)`` (default: config.tune_mode(), ``STFUSE_TUNE``):

=========  ==================================================================
measure    each candidate group is timed fused against its members run apart,
           on the tenants' device at the example shapes (kernels/timing.py);
           after lowering, the whole fused program is timed against the
           tenants' unfused program (check_program)
model      the analytic cost model of passes/cost.py prices every group
off        every group the matcher forms is kept; nothing is timed
=========  ==================================================================

A candidate is timed as two small canonical programs over the same random
inputs of the example shapes, bound to the device like every program
(kernels/bind.py: the torch reference on CPU, Triton on CUDA):

    fused:  y = stacked_linear(stack([x0, x1]), w_packed, b_packed, "", [], [])
    apart:  y0 = aten.linear(x0, w0, b0); y1 = aten.linear(x1, w1, b1)

Epilogues are not folded yet when groups are priced, so neither side computes
them. Inputs that arrive stacked from an earlier group (lower.arrives_stacked)
come as one stacked tensor to both sides, as they will at run time.

Measurements are cached per device identity (kernels/timing.TimingCache). A
candidate's key (candidate_key) hashes its members' ops and arguments, every
tensor argument's shape, dtype and sharing, and its weights' strides; the whole
program's (program_key) the program's ops, wiring and tensor shapes. Names and
weight values are left out, so the twelve identical layers of a BERT share one
measurement, and the next compile of the same shapes times nothing.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import operator

import torch

from stfuse import config, dims, ir
from stfuse.calls import call_problem
from stfuse.frontend import example_args, with_batch
from stfuse.ir import FusedOp
from stfuse.kernels import timing
from stfuse.kernels.bind import bind

from .fold_epilogues import fold_epilogues, own_steps
from .lower import _Builder, _member_inputs, _uniform, arrives_stacked, lower, pack_weights
from .schedule import schedule

log = logging.getLogger(__name__)

CANDIDATE = "candidate"  # the group id a candidate is lowered under


def mode(g) -> str:
    """The graph's tuning mode (set by stfuse.compile), else the configured default."""
    return g.graph.get("tune") or config.tune_mode()


def device_of(g) -> torch.device:
    return next(iter(g.graph["tenants"].values())).device


# ---------------------------------------------------------------------------- program keys


def _tensor_key(t) -> tuple:
    return (tuple(t.shape), str(t.dtype), tuple(t.stride()), t.device.type)


def _arg_key(v, index: dict):
    if isinstance(v, torch.fx.Node):
        return index[v]
    if isinstance(v, (tuple, list)):
        return tuple(_arg_key(x, index) for x in v)
    if isinstance(v, dict):
        return tuple((k, _arg_key(x, index)) for k, x in v.items())
    return repr(v)


def program_key(programs, input_keys, extra=()) -> str:
    """A hash of what running ``programs`` costs, each a (torch.fx.Graph, module holding
    its attributes): every node's op and argument wiring, every input's and weight's
    (shape, dtype, strides, device); not node names, not weight values."""
    parts: list = [tuple(input_keys), tuple(extra)]
    for graph, root in programs:
        index = {n: i for i, n in enumerate(graph.nodes)}
        for n in graph.nodes:
            if n.op == "get_attr":
                attr = operator.attrgetter(n.target)(root)
                parts.append(("attr", _tensor_key(attr) if isinstance(attr, torch.Tensor)
                              else getattr(attr, "code", repr(attr))))
            elif n.op == "call_module":
                parts.append(("module", repr(root.get_submodule(n.target)), _arg_key(n.args, index)))
            elif n.op != "placeholder":
                parts.append((n.op, str(n.target), _arg_key((n.args, n.kwargs), index)))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _inputs(specs, device: torch.device) -> list[torch.Tensor]:
    """Tensors of the given (shape, dtype): normal floats, zero integers and booleans."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(dtype).to(device) if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in specs]


# ---------------------------------------------------------------------------- one candidate group


def _spec(a) -> tuple | None:
    shape, dtype = a["shape"], a["dtype"]
    if shape is None or not isinstance(dtype, torch.dtype) or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape), dtype


def candidate_programs(g, members, packed: bool = False):
    """(fused, apart, input specs): two canonical programs computing the members'
    outputs from the same inputs (one call of the group's stfuse:: op; the members'
    own ops in turn), each a (torch.fx.Graph, module holding its weights): a
    GraphModule only where it is timed (generating its code costs ~1 ms); and each
    input's (shape, dtype); None where a shape is unknown.

    ``packed``: the fused program reads packed weights, as the real one does (a copy of
    every weight)."""
    members = tuple(members)
    reads = list(dict.fromkeys(r for k in members for r in ir.refs((g.nodes[k]["args"], g.nodes[k]["kwargs"]))))
    params = [r for r in reads if g.nodes[r]["kind"] == "param"]
    # pack_weights packs a weight only where the member is its one reader: keep its readers
    sub = g.subgraph(set(members) | set(reads) | {u for p in params for u in g.successors(p)}).copy()
    grp = FusedOp(CANDIDATE, g.nodes[members[0]]["op_class"], members)
    if grp.op_class == "pointwise":
        grp = own_steps(sub, grp)  # a pointwise group computes its members' own step
    sub.graph["groups"] = {CANDIDATE: grp}
    if packed:
        sub = pack_weights(sub)
    xs = tuple(_member_inputs(sub, grp.op_class, members)["x"])
    stacked_in = _uniform(sub, members) and arrives_stacked(g, members)
    inputs = [r for r in reads if g.nodes[r]["kind"] != "param" and not (stacked_in and r in xs)]
    specs = [_spec(g.nodes[r]) for r in inputs]
    if stacked_in:
        one = _spec(g.nodes[xs[0]])
        specs.append(None if one is None else ((len(xs),) + one[0], one[1]))
    if any(s is None for s in specs):
        return None
    tenants = tuple(dict.fromkeys(g.nodes[k]["tenant"] for k in members))

    def program(fused: bool) -> tuple[torch.fx.Graph, torch.nn.Module]:
        b = _Builder(sub, tenants, stacked=True)
        for r in inputs:
            b.env[r] = b.graph.placeholder(b.unique("x"))
        if stacked_in:
            b.stacks[xs] = b.graph.placeholder(b.unique("xs"))
            b.lazy.update({x: (b.stacks[xs], i) for i, x in enumerate(xs)})
        if fused:
            b.group(grp)
            y = b.stacks.get(tuple(grp.outputs()))  # a stacked output stays stacked
            outs = (y,) if y is not None else tuple(b.env[k] for k in grp.outputs())
        else:
            for k in members:
                b.call(k)
            outs = tuple(b.env[k] for k in members)
        b.graph.output(outs)
        return b.graph, b.root

    return program(True), program(False), specs


def _module(program) -> torch.fx.GraphModule:
    graph, root = program
    return torch.fx.GraphModule(root, graph)


def candidate_key(g, members) -> str:
    """A hash of what timing a candidate depends on, from the graph alone (building its
    programs costs ~1 ms of fx work each; this ~0.05 ms): per member its op and
    arguments, every tensor argument as (first-seen index, kind, shape, sig, dtype,
    a weight's strides and whether others read it), and whether its inputs arrive
    stacked. Names and weight values are left out."""
    seen: dict[str, int] = {}

    def arg(v):
        if isinstance(v, ir.Ref):
            a = g.nodes[v.key]
            spec = (seen.setdefault(v.key, len(seen)), a["kind"], a["shape"] and tuple(a["shape"]), a["sig"],
                    str(a["dtype"]))
            if a["kind"] == "param":
                spec += (_tensor_key(a["value"]), len(list(g.successors(v.key))))
            return spec
        if isinstance(v, (tuple, list)):
            return tuple(arg(x) for x in v)
        if isinstance(v, dict):
            return tuple((k, arg(x)) for k, x in v.items())
        return repr(v)

    parts = [(str(g.nodes[k]["target"]), g.nodes[k]["op_class"], g.nodes[k]["sig"], arg(g.nodes[k]["args"]),
              arg(g.nodes[k]["kwargs"])) for k in members]
    parts.append(("stacked in", arrives_stacked(g, members), str(device_of(g))))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def describe(g, members) -> str:
    """A candidate in words, for logs and for a test's fake timer: class and members."""
    return f"{g.nodes[members[0]]['op_class']} [{', '.join(members)}]"


def measure_group(g, members, cache: timing.TimingCache) -> tuple[float, float, str] | None:
    """(fused us, apart us, "measured" or "cached") for a candidate group, or None where it
    cannot be built or run (the cost pass then prices it with the model)."""
    device = device_of(g)
    key = "group:" + candidate_key(g, members)
    hit = cache.get(key)
    if hit is not None and {"fused_us", "apart_us"} <= hit.keys():
        return hit["fused_us"], hit["apart_us"], "cached"
    try:
        built = candidate_programs(g, members, packed=True)
        if built is None:
            return None
        fused, apart, specs = built
        fused = bind(_module(fused), device)
        apart = bind(_module(apart), device)
        inputs = _inputs(specs, device)
        f_us, a_us = timing.time_pair(lambda: fused.forward(*inputs), lambda: apart.forward(*inputs),
                                      device, what=describe(g, members))
    except Exception as err:  # noqa: BLE001 - a candidate that cannot be timed is priced by the model
        log.info("stfuse: could not time %s (%s: %s); the cost model prices it",
                 describe(g, members), type(err).__name__, err)
        return None
    cache.put(key, {"fused_us": f_us, "apart_us": a_us})
    return f_us, a_us, "measured"


# ---------------------------------------------------------------------------- the device profile


def measure_profile(device: torch.device) -> dict:
    """The cost model's constants measured on ``device`` (cached like every measurement):

    launch_us  one aten.linear at [1, 16] x [16, 16] (the work is nothing: the call is all)
    member_us  per member of a grouped reference loop: (8 members - 1 member) / 7
    gflops     aten.linear at [128, 512] x [512, 512] (67 MFLOP)
    gbps       torch.stack of two 4 MiB tensors, input bytes per second (what stacking copies)

    About 40 ms on the 2-core CPU, once per device identity.
    """
    cache = timing.TimingCache(device)
    hit = cache.get("profile")
    if hit is not None and {"launch_us", "member_us", "gflops", "gbps"} <= hit.keys():
        return hit
    from stfuse.kernels import reference

    linear = torch.ops.aten.linear.default
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(device)

    x, w = rand(1, 16), rand(16, 16)
    launch = timing.median_us(lambda: linear(x, w), device)
    one = timing.median_us(lambda: reference.grouped_linear([x], [w], [None], "", [], []), device)
    eight = timing.median_us(lambda: reference.grouped_linear([x] * 8, [w] * 8, [None] * 8, "", [], []), device)
    a, b = rand(128, 512), rand(512, 512)
    gemm = timing.median_us(lambda: linear(a, b), device)
    c, d = rand(1 << 20), rand(1 << 20)
    copy = timing.median_us(lambda: torch.stack([c, d]), device)
    profile = {"launch_us": launch, "member_us": max(eight - one, 0.0) / 7,
               "gflops": 2 * 128 * 512 * 512 / (gemm * 1e3), "gbps": 2 * 4 * (1 << 20) / (copy * 1e3)}
    cache.put("profile", profile)
    cache.flush()
    return profile


# ---------------------------------------------------------------------------- the whole program


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
    keys = [_tensor_key(x) for x in inputs]
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
            bound[name] = bind(program, device)
        return lambda: bound[name].forward(*inputs)

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
        # keyed before lowering (tune.matched_key): a hit lowers nothing (lowering the matched
        # program took 0.1-0.3 s of a warm compile), and where it chose "matched",
        # drop_unprofitable took it already (chosen_before)
        key = g.graph["matched_key"]
        hit = cache.get(key)
        every = None
        if hit is None or not {"matched_us", "plan_us"} <= hit.keys():
            every = _every_matched(matched)
            hit = dict(zip(("matched_us", "plan_us"), timing.time_pair(
                run("matched", every.graph["program"][0]), run(decision), device, what="program-matched")))
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
    inputs = [_tensor_key(x) for x in _flat_examples(g) or ()]
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
    key = "codegen:" + program_key([(fused.graph, fused)], [_tensor_key(x) for x in inputs])
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

