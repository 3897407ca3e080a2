"""cost: keep a group only where one fused launch beats its members run apart.

Each candidate group is priced as (fused us, apart us) by the tuning mode
(passes/tune.py): ``measure`` times both on the device (the analytic model
prices what cannot be timed), ``model`` uses the analytic model below, ``off``
keeps every group the matcher formed.

The analytic model (the prior), per device:

    work_i    = max(flops_i / peak, bytes_i / bandwidth)
    separate  = sum_i (launch + work_i)
    fused     = launch + sum_i work_i + extra
    extra     = stacked inputs' bytes / bandwidth    when members have equal shapes
                (the CPU path copies activations into one batch unless they arrive
                stacked from the previous group; Triton reads them in place)
              = R * member                            otherwise (per-member setup)

Its CPU constants come from a measured device profile (tune.measure_profile,
cached per device); the CUDA ones are still guesses (DEVICES).

A group whose members differ in shape may instead split into its equal-shape
subgroups; the pass keeps whichever of (whole group, subgroups, nothing) saves
most. A measured group is kept only where it saves more than MARGIN of its
members' time apart. The paper's one-tenant fused call lost (0.71x at R=1): a
group of one is never formed.

Before/after::

    groups = {g0: 2 x linear [1, 256], g1: 2 x linear [4096, 4096],
              g2: linear [4, 32], [4, 32], [4, 48]}
    -> groups = {g0, g2 = the two [4, 32] members}   (on CPU: copying 2 x 64 MiB of
       input costs more than one launch saves; a grouped loop over unequal
       members saves less than the calls it replaces)
    g.graph["tuning"]["groups"] = {g0: {fused_us, apart_us, decision: "fused", source}, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from stfuse import config, ir
from stfuse.ir import FusedOp
from stfuse.kernels import timing

from . import program_check, tune
from .lower import arrives_stacked
from .match import uniform_key

# A measured group must save more than this share of its members' time apart
# (docs/tuning.md, "The margin"): the same program timed against itself on the loaded
# 2-core CPU differed by 0.2% (median) and up to 12% (worst of 60); a kept group costs
# what its timing does not see (a packed copy of its weights, a longer program); and a
# near tie is not worth a plan that flips from one machine to the next.
MARGIN = 0.10


@dataclass(frozen=True)
class DeviceModel:
    launch_us: float  # one operator call: Python + dispatch (+ kernel launch)
    member_us: float  # per member inside a grouped op with unequal shapes
    gflops: float  # sustained GFLOP/s
    gbps: float  # sustained GB/s (= bytes per ns)
    stacks_inputs: bool  # the fused path copies inputs into a stacked batch


DEVICES = {
    # Nominal constants, used where STFUSE_DEVICE_MODEL pins them (the tests do, so
    # plans do not depend on the machine); otherwise CPU runs on a measured profile.
    # 2-core x86 CPU, torch 2.13: ~6 us per F.linear at [1, 256] x [256, 256]
    # from an fx program, ~5 us per member of a grouped loop, MKL ~50 GFLOP/s, ~10 GB/s copies.
    "cpu": DeviceModel(launch_us=6.0, member_us=5.0, gflops=50.0, gbps=10.0, stacks_inputs=True),
    # H100-class GPU: guesses, never measured (no GPU has run stfuse yet): ~5 us per
    # launch from Python, one grouped Triton launch, datasheet-order peak and bandwidth.
    "cuda": DeviceModel(launch_us=5.0, member_us=0.0, gflops=50_000.0, gbps=2_000.0,
                        stacks_inputs=False),
}


def device_model(g) -> DeviceModel:
    """The nominal model of STFUSE_DEVICE_MODEL where set; else CPU's measured profile,
    or CUDA's nominal row."""
    override = config.device_model_override()
    if override:
        return DEVICES[override]
    device = tune.device_of(g)
    if device.type != "cpu":
        return DEVICES["cuda"]
    return DeviceModel(**tune.measure_profile(device), stacks_inputs=True)


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


def _work(g, members, dev: DeviceModel) -> float:
    return sum(max(g.nodes[k]["flops"] / (dev.gflops * 1e3), g.nodes[k]["bytes"] / (dev.gbps * 1e3))
               for k in members)


def estimate(g, members, dev: DeviceModel) -> tuple[float, float]:
    """(fused us, separate us) for one group's members."""
    R = len(members)
    work = _work(g, members, dev)
    if len({uniform_key(g, k) for k in members}) == 1:
        copied = 0 if arrives_stacked(g, members) else sum(_activation_bytes(g, k) for k in members)
        extra = copied / (dev.gbps * 1e3) if dev.stacks_inputs else 0.0
    else:
        extra = R * dev.member_us
    return dev.launch_us + work + extra, R * dev.launch_us + work


class Price(NamedTuple):
    fused_us: float
    apart_us: float
    source: str  # "measured", "cached" or "model"


