"""cost: keep a group only where one fused launch beats its members run apart.

The model, per device (rough constants, estimated rather than measured: see DEVICES):

    work_i    = max(flops_i / peak, bytes_i / bandwidth)
    separate  = sum_i (launch + work_i)
    fused     = launch + sum_i work_i + extra
    extra     = stacked inputs' bytes / bandwidth    when members have equal shapes
                (the CPU path copies activations into one batch unless they arrive
                stacked from the previous group; Triton reads them in place)
              = R * member                            otherwise (per-member setup)

A group whose members differ in shape may instead split into its equal-shape
subgroups; the pass keeps whichever of (whole group, subgroups, nothing) the
model prices lowest. The paper's one-tenant fused call lost (0.71x at R=1): a
group of one is never formed.

Before/after::

    groups = {g0: 2 x linear [1, 256], g1: 2 x linear [4096, 4096],
              g2: linear [4, 32], [4, 32], [4, 48]}
    -> groups = {g0, g2 = the two [4, 32] members}   (on CPU: copying 2 x 64 MiB of
       input costs more than one launch saves; a grouped loop over unequal
       members saves less than the calls it replaces)
"""

from __future__ import annotations

from dataclasses import dataclass

from stfuse import config, ir
from stfuse.ir import FusedOp

from .match import uniform_key


@dataclass(frozen=True)
class DeviceModel:
    launch_us: float  # one operator call: Python + dispatch (+ kernel launch)
    member_us: float  # per member inside a grouped op with unequal shapes
    gflops: float  # sustained GFLOP/s
    gbps: float  # sustained GB/s (= bytes per ns)
    stacks_inputs: bool  # the fused path copies inputs into a stacked batch


DEVICES = {
    # 2-core x86 CPU, torch 2.13: ~6 us per F.linear at [1, 256] x [256, 256]
    # from an fx program, MKL ~50 GFLOP/s, ~10 GB/s copies,
    "cpu": DeviceModel(launch_us=6.0, member_us=5.0, gflops=50.0, gbps=10.0, stacks_inputs=True),
    # ~5 us per member inside a grouped loop of F.linear calls.
    # H100-class GPU: guesses, never measured (no GPU has run stfuse yet): ~5 us per
    # launch from Python, one grouped Triton launch, datasheet-order peak and bandwidth.
    "cuda": DeviceModel(launch_us=5.0, member_us=0.0, gflops=50_000.0, gbps=2_000.0,
                        stacks_inputs=False),
}


def device_model(g) -> DeviceModel:
    override = config.device_model_override()
    if override:
        return DEVICES[override]
    devices = {tg.device.type for tg in g.graph["tenants"].values()}
    return DEVICES["cuda" if "cuda" in devices else "cpu"]


def _activation_bytes(g, k) -> int:
    """Bytes of k's computed (non-parameter) tensor inputs: what stacking copies."""
    srcs = {r for r in ir.refs(g.nodes[k]["args"]) if g.nodes[r]["kind"] != "param"}
    return sum(_nbytes(g.nodes[r]) for r in srcs)


def _nbytes(a) -> int:
    if a["shape"] is None or a["dtype"] is None:
        return 0
    n = 1
    for d in a["shape"]:
        n *= d
    return n * a["dtype"].itemsize


def _arrives_stacked(g, members) -> bool:
    """The members' first inputs are distinct outputs of one group: a stacked tensor, no copy.

    Members of one tenant may read one tensor (Q, K and V of one input): stacking
    that tensor R times is a copy, however it was produced.
    """
    srcs = [ir.refs(g.nodes[k]["args"][:1]) for k in members]
    gids = {g.nodes[s[0]]["group"] if s else None for s in srcs}
    firsts = [s[0] for s in srcs if s]
    return len(gids) == 1 and None not in gids and len(set(firsts)) == len(firsts)


def _work(g, members, dev: DeviceModel) -> float:
    return sum(max(g.nodes[k]["flops"] / (dev.gflops * 1e3), g.nodes[k]["bytes"] / (dev.gbps * 1e3))
               for k in members)


def estimate(g, members, dev: DeviceModel) -> tuple[float, float]:
    """(fused us, separate us) for one group's members."""
    R = len(members)
    work = _work(g, members, dev)
    if len({uniform_key(g, k) for k in members}) == 1:
        copied = 0 if _arrives_stacked(g, members) else sum(_activation_bytes(g, k) for k in members)
        extra = copied / (dev.gbps * 1e3) if dev.stacks_inputs else 0.0
    else:
        extra = R * dev.member_us
    return dev.launch_us + work + extra, R * dev.launch_us + work


def _subgroups(g, members) -> list[tuple[str, ...]]:
    by_key: dict = {}
    for k in members:
        by_key.setdefault(uniform_key(g, k), []).append(k)
    return [tuple(v) for v in by_key.values()]


def best_split(g, members, dev: DeviceModel) -> list[tuple[str, ...]]:
    """The cheapest of: the whole group, its equal-shape subgroups, or nothing.

    Returns the member tuples to keep as groups (each of two or more members).
    """
    whole, separate = estimate(g, members, dev)
    subs = [s for s in _subgroups(g, members) if len(s) >= 2]
    split = sum(min(estimate(g, s, dev)) for s in subs)
    split += sum(estimate(g, (k,), dev)[1] for k in members if not any(k in s for s in subs))
    best = min(whole, split, separate)
    if best == separate and best < whole and best <= split:
        return []
    if whole <= split and whole < separate:
        return [tuple(members)]
    return [s for s in subs if estimate(g, s, dev)[0] < estimate(g, s, dev)[1]]


def drop_unprofitable(g):
    """Keep, split or drop each group as the cost model says; returns a new graph."""
    g = g.copy()
    dev = device_model(g)
    kept, estimates = {}, {}
    for gid, grp in g.graph["groups"].items():
        estimates[gid] = estimate(g, grp.members, dev)
        for k in grp.members:
            g.nodes[k]["group"] = None
        parts = best_split(g, grp.members, dev)
        for j, members in enumerate(parts):
            sub = gid if len(parts) == 1 else f"{gid}.{j}"
            kept[sub] = FusedOp(sub, grp.op_class, members)
            for k in members:
                g.nodes[k]["group"] = sub
    g.graph["groups"] = kept
    g.graph["cost"] = estimates
    return g
