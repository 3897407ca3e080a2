"""Runtime policies side by side under open-loop Poisson load.

    python benchmarks/bench_runtime.py --quick          # about a minute on 2 CPU cores
    python benchmarks/bench_runtime.py --plot benchmarks/out/runtime_latency.png --markdown

N tenants (default: 4 same-architecture MLPs, the paper's regime of small
launches) are compiled once with stfuse.compile. For each offered load, every
policy ("time", "space", "batch", "space-time") gets its own Runtime on the
same program and the same arrival schedule: Poisson arrivals per tenant,
submitted at their scheduled times whatever the runtime does (open loop); a
request that finds its tenant's queue full, or is still queued when the point
ends (as long again after the last arrival), counts as an SLO miss.

Loads are multiples of a measured capacity: the throughput of the "time"
policy kept saturated (one request per launch). Per policy and load it prints
throughput, p50/p99 latency over the requests served, the SLO-miss rate (late +
rejected + shed + failed, over offered) and mean tenants per launch, then the best
throughput each policy reached with at most --miss-target of its requests
missing. --plot writes p99 latency and throughput against load (matplotlib,
the optional "plot" extra); --json keeps the raw numbers.

The submitting thread and the runtime's worker share the GIL and, on a small
machine, the cores with whatever else runs there. So torch runs one intra-op
thread (--threads), the GIL switch interval is 0.5 ms (--switch-interval-ms),
the Runtime freezes the collector's view of the program (--gc, collector.py),
each point reports the CPU other processes used meanwhile ("others' CPU", in
cores), and without --quick every point runs 3 times (--repeat), interleaved
across the policies: the table shows the run with the median p99 and, in "p99
range", the lowest and highest p99 of the runs (the spread a single run hides: at
2x load one policy's p99 was 8.3 ms in one quick run and 16.8 in the next).
--policies runs a subset (e.g. batch,space-time).

--simulate runs the same arrivals on a fake clock (stfuse.runtime.simulate),
with the measured latency profile, or the one --profile names (a JSON file
that --save-profile writes), as the device. There the load unit is what
per-tenant batching sustains at max_batch rows per launch (one full batch of
every tenant in turn), so that 1x is the simulated device's capacity:

    python benchmarks/bench_runtime.py --simulate --profile benchmarks/profiles/mlp-small-x4.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import random
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import torch

import stfuse
from stfuse import zoo
from stfuse.kernels.timing import OthersMeter
from stfuse.runtime import QueueFullError, Runtime, measure_profile
from stfuse.runtime.simulate import SimRequest, simulate
from stfuse.runtime.stats import percentile
from stfuse.runtime.policies import POLICIES, make_scheduler
from stfuse.runtime.profile import LatencyProfile

MODELS = {  # name: (model factory, input shape without the batch dimension)
    "mlp-small": (lambda: zoo.mlp(64, 256, 10, depth=3), (64,)),
    "mlp": (lambda: zoo.mlp(256, 512, 10, depth=4), (256,)),
    "cnn": (lambda: zoo.cnn(8, 10), (3, 16, 16)),
}


def build(model: str, n: int, seed: int):
    torch.manual_seed(seed)
    make, shape = MODELS[model]
    models = {f"t{i}": make().eval() for i in range(n)}
    examples = {t: (torch.randn(2, *shape),) for t in models}
    return stfuse.compile(models, examples), models, examples, shape


def schedule(tenants, rate_per_tenant: float, duration: float, seed: int):
    """[(arrival seconds, tenant)] merged over tenants, Poisson per tenant."""
    rng = random.Random(seed)
    out = []
    for t in tenants:
        now = rng.expovariate(rate_per_tenant)
        while now < duration:
            out.append((now, t))
            now += rng.expovariate(rate_per_tenant)
    return sorted(out)


def warm(fused, examples) -> None:
    """Run every tenant subset once at equal and at unequal batch sizes, so that no policy pays for
    lowering a subset's program (done on first use, a few ms each) inside its measurement."""
    tenants = list(examples)
    for k in range(1, len(tenants) + 1):
        for subset in itertools.combinations(tenants, k):
            for rows in ([1] * k, list(range(1, k + 1))):
                for _ in range(3):
                    fused.run({t: tuple(a[:1].repeat(b, *[1] * (a.dim() - 1)) for a in examples[t])
                               for t, b in zip(subset, rows)})


