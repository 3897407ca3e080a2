"""``stfuse place``: the command line of the placement planner (placement.py; docs/serve.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from stfuse.errors import StfuseError
from stfuse.serve.command import named_numbers


def add_arguments(sub, count) -> None:
    """The ``place`` subcommand on ``sub`` (``count``: the CLI's bounded-int type)."""
    place = sub.add_parser("place", help="plan which replicas host which tenants",
                           description="Assign tenants to replicas so that tenants that fuse well share one, "
                           "load and memory are balanced and every SLO is feasible (stfuse.serve.plan_placement; "
                           "docs/serve.md). TENANTS are [NAME=]MODULE:FACTORY as for compile, or JSON files of "
                           "tenant descriptions (a list of stfuse.serve.TenantDesc.to_json()).")
    place.add_argument("tenants", nargs="+", metavar="TENANTS")
    place.add_argument("--replicas", type=count(1, 10**6), required=True, help="number of replicas")
    place.add_argument("--memory-mb", type=float, required=True, help="weights memory per replica, MB")
    place.add_argument("--rate", action="append", default=[], metavar="[NAME=]RPS",
                       help="expected requests/s: of one tenant, or of every tenant without its own (repeatable)")
    place.add_argument("--slo-ms", action="append", default=[], metavar="[NAME=]MS",
                       help="latency SLO: of one tenant, or of every tenant without its own (repeatable)")
    place.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="the cost model's device row for latencies and fusion savings (default cuda)")
    place.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    place.add_argument("--save-descriptions", type=Path, metavar="FILE",
                       help="write the tenants' descriptions as JSON (to plan again without tracing)")
    place.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _per_tenant(values: list[str], what: str) -> tuple[float | None, dict[str, float]]:
    """(default, {name: value}) from ``[NAME=]NUMBER`` options (a rate may be 0)."""
    default, named = None, {}
    for name, x in named_numbers(values, what, zero_ok=what == "--rate"):
        if name:
            named[name] = x
        else:
            default = x
    return default, named


def place(args, say, load_factories) -> int:
    """Run ``stfuse place``: ``say`` prints progress, ``load_factories`` is the CLI's
    (``[NAME=]MODULE:FACTORY`` -> models and example inputs)."""
    from . import TenantDesc, describe, plan_placement

    descs, factories = [], []
    for spec in args.tenants:
        if spec.endswith(".json"):
            try:
                data = json.loads(Path(spec).read_text())
            except json.JSONDecodeError as err:
                raise StfuseError(f"{spec}: not JSON: {err}") from None
            if not isinstance(data, list):
                raise StfuseError(f"{spec}: expected a list of tenant descriptions")
            descs += [TenantDesc.from_json(d) for d in data]
        elif Path(spec).is_dir():
            raise StfuseError(f"{spec}: an artifact keeps no per-op graph to place by; pass the factories it was "
                              f"compiled from, or tenant descriptions (--save-descriptions)")
        else:
            factories.append(spec)
    if factories:
        say(f"tracing {len(factories)} factor{'y' if len(factories) == 1 else 'ies'}")
        models, inputs = load_factories(factories)
        descs += describe(models, inputs, device=args.device)
    rate, rates = _per_tenant(args.rate, "--rate")
    slo, slos = _per_tenant(args.slo_ms, "--slo-ms")
    descs = [replace(d, rate=d.rate if rate is None else rate,
                     slo_s=d.slo_s if slo is None else slo / 1e3) for d in descs]
    if args.save_descriptions:
        args.save_descriptions.write_text(json.dumps([d.to_json() for d in descs], indent=1))
    say(f"placing {len(descs)} tenants on {args.replicas} replicas")
    plan = plan_placement(descs, args.replicas, int(args.memory_mb * 2**20), rates=rates, slo_ms=slos,
                          device=args.device)
    print(plan.table())
    if args.json:
        args.json.write_text(json.dumps(plan.to_json(), indent=1))
        print(f"wrote {args.json}")
    return 0
