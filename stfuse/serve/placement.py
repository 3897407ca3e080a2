"""Placement: which tenants share a replica, planned with the compiler's own fusion decisions.

``TenantDesc``: what the planner knows of a tenant (match.py keys of its fusable ops,
launches, weights, latency alone, rate, SLO); ``describe`` derives it from a compiled
program or traced models, so 1000 tenants of 20 architectures need 20 traces.
``FusionModel``: the fixed cost of tenants sharing one fused program (match.py's
alignment says which ops share a launch, cost.py's group rule what a launch saves).
``pressure``: max(utilization, 2 * cycle / tightest SLO), <= 1 on every replica of a plan.
``plan_placement``: split hot tenants, pack architecture by architecture where each tenant
adds least pressure within memory and a pressure cap, bisect the cap; deterministic.
docs/serve.md ("Placement") explains each step and its reasons.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Sequence

from stfuse.errors import StfuseError

SHARD_PRESSURE = 0.5  # a tenant alone above this pressure is split over several replicas
_SEARCH_STEPS = 14  # bisection steps on the pressure cap: 1 / 2**14 of the range


@dataclass(frozen=True)
class TenantDesc:
    """What placement needs of a tenant; ``ops`` are (op_class, class key, uniform key)
    of its fusable ops in order, keys as text (passes/match.py)."""

    name: str
    arch: str
    ops: tuple[tuple[str, str, str], ...]
    launches: int
    param_bytes: int
    fixed_s: float
    per_row_s: float
    rate: float = 0.0  # expected requests per second
    slo_s: float = math.inf

    def solo_s(self, rows: int = 1) -> float:
        return self.fixed_s + self.per_row_s * rows

    def to_json(self) -> dict:
        d = asdict(self)
        d["ops"] = [list(op) for op in self.ops]
        d["slo_s"] = None if math.isinf(self.slo_s) else self.slo_s
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> TenantDesc:
        try:
            return cls(str(d["name"]), str(d["arch"]), tuple(tuple(map(str, op)) for op in d["ops"]),
                       int(d["launches"]), int(d["param_bytes"]), float(d["fixed_s"]), float(d["per_row_s"]),
                       float(d.get("rate", 0.0)), math.inf if d.get("slo_s") is None else float(d["slo_s"]))
        except (KeyError, TypeError, ValueError) as err:
            raise StfuseError(f"tenant description {d.get('name', '?')!r}: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------- describe


def device_model(name: str):
    """passes/cost.py's nominal device row ("cpu" or "cuda")."""
    from stfuse.passes import cost

    if name not in cost.DEVICES:
        raise StfuseError(f"unknown device model {name!r}; expected one of {sorted(cost.DEVICES)}")
    return cost.DEVICES[name]


def describe(source, example_inputs=None, *, rates: Mapping[str, float] | None = None,
             slo_ms: Mapping[str, float] | None = None, device: str | None = None,
             profile=None) -> list[TenantDesc]:
    """TenantDescs of a compiled FusedProgram's tenants, or of models ({name: model} with
    ``example_inputs``) traced and annotated by the compiler's own front passes.

    Latencies come from ``profile`` (a runtime LatencyProfile, e.g. from
    ``stfuse.runtime.measure_profile``) where it has the tenant, else from the cost
    model of ``device`` ("cpu" / "cuda"; default: the tenants' device)."""
    from stfuse import ir

    if hasattr(source, "plan") and getattr(source.plan, "graph", None) is not None:
        g = source.plan.graph
    elif isinstance(source, Mapping):
        from stfuse.frontend import trace_tenant
        from stfuse.passes import pipeline
        from stfuse.passes.annotate import annotate
        from stfuse.passes.normalize import normalize

        if not isinstance(example_inputs, Mapping) or set(example_inputs) != set(source):
            raise StfuseError("describe: models need example_inputs, one entry per model name")
        tenants = {n: trace_tenant(n, m, example_inputs[n]) for n, m in source.items()}
        g, _ = pipeline.run(ir.build(tenants), passes=[normalize, annotate])
    else:
        raise StfuseError(f"describe: expected a compiled FusedProgram or {{name: model}}, got "
                          f"{type(source).__name__} (a loaded artifact keeps no graph: describe its models)")
    names = list(g.graph["tenants"])
    _check_known(names, rates, "rates")
    _check_known(names, slo_ms, "slo_ms")
    out = []
    for t in names:
        tg = g.graph["tenants"][t]
        dev = device_model(device or ("cpu" if tg.device.type == "cpu" else "cuda"))
        d = _describe_tenant(g, t, dev)
        if profile is not None and t in profile.fixed:
            d = replace(d, fixed_s=profile.fixed[t], per_row_s=profile.per_row.get(t, d.per_row_s))
        out.append(replace(d, rate=float((rates or {}).get(t, 0.0)),
                           slo_s=(slo_ms or {}).get(t, math.inf) / 1e3))
    return out