def capacity(fused, examples, profile, args) -> float:
    """Requests/s of the "time" policy kept saturated: the unit for offered load.

    The best of three bursts, because other processes on a small machine can
    only make a burst slower."""
    n = 1000 if args.quick else 3000
    best = 0.0
    for _ in range(3):
        with Runtime(fused, "time", max_queue=n, profile=copy.deepcopy(profile), example_inputs=examples) as rt:
            start = time.perf_counter()
            futs = [rt.submit(t, tuple(a[:1] for a in examples[t])) for i in range(n // len(examples))
                    for t in examples]
            wait(futs, timeout=300)
            best = max(best, len(futs) / (time.perf_counter() - start))
    return best


def _served(latencies: list, lock, sent: float, fut) -> None:
    """A future's done callback: keep its latency if it was served (not shed, failed or cancelled)."""
    if not fut.cancelled() and fut.exception() is None:
        with lock:
            latencies.append(time.perf_counter() - sent)


def serve(fused, examples, shape, profile, policy: str, arrivals, args, watch=None) -> dict:
    """Submit `arrivals` ([(seconds, tenant)]) at their times to a fresh Runtime (open loop), then
    wait as long again; what is still queued is cancelled. Per tenant: latencies of what was served
    (s) and requests refused at submit; the runtime's stats; the submit span; others' CPU.
    `watch`: the tenants whose latencies are taken (a done-callback per request, run under the
    GIL the runtime's worker needs too); None: every tenant."""
    tenants = list(examples)
    gen = torch.Generator().manual_seed(args.seed)
    pool = {t: [(torch.randn(1, *shape, generator=gen),) for _ in range(64)] for t in tenants}
    latencies, lock = {t: [] for t in tenants}, threading.Lock()
    rejected = {t: 0 for t in tenants}
    rt = Runtime(fused, policy, slice_ms=args.slice_ms, slo_ms=args.slo_ms, max_batch=args.max_batch,
                 max_queue=args.max_queue, example_inputs=examples, profile=copy.deepcopy(profile),
                 freeze_gc=getattr(args, "gc", "freeze") == "freeze")
    futures = []
    others_meter = OthersMeter()  # CPU other processes use meanwhile (what makes a point noisy)
    start = time.perf_counter()
    for i, (at, t) in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        try:
            fut = rt.submit(t, pool[t][i % 64])
        except QueueFullError:
            rejected[t] += 1
            continue
        if watch is None or t in watch:
            fut.add_done_callback(functools.partial(_served, latencies[t], lock, sent))
        futures.append(fut)
        if len(futures) >= 4096:  # keep only pending ones: 100k done futures held here made the
            futures = [f for f in futures if not f.done()]  # collector's young generations slow
    submit_span = time.perf_counter() - start
    wait(futures, timeout=args.duration)  # what is still queued after as long again counts as missed
    rt.close(cancel_pending=True)
    others = others_meter.cores()
    return {"latencies": latencies, "rejected": rejected, "stats": rt.stats(), "submit_span": submit_span,
            "others_load": others}


def run_point(fused, examples, shape, profile, policy: str, rate: float, args) -> dict:
    arrivals = schedule(list(examples), rate / len(examples), args.duration, args.seed)
    run = serve(fused, examples, shape, profile, policy, arrivals, args)
    stats = run["stats"]
    offered, rejected = len(arrivals), sum(run["rejected"].values())
    per = stats["tenants"].values()
    late = sum(s["slo_misses"] + s["failed"] + s["cancelled"] + s["shed"] for s in per)
    launches = sum(s["launches"] for s in per)
    lat = sorted(x for xs in run["latencies"].values() for x in xs)
    return {
        "policy": policy, "load": rate / args.capacity, "offered_rps": rate,
        "submitted_rps": offered / run["submit_span"], "throughput_rps": stats["throughput_rps"],
        "p50_ms": percentile(lat, 50) * 1e3 if lat else None, "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        "slo_miss_rate": (late + rejected) / offered if offered else 0.0, "rejected": rejected,
        "tenants_per_launch": stats["mean_tenants_per_launch"],
        "mean_batch": sum(s["mean_batch"] * s["launches"] for s in per) / launches if launches else 0.0,
        "others_load": run["others_load"],
    }


def replay(profile, tenants, policy: str, arrivals, args):
    """`arrivals` on a fake clock: the policy's decisions against `profile` as the device (a SimResult).

    No Python overhead, no GIL, no other processes: what the scheduling alone
    does with these costs. The concurrent (space) launches of the simulated
    device do not overlap (LatencyProfile.concurrent_ratio 1.0), as on CPU.
    """
    slo = args.slo_ms / 1e3
    sched = make_scheduler(policy, tenants, slice_s=args.slice_ms / 1e3, max_batch=args.max_batch,
                           profile=copy.deepcopy(profile), slo_s={t: slo for t in tenants})
    return simulate(sched, [SimRequest(t, at, at + slo) for at, t in arrivals], profile,
                    slo_s={t: slo for t in tenants}, max_queue=args.max_queue)


def simulate_point(profile, tenants, policy: str, rate: float, args) -> dict:
    """The same point on a fake clock (`replay`)."""
    res = replay(profile, tenants, policy, schedule(tenants, rate / len(tenants), args.duration, args.seed), args)
    per = res.stats["tenants"].values()
    lat = sorted(r.finish - r.arrival for r in res.requests if r.finish is not None)
    launches = sum(s["launches"] for s in per)
    missed = sum(s["slo_misses"] + s["rejected"] + s["shed"] for s in per)
    return {
        "policy": policy, "load": rate / args.capacity, "offered_rps": rate, "submitted_rps": rate,
        "throughput_rps": res.stats["throughput_rps"],
        "p50_ms": percentile(lat, 50) * 1e3 if lat else None, "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        "slo_miss_rate": missed / len(res.requests) if res.requests else 0.0,
        "rejected": sum(s["rejected"] for s in per),
        "tenants_per_launch": res.stats["mean_tenants_per_launch"],
        "mean_batch": sum(s["mean_batch"] * s["launches"] for s in per) / launches if launches else 0.0,
        "others_load": None,
    }


def batch_capacity(profile, tenants, max_batch: int) -> float:
    """Requests/s (one row each) of per-tenant batching kept saturated on the simulated device:
    a full batch of every tenant in turn. The load unit of --simulate."""
    return len(tenants) * max_batch / sum(profile.solo(t, max_batch) for t in tenants)


def device_profile(args, model: str, n: int):
    """(profile, tenants): from --profile, else measured on the compiled tenants (and kept with --save-profile)."""
    if args.profile:
        profile = LatencyProfile.from_json(json.loads(Path(args.profile).read_text()))
        return profile, sorted(profile.fixed)
    fused, _, examples, _ = build(model, n, args.seed)
    warm(fused, examples)
    profile = measure_profile(fused, examples, args.max_batch, reps=5)
    if args.save_profile:
        Path(args.save_profile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_profile).write_text(json.dumps(profile.to_json(), indent=1))
    return profile, list(examples)


def table(rows: list[dict], markdown: bool) -> str:
    spread = any("p99_range" in r for r in rows)
    head = ["load", "policy", "offered/s", "throughput/s", "p50 ms", "p99 ms"] + (["p99 range"] if spread else []) + [
        "SLO miss", "tenants/launch", "rows/launch", "others' CPU"]
    body = [[f"{r['load']:.2f}x", r["policy"], f"{r['offered_rps']:.0f}", f"{r['throughput_rps']:.0f}",
             f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-",
             f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-"]
            + ([_range(r.get("p99_range"))] if spread else [])
            + [f"{r['slo_miss_rate']:.1%}", f"{r['tenants_per_launch']:.2f}", f"{r['mean_batch']:.2f}",
               f"{r['others_load']:.2f}" if r.get("others_load") is not None else "-"]
            for r in rows]
    return render(head, body, markdown)


def _range(span) -> str:
    return "-" if not span or None in span else f"{span[0]:.2f}-{span[1]:.2f}"


def median_run(runs: list[dict]) -> dict:
    """The run with the median p99 (the upper one of an even count), with every run's lowest and
    highest p99 as "p99_range"."""
    p99 = [r["p99_ms"] for r in runs]
    if len(runs) == 1 or None in p99:
        return runs[0]
    ranked = sorted(runs, key=lambda r: r["p99_ms"])
    return {**ranked[len(ranked) // 2], "p99_range": (min(p99), max(p99))}


def render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    """A table as markdown or as right-aligned columns."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head] + body)


def best_within_target(rows: list[dict], target: float) -> dict[str, float]:
    """Per policy: the highest throughput among loads where at most `target` of requests missed."""
    return {p: max((r["throughput_rps"] for r in rows if r["policy"] == p and r["slo_miss_rate"] <= target),
                   default=0.0) for p in dict.fromkeys(r["policy"] for r in rows)}


def pyplot(path: str):
    """matplotlib.pyplot on the Agg backend, or None (said) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"--plot: matplotlib is not installed (pip install 'stfuse[plot]'); {path} not written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, axes, path: str, title: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def emit(rows: list[dict], args, title: str, table_fn, plot_fn) -> None:
    """What --markdown, --json and --plot ask for."""
    if args.markdown:
        print()
        print(table_fn(rows, True))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"title": title, "capacity": args.capacity, "rows": rows}, indent=1))
    if args.plot:
        plot_fn(rows, args.plot, title)


def plot(rows: list[dict], path: str, title: str) -> None:
    if (plt := pyplot(path)) is None:
        return
    fig, (lat_ax, thr_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for p in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == p]
        lat_ax.plot([r["offered_rps"] for r in mine], [r["p99_ms"] for r in mine], marker="o", label=p)
        thr_ax.plot([r["offered_rps"] for r in mine], [r["throughput_rps"] for r in mine], marker="o", label=p)
    lat_ax.set(xlabel="offered load (requests/s)", ylabel="p99 latency (ms)", yscale="log", title="p99 latency")
    thr_ax.set(xlabel="offered load (requests/s)", ylabel="throughput (requests/s)", title="throughput")
    save_figure(fig, (lat_ax, thr_ax), path, title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 loads, 2 s each (about a minute)")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--model", choices=list(MODELS), default="mlp-small")
    ap.add_argument("--loads", default=None, help="comma-separated multiples of the measured capacity")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per point")
    ap.add_argument("--slo-ms", type=float, default=25.0)
    ap.add_argument("--slice-ms", type=float, default=2.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--miss-target", type=float, default=0.01)
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per policy and load, showing the one with the median p99 and the range "
                         "(default 1 with --quick, else 3)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help=f"comma-separated policies to run (default: all of {', '.join(POLICIES)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 leaves the second of 2 cores to the submitting thread)")
    ap.add_argument("--gc", choices=("freeze", "leave"), default="freeze",
                    help="Runtime(freeze_gc=...): whether the collector skips the program's objects (collector.py)")
    ap.add_argument("--switch-interval-ms", type=float, default=0.5,
                    help="sys.setswitchinterval: at CPython's default 5 ms, a busy submitting thread stalls "
                         "the runtime's worker for up to 5 ms at every torch op, as the GIL changes hands")
    ap.add_argument("--plot", default=None, help="PNG path for latency and throughput against load")
    ap.add_argument("--json", default=None, help="where to write the raw rows")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--simulate", action="store_true",
                    help="run the policies on a fake clock against the measured profile instead (seconds)")
    ap.add_argument("--profile", default=None,
                    help="--simulate: the device's latency profile from this JSON file instead of measuring it")
    ap.add_argument("--save-profile", default=None, help="write the measured latency profile as JSON")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    if not policies or set(policies) - set(POLICIES):
        ap.error(f"--policies: expected some of {', '.join(POLICIES)}, got {args.policies!r}")
    args.duration = args.duration or (0.25 if args.simulate else 2.0 if args.quick else 3.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    loads = [float(x) for x in args.loads.split(",")] if args.loads else (
        [0.25, 0.5, 1.0, 1.5, 2.0] if args.simulate else [0.5, 1.0, 1.5, 2.0] if args.quick
        else [0.25, 0.5, 1.0, 1.5, 2.0, 2.5])

    torch.set_num_threads(args.threads)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if args.simulate:
        profile, tenants = device_profile(args, args.model, args.tenants)
        args.capacity = batch_capacity(profile, tenants, args.max_batch)
        return report([simulate_point(profile, tenants, p, load * args.capacity, args)
                       for load in loads for p in policies],
                      args, f"simulated: {len(tenants)} tenants, slo {args.slo_ms:g} ms, slice {args.slice_ms:g} ms, "
                            f"max_batch {args.max_batch}, device profile {args.profile or 'measured'}; "
                            f"load unit (batch, saturated) {args.capacity:.0f} requests/s")
    fused, _, examples, shape = build(args.model, args.tenants, args.seed)
    warm(fused, examples)
    profile = measure_profile(fused, examples, args.max_batch, reps=5)
    args.capacity = capacity(fused, examples, profile, args)
    title = (f"{args.tenants} x {args.model}, slo {args.slo_ms:g} ms, slice {args.slice_ms:g} ms, "
             f"max_batch {args.max_batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"GIL switch {args.switch_interval_ms:g} ms")
    print(title)
    print(f"capacity unit (time policy, saturated): {args.capacity:.0f} requests/s; "
          f"{args.duration:g} s of arrivals per point, median p99 of {args.repeat} run(s); "
          f"others' CPU: cores used by other processes meanwhile")
    rows = []
    for load in loads:
        runs = {p: [] for p in policies}
        for _ in range(args.repeat):  # repetitions interleave the policies, so a noisy spell hits all of them
            for policy in policies:
                runs[policy].append(run_point(fused, examples, shape, profile, policy, load * args.capacity, args))
                print(table(runs[policy][-1:], False).splitlines()[-1], flush=True)
        rows += [median_run(runs[policy]) for policy in policies]
    return report(rows, args, title)


def report(rows: list[dict], args, title: str) -> int:
    print()
    print(title)
    print(table(rows, False))
    best = best_within_target(rows, args.miss_target)
    print(f"\nbest throughput with SLO-miss rate <= {args.miss_target:.0%}: "
          + ", ".join(f"{p} {v:.0f}/s" for p, v in best.items()))
    emit(rows, args, title, table, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
