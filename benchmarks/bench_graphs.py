"""A whole fused program per call on CUDA: replayed as a CUDA graph against launched op by op.

R tenants, each a two-layer MLP on the paper's GEMM shape (M=256 rows, K=1152 -> N=128,
then 128 -> 128, fp32), compiled once with CUDA graphs (kernels/graphs.py) and once
without (STFUSE_CUDA_GRAPHS=0), called

- ``stacked``: every tenant at batch 256 (stacked GEMMs);
- ``grouped``: tenant i at batch 256 - i (grouped GEMMs: planned sites, kernels/arena.py).

Each point: the median wall time per ``fused(*xs)`` over ``--repeat`` calls (the
program's own input checks included; launches are asynchronous, so this is what
the host spends, bounded below by the GPU's time: the calls run back to back, a
synchronize after each batch of ten), and how many calls replayed a graph.

    python benchmarks/bench_graphs.py [--rs 8 32 118] [--repeat 50] [--json FILE]

Without CUDA it says so and exits 0 (nothing here runs on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from common import machine

M, N, K = 256, 128, 1152


def _fused(R: int, graphs: bool):
    import stfuse
    from stfuse import zoo

    os.environ["STFUSE_CUDA_GRAPHS"] = "1" if graphs else "0"  # read when the program is bound
    torch.manual_seed(R)
    models = [zoo.mlp(K, N, N, depth=2).cuda() for _ in range(R)]
    return stfuse.compile(models, [torch.randn(2, K, device="cuda") for _ in models], tune="off")


def _per_call_us(fused, xs, repeat: int) -> float:
    for _ in range(3):  # warm-up, capture, first replay
        fused(*xs)
    torch.cuda.synchronize()
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        fused(*xs)
        times.append((time.perf_counter() - start) * 1e6)
        if i % 10 == 9:
            torch.cuda.synchronize()
    return statistics.median(times)


def _replays(fused) -> int:
    from stfuse.kernels.graphs import GraphedProgram

    return sum(p.counts["replay"] for p, _ in fused._programs.values() if isinstance(p, GraphedProgram))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rs", type=int, nargs="+", default=[8, 32, 118])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_graphs: no CUDA device; CUDA graphs cannot run here (skipped)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"fused program per call, graphs vs op by op; {machine(torch.device('cuda'))}")
    print(f"{'form':<8} {'R':>4} {'graphs us':>10} {'op by op us':>12} {'speedup':>8} {'replays':>8}")
    rows = []
    saved = os.environ.get("STFUSE_CUDA_GRAPHS")
    try:
        for R in args.rs:
            programs = {g: _fused(R, g) for g in (True, False)}
            for form, batches in (("stacked", [M] * R), ("grouped", [M - i for i in range(R)])):
                xs = [torch.randn(b, K, device="cuda") for b in batches]
                us = {g: _per_call_us(f, xs, args.repeat) for g, f in programs.items()}
                row = {"form": form, "R": R, "graphs_us": us[True], "eager_us": us[False],
                       "replays": _replays(programs[True])}
                rows.append(row)
                print(f"{form:<8} {R:>4} {us[True]:>10.1f} {us[False]:>12.1f} {us[False] / us[True]:>7.2f}x "
                      f"{row['replays']:>8}")
    finally:
        if saved is None:
            os.environ.pop("STFUSE_CUDA_GRAPHS", None)
        else:
            os.environ["STFUSE_CUDA_GRAPHS"] = saved
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(torch.device("cuda")), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
