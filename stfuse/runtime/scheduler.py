"""The scheduler's interface, and what every policy decides the same way.

What a policy reads of a queued request (`Pending`), what it answers (`Dispatch`,
`Wait`), the queue arithmetic the policies share, and the base class `Scheduler`:
admission, shedding, fair-share charging and the urgency order (see policies.py for
the policies themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

from stfuse.errors import StfuseError

from .profile import LatencyProfile
from .shares import Shares

_EPS = 1e-9  # seconds: deadline comparisons tolerate float rounding of this much


class Pending(Protocol):
    """What a policy reads from a queued request (the runtime's and the simulator's both have it)."""

    arrival: float
    deadline: float
    rows: int  # size of the request's batch dimension


@dataclass(frozen=True)
class Dispatch:
    """Run the first `take[t]` queued requests of each tenant t.

    mode "fused": one call of the fused program over all tenants in `take`
    (one tenant means an ordinary single-tenant call); mode "concurrent": one
    call per tenant, all at the same time (threads on CPU, streams on GPU).
    With `pad_to`, every member's rows are padded (repeating its last row) to
    that many before the fused call, and the padding is dropped from the outputs.
    """

    take: Mapping[str, int]
    mode: str = "fused"
    pad_to: int | None = None


@dataclass(frozen=True)
class Wait:
    """Nothing to launch before `until`, unless a request of a tenant in `wake` arrives first
    (None: of any tenant), or one that leaves its tenant a whole batch (max_batch rows) queued.

    `wake` spares the runtime's worker the arrivals that cannot change the decision: woken
    by every one, at 1x load in bench_runtime (4 x mlp-small, 2-core CPU) "batch" decided
    four times per launch, 0.4 s of the worker's CPU in 2 s spent deciding to wait again.
    """

    until: float
    wake: frozenset | None = None


def woken(wake: frozenset | None, tenant: str, queue: Sequence[Pending], max_batch: int) -> bool:
    """Whether an arrival of `tenant` (now last in `queue`) ends a Wait whose `wake` this is:
    what Runtime.submit notifies the worker for, and what simulate checks against."""
    return wake is None or tenant in wake or _holds_rows(queue, 0, max_batch)


# --------------------------------------------------------------------------- policies


def _prefix(queue: Sequence[Pending], max_rows: int) -> list[int]:
    """Cumulative rows of the head requests that fit in max_rows rows (always at least one request)."""
    out: list[int] = []
    total = 0
    for r in queue:
        if out and total + r.rows > max_rows:
            break
        total += r.rows
        out.append(total)
    return out


def _holds_rows(queue: Sequence[Pending], start: int, rows: int) -> bool:
    """Whether queue[start:] holds at least `rows` rows (every request has at least one)."""
    n = len(queue)
    return n - start >= rows or sum([queue[i].rows for i in range(start, n)]) >= rows


def _full(queue: Sequence[Pending], prefix: list[int], max_rows: int) -> bool:
    """Whether the queue already holds a whole batch."""
    return prefix[-1] >= max_rows or len(prefix) < len(queue)


class Scheduler:
    """Base class. Subclasses implement `decide`; `tenants` fixes the round-robin and tie order.

    weights / rate_limits: see shares.Shares. shed: whether `expired` sheds
    requests (None: the policy's SHED default).
    """

    name = "base"
    SHED = False

    def __init__(self, tenants: Sequence[str], *, slice_s: float = 0.002, max_batch: int = 32,
                 profile: LatencyProfile | None = None, slo_s: Mapping[str, float] | None = None,
                 weights: Mapping[str, float] | None = None,
                 rate_limits: Mapping[str, float | tuple[float, float]] | None = None, shed: bool | None = None):
        if not tenants:
            raise StfuseError("scheduler: no tenants")
        if max_batch < 1:
            raise StfuseError(f"scheduler: max_batch must be >= 1, got {max_batch}")
        if slice_s < 0:
            raise StfuseError(f"scheduler: slice must be >= 0, got {slice_s}")
        self.tenants = list(tenants)
        self.slice_s = slice_s
        self.max_batch = max_batch
        self.profile = profile if profile is not None else LatencyProfile({}, {})
        self.slo_s = dict(slo_s or {})
        self._order = {t: i for i, t in enumerate(self.tenants)}
        self.shares = Shares(self.tenants, weights, rate_limits, quantum_s=slice_s)
        if shed is not None and not isinstance(shed, bool):
            raise StfuseError(f"scheduler: shed must be True, False or None, got {shed!r}")
        self.shed = self.SHED if shed is None else shed

    def admit(self, tenant: str, now: float) -> str | None:
        """A request of `tenant` arrives at `now`: None to queue it, else why it is refused."""
        return self.shares.admit(tenant, now)

    def expired(self, queues: Mapping[str, Sequence[Pending]], now: float) -> dict[str, int]:
        """{tenant: k}: shed the first k queued requests, which can no longer meet their deadline.

        A request is shed when, launched now, it would finish after its
        deadline: launched alone, or, while its tenant is overloaded (a whole
        batch, max_batch rows, queued from it on), in the launch the policy
        gives an overloaded tenant (`_full_launch`). Without that second rule
        an overloaded tenant's oldest requests, each still just in time alone,
        fill every full launch and all finish late: in the simulated 2x
        overload of tests/test_policies.py, 2% of requests made their SLO
        instead of half. Only for a tenant whose SLO an idle device meets
        (slo_s >= its one-row latency alone): a tenant that misses its SLO even
        alone, or has none, keeps being served late. Requests of a tenant are
        in arrival order with one SLO, so the expired ones are a prefix.
        """
        out: dict[str, int] = {}
        if not self.shed:
            return out
        for t, queue in queues.items():
            slo = self.slo_s.get(t)
            if not queue or slo is None or self.profile.estimate({t: 1}) > slo:
                continue
            full = None
            k = 0
            for r in queue:
                if _holds_rows(queue, k, self.max_batch):
                    full = self._full_launch(queues, t) if full is None else full
                    cost = max(full, self.profile.estimate({t: r.rows}))
                else:
                    cost = self.profile.estimate({t: r.rows})
                if now + cost <= r.deadline + _EPS:
                    break
                k += 1
            if k:
                out[t] = k
        return out

    def _full_launch(self, queues: Mapping[str, Sequence[Pending]], t: str) -> float:
        """Seconds of the launch an overloaded tenant t gets: its own whole batch (space-time fuses
        others into it only while that keeps its head on time)."""
        return self.profile.estimate({t: self.max_batch})

    def charge(self, rows: Mapping[str, int], seconds: float) -> None:
        """One launch ran for `seconds` (measured, or simulated) with `rows[t]` rows of each tenant."""
        self.shares.charge(rows, seconds, self.profile.solo)

    def decide(self, queues: Mapping[str, Sequence[Pending]], now: float,
               flush: bool = False) -> Dispatch | Wait | None:
        """The next decision. `flush` (set while closing) forbids waiting."""
        raise NotImplementedError

    def _by_urgency(self, queues: Mapping[str, Sequence[Pending]], tenants: Iterable[str],
                    now: float) -> list[str]:
        """Tenants within their fair share before those over it; inside each, earliest deadline
        first over the tenants' oldest requests, late ones after on-time ones.

        A head is late when even alone it cannot finish by its deadline. Ranking
        late heads last is what keeps a light tenant on time beside an
        overloaded one (whose backlog is all late); plain EDF would serve the
        backlog first and make both miss. Late heads still run whenever no
        on-time work is waiting, and in space-time they join fused launches.
        The share comes first because deadlines alone do not isolate: a flood
        whose backlog is still on time has earlier deadlines than a quiet
        tenant's new request, and EDF would serve the whole backlog first.
        """
        self.shares.refresh(self._busy(queues))

        def key(t):
            head = queues[t][0]
            late = now + self.profile.estimate({t: head.rows}) > head.deadline
            return (self.shares.over(t), late, head.deadline, head.arrival, self._order[t])

        return sorted(tenants, key=key)

    def _busy(self, queues: Mapping[str, Sequence[Pending]]) -> list[str]:
        return [t for t in self.tenants if queues.get(t)]
