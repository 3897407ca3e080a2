"""The pass pipeline: one list, one line per pass, run in order by ``run``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from stfuse import config, ir
from stfuse.errors import PassError, StfuseError

from .annotate import annotate
from .cost import drop_unprofitable
from .fold_epilogues import fold_epilogues
from .horizontal import group_siblings
from .lower import lower
from .match import match_groups
from .normalize import normalize
from .schedule import schedule
from .program_check import check_program

PASSES = [
    normalize,          # canonical forms: addmm/mm/matmul -> linear, fold eval BN, drop eval dropout
    annotate,           # shapes (and their batch dependence), dtypes, op classes, FLOPs, bytes
    match_groups,       # align tenants' fusable ops into cross-tenant groups (acyclic, deterministic)
    drop_unprofitable,  # keep groups whose one launch beats their members apart (timed, or the cost model)
    group_siblings,     # a tenant's ungrouped independent same-class ops (QKV, branches, experts), where they pay
    fold_epilogues,     # fold bias / activation / residual / scale successors into each group
    schedule,           # one topological order of groups and unfused calls
    lower,              # pack weights; emit the fx program calling stfuse:: custom ops
    check_program,      # tune="measure": time the program against the tenants apart; keep the faster
]


def passes_without_fusing(tenants) -> list:
    """PASSES with ``tenants`` taken out of every group before epilogues are folded
    (stfuse/selfcheck.py: what could not be shown correct runs unfused)."""
    from .ungroup import ungroup

    i = PASSES.index(fold_epilogues)
    return PASSES[:i] + [ungroup(tenants)] + PASSES[i:]


@dataclass(frozen=True)
class PassRecord:
    name: str
    ms: float
    nodes: int
    groups: int


def run(g, passes=None, verify: bool = False):
    """Run the passes over g; returns (final graph, [PassRecord]).

    ``verify`` runs ir.verify after every pass (the tests do). STFUSE_DEBUG=1 prints
    each pass and dumps its graph to STFUSE_DUMP_DIR.
    """
    history: list[PassRecord] = []
    for p in PASSES if passes is None else passes:
        name = p.__name__
        start = time.perf_counter()
        try:
            g = p(g)
            if verify:
                ir.verify(g)
        except StfuseError as err:
            raise PassError(f"pass {name} failed after {[r.name for r in history]}: {err}") from err
        except Exception as err:  # noqa: BLE001 - re-raised with the pass named
            raise PassError(f"pass {name} failed after {[r.name for r in history]}: "
                            f"{type(err).__name__}: {err}") from err
        rec = PassRecord(name, (time.perf_counter() - start) * 1e3, g.number_of_nodes(),
                         len(g.graph.get("groups", {})))
        history.append(rec)
        if config.debug():
            _dump(g, rec, len(history))
    return g, history


def _dump(g, rec: PassRecord, i: int) -> None:
    print(f"[stfuse] pass {rec.name}: {rec.ms:.1f} ms, {rec.nodes} nodes, {rec.groups} groups")
    out = config.dump_dir()
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} {a['kind']} {a['target']} {a['args']} class={a['op_class']} shape={a['shape']} "
             f"group={a['group']}" for k, a in g.nodes(data=True)]
    lines += [repr(grp) for grp in g.graph.get("groups", {}).values()]
    (out / f"{i:02d}_{rec.name}.txt").write_text("\n".join(lines) + "\n")