def _check_known(names: Sequence[str], given: Mapping | None, what: str) -> None:
    unknown = sorted(set(given or {}) - set(names))
    if unknown:
        raise StfuseError(f"{what}: unknown tenant(s) {unknown}; tenants are {list(names)}")


def _describe_tenant(g, t: str, dev) -> TenantDesc:
    """One tenant of an annotated graph: match keys, launches, bytes, and its latency alone
    by the cost model (per call: a launch plus its weights read once; rows pay the rest)."""
    from stfuse import ir
    from stfuse.passes import match

    ops = tuple((g.nodes[k]["op_class"], repr(match.class_key(g, k)), repr(match.uniform_key(g, k)))
                for k in match.fusable_sequence(g, t))
    calls = [k for k in ir.tenant_order(g, t) if g.nodes[k]["kind"] == "call" and g.nodes[k]["op_class"] != "view"]
    tg = g.graph["tenants"][t]
    batch = max(int(tg.batch or 1), 1)
    fixed = per_row = 0.0
    for k in calls:
        a = g.nodes[k]
        weights = sum(_nbytes(g.nodes[r]) for r in set(ir.refs(a["args"])) if g.nodes[r]["kind"] == "param")
        fixed += dev.launch_us * 1e-6 + weights / (dev.gbps * 1e9)
        per_row += max(a["flops"] / (dev.gflops * 1e9), max(a["bytes"] - weights, 0) / (dev.gbps * 1e9)) / batch
    shape = repr([(g.nodes[k]["op_class"], g.nodes[k]["sig"], str(g.nodes[k]["target"])) for k in calls])
    arch = f"{type(tg.model).__name__.lower() if tg.model is not None else 'model'}-" \
           f"{hashlib.sha1(shape.encode()).hexdigest()[:8]}"
    seen, param_bytes = set(), 0
    for v in tg.tensors.values():
        if id(v) not in seen:
            seen.add(id(v))
            param_bytes += v.numel() * v.element_size()
    return TenantDesc(t, arch, ops, len(calls), param_bytes, fixed, per_row)


def _nbytes(a) -> int:
    return math.prod(a["shape"]) * a["dtype"].itemsize if a["shape"] is not None and a["dtype"] is not None else 0


# ----------------------------------------------------------------------------- fusion model


