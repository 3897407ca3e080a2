"""Host work per fused GEMM call: what stfuse spends around one Triton launch.

The paper's GEMM (M=256, N=128, K=1152, fp32) across R = 1, 8, 32, 118 tenants,
as the fused program on CUDA calls it:

- ``stacked``: ``stacked_linear`` over one [R, M, K] stack (members at one batch);
- ``grouped``: a planned grouped GEMM (kernels/arena.py: weights bound, outputs in
  an arena) whose inputs are the tensors of its last call, at the same addresses:
  every op of a planned chain but the first reads the arena of the op before it;
- ``moved``: the same site, its R inputs other tensors of the same shapes on every
  call (two sets taken in turn, neither the one the launch plan was built for, so
  every call patches and copies the table): the first grouped op of a program,
  which reads the tenants' own inputs;
- ``unplanned``: ``grouped_linear`` as the dispatcher calls it, the path before
  memory planning (R output allocations and a full member signature per call).

Columns (medians of ``--repeat`` calls after warm-up):

- ``records``: argument checks, output allocation and the per-member records
  (views, operands), the config choice; for a site (grouped, moved) all its own
  work: identity, shape and address checks, and a moved table's patch and copy;
- ``tables``: the launch plan (kernels/launch.py): the member signature, the
  plan lookup, and the problem table refreshed and copied where addresses
  moved (built from scratch only on a plan's first call);
- ``launch``: the kernel launch call itself;
- ``total``: the whole op call.

On a machine without CUDA the kernel launch is STUBBED: ``kernel[grid](...)``
returns at once (Triton's own launcher, ~4 us of Python per launch on a GPU
host, is left out; configs are never timed on a call anyway), and tensors are
on the CPU; everything else a call does runs as it would. On CUDA the kernels
run for real; each call is timed to its return, as a caller sees it (launches
are asynchronous; no synchronize inside the timing).

    python benchmarks/bench_host_overhead.py [--repeat 200]

The last line is ``host overhead per call at R=118: stacked X us, grouped Y us``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from common import machine

M, N, K = 256, 128, 1152
RS = (1, 8, 32, 118)
KINDS = ("stacked", "grouped", "moved", "unplanned")


class _Timed:
    """Accumulates the time spent in a wrapped function, per call of the op."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


class _StubKernel:
    """Stands in for a Triton kernel on a machine without CUDA: ``k[grid](...)`` returns at once."""

    def __init__(self, arg_names):
        self.arg_names = arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _instrumented(stub: bool):
    """Patch the launch path: time the launch plan and the launch; stub the kernel on CPU."""
    from stfuse.kernels import codegen, triton_gemm

    tables, launch = _Timed(), _Timed()
    saved = (triton_gemm.launcher, codegen.load_kernel)

    def launcher(*args, **kwargs):
        run = tables.wrap(saved[0])(*args, **kwargs)
        prepare = tables.wrap(run.prepare)

        def timed_run(cfg):
            prepare(cfg)()
        timed_run.prepare, timed_run.consts = prepare, run.consts
        return timed_run
    triton_gemm.launcher = launcher

    kernels = {}  # one wrapper per kernel, as codegen.load_kernel returns one kernel (plans key on it)

    def load(template, epilogue):
        if (template.kind, epilogue) not in kernels:
            real = saved[1](template, epilogue)
            kernels[template.kind, epilogue] = _TimedKernel(_StubKernel(real.arg_names) if stub else real, launch)
        return kernels[template.kind, epilogue]
    codegen.load_kernel = load
    try:
        yield tables, launch
    finally:
        triton_gemm.launcher, codegen.load_kernel = saved


class _TimedKernel:
    def __init__(self, kernel, timer: _Timed):
        self.kernel, self.timer = kernel, timer
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return self.timer.wrap(self.kernel[grid])


def _op(kind: str, R: int, device: torch.device):
    """(the op call, its argument sets: one per call, taken in turn) for ``kind``."""
    from stfuse.kernels import arena, triton_gemm

    g = torch.Generator().manual_seed(R)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)
    if kind == "stacked":
        return triton_gemm.stacked_linear, [(randn(R, M, K), randn(R, N, K), randn(R, N), "", [], [])]
    w, b = [randn(N, K) for _ in range(R)], [randn(N) for _ in range(R)]
    xs = [[randn(M, K) for _ in range(R)] for _ in range(3 if kind == "moved" else 1)]
    if kind == "unplanned":
        return triton_gemm.grouped_linear, [(x, w, b, "", [], []) for x in xs]
    return arena.GroupedLinearSite(w, b, "", []), [(x, []) for x in xs]


def measure(kind: str, R: int, device: torch.device, repeat: int, stub: bool) -> dict:
    op, arg_sets = _op(kind, R, device)
    totals, tables_us, launch_us = [], [], []
    with _instrumented(stub) as (tables, launch):
        if len(arg_sets) > 1:  # the plan is built for the first set; the timed calls move from it
            op(*arg_sets[0])
            arg_sets = arg_sets[1:]
        for i in range(repeat + max(5, repeat // 10)):
            tables.seconds = launch.seconds = 0.0
            start = time.perf_counter()
            op(*arg_sets[i % len(arg_sets)])
            total = time.perf_counter() - start
            if i >= max(5, repeat // 10):  # after warm-up (first calls compile, tune, fill caches)
                totals.append(total * 1e6)
                tables_us.append(tables.seconds * 1e6)
                launch_us.append(launch.seconds * 1e6)
    total, tab, lau = (statistics.median(v) for v in (totals, tables_us, launch_us))
    return {"kind": kind, "R": R, "total_us": total, "tables_us": tab, "launch_us": lau,
            "records_us": max(total - tab - lau, 0.0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200, help="timed calls per point (default 200)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stub = device.type != "cuda"
    print(f"host overhead of one fused GEMM call (M={M}, N={N}, K={K}, fp32); {machine(device)}")
    if stub:
        print("no CUDA: the kernel launch is STUBBED (returns at once), first config, CPU tensors: "
              "host work alone")
    print(f"{'kind':<8} {'R':>4} {'total us':>9} {'records':>8} {'tables':>8} {'launch':>8} {'us/member':>9}")
    rows = []
    for kind in KINDS:
        for R in RS:
            r = measure(kind, R, device, args.repeat, stub)
            rows.append(r)
            print(f"{kind:<8} {R:>4} {r['total_us']:>9.1f} {r['records_us']:>8.1f} {r['tables_us']:>8.1f} "
                  f"{r['launch_us']:>8.1f} {r['total_us'] / R:>9.2f}")
    at = {r["kind"]: r["total_us"] for r in rows if r["R"] == RS[-1]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(device), "stubbed": stub, "rows": rows}, indent=1))
    print(f"host overhead per call at R={RS[-1]}: stacked {at['stacked']:.1f} us, grouped {at['grouped']:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
