"""N small tenants on CPU, every alternative side by side in one run.

    python benchmarks/bench_cpu_tenants.py            # N = 2, 4, 8; MLP and CNN; batch 1 and 8
    python benchmarks/bench_cpu_tenants.py --quick    # fewer repetitions, N = 2, 4

Alternatives, all on the same models and inputs:
  eager      sequential eager, one tenant after another (the paper's time-only)
  vmap       torch.func.stack_module_state + vmap (same architecture only)
  compile    torch.compile (inductor) of each model, run in turn
  stfuse     stfuse.compile of all tenants, one call

Prints median microseconds per round (every tenant once) and speed-ups over
eager; writes benchmarks/out/cpu_tenants.json. Every stfuse result is first
checked against eager with the tolerance table. The alternatives are timed in
ROUNDS interleaved rounds (a noisy spell hits them all): each time is the median
of the rounds' medians, and "x eager" shows the lowest and highest of the
rounds' eager/stfuse ratios, the spread within which "never slower" holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
from pathlib import Path

# Compile in this process: inductor's worker pool would keep compiling in the
# background and disturb the timings of the next rows.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from torch.func import functional_call, stack_module_state

import stfuse  # noqa: E402
from stfuse import zoo  # noqa: E402
from stfuse.demo import median_us  # noqa: E402
from stfuse.tolerances import assert_close  # noqa: E402

OUT = Path(__file__).parent / "out"
ROUNDS = 3


def make(kind: str, n: int, batch: int):
    torch.manual_seed(n * 10 + batch)
    if kind == "mlp":
        models = [zoo.mlp(256, 256, 256, depth=3).eval() for _ in range(n)]
        xs = [torch.randn(batch, 256) for _ in range(n)]
    else:
        models = [zoo.cnn(16).eval() for _ in range(n)]
        xs = [torch.randn(batch, 3, 32, 32) for _ in range(n)]
    return models, xs


def run_case(kind: str, n: int, batch: int, repeat: int, with_compile: bool) -> dict:
    models, xs = make(kind, n, batch)
    row = {"model": kind, "tenants": n, "batch": batch}

    def eager():
        for m, x in zip(models, xs):
            m(x)

    fused = stfuse.compile(models, [(x,) for x in xs])
    with torch.no_grad():
        for m, x, y in zip(models, xs, fused(*xs)):
            assert_close(y, m(x), msg=f"{kind} x{n} b{batch}")

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    vmapped = torch.vmap(one)
    xstack = torch.stack(xs)

    def vmap():
        vmapped(params, buffers, xstack)

    alternatives = {"eager": eager, "vmap": vmap, "stfuse": lambda: fused(*xs)}
    with torch.no_grad():
        if with_compile:
            compiled = [torch.compile(m) for m in models]

            def compiled_seq():
                for m, x in zip(compiled, xs):
                    m(x)

            compiled_seq()  # compile outside the timing
            alternatives["compile"] = compiled_seq
        rounds = {name: [] for name in alternatives}
        for _ in range(ROUNDS):
            for name, fn in alternatives.items():
                rounds[name].append(median_us(fn, repeat))
    for name, times in rounds.items():
        row[f"{name}_us"] = statistics.median(times)
    ratios = [e / f for e, f in zip(rounds["eager"], rounds["stfuse"])]
    row["x_eager_range"] = (min(ratios), max(ratios))
    row["groups"] = fused.plan.stats["fused_groups"]
    row["launches"] = f"{fused.plan.stats['launches_before']}->{fused.plan.stats['launches_after']}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 2, 4 and fewer repetitions")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (needs a C++ compiler)")
    args = ap.parse_args()
    tenants = (2, 4) if args.quick else (2, 4, 8)
    repeat = 50 if args.quick else 300
    rows = []
    for kind in ("mlp", "cnn"):
        for batch in (1, 8):
            for n in tenants:
                rows.append(run_case(kind, n, batch, repeat, not args.no_compile))
    cols = ["eager_us", "vmap_us"] + ([] if args.no_compile else ["compile_us"]) + ["stfuse_us"]
    head = f"{'model':5} {'N':>2} {'batch':>5} " + " ".join(f"{c[:-3]:>9}" for c in cols)
    head += f" {'x eager (rounds)':>17} {'x vmap':>7}" + ("" if args.no_compile else f" {'x compile':>9}") + "  launches"
    print(f"\nmedian us per round (all tenants once); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(head)
    for r in rows:
        line = f"{r['model']:5} {r['tenants']:>2} {r['batch']:>5} " + " ".join(f"{r[c]:9.0f}" for c in cols)
        low, high = r["x_eager_range"]
        line += f" {r['eager_us'] / r['stfuse_us']:5.2f} ({low:.2f}-{high:.2f}) {r['vmap_us'] / r['stfuse_us']:7.2f}"
        if not args.no_compile:
            line += f" {r['compile_us'] / r['stfuse_us']:9.2f}"
        print(line + f"  {r['launches']}")
    OUT.mkdir(exist_ok=True)
    (OUT / "cpu_tenants.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
