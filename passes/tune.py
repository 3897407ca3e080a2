"""tune: measured prices for the cost passes (the whole-program check that follows
them is passes/program_check.py).

``stfuse.compile(..., tune=...)`` (default: config.tune_mode(), ``STFUSE_TUNE``):

=========  ==================================================================
measure    each candidate group is timed fused against its members run apart,
           on the tenants' device at the example shapes (kernels/timing.py);
           after lowering, the whole fused program is timed against the
           tenants' unfused program (program_check.check_program)
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

import hashlib
import logging
import operator

import torch

from stfuse import config, ir
from stfuse.ir import FusedOp
from stfuse.kernels import timing
from stfuse.kernels.bind import bind

from .fold_epilogues import own_steps
from .lower import _Builder, _member_inputs, _uniform, arrives_stacked, pack_weights

log = logging.getLogger(__name__)

CANDIDATE = "candidate"  # the group id a candidate is lowered under


def mode(g) -> str:
    """The graph's tuning mode (set by stfuse.compile), else the configured default."""
    return g.graph.get("tune") or config.tune_mode()


def device_of(g) -> torch.device:
    return next(iter(g.graph["tenants"].values())).device


# ---------------------------------------------------------------------------- program keys


def tensor_key(t) -> tuple:
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
                parts.append(("attr", tensor_key(attr) if isinstance(attr, torch.Tensor)
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
                spec += (tensor_key(a["value"]), len(list(g.successors(v.key))))
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


def measure_group(g, members, cache: timing.TimingCache, *,
                  decide_at: float) -> tuple[float, float, str] | None:
    """(fused us, apart us, "measured" or "cached") for a candidate group, or None where it
    cannot be built or run (the cost pass then prices it with the model). ``decide_at``:
    the ratio fused / apart the caller keeps the group under (timing.time_pair)."""
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
        fused, apart = bind(fused, device), bind(apart, device)  # consumed: no code generated twice
        inputs = _inputs(specs, device)
        f_us, a_us = timing.time_pair(lambda: fused.forward(*inputs), lambda: apart.forward(*inputs),
                                      device, what=describe(g, members), decide_at=decide_at)
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