class Pricer:
    """Prices candidate groups for one pass in the graph's tuning mode (tune.mode).

    Measurements go to the device's TimingCache; ``close`` writes it once. The model
    is built on first use only, so a measured compile never measures the profile
    unless some group cannot be timed.
    """

    def __init__(self, g):
        self.g, self.mode = g, tune.mode(g)
        self.cache = timing.TimingCache(tune.device_of(g)) if self.mode == "measure" else None
        self._model: DeviceModel | None = None

    def model(self) -> DeviceModel:
        if self._model is None:
            self._model = device_model(self.g)
        return self._model

    def price(self, members) -> Price:
        if self.cache is not None:
            measured = tune.measure_group(self.g, members, self.cache, decide_at=1 - MARGIN)
            if measured is not None:
                return Price(*measured)
        return Price(*estimate(self.g, members, self.model()), "model")

    def saving(self, p: Price) -> float:
        """us saved by fusing, less the margin a measurement must clear (none for the model:
        it is the prior, and its own decisions stay as they were)."""
        margin = 0.0 if p.source == "model" else MARGIN
        return p.apart_us - p.fused_us - margin * p.apart_us

    def close(self, tuning: dict) -> None:
        """Write the measurements; note in ``tuning`` if they could not be kept."""
        if self.cache is not None:
            self.cache.flush()
            tuning["unsaved"] = tuning.get("unsaved") or self.cache.unsaved


def _subgroups(g, members) -> list[tuple[str, ...]]:
    by_key: dict = {}
    for k in members:
        by_key.setdefault(uniform_key(g, k), []).append(k)
    return [tuple(v) for v in by_key.values()]


def best_split(g, members, pricer: Pricer) -> tuple[list[tuple[str, ...]], dict]:
    """Whichever of the whole group, its equal-shape subgroups, or nothing saves most.

    Returns (the member tuples to keep as groups, each of two or more members;
    {member tuple: Price} of what was priced). Mode "off" keeps the whole group.
    """
    members = tuple(members)
    if pricer.mode == "off":
        return [members], {}
    whole = pricer.price(members)
    prices = {members: whole}
    subs = [s for s in _subgroups(g, members) if len(s) >= 2]
    if subs == [members]:
        return ([members] if pricer.saving(whole) > 0 else []), prices
    prices.update({s: pricer.price(s) for s in subs})
    paying = [s for s in subs if pricer.saving(prices[s]) > 0]
    if pricer.saving(whole) > 0 and pricer.saving(whole) >= sum(pricer.saving(prices[s]) for s in paying):
        return [members], prices
    return paying, prices


def record(gid: str, members, parts: list, prices: dict) -> dict:
    """plan.stats["tuning"]["groups"] rows for candidate ``gid`` split into ``parts``:
    the candidate's own row (fused us, apart us, decision, source) and one per kept part."""
    members = tuple(members)
    decision = "fused" if parts == [members] else "split" if parts else "apart"
    whole = prices.get(members)
    if whole is None:  # mode "off": nothing priced
        return {gid: {"decision": decision, "source": "off"}}
    rows = {gid: {"fused_us": whole.fused_us, "apart_us": whole.apart_us, "decision": decision,
                  "source": whole.source}}
    if decision == "split":
        ids = [f"{gid}.{j}" for j in range(len(parts))] if len(parts) > 1 else [gid]
        rows[gid]["kept"] = ids
        for sid, part in zip(ids, parts):
            if sid == gid:
                continue  # one part kept under the candidate's own id: its row stays the candidate's
            p = prices[part]
            rows[sid] = {"fused_us": p.fused_us, "apart_us": p.apart_us, "decision": "fused",
                         "source": p.source}
    return rows


def tuning_record(g, pricer: Pricer) -> dict:
    """g's tuning record (mode, margin, per-group rows, the program check) to extend."""
    old = g.graph.get("tuning") or {}
    return {"mode": pricer.mode, "margin": MARGIN, "groups": dict(old.get("groups", {})),
            "program": old.get("program"), "unsaved": old.get("unsaved")}


def drop_unprofitable(g):
    """Keep, split or drop each group as its prices say; returns a new graph."""
    matched, g = g, g.copy()
    pricer = Pricer(g)
    tuning = tuning_record(g, pricer)
    kept = {}
    for gid, grp in g.graph["groups"].items():
        for k in grp.members:
            g.nodes[k]["group"] = None
        parts, prices = best_split(g, grp.members, pricer)
        tuning["groups"].update(record(gid, grp.members, parts, prices))
        for j, members in enumerate(parts):
            sub = gid if len(parts) == 1 else f"{gid}.{j}"
            kept[sub] = FusedOp(sub, grp.op_class, members)
            for k in members:
                g.nodes[k]["group"] = sub
    offer = tuning.get("mode") == "measure" and kept.keys() != g.graph["groups"].keys() and \
        2 * sum(len(grp.members) for grp in kept.values()) >= sum(len(grp.members) for grp in g.graph["groups"].values())
    pricer.close(tuning)
    g.graph["groups"] = kept
    g.graph["tuning"] = tuning
    if offer:
        # every group as matched, for check_program to time as a whole (tune.py): where at least
        # half of the matched members stay fused. Where most groups lost their own timings (the
        # transformer sets under oneDNN's GEMMs keep 0-2 of 35), fusing them all did not win
        # either, and timing it cost a cold compile up to 2.6 s (GPT-2 x4 quick)
        g = program_check.chosen_before(g, matched, pricer.cache)
    return g
