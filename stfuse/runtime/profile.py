"""The latency model the policies plan with: a fit of each tenant's launch time and of
fused groups, measured at start-up (``measure_profile`` in batching.py) and corrected
by what launches really take (``observe``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from stfuse.errors import StfuseError

_ANY = frozenset()  # LatencyProfile.correction key of the scale common to every tenant set
_MAX_STEP = math.log(4.0)  # an observation moves a correction by at most 4 ** weight
_TABLES = ("fixed", "per_row", "fused_fixed", "uneven_fixed")  # the measurement: read-only


def _seconds(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise StfuseError(f"LatencyProfile: {what} must be a finite number >= 0, got {value!r}")


def _groups(table: Mapping[frozenset, float]) -> list:
    return [[sorted(g), v] for g, v in sorted(table.items(), key=lambda kv: sorted(kv[0]))]


@dataclass
class LatencyProfile:
    """Latency model of the fused program, per group of tenants and batch sizes.

    A tenant alone with b rows costs `fixed[t] + per_row[t] * b`. A fused group
    S with equal batch sizes costs `group_fixed(S) + sum(per_row[t] * b_t)`:
    fusion shares the fixed part (dispatch and launch overhead) and adds up the
    per-row work. With unequal batch sizes the program may lose its fast path
    (on CPU stfuse stacks equal-size members into one bmm and loops over
    unequal ones): that costs `uneven_cost(S)` more, unless the smaller batches
    are padded up to the largest (padding rows cost per_row like real ones).
    `estimate` is the cheaper of the two and `pad_to` says which it was.

    `fused_fixed` and `uneven_fixed` hold measured groups; a group never
    measured is scaled from the largest measured one: with r = fused_fixed /
    (sum of its members' fixed), a k-tenant group gets a ratio interpolated
    linearly between 1 (k = 1) and r (k = the measured group's size), and its
    uneven cost is its group_fixed times the measured group's uneven/fused ratio.
    The estimate never falls when a member's rows grow, which lets the
    space-time scheduler size batches by bisection.

    `observe` corrects the model by what launches really take, in two
    multiplicative parts: a scale common to every tenant set (``correction[
    frozenset()]``), which follows each launch quickly (weight 0.2), and a
    residual per tenant set, which moves slowly (weight / RESIDUAL_SLOWER),
    for what the model gets wrong about that set. Both move in log space with
    a clipped step: a profile that is off by 1000x converges within a few
    dozen launches, while one 50 ms hiccup moves it by at most 32%. Why two
    parts: a machine that gets busier slows every set alike, and one
    correction per set, each following its own last few launches, had set
    costs disagreeing by 3x on a loaded 2-core CPU (1.45-4.48x over the model
    across the subsets of 4 MLP tenants), which decided what got fused.
    `concurrent_ratio` only matters to `simulate`: a concurrent (space) launch
    takes `concurrent_ratio * sum(solo costs)`, 1.0 meaning no overlap at all.

    The four tables are the measurement and are read-only once the profile is
    made (build a new profile to change them): a tenant set's fixed and uneven
    costs are worked out once and kept (`_terms`). A space-time decision asks
    for some 25-45 estimates; worked out on every call they took 150 us of the
    runtime worker's CPU per launch at 2x load, more than the launch's own
    Python (bench_runtime's 4 x mlp-small).
    """

    fixed: dict[str, float]
    per_row: dict[str, float]
    fused_fixed: dict[frozenset, float] = field(default_factory=dict)
    uneven_fixed: dict[frozenset, float] = field(default_factory=dict)
    concurrent_ratio: float = 1.0
    default_fixed: float = 1e-3
    default_per_row: float = 1e-4
    correction: dict[frozenset, float] = field(default_factory=dict)
    _terms: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    RESIDUAL_SLOWER = 8  # a set's residual moves this many times more slowly than the common scale

    def __post_init__(self):
        for name in _TABLES:
            table = getattr(self, name)
            if not isinstance(table, Mapping):
                raise StfuseError(f"LatencyProfile: {name} must be a mapping, got {type(table).__name__}")
            for key, value in table.items():
                groups = name in ("fused_fixed", "uneven_fixed")
                if (groups and not isinstance(key, frozenset)) or (not groups and not isinstance(key, str)):
                    raise StfuseError(f"LatencyProfile: {name} keys are {'frozensets of ' if groups else ''}"
                                      f"tenant names, got {key!r}")
                _seconds(f"{name}[{key!r}]", value)
            setattr(self, name, MappingProxyType(dict(table)))
        for name in ("concurrent_ratio", "default_fixed", "default_per_row"):
            _seconds(name, getattr(self, name))

    def __reduce__(self):  # copy and pickle as plain dicts (a mappingproxy does neither)
        return type(self), (*(dict(getattr(self, n)) for n in _TABLES), self.concurrent_ratio,
                            self.default_fixed, self.default_per_row, dict(self.correction))

    def to_json(self) -> dict:
        """The model as plain JSON (groups as sorted name lists); corrections are not kept."""
        return {"fixed": dict(self.fixed), "per_row": dict(self.per_row), "fused_fixed": _groups(self.fused_fixed),
                "uneven_fixed": _groups(self.uneven_fixed), "concurrent_ratio": self.concurrent_ratio}

    @classmethod
    def from_json(cls, data: Mapping) -> "LatencyProfile":
        return cls(dict(data["fixed"]), dict(data["per_row"]),
                   {frozenset(g): v for g, v in data.get("fused_fixed", [])},
                   {frozenset(g): v for g, v in data.get("uneven_fixed", [])},
                   concurrent_ratio=data.get("concurrent_ratio", 1.0))

    def solo(self, tenant: str, rows: int) -> float:
        return self._fixed(tenant) + self._per_row(tenant) * rows

    def estimate(self, rows: Mapping[str, int]) -> float:
        """Seconds for one fused launch with `rows[t]` rows of each tenant t."""
        if not rows:
            return 0.0
        key = frozenset(rows)
        return self._model(rows, key)[0] * self.correction.get(_ANY, 1.0) * self.correction.get(key, 1.0)

    def pad_to(self, rows: Mapping[str, int]) -> int | None:
        """The batch size to pad every member to, where that beats running unequal sizes; else None."""
        return self._model(rows, frozenset(rows))[1] if rows else None

    def estimate_concurrent(self, rows: Mapping[str, int]) -> float:
        return self.concurrent_ratio * sum(self.estimate({t: b}) for t, b in rows.items())

    def group_fixed(self, tenants: frozenset) -> float:
        if len(tenants) > 1 and tenants in self.fused_fixed:
            return self.fused_fixed[tenants]
        base = sum([self._fixed(t) for t in tenants])
        if len(tenants) <= 1:
            return base
        ref = self._reference(self.fused_fixed)
        if ref is None:
            return base
        ratio = self.fused_fixed[ref] / max(sum(self._fixed(t) for t in ref), 1e-12)
        frac = min(1.0, (len(tenants) - 1) / (len(ref) - 1))
        return base * (1.0 + (ratio - 1.0) * frac)

    def uneven_cost(self, tenants: frozenset) -> float:
        """Extra seconds when the members' batch sizes differ and are not padded."""
        if len(tenants) <= 1:
            return 0.0
        if tenants in self.uneven_fixed:
            return self.uneven_fixed[tenants]
        ref = self._reference(self.uneven_fixed)
        if ref is None:
            return 0.0
        return self.group_fixed(tenants) * self.uneven_fixed[ref] / max(self.group_fixed(ref), 1e-12)

    def observe(self, rows: Mapping[str, int], seconds: float, weight: float = 0.2) -> None:
        """Fold one measured launch into the common scale and, more slowly, its set's residual."""
        if not rows or seconds <= 0:
            return
        key = frozenset(rows)
        model = self._model(rows, key)[0]
        if model <= 0:
            return
        shared, own = self.correction.get(_ANY, 1.0), self.correction.get(key, 1.0)
        step = max(-_MAX_STEP, min(_MAX_STEP, math.log(seconds / (model * shared * own))))
        self.correction[_ANY] = shared * math.exp(weight * step)
        self.correction[key] = own * math.exp(weight / self.RESIDUAL_SLOWER * step)

    def _model(self, rows: Mapping[str, int], key: frozenset) -> tuple[float, int | None]:
        """Uncorrected seconds and pad_to: unequal sizes padded or not, whichever is cheaper."""
        if len(rows) == 1:  # a tenant alone, most of a decision's estimates: no group work
            (t, b), = rows.items()
            return self._fixed(t) + self._per_row(t) * b, None
        terms = self._terms.get(key)
        if terms is None:
            terms = self._terms[key] = (self.group_fixed(key), self.uneven_cost(key))
        fixed, uneven = terms
        work = 0.0
        most = least = None
        for t, b in rows.items():
            work += self._per_row(t) * b
            most = b if most is None or b > most else most
            least = b if least is None or b < least else least
        if least == most:
            return fixed + work, None
        padded = fixed + sum([self._per_row(t) for t in rows]) * most
        return (padded, most) if padded < fixed + uneven + work else (fixed + uneven + work, None)

    @staticmethod
    def _reference(table: Mapping[frozenset, float]) -> frozenset | None:
        """The largest measured multi-tenant group (ties: the first by sorted names), or None."""
        groups = [g for g in table if len(g) > 1]
        return max(groups, key=lambda g: (len(g), sorted(g))) if groups else None

    def _fixed(self, tenant: str) -> float:
        return self.fixed.get(tenant, self.default_fixed)

    def _per_row(self, tenant: str) -> float:
        return self.per_row.get(tenant, self.default_per_row)
