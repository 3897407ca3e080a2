"""The noisy neighbour: quiet tenants' latency and SLO misses while one tenant floods, per policy.

    python benchmarks/bench_isolation.py --simulate --profile benchmarks/profiles/mlp-small-x4.json
    python benchmarks/bench_isolation.py                # real runs: about 2 minutes on 2 CPU cores
    python benchmarks/bench_isolation.py --plot benchmarks/out/isolation.png --markdown

Issue 18's experiment. N tenants (default 4 x mlp-small, 64-256-256-10): the
first N-1 are quiet, each offering --quiet-load (default 3%) of the capacity
unit in Poisson arrivals; the last floods at each of --floods (default 2, 6
and 20) times the quiet tenants' combined rate, and not at all for the
"no flood" baseline. Every policy gets the same arrivals. Per policy and flood
it prints the quiet tenants' p50 / p99 latency over the requests served and
their SLO-miss rate (late, shed, refused at submit or failed, over offered), and
the flooding tenant's offered and served requests/s: isolation means the quiet
columns do not move when the flood grows, while the flood still gets the
capacity they leave. Latencies are taken for the quiet tenants only (the
flood's would cost a done-callback per request in this process, under the
GIL the worker needs: at the 20x flood that bookkeeping alone took quiet
misses from 0 to about 2%); the flood's served rate comes from the runtime.

The capacity unit and everything about real runs (one torch thread, the GIL
switch interval, open-loop submission from one thread, the "others' CPU"
column) are bench_runtime.py's, whose helpers this script uses; --simulate
replays the arrivals on a fake clock with a latency profile as the device,
where the unit is what per-tenant batching sustains.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_runtime import (MODELS, batch_capacity, build, capacity, device_profile, emit, pyplot, render, replay,
                           save_figure, schedule, serve, warm)
from stfuse.runtime import measure_profile
from stfuse.runtime.policies import POLICIES
from stfuse.runtime.stats import percentile


def arrivals(tenants, flood: float, args) -> list[tuple[float, str]]:
    """Quiet tenants at --quiet-load of the unit each; the last tenant at `flood` x their sum."""
    quiet, noisy = tenants[:-1], tenants[-1]
    rate = args.quiet_load * args.capacity
    out = schedule(quiet, rate, args.duration, args.seed)
    if flood:
        out += schedule([noisy], flood * rate * len(quiet), args.duration, args.seed + 1)
    return sorted(out)


def summarise(policy: str, flood: float, tenants, offered, latencies, missed, served, others, args) -> dict:
    """One row: `latencies` {tenant: [s]}, `missed` and `served` {tenant: count}, `offered` the arrivals."""
    quiet, noisy = tenants[:-1], tenants[-1]
    lat = sorted(x for t in quiet for x in latencies[t])
    n_quiet = sum(t != noisy for _, t in offered)
    return {
        "policy": policy, "flood": flood,
        "quiet_p50_ms": percentile(lat, 50) * 1e3 if lat else None,
        "quiet_p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        "quiet_miss": sum(missed[t] for t in quiet) / n_quiet if n_quiet else 0.0,
        "flood_offered_rps": sum(t == noisy for _, t in offered) / args.duration,
        "flood_served_rps": served[noisy] / args.duration,
        "others_load": others,
    }


def simulated_point(profile, tenants, policy: str, flood: float, args) -> dict:
    offered = arrivals(tenants, flood, args)
    res = replay(profile, tenants, policy, offered, args)
    slo = args.slo_ms / 1e3
    latencies = {t: [r.finish - r.arrival for r in res.requests if r.tenant == t and r.finish is not None]
                 for t in tenants}
    missed = {t: sum(x > slo for x in latencies[t]) + sum(r.tenant == t and (r.shed or r.rejected)
                                                            for r in res.requests) for t in tenants}
    return summarise(policy, flood, tenants, offered, latencies, missed, {t: len(latencies[t]) for t in tenants},
                     None, args)


def real_point(fused, examples, shape, profile, policy: str, flood: float, args) -> dict:
    tenants = list(examples)
    offered = arrivals(tenants, flood, args)
    # latencies of the quiet tenants only: a callback per flood request (20x: 35k/s) would spend
    # the GIL the worker needs on the benchmark's own bookkeeping
    run = serve(fused, examples, shape, profile, policy, offered, args, watch=tenants[:-1])
    per = run["stats"]["tenants"]
    missed = {t: per[t]["slo_misses"] + per[t]["shed"] + per[t]["failed"] + per[t]["cancelled"]
              + run["rejected"][t] for t in tenants}
    return summarise(policy, flood, tenants, offered, run["latencies"], missed,
                     {t: per[t]["served"] for t in tenants}, run["others_load"], args)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], markdown: bool) -> str:
    head = ["policy", "flood", "quiet p50 ms", "quiet p99 ms", "quiet SLO miss", "flood offered/s",
            "flood served/s", "others' CPU"]
    body = [[r["policy"], f"{r['flood']:g}x" if r["flood"] else "none", fmt(r["quiet_p50_ms"], ".2f"),
             fmt(r["quiet_p99_ms"], ".2f"), f"{r['quiet_miss']:.1%}", f"{r['flood_offered_rps']:.0f}",
             f"{r['flood_served_rps']:.0f}", fmt(r["others_load"], ".2f")] for r in rows]
    return render(head, body, markdown)


def plot(rows: list[dict], path: str, title: str) -> None:
    if (plt := pyplot(path)) is None:
        return
    fig, (lat_ax, miss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for p in POLICIES:
        mine = [r for r in rows if r["policy"] == p]
        xs = [r["flood"] for r in mine]
        lat_ax.plot(xs, [r["quiet_p99_ms"] for r in mine], marker="o", label=p)
        miss_ax.plot(xs, [100 * r["quiet_miss"] for r in mine], marker="o", label=p)
    lat_ax.set(xlabel="flood (x the quiet tenants' combined rate)", ylabel="quiet p99 (ms)", yscale="log",
               title="quiet tenants' p99 latency")
    miss_ax.set(xlabel="flood (x the quiet tenants' combined rate)", ylabel="quiet SLO miss (%)",
                title="quiet tenants' SLO misses")
    save_figure(fig, (lat_ax, miss_ax), path, title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", type=int, default=4, help="the last one floods")
    ap.add_argument("--model", choices=list(MODELS), default="mlp-small")
    ap.add_argument("--floods", default="2,6,20", help="flood rates, multiples of the quiet tenants' combined rate")
    ap.add_argument("--quiet-load", type=float, default=0.03, help="each quiet tenant's rate, x the capacity unit")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per point")
    ap.add_argument("--slo-ms", type=float, default=25.0)
    ap.add_argument("--slice-ms", type=float, default=2.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--switch-interval-ms", type=float, default=0.5, help="sys.setswitchinterval (see bench_runtime)")
    ap.add_argument("--gc", choices=("freeze", "leave"), default="freeze", help="Runtime(freeze_gc=...), see bench_runtime")
    ap.add_argument("--quick", action="store_true", help="real runs: fewer repetitions in the capacity measurement")
    ap.add_argument("--simulate", action="store_true", help="replay on a fake clock against a latency profile")
    ap.add_argument("--profile", default=None, help="--simulate: the device's latency profile (JSON)")
    ap.add_argument("--save-profile", default=None, help="write the measured latency profile as JSON")
    ap.add_argument("--plot", default=None, help="PNG path: quiet p99 and SLO misses against the flood")
    ap.add_argument("--json", default=None, help="where to write the raw rows")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = ap.parse_args(argv)
    args.duration = args.duration or (1.0 if args.simulate else 4.0)
    floods = [0.0] + [float(x) for x in args.floods.split(",")]
    torch.set_num_threads(args.threads)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)

    if args.simulate:
        profile, tenants = device_profile(args, args.model, args.tenants)
        args.capacity = batch_capacity(profile, tenants, args.max_batch)
        title = (f"simulated: {len(tenants)} tenants ({tenants[-1]} floods), slo {args.slo_ms:g} ms, slice "
                 f"{args.slice_ms:g} ms, max_batch {args.max_batch}, device profile {args.profile or 'measured'}; "
                 f"quiet tenants at {args.quiet_load:.0%} of {args.capacity:.0f} requests/s (batch, saturated)")
        rows = [simulated_point(profile, tenants, p, f, args) for p in POLICIES for f in floods]
    else:
        fused, _, examples, shape = build(args.model, args.tenants, args.seed)
        warm(fused, examples)
        profile = measure_profile(fused, examples, args.max_batch, reps=5)
        args.capacity = capacity(fused, examples, profile, args)
        title = (f"{args.tenants} x {args.model} ({list(examples)[-1]} floods), slo {args.slo_ms:g} ms, slice "
                 f"{args.slice_ms:g} ms, max_batch {args.max_batch}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads; quiet tenants at {args.quiet_load:.0%} of "
                 f"{args.capacity:.0f} requests/s (time, saturated); {args.duration:g} s per point")
        print(title, flush=True)
        rows = []
        for p in POLICIES:
            for f in floods:
                rows.append(real_point(fused, examples, shape, profile, p, f, args))
                print(table(rows[-1:], False).splitlines()[-1], flush=True)
    print()
    print(title)
    print(table(rows, False))
    emit(rows, args, title, table, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
