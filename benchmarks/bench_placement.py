"""Placement at internet scale: the planner against round-robin and random, simulated.

    python benchmarks/bench_placement.py --markdown      # 1000 tenants, 20 architectures, 100 replicas
    python benchmarks/bench_placement.py --tenants 100 --replicas 10 --rate 20000

Twenty architectures (MLPs, CNNs, ResNets, GroupNorm CNNs and transformer encoders
of several sizes, stfuse/zoo.py) are traced once each and described by the
compiler's own passes (stfuse.serve.describe: match keys, launches, weights, and
latency alone from passes/cost.py's device row, --device, "cuda" by default).
--tenants tenants are spread evenly over them with Zipf(--exponent) request rates
summing to --rate requests/s in a random order, and SLOs of max(--slo-floor-ms,
--slo-factor x latency alone at one row) per architecture. The planner places
them on --replicas replicas of --memory-mb each, for the rates of each load
scale in --scales (times --rate), or refuses where no placement keeps every SLO
feasible; round-robin and random place the same tenants (a hot tenant split over
as many replicas as the planner would). Every placement then runs on the
runtime's fake clock (stfuse.serve.place_sim: space-time policy per replica,
Poisson arrivals). Throughput at SLO: the highest goodput among the scales where
at least 99% of requests finished within their SLO.

The numbers come from the cost model and the fake clock, not from timing this
machine, so they do not depend on its load; the cost model's "cuda" row is
itself a guess (passes/cost.py), so they rank placements, they do not predict
a GPU's throughput.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from stfuse import zoo
from stfuse.serve import describe, plan_placement
from stfuse.serve import place_sim
from stfuse.serve.placement import TenantDesc


def catalog() -> tuple[dict, dict]:
    """Twenty architectures ({name: model}, {name: example inputs}), small enough to trace in seconds."""
    torch.manual_seed(0)
    img = lambda c, s: (torch.randn(1, c, s, s),)  # noqa: E731
    seq = lambda s, d: (torch.randn(1, s, d),)  # noqa: E731
    rows = {
        "mlp-64x256": (zoo.mlp(64, 256, 10), (torch.randn(1, 64),)),
        "mlp-128x512": (zoo.mlp(128, 512, 10), (torch.randn(1, 128),)),
        "mlp-256x1024": (zoo.mlp(256, 1024, 100, depth=4), (torch.randn(1, 256),)),
        "mlp-512x2048": (zoo.mlp(512, 2048, 1000, depth=3), (torch.randn(1, 512),)),
        "mlp-1024x4096": (zoo.mlp(1024, 4096, 1000, depth=4), (torch.randn(1, 1024),)),
        "cnn-16": (zoo.cnn(16), img(3, 32)),
        "cnn-32": (zoo.cnn(32), img(3, 32)),
        "cnn-64": (zoo.cnn(64), img(3, 64)),
        "resnet-16x2": (zoo.resnet(16, 2), img(3, 32)),
        "resnet-32x2": (zoo.resnet(32, 2), img(3, 32)),
        "resnet-32x4": (zoo.resnet(32, 4), img(3, 32)),
        "resnet-64x4": (zoo.resnet(64, 4), img(3, 64)),
        "gn-cnn-32": (zoo.gn_cnn(32, 8, 1), img(3, 32)),
        "gn-cnn-64": (zoo.gn_cnn(64, 8, 2), img(3, 32)),
        "encoder-64x2": (zoo.Encoder(64, 4, 2, 128), seq(32, 64)),
        "encoder-128x2": (zoo.Encoder(128, 4, 2, 256), seq(64, 128)),
        "encoder-128x4": (zoo.Encoder(128, 4, 4, 512), seq(64, 128)),
        "encoder-256x4": (zoo.Encoder(256, 8, 4, 1024), seq(128, 256)),
        "encoder-384x6": (zoo.Encoder(384, 6, 6, 1536), seq(128, 384)),
        "encoder-512x8": (zoo.Encoder(512, 8, 8, 2048), seq(128, 512)),
    }
    return {n: m for n, (m, _) in rows.items()}, {n: x for n, (_, x) in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=100)
    ap.add_argument("--rate", type=float, default=200_000.0, help="total requests/s at scale 1")
    ap.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent of the rates")
    ap.add_argument("--memory-mb", type=float, default=512.0, help="weights per replica")
    ap.add_argument("--device", default="cuda", help="cost model row: cuda or cpu")
    ap.add_argument("--slo-factor", type=float, default=5.0)
    ap.add_argument("--slo-floor-ms", type=float, default=2.0)
    ap.add_argument("--scales", default="1,2,4,6,8")
    ap.add_argument("--duration", type=float, default=0.05, help="simulated seconds per point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas-shown", type=int, default=8, help="rows of the planner's table printed")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="write the outcomes here")
    ap.add_argument("--archs", help="read the architectures' descriptions from this JSON file instead of tracing")
    ap.add_argument("--save-archs", help="write the architectures' descriptions to this JSON file")
    args = ap.parse_args()

    start = time.perf_counter()
    if args.archs:
        with open(args.archs) as f:
            archs = [TenantDesc.from_json(d) for d in json.load(f)]
    else:
        models, inputs = catalog()
        archs = [replace(d, arch=d.name) for d in describe(models, inputs, device=args.device)]
    if args.save_archs:
        with open(args.save_archs, "w") as f:
            json.dump([d.to_json() for d in archs], f)
    archs = [replace(d, slo_s=max(args.slo_floor_ms / 1e3, args.slo_factor * d.solo_s(1))) for d in archs]
    described = time.perf_counter() - start
    print(f"{'architecture':<14} {'ops':>4} {'launches':>8} {'weights MB':>10} {'fixed us':>9} "
          f"{'per row us':>10} {'slo ms':>7}")
    for d in archs:
        print(f"{d.name:<14} {len(d.ops):>4} {d.launches:>8} {d.param_bytes / 2**20:>10.2f} {d.fixed_s * 1e6:>9.1f} "
              f"{d.per_row_s * 1e6:>10.2f} {d.slo_s * 1e3:>7.2f}")
    pop = place_sim.zipf_population(archs, args.tenants, args.rate, exponent=args.exponent, seed=args.seed)
    start = time.perf_counter()
    plan = plan_placement(pop, args.replicas, int(args.memory_mb * 2**20), device=args.device)
    planned = time.perf_counter() - start
    print()
    print(plan.table(limit=args.replicas_shown))
    scales = [float(s) for s in args.scales.split(",")]
    start = time.perf_counter()
    results = place_sim.compare(pop, args.replicas, int(args.memory_mb * 2**20), scales, device=args.device,
                                duration_s=args.duration, seed=args.seed)
    simulated = time.perf_counter() - start

    print(f"\n{args.tenants} tenants of {len(archs)} architectures on {args.replicas} replicas "
          f"({args.memory_mb:.0f} MB each), Zipf {args.exponent} rates, {args.rate:,.0f} requests/s at scale 1x, "
          f"device model {args.device!r}, {args.duration} s simulated per point; the planner plans for each "
          f"scale's rates, the baselines place the same tenants (hot ones split alike)")
    head = ["placement", "throughput at SLO (rps)"] + [f"attain @{s:g}x" for s in scales] + \
        [f"archs/replica @{scales[0]:g}x", f"max pressure @{scales[0]:g}x", f"over memory @{scales[0]:g}x"]
    lines = []
    for name, entries in results.items():
        first = next((p for _, p, _ in entries if p is not None), None)
        summary = first.summary() if first is not None else None
        lines.append([name, f"{place_sim.throughput_at_slo([o for _, _, o in entries]):,.0f}"]
                     + [f"{o.attainment:.4f}" if o is not None else "no plan" for _, _, o in entries]
                     + ([f"{summary['archs_per_replica']:.2f}", f"{summary['max_pressure']:.2f}",
                         str(summary["over_budget"])] if summary else ["-"] * 3))
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in lines:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for row in lines:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    sent = sum(o.sent for entries in results.values() for _, _, o in entries if o is not None)
    print(f"\n(described in {described:.1f} s, planned in {planned:.1f} s, simulated {sent:,} requests in "
          f"{simulated:.1f} s; wall times on a shared machine, noisy)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plan": plan.to_json(),
                       "outcomes": {k: [{"scale": s, **(o.__dict__ if o else {})} for s, _, o in v]
                                    for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
