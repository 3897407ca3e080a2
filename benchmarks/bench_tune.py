"""Measured plan selection: what tune="measure" costs at compile time, and what its plans run at.

    python benchmarks/bench_tune.py                      # the demo and bench_models --quick sets
    python benchmarks/bench_tune.py --sets demo bert --repeat 50
    python benchmarks/bench_tune.py --ignore-load        # cache timings even on a busy machine

Per set, each compile traces the tenants again (tracing is most of a compile):
  model     stfuse.compile(tune="model"): the analytic cost model on the measured device profile
  cold      tune="measure" with an empty cache (a fresh STFUSE_CACHE_DIR): every candidate timed
  warm      tune="measure" again on that cache: nothing timed
  off       tune="off": every group the matcher forms
Prints compile seconds, the tuning passes' share (drop_unprofitable, group_siblings,
check_program), what measuring added over the model compile (cold and warm), groups
kept, and each plan's median run time against sequential eager (ms, one call per tenant).

Sets: "demo" (stfuse/demo.py: 2 MLPs + 2 residual CNNs at batch 1) and bench_models.py's
--quick sets (bert, vit, resnet50, gpt2, mixed; N = 4, batch 1). JSON: benchmarks/out/tune.json.
A machine whose load average exceeds its cores does not keep timings (kernels/timing.busy),
so its "warm" compile times again; --ignore-load keeps them anyway.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import stfuse
from stfuse import demo
from stfuse.kernels import timing

from bench_models import FAMILIES, tenant_set
from common import machine, time_ms

OUT = Path(__file__).parent / "out"
TUNING_PASSES = ("drop_unprofitable", "group_siblings", "check_program")
MODES = ("model", "cold", "warm", "off")


def tenants(name: str):
    if name == "demo":
        models, inputs = demo.tenants()
        return list(models.values()), [inputs[n][0] for n in models]
    return tenant_set(name, 4, 1, True, torch.device("cpu"))


def compile_row(models, xs, mode: str, repeat: int) -> dict:
    # Every compile starts from the same collector state: one full collection of this
    # heap takes ~0.3 s here, and which compile the previous one's garbage tipped into
    # one decided which mode paid for it.
    gc.collect()
    t = time.perf_counter()
    fused = stfuse.compile(models, [(x,) for x in xs], tune="measure" if mode in ("cold", "warm") else mode)
    seconds = time.perf_counter() - t
    tuning = fused.plan.stats["tuning"] or {}
    program = tuning.get("program") or {}
    return {"compile_s": seconds,
            "tuning_ms": sum(r.ms for r in fused.plan.history if r.name in TUNING_PASSES),
            "groups": fused.plan.stats["fused_groups"], "coverage": fused.plan.stats["coverage"],
            "program": program.get("decision", "-"), "unsaved": tuning.get("unsaved"),
            "run_ms": time_ms(lambda: fused(*xs), torch.device("cpu"), repeat)}


def run_set(name: str, repeat: int) -> dict:
    models, xs = tenants(name)
    for m in models:
        m.eval()
    row = {"set": name}
    with torch.no_grad():
        row["eager_ms"] = time_ms(lambda: [m(x) for m, x in zip(models, xs)], torch.device("cpu"), repeat)
    saved = os.environ.get("STFUSE_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="stfuse-bench-tune-") as cache:  # a cold cache, removed after
        os.environ["STFUSE_CACHE_DIR"] = cache
        try:
            stfuse.compile(models, [(x,) for x in xs], tune="off")  # untimed: torch.export's first-use costs
            for mode in MODES:
                row[mode] = compile_row(models, xs, mode, repeat)
        finally:
            if saved is None:
                os.environ.pop("STFUSE_CACHE_DIR", None)
            else:
                os.environ["STFUSE_CACHE_DIR"] = saved
    base = row["model"]["compile_s"]
    row["added_cold"] = (row["cold"]["compile_s"] - base) / base
    row["added_warm"] = (row["warm"]["compile_s"] - base) / base
    print(f"  {name}: " + ", ".join(f"{m} {row[m]['compile_s']:.1f} s" for m in MODES), flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ["set"] + [f"{m} compile s (tuning ms)" for m in MODES] + [
        "added cold", "added warm", "eager ms"] + [f"{m} ms (groups)" for m in ("model", "cold", "off")] + [
        "program check"]
    body = []
    for r in rows:
        body.append([r["set"]] + [f"{r[m]['compile_s']:.2f} ({r[m]['tuning_ms']:.0f})" for m in MODES]
                    + [f"{r['added_cold']:+.0%}", f"{r['added_warm']:+.0%}", f"{r['eager_ms']:.3f}"]
                    + [f"{r[m]['run_ms']:.3f} ({r[m]['groups']})" for m in ("model", "cold", "off")]
                    + [r["cold"]["program"] + (" (busy: not cached)" if r["cold"]["unsaved"] else "")])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head] + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", choices=("demo",) + FAMILIES + ("mixed",),
                    default=["demo", *FAMILIES, "mixed"])
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per plan")
    ap.add_argument("--ignore-load", action="store_true", help="keep timings however busy the machine is")
    ap.add_argument("--out", type=Path, default=OUT / "tune.json")
    args = ap.parse_args(argv)
    if args.ignore_load:
        timing.busy = lambda: None
    where = machine(torch.device("cpu"))
    print(where)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = [run_set(s, args.repeat) for s in args.sets]
    print(f"\ncompile seconds (ms in the tuning passes); added: (measure - model) / model; run: median ms "
          f"of one call per tenant; load average at the end {os.getloadavg()[0]:.1f} (start {load:.1f}); {where}")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": where, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