class FusionModel:
    """Fixed seconds of tenants sharing one fused program (see the module docstring).

    Tenants of one architecture have equal ops, so alignments are computed over
    architectures (cached per set of them) and members counted per architecture."""

    def __init__(self, tenants: Sequence[TenantDesc], device: str = "cuda"):
        dev = device_model(device)
        self.device = device
        self.launch_s, self.member_s = dev.launch_us * 1e-6, dev.member_us * 1e-6
        self.ops: dict[str, tuple] = {}
        self._columns: dict[tuple, list] = {}
        self.learn(tenants)

    def learn(self, tenants: Sequence[TenantDesc]) -> None:
        """Record the tenants' architectures; one architecture always has the same ops."""
        for d in tenants:
            if self.ops.setdefault(d.arch, d.ops) != d.ops:
                raise StfuseError(f"tenant {d.name!r}: architecture {d.arch!r} given with other ops than "
                                  f"another tenant of it")

    def columns(self, archs: tuple[str, ...]) -> list[list[tuple[str, int]]]:
        """match.py's alignment of the architectures' fusable ops: columns of (arch, op index)."""
        if archs not in self._columns:
            from stfuse.passes import match, optable

            def score(x, y):
                a, b = self.ops[x[0]][x[1]], self.ops[y[0]][y[1]]
                if a[1] != b[1]:
                    return 0
                return optable.OP_CLASSES[a[0]].match_weight + (a[2] == b[2])

            cols: list = []
            for arch in archs:
                seq = [(arch, j) for j in range(len(self.ops[arch]))]
                cols = match.align(cols, seq, score) if cols else [[x] for x in seq]
            self._columns[archs] = cols
        return self._columns[archs]

    def column_saving(self, counts: Mapping[str, int]) -> float:
        """Seconds one aligned column saves with counts[uniform key] members (cost.best_split's choice)."""
        members = sum(counts.values())
        if members < 2:
            return 0.0
        whole = (members - 1) * self.launch_s - (members * self.member_s if len(counts) > 1 else 0.0)
        parts = sum((c - 1) * self.launch_s for c in counts.values())
        return max(whole, parts, 0.0)

    def saving(self, counts: Mapping[str, int]) -> float:
        """Seconds saved by fusing counts[arch] tenants of each architecture into one program."""
        archs = tuple(sorted(a for a, c in counts.items() if c > 0))
        total = 0.0
        for col in self.columns(archs):
            by_key: dict[str, int] = {}
            for arch, j in col:
                key = self.ops[arch][j][2]
                by_key[key] = by_key.get(key, 0) + counts[arch]
            total += self.column_saving(by_key)
        return total

    def fused_fixed(self, tenants: Sequence[TenantDesc]) -> float:
        if not tenants:
            return 0.0
        self.learn(tenants)
        counts: dict[str, int] = {}
        for d in tenants:
            counts[d.arch] = counts.get(d.arch, 0) + 1
        apart = sum(d.fixed_s for d in tenants)
        return max(apart - self.saving(counts), max(d.fixed_s for d in tenants))


def pressure(fixed_s: float, utilization: float, slo_s: float) -> float:
    """2 * cycle / SLO, and at least the utilization: above 1, the replica cannot promise its
    tightest SLO, or cannot keep up at all (module docstring)."""
    if utilization >= 1.0:
        return math.inf
    return max(utilization, 0.0 if math.isinf(slo_s) else 2.0 * fixed_s / (1.0 - utilization) / slo_s)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ReplicaRow:
    index: int
    tenants: tuple[str, ...]
    archs: tuple[str, ...]
    memory_bytes: int
    fixed_apart_s: float  # the tenants' fixed parts run apart
    fixed_fused_s: float  # one fused launch of all of them (FusionModel)
    utilization: float  # sum(rate * per_row_s) of the rates routed here
    slo_s: float  # the tightest SLO here
    pressure: float


