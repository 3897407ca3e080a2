"""Placements on the runtime's fake clock: the planner against round-robin and random.

Each replica runs the space-time policy (stfuse/runtime/space_time.py) over the tenants
placed on it, on ``stfuse.runtime.simulate.simulate``'s fake clock, against a
LatencyProfile whose per-tenant parts come from the tenants' descriptions and whose
fused groups are priced by the FusionModel (placement.py): the same model for every
placement, so only where tenants sit differs. Requests arrive as Poisson processes;
a tenant hosted on k replicas sends each a k-th of its rate.

    attainment           requests finished within their SLO / requests sent
    goodput              requests finished within their SLO per second
    throughput at SLO    the largest goodput over a sweep of load scales at which
                         attainment stays >= ATTAINMENT (0.99)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Sequence

from stfuse.errors import StfuseError
from stfuse.runtime.policies import make_scheduler
from stfuse.runtime.profile import LatencyProfile
from stfuse.runtime.simulate import SimRequest, simulate

from .placement import FusionModel, PlacementPlan, TenantDesc, build_plan, plan_placement, replicas_needed

ATTAINMENT = 0.99


class FusedProfile(LatencyProfile):
    """The runtime's latency model with every group's fixed part priced by the FusionModel.

    A plain LatencyProfile scales an unmeasured group from the largest measured one,
    linearly in its size: for 26 same-architecture tenants that prices a group of 5
    at 3.5x what fusing them costs by the FusionModel, and the scheduler then fuses
    too little. The fake device knows every group's price instead."""

    def __init__(self, tenants: Sequence[TenantDesc], fusion: FusionModel):
        super().__init__({d.name: d.fixed_s for d in tenants}, {d.name: d.per_row_s for d in tenants})
        self._descs = {d.name: d for d in tenants}
        self._fusion = fusion
        self._cache: dict[frozenset, float] = {}

    def group_fixed(self, tenants: frozenset) -> float:
        if tenants not in self._cache:
            self._cache[tenants] = self._fusion.fused_fixed([self._descs[t] for t in sorted(tenants)])
        return self._cache[tenants]


def zipf_population(archs: Sequence[TenantDesc], tenants: int, total_rate: float, *, exponent: float = 1.0,
                    seed: int = 0) -> list[TenantDesc]:
    """``tenants`` tenants ("t0000", ...) spread evenly over the architectures in a random order
    (each a copy of its representative: name aside, the same description), with request rates following
    a Zipf law of ``exponent`` in a random order, summing to ``total_rate``."""
    if not archs:
        raise StfuseError("zipf_population: no architectures")
    rng = random.Random(seed)
    ranks = list(range(1, tenants + 1))
    rng.shuffle(ranks)
    kinds = [i % len(archs) for i in range(tenants)]
    rng.shuffle(kinds)  # names say nothing of architectures (round-robin by name would group them)
    weights = [r ** -exponent for r in ranks]
    scale = total_rate / sum(weights)
    return [replace(archs[k], name=f"t{i:04d}", rate=w * scale) for i, (k, w) in enumerate(zip(kinds, weights))]


def _splits(tenants: Sequence[TenantDesc], replicas: int) -> list[tuple[str, int]]:
    """(tenant, replicas it needs) in name order: the baselines split hot tenants as the planner does."""
    return [(d.name, replicas_needed(d, replicas, strict=False)) for d in sorted(tenants, key=lambda d: d.name)]


def round_robin(tenants: Sequence[TenantDesc], replicas: int, memory_bytes: int,
                fusion: FusionModel) -> PlacementPlan:
    """Tenants (and the shares of split ones) in name order, replica after replica."""
    hosts, i = {}, 0
    for t, k in _splits(tenants, replicas):
        hosts[t] = [(i + j) % replicas for j in range(k)]
        i += k
    return build_plan("round-robin", hosts, tenants, replicas, memory_bytes, fusion)


