"""The runtime's Python work per request, counted rather than timed (issue 18, item 2).

    python benchmarks/bench_runtime_overhead.py              # fake-fast and real program, both scenarios
    python benchmarks/bench_runtime_overhead.py --program fake --requests 4096 --top 25

Wall-clock throughput on a shared machine is noise; function calls are not.
Each scenario runs under cProfile, the submitting thread and the runtime's
worker profiled apart (cProfile sees one thread), and prints per request: the
function calls on each side and the cumulative microseconds of the runtime's
own functions (those under cProfile's overhead, so larger than without it:
compare them with each other and between commits, not with a benchmark).

Scenarios, both deterministic in what they launch:

    overload    the device is held while N requests (N/4 per tenant) queue, then
                released: every launch takes full batches, as past capacity
    one-by-one  submit, wait for the result, submit the next (slice_ms=0): a
                launch per request, as at low load

Programs: "fake" answers every call without compute (the runtime alone);
"real" is stfuse.compile of 4 zoo.mlp(64, 256, 10) tenants. Throughput on a
quiet machine is bench_runtime.py's: python benchmarks/bench_runtime.py --quick --markdown
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import threading
import time
from concurrent.futures import wait

import torch

import stfuse
from stfuse import zoo
from stfuse.runtime import Runtime
from stfuse.runtime.profile import LatencyProfile

TENANTS = [f"t{i}" for i in range(4)]
RUNTIME_FILES = ("stfuse/runtime/", "stfuse/program.py", "concurrent/futures/", "threading.py")


class FakeProgram:
    """The FusedProgram contract with no compute: each tenant's output is a view of its input."""

    tenants = TENANTS

    def run(self, inputs):
        return {t: a[0][:, :10] for t, a in inputs.items()}


class Gated:
    """Wraps a program: while closed, calls block inside run() (the device is busy)."""

    def __init__(self, program):
        self.program, self.tenants = program, list(program.tenants)
        self.plan = getattr(program, "plan", None)
        self.specs = getattr(program, "specs", {})
        self.check_inputs = getattr(program, "check_inputs", None)
        if self.check_inputs is None:
            del self.check_inputs
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def run(self, inputs):
        self.entered.set()
        self.open.wait()
        return self.program.run(inputs)


class Profiled(Runtime):
    """A Runtime whose worker thread runs under its own cProfile.Profile."""

    def _loop(self):
        self.worker_profile = cProfile.Profile(time.thread_time)
        self.worker_profile.enable()
        try:
            super()._loop()
        finally:
            self.worker_profile.disable()


def program(kind: str):
    if kind == "fake":
        return FakeProgram()
    torch.manual_seed(0)
    models = {t: zoo.mlp(64, 256, 10).eval() for t in TENANTS}
    return stfuse.compile(models, {t: (torch.randn(2, 64),) for t in TENANTS})


def requests(n: int):
    torch.manual_seed(1)
    return [(TENANTS[i % len(TENANTS)], torch.randn(1, 64)) for i in range(n)]


def overload(rt: Runtime, gated: Gated, reqs, submit_profile: cProfile.Profile):
    gated.open.clear()
    first = rt.submit(*reqs[0])
    gated.entered.wait(60)
    submit_profile.enable()
    futures = [rt.submit(t, x) for t, x in reqs[1:]]
    submit_profile.disable()
    gated.open.set()
    return [first] + futures


def one_by_one(rt: Runtime, gated: Gated, reqs, submit_profile: cProfile.Profile):
    futures = []
    for t, x in reqs:
        submit_profile.enable()
        futures.append(rt.submit(t, x))
        submit_profile.disable()
        futures[-1].result(60)
    return futures


SCENARIOS = {"overload": (overload, 1.0), "one-by-one": (one_by_one, 0.0)}


def per_request(profile: cProfile.Profile, n: int, top: int):
    """(function calls per request, [(us per request, calls per request, name)] of the runtime's functions)."""
    st = pstats.Stats(profile)
    calls = sum(nc for (cc, nc, tt, ct, callers) in st.stats.values())
    rows = []
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        if any(part in file for part in RUNTIME_FILES) or file == "~":
            where = file.split("/stfuse/")[-1] if "/stfuse/" in file else file.rsplit("/", 1)[-1]
            rows.append((ct / n * 1e6, nc / n, f"{where}:{line}({func})" if file != "~" else func))
    rows.sort(reverse=True)
    return calls / n, rows[:top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--program", choices=("fake", "real", "both"), default="both")
    ap.add_argument("--scenario", choices=(*SCENARIOS, "both"), default="both")
    ap.add_argument("--policy", default="space-time,batch")
    ap.add_argument("--requests", type=int, default=2048, help="N; overload queues them all")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kinds = ("fake", "real") if args.program == "both" else (args.program,)
    scenarios = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    profile = LatencyProfile({t: 5e-5 for t in TENANTS}, {t: 1e-6 for t in TENANTS},
                             {frozenset(TENANTS): 8e-5})
    reqs = requests(args.requests)
    for kind in kinds:
        gated = Gated(program(kind))
        for scenario in scenarios:
            run, slice_ms = SCENARIOS[scenario]
            for policy in args.policy.split(","):
                submit_profile = cProfile.Profile(time.thread_time)
                rt = Profiled(gated, policy, slice_ms=slice_ms, slo_ms=10_000, max_batch=32,
                              max_queue=args.requests, profile=profile)
                futures = run(rt, gated, reqs, submit_profile)
                done, pending = wait(futures, timeout=120)
                assert not pending and all(f.exception() is None for f in done)
                launches = rt.stats()["launches"]
                rt.close()
                n = len(reqs)
                print(f"\n## {kind} program, {scenario}, {policy}: {n} requests, {launches} launches")
                for side, prof in (("submit", submit_profile), ("worker", rt.worker_profile)):
                    calls, rows = per_request(prof, n, args.top)
                    print(f"\n{side}: {calls:.1f} function calls per request\n")
                    print("| us/request (cum) | calls/request | function |\n|---:|---:|---|")
                    for us, nc, name in rows:
                        print(f"| {us:.2f} | {nc:.2f} | {name} |")


if __name__ == "__main__":
    main()