@dataclass
class PlacementPlan:
    """Which replicas host each tenant, and why: ``table()`` explains it."""

    name: str  # "planner", "round-robin", "random"
    hosts: dict[str, tuple[int, ...]]  # tenant -> replicas (more than one: its rate is split evenly)
    rows: list[ReplicaRow]
    memory_budget: int
    tenants: dict[str, TenantDesc]

    def rate_on(self, tenant: str) -> float:
        return self.tenants[tenant].rate / len(self.hosts[tenant])

    @property
    def max_pressure(self) -> float:
        return max((r.pressure for r in self.rows), default=0.0)

    @property
    def over_budget(self) -> int:
        return sum(r.memory_bytes > self.memory_budget for r in self.rows)

    def summary(self) -> dict:
        used = [r for r in self.rows if r.tenants]
        return {"placement": self.name, "replicas": len(self.rows), "used": len(used),
                "max_pressure": self.max_pressure,
                "archs_per_replica": sum(len(r.archs) for r in used) / max(len(used), 1),
                "fused_fixed_ms": sum(r.fixed_fused_s for r in used) * 1e3,
                "apart_fixed_ms": sum(r.fixed_apart_s for r in used) * 1e3,
                "over_budget": self.over_budget, "split_tenants": sum(len(h) > 1 for h in self.hosts.values())}

    def table(self, limit: int | None = None) -> str:
        """One line per replica: tenants, architectures, memory, fixed cost apart and fused,
        utilization, tightest SLO, pressure (<= 1 where every SLO is feasible)."""
        head = (f"{'replica':>7} {'tenants':>7} {'archs':>5} {'memory MB':>10} {'fixed apart ms':>14} "
                f"{'fused ms':>8} {'util':>5} {'slo ms':>7} {'pressure':>8}  architectures")
        lines = [f"placement {self.name}: {len(self.hosts)} tenants on {len(self.rows)} replicas, memory budget "
                 f"{self.memory_budget / 2**20:.1f} MB each", head]
        rows = self.rows if limit is None else self.rows[:limit]
        for r in rows:
            archs = ", ".join(r.archs) if len(r.archs) <= 4 else ", ".join(r.archs[:4]) + f", +{len(r.archs) - 4}"
            slo = "-" if math.isinf(r.slo_s) else f"{r.slo_s * 1e3:.1f}"
            mem = f"{r.memory_bytes / 2**20:.2f}" + ("!" if r.memory_bytes > self.memory_budget else "")
            lines.append(f"{r.index:>7} {len(r.tenants):>7} {len(r.archs):>5} {mem:>10} "
                         f"{r.fixed_apart_s * 1e3:>14.3f} {r.fixed_fused_s * 1e3:>8.3f} {r.utilization:>5.2f} "
                         f"{slo:>7} {r.pressure:>8.3f}  {archs}")
        if len(rows) < len(self.rows):
            lines.append(f"... {len(self.rows) - len(rows)} more replicas")
        s = self.summary()
        lines.append(f"fused fixed {s['fused_fixed_ms']:.3f} ms of {s['apart_fixed_ms']:.3f} ms apart; "
                     f"{s['archs_per_replica']:.2f} architectures per used replica; max pressure "
                     f"{s['max_pressure']:.3f}; {s['over_budget']} replicas over the memory budget")
        split = {t: h for t, h in self.hosts.items() if len(h) > 1}
        if split:
            lines.append("split over replicas: " + "; ".join(f"{t} -> {list(h)}" for t, h in sorted(split.items())))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"placement": self.name, "memory_budget": self.memory_budget,
                "hosts": {t: list(h) for t, h in self.hosts.items()},
                "replicas": [{**asdict(r), "tenants": list(r.tenants), "archs": list(r.archs),
                              "slo_s": None if math.isinf(r.slo_s) else r.slo_s} for r in self.rows]}