def random_placement(tenants: Sequence[TenantDesc], replicas: int, memory_bytes: int, fusion: FusionModel,
                     seed: int = 0) -> PlacementPlan:
    """Each tenant on replicas drawn uniformly (distinct ones for a split tenant)."""
    rng = random.Random(seed)
    hosts = {t: rng.sample(range(replicas), k) for t, k in _splits(tenants, replicas)}
    return build_plan("random", hosts, tenants, replicas, memory_bytes, fusion)


@dataclass(frozen=True)
class SimOutcome:
    placement: str
    scale: float
    offered_rps: float
    sent: int
    on_time: int
    attainment: float
    goodput_rps: float
    p99_ms: float | None


def _arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    out, t = [], 0.0
    if rate <= 0:
        return out
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def simulate_plan(plan: PlacementPlan, fusion: FusionModel, *, scale: float = 1.0, duration_s: float = 1.0,
                  seed: int = 0, max_batch: int = 32) -> SimOutcome:
    """Every replica of ``plan`` on the fake clock with the tenants' rates times ``scale``.

    Each replica's slice (how long space-time holds a request for fusion partners) is the
    runtime's 2 ms default, or a quarter of its tightest SLO where that is shorter: a
    replica of sub-10 ms SLOs would otherwise spend most of a request's budget waiting
    for partners."""
    rng = random.Random(seed)
    sent = on_time = 0
    tails: list[float] = []
    offered = 0.0
    for row in plan.rows:
        if not row.tenants:
            continue
        descs = [plan.tenants[t] for t in row.tenants]
        names = list(row.tenants)
        profile = FusedProfile(descs, fusion)
        slo = {d.name: d.slo_s for d in descs}
        reqs = []
        for d in descs:
            rate = plan.rate_on(d.name) * scale
            offered += rate
            reqs += [SimRequest(d.name, a, a + d.slo_s) for a in _arrivals(rate, duration_s, rng)]
        if not reqs:
            continue
        scheduler = make_scheduler("space-time", names, profile=profile, slo_s=slo, max_batch=max_batch,
                                   slice_s=min(row.slo_s / 4, 0.002))
        result = simulate(scheduler, reqs, profile, slo_s=slo)
        sent += len(reqs)
        for r in result.requests:
            if r.finish is not None:
                latency = r.finish - r.arrival
                on_time += latency <= slo[r.tenant] + 1e-9
                tails.append(latency)
            else:
                tails.append(math.inf)
    tails.sort()
    p99 = tails[max(0, math.ceil(0.99 * len(tails)) - 1)] * 1e3 if tails else None
    return SimOutcome(plan.name, scale, offered, sent, on_time, on_time / sent if sent else 1.0,
                      on_time / duration_s, p99)


def throughput_at_slo(outcomes: Sequence[SimOutcome | None]) -> float:
    """The largest goodput among the outcomes whose attainment is at least ATTAINMENT (0 if none)."""
    return max((o.goodput_rps for o in outcomes if o is not None and o.attainment >= ATTAINMENT), default=0.0)


def compare(population: Sequence[TenantDesc], replicas: int, memory_bytes: int, scales: Sequence[float], *,
            device: str = "cuda", duration_s: float = 0.1, seed: int = 0) -> dict[str, list]:
    """{placement: [(scale, plan or None, SimOutcome or None)]} for the planner, round-robin and
    random at each load scale (every rate times it). The planner plans for each scale's rates
    (it is told them) and has no plan (None) where it finds no feasible placement; the
    baselines place the same tenants, hot ones split over as many replicas."""
    fusion = FusionModel(population, device)
    out: dict[str, list] = {"planner": [], "round-robin": [], "random": []}
    for s in scales:
        pop = [replace(d, rate=d.rate * s) for d in population]
        plans = [round_robin(pop, replicas, memory_bytes, fusion),
                 random_placement(pop, replicas, memory_bytes, fusion, seed)]
        try:
            plans.insert(0, plan_placement(pop, replicas, memory_bytes, device=device))
        except StfuseError:
            out["planner"].append((s, None, None))
        for p in plans:
            out[p.name].append((s, p, simulate_plan(p, fusion, duration_s=duration_s, seed=seed)))
    return out