def build_plan(name: str, hosts: Mapping[str, Sequence[int]], tenants: Sequence[TenantDesc], replicas: int,
               memory_budget: int, fusion: FusionModel) -> PlacementPlan:
    """The plan (rows priced by ``fusion``) of any assignment: the planner's or a baseline's."""
    by_name = {d.name: d for d in tenants}
    on: list[list[TenantDesc]] = [[] for _ in range(replicas)]
    for t, hs in hosts.items():
        for h in hs:
            on[h].append(by_name[t])
    rows = []
    for i, ds in enumerate(on):
        ds.sort(key=lambda d: d.name)
        fused = fusion.fused_fixed(ds)
        util = sum(d.per_row_s * d.rate / len(hosts[d.name]) for d in ds)
        slo = min((d.slo_s for d in ds), default=math.inf)
        rows.append(ReplicaRow(i, tuple(d.name for d in ds), tuple(sorted({d.arch for d in ds})),
                               sum(d.param_bytes for d in ds), sum(d.fixed_s for d in ds), fused, util, slo,
                               pressure(fused, util, slo)))
    return PlacementPlan(name, {t: tuple(hs) for t, hs in hosts.items()}, rows, memory_budget, by_name)


# ----------------------------------------------------------------------------- the planner


def plan_placement(tenants, replicas: int, memory_bytes: int, *, rates: Mapping[str, float] | None = None,
                   slo_ms: Mapping[str, float] | None = None, device: str = "cuda",
                   example_inputs=None) -> PlacementPlan:
    """Assign tenants to ``replicas`` replicas of ``memory_bytes`` each (see the module docstring).

    ``tenants``: TenantDescs, or what ``describe`` takes (a FusedProgram, or {name: model}
    with ``example_inputs``). ``rates`` (requests/s) and ``slo_ms`` override the descriptions'
    per tenant. ``device``: the cost model's row ("cuda" or "cpu") for what fusing saves, and for
    latencies of tenants described here.
    Raises StfuseError where no placement keeps every tenant within memory and its SLO."""
    if isinstance(tenants, Sequence) and all(isinstance(d, TenantDesc) for d in tenants):
        descs = list(tenants)
    else:
        descs = describe(tenants, example_inputs, device=device)
    names = [d.name for d in descs]
    if len(set(names)) != len(names):
        raise StfuseError(f"tenant names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    _check_known(names, rates, "rates")
    _check_known(names, slo_ms, "slo_ms")
    descs = [replace(d, rate=float((rates or {}).get(d.name, d.rate)),
                     slo_s=(slo_ms or {}).get(d.name, d.slo_s * 1e3) / 1e3) for d in descs]
    if not descs:
        raise StfuseError("plan_placement: no tenants")
    if not isinstance(replicas, int) or replicas < 1:
        raise StfuseError(f"replicas must be a positive integer, got {replicas!r}")
    if memory_bytes <= 0:
        raise StfuseError(f"memory_bytes must be positive, got {memory_bytes}")
    for d in descs:
        if d.rate < 0:
            raise StfuseError(f"tenant {d.name!r}: rate must be >= 0, got {d.rate}")
        if d.param_bytes > memory_bytes:
            raise StfuseError(f"tenant {d.name!r} needs {d.param_bytes / 2**20:.2f} MB, more than the "
                              f"memory budget of {memory_bytes / 2**20:.2f} MB per replica")
        if not d.slo_s > 0:
            raise StfuseError(f"tenant {d.name!r}: SLO must be positive, got {d.slo_s * 1e3} ms")
        if 2 * d.solo_s(1) > d.slo_s:
            raise StfuseError(f"tenant {d.name!r}: SLO {d.slo_s * 1e3:.3f} ms is below twice its latency alone "
                              f"({2 * d.solo_s(1) * 1e3:.3f} ms at one row): infeasible on any replica")
    fusion = FusionModel(descs, device)
    shards = {d.name: replicas_needed(d, replicas) for d in descs}
    packer = _Packer(descs, shards, replicas, memory_bytes, fusion)
    hosts = packer.pack(1.0)
    if hosts is None:
        need = sum(d.param_bytes * shards[d.name] for d in descs)
        why = (f"their weights take {need / 2**20:.1f} MB against {replicas} x {memory_bytes / 2**20:.1f} MB"
               if need > replicas * memory_bytes else "memory or load leave some tenant without a replica")
        raise StfuseError(f"no placement of {len(descs)} tenants on {replicas} replicas keeps every SLO within "
                          f"memory: {why}; add replicas, memory, or relax SLOs")
    lo, hi = 0.0, 1.0
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        found = packer.pack(mid)
        if found is None:
            lo = mid
        else:
            hi, hosts = mid, found
    return build_plan("planner", hosts, descs, replicas, memory_bytes, fusion)


def replicas_needed(d: TenantDesc, replicas: int, strict: bool = True) -> int:
    """Replicas a tenant needs so that its share alone stays below SHARD_PRESSURE; more than
    ``replicas``: an error, or (``strict=False``) all of them."""
    k = 1
    while pressure(d.fixed_s, d.per_row_s * d.rate / k, d.slo_s) > SHARD_PRESSURE:
        k += 1
        if k > replicas:
            if not strict:
                return replicas
            raise StfuseError(f"tenant {d.name!r}: {d.rate:.1f} requests/s need more than {replicas} replicas "
                              f"to meet its SLO of {d.slo_s * 1e3:.3f} ms")
    return k


class _Packer:
    """Best-fit packing under a pressure cap, with the fixed cost of a replica estimated
    incrementally: a tenant joining its own architecture saves a launch per fusable op; one
    joining others saves what the best pair of its architecture with one of theirs does."""

    def __init__(self, descs, shards, replicas, memory, fusion: FusionModel):
        self.replicas, self.memory, self.fusion, self.shards = replicas, memory, fusion, shards
        load: dict[str, float] = {}
        for d in descs:
            load[d.arch] = load.get(d.arch, 0.0) + d.per_row_s * d.rate + d.fixed_s
        archs = sorted(load, key=lambda a: (-load[a], a))
        rank = {a: i for i, a in enumerate(archs)}
        self.items = sorted(descs, key=lambda d: (rank[d.arch], -d.per_row_s * d.rate, d.name))
        self.self_saving = {a: fusion.saving({a: 2}) for a in archs}
        self.pair_saving = {a: {b: fusion.saving({a: 1, b: 1}) for b in archs if b != a} for a in archs}

    def pack(self, cap: float) -> dict[str, list[int]] | None:
        n = self.replicas
        fixed, util, slo, mem = [0.0] * n, [0.0] * n, [math.inf] * n, [0] * n
        best: list[dict[str, float]] = [{} for _ in range(n)]  # arch -> saving if it joins replica i
        hosts: dict[str, list[int]] = {}
        for d in self.items:
            k = self.shards[d.name]
            hosts[d.name] = []
            for _ in range(k):
                choice, delta = None, math.inf
                empty_seen = False
                for i in range(n):
                    if i in hosts[d.name] or mem[i] + d.param_bytes > self.memory:
                        continue
                    if not best[i] and fixed[i] == 0.0:
                        if empty_seen:
                            continue  # empty replicas are all alike: the first stands for them
                        empty_seen = True
                    f = fixed[i] + d.fixed_s - best[i].get(d.arch, 0.0)
                    p = pressure(f, util[i] + d.per_row_s * d.rate / k, min(slo[i], d.slo_s))
                    if p > cap:
                        continue
                    dp = p - pressure(fixed[i], util[i], slo[i])
                    if dp < delta - 1e-12:
                        choice, delta = i, dp
                if choice is None:
                    return None
                i = choice
                fixed[i] += d.fixed_s - best[i].get(d.arch, 0.0)
                util[i] += d.per_row_s * d.rate / k
                slo[i], mem[i] = min(slo[i], d.slo_s), mem[i] + d.param_bytes
                if d.arch not in best[i] or best[i][d.arch] < self.self_saving[d.arch]:
                    best[i][d.arch] = self.self_saving[d.arch]
                    for b, s in self.pair_saving[d.arch].items():
                        if best[i].get(b, 0.0) < s:
                            best[i][b] = s
                hosts[d.name].append(i)
        return hosts
