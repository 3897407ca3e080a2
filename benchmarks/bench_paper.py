"""The paper's experiments (Jain et al., arXiv:1901.00041), with stfuse as the fused side.

    python benchmarks/bench_paper.py --quick     # CPU, under 2 minutes on 2 cores
    python benchmarks/bench_paper.py             # full sweeps (meant for a GPU)
    python benchmarks/bench_paper.py --only gemm # or: --only e2e

gemm (Fig. 7 / Table 1): one GEMM, y = x @ w^T with x [M, K] and w [N, K], in R
same-shape tenants, R swept 1..118 (quick: a few R). Cases: the paper's
ResNet-18 conv2_2 GEMM (M=256, N=128, K=1152), a matrix-vector product (M=1)
and a square 256^3 GEMM. Alternatives, on the same tensors:
  time-only   the R GEMMs in turn: on CUDA torch.mm (bench_gpu_kernels.time_only),
              on CPU F.linear (see gemm_row for why not torch.mm there)
  space-only  the R GEMMs at once: on CUDA one stream each
              (bench_gpu_kernels.space_only); on CPU F.linear on one thread each
              from a pool of R threads (torch releases the GIL inside the op)
  stfuse      stfuse.compile of R tenants, each an nn.Linear(K, N, bias=False),
              called with R separate inputs: what the compiler emits, including
              its cost model's choice (on CPU it may decline to fuse, because the
              fused path first copies the R inputs into one batch)
  stacked     torch.ops.stfuse.stacked_linear on inputs already stacked [R, M, K]:
              the fused kernel alone, as the paper timed cublasSgemmBatched
Ratios as the paper's Table 1: time of the alternative / time of stfuse (and of
stacked), geometric mean over R.

e2e (Fig. 3): R tenants of a ResNet-50-shaped model (transformers ResNetConfig,
bottleneck blocks [3, 4, 6, 3], random weights, different per tenant; --quick
scales the widths and the image down), one request of a small batch per tenant
per round. Mean and p99 latency of a round:
  time-only   the R models in turn (sequential eager)
  space-only  the R models at once, one thread (and on CUDA one stream) each
  exclusive   one model serving all R requests as one batch of R x batch: the
              bound of exclusive batching (one model owns the device and batches
              everything); not a multi-tenant answer, since every request meets
              tenant 0's weights
  stfuse      stfuse.compile of the R tenants, one call

Every stfuse result is first checked against a float64 reference with the
tolerance table. Tables are printed; JSON goes to benchmarks/out/paper.json and
PNG plots to benchmarks/out/paper_fig7.png and paper_fig3.png (matplotlib, the
optional "plot" extra; skipped with a note where it is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Compile in this process: inductor's worker pool would keep compiling in the
# background and disturb the timings (stfuse itself does not use inductor here).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch
import torch.nn.functional as F
from torch import nn

import stfuse
from stfuse.runtime.stats import percentile
from stfuse.tolerances import assert_close

from common import check_against_float64, geomean, latencies_ms, machine, resnet50_config, time_ms, time_only
from common import space_only as cuda_space_only

OUT = Path(__file__).parent / "out"
GEMMS = {  # name: (M, N, K)
    "conv2_2": (256, 128, 1152),  # the paper's ResNet-18 layer
    "matvec": (1, 1024, 1024),
    "square": (256, 256, 256),
}
PAPER = {"vs_time": 7.7, "vs_space": 3.23, "R1": 0.71}  # V100 fp32, conv2_2, R = 1..118
ALTS = ("time_only", "space_only", "stfuse", "stacked")


def cpu_space_only(pool: ThreadPoolExecutor, jobs):
    """Run the callables in ``jobs`` at once on the pool's threads; return when all are done."""
    def run():
        for f in [pool.submit(j) for j in jobs]:
            f.result()
    return run


# ---------------------------------------------------------------- Fig. 7 / Table 1

def gemm_row(case: str, R: int, device: torch.device, repeat: int) -> dict:
    M, N, K = GEMMS[case]
    torch.manual_seed(R)
    x = torch.randn(R, M, K, device=device)
    w = torch.randn(R, N, K, device=device) / K ** 0.5
    outs = torch.empty(R, M, N, device=device)
    xs, ws, os_ = list(x.unbind()), list(w.unbind()), list(outs.unbind())
    tenants = []
    for wi in ws:
        lin = nn.Linear(K, N, bias=False, device=device)
        lin.weight.data.copy_(wi)
        tenants.append(lin.eval())
    fused = stfuse.compile(tenants, [(xi,) for xi in xs])
    stats = fused.plan.stats

    refs = [(xi.double() @ wi.double().t()) for xi, wi in zip(xs, ws)]
    with torch.no_grad():
        assert_close(list(fused(*xs)), refs, k=K, msg=f"stfuse {case} R={R}")
        assert_close(list(torch.ops.stfuse.stacked_linear(x, w, None, "", [], []).unbind()), refs, k=K,
                     msg=f"stacked_linear {case} R={R}")

    pool = None
    if device.type == "cuda":
        seq, space = time_only(xs, ws, os_), cuda_space_only(xs, ws, os_)
    else:
        # F.linear, what each nn.Linear tenant runs: on the 2-core CPU of RESULTS.md, torch.mm(x, w.t())
        # with 2 intra-op threads took 7.4 ms at conv2_2's shape against 0.2 ms for F.linear(x, w).
        def seq():
            for xi, wi in zip(xs, ws):
                F.linear(xi, wi)
        pool = ThreadPoolExecutor(R)
        space = cpu_space_only(pool, [lambda xi=xi, wi=wi: F.linear(xi, wi) for xi, wi in zip(xs, ws)])
    with torch.no_grad():
        ms = {
            "time_only": time_ms(seq, device, repeat),
            "stfuse": time_ms(lambda: fused(*xs), device, repeat),
            "stacked": time_ms(lambda: torch.ops.stfuse.stacked_linear(x, w, None, "", [], []), device, repeat),
            # last: on CPU each pool thread keeps its own OpenMP team spinning for a while after its op,
            # which took ~30% off whatever was timed next (measured on the 2-core CPU of RESULTS.md)
            "space_only": time_ms(space, device, repeat),
        }
    if pool is not None:
        pool.shutdown()  # joins the threads, and their OpenMP teams end with them
    flop = 2 * R * M * N * K
    return {"case": case, "M": M, "N": N, "K": K, "R": R, "ms": ms,
            "gflops": {a: flop / v / 1e6 for a, v in ms.items()},
            "groups": stats["fused_groups"], "launches": f"{stats['launches_before']}->{stats['launches_after']}"}


def gemm_table(rows: list[dict]) -> str:
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        M, N, K = GEMMS[case]
        lines.append(f"\nGEMM {case}: M={M} N={N} K={K} fp32, R tenants; GFLOP/s, and time ratios "
                     f"(alternative / stfuse, > 1 = stfuse faster)")
        lines.append(f"{'R':>4} {'time-only':>9} {'space-only':>10} {'stfuse':>8} {'stacked':>8} "
                     f"{'st/time':>7} {'st/space':>8} {'sk/time':>7} {'sk/space':>8} groups launches")
        for r in mine:
            g, ms = r["gflops"], r["ms"]
            lines.append(f"{r['R']:>4} {g['time_only']:9.1f} {g['space_only']:10.1f} {g['stfuse']:8.1f} "
                         f"{g['stacked']:8.1f} {ms['time_only'] / ms['stfuse']:7.2f} "
                         f"{ms['space_only'] / ms['stfuse']:8.2f} {ms['time_only'] / ms['stacked']:7.2f} "
                         f"{ms['space_only'] / ms['stacked']:8.2f} {r['groups']:>6} {r['launches']}")
    return "\n".join(lines)


def table1(rows: list[dict]) -> tuple[str, list[dict]]:
    """The paper's Table 1: geometric-mean speed-ups over the R swept, per case."""
    head = (f"{'case':8} {'Rs':>7} {'stfuse/time':>11} {'stfuse/space':>12} {'stacked/time':>12} "
            f"{'stacked/space':>13} {'stfuse@R=1':>10}")
    out, lines = [], ["\nTable 1: geometric-mean speed-up over the R swept (paper: V100, conv2_2, R = 1..118)", head]
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        s = {f"{f}_vs_{b}": geomean([r["ms"][b + "_only"] / r["ms"][f] for r in mine])
             for f in ("stfuse", "stacked") for b in ("time", "space")}
        r1 = [r["ms"]["time_only"] / r["ms"]["stfuse"] for r in mine if r["R"] == 1]
        s.update(case=case, rs=f"{mine[0]['R']}..{mine[-1]['R']}", r1=r1[0] if r1 else None)
        out.append(s)
        lines.append(f"{case:8} {s['rs']:>7} {s['stfuse_vs_time']:11.2f} {s['stfuse_vs_space']:12.2f} "
                     f"{s['stacked_vs_time']:12.2f} {s['stacked_vs_space']:13.2f} "
                     + (f"{s['r1']:10.2f}" if s["r1"] is not None else f"{'-':>10}"))
    lines.append(f"{'paper':8} {'1..118':>7} {PAPER['vs_time']:11.2f} {PAPER['vs_space']:12.2f} "
                 f"{'-':>12} {'-':>13} {PAPER['R1']:10.2f}   (cublasSgemmBatched, conv2_2)")
    return "\n".join(lines), out


def plot_gemm(rows: list[dict], path: Path, title: str) -> None:
    plt = _pyplot(path)
    if plt is None:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case]
        for a in ALTS:
            ax.plot([r["R"] for r in mine], [r["gflops"][a] for r in mine], marker="o", ms=3, label=a)
        M, N, K = GEMMS[case]
        ax.set(xlabel="tenants R", ylabel="GFLOP/s", title=f"{case} (M={M}, N={N}, K={K})")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, plt, path, title)


# ---------------------------------------------------------------- Fig. 3

def resnet_tenants(R: int, batch: int, quick: bool, device: torch.device):
    import transformers as T

    cfg, size = resnet50_config(quick)
    models, xs = [], []
    for i in range(R):
        torch.manual_seed(1000 + i)
        m = T.ResNetModel(cfg).eval()
        for mod in m.modules():  # random running statistics, so BatchNorm folding is exercised
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        models.append(m.to(device))
        xs.append(torch.randn(batch, 3, size, size, device=device))
    return models, xs


def e2e_row(R: int, batch: int, quick: bool, device: torch.device, repeat: int) -> dict:
    models, xs = resnet_tenants(R, batch, quick, device)
    fused = stfuse.compile(models, [(x,) for x in xs])
    check_against_float64(fused, models, xs, f"resnet50-shaped R={R} b={batch}")
    pool = ThreadPoolExecutor(R)
    streams = [torch.cuda.Stream() for _ in models] if device.type == "cuda" else [None] * R

    def on_stream(m, x, s):
        if s is None:
            return m(x)
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.default_stream())
            return m(x)

    big = torch.cat(xs)
    alts = {  # space-only last: its threads' OpenMP teams keep spinning after it (see gemm_row)
        "time_only": lambda: [m(x) for m, x in zip(models, xs)],
        "exclusive": lambda: models[0](big),
        "stfuse": lambda: fused(*xs),
        "space_only": cpu_space_only(pool, [lambda m=m, x=x, s=s: on_stream(m, x, s)
                                            for m, x, s in zip(models, xs, streams)]),
    }
    row = {"R": R, "batch": batch, "groups": fused.plan.stats["fused_groups"],
           "coverage": fused.plan.stats["coverage"],
           "launches": f"{fused.plan.stats['launches_before']}->{fused.plan.stats['launches_after']}"}
    with torch.no_grad():
        for name, fn in alts.items():
            lat = sorted(latencies_ms(fn, device, repeat))
            row[name] = {"mean_ms": statistics.fmean(lat), "p99_ms": percentile(lat, 99)}
    pool.shutdown()
    return row


E2E = ("time_only", "space_only", "exclusive", "stfuse")


def e2e_table(rows: list[dict], title: str) -> str:
    lines = [f"\nFig. 3: {title}; latency of a round (one request per tenant), ms",
             f"{'R':>3} {'batch':>5} " + " ".join(f"{a + ' mean':>15} {'p99':>7}" for a in E2E)
             + f" {'time/st':>7} {'space/st':>8} {'excl/st':>7}  groups coverage launches"]
    for r in rows:
        st = r["stfuse"]["mean_ms"]
        lines.append(f"{r['R']:>3} {r['batch']:>5} "
                     + " ".join(f"{r[a]['mean_ms']:15.2f} {r[a]['p99_ms']:7.2f}" for a in E2E)
                     + f" {r['time_only']['mean_ms'] / st:7.2f} {r['space_only']['mean_ms'] / st:8.2f} "
                       f"{r['exclusive']['mean_ms'] / st:7.2f}  {r['groups']:>6} {r['coverage']:8.0%} "
                       f"{r['launches']}")
    return "\n".join(lines)


def plot_e2e(rows: list[dict], path: Path, title: str) -> None:
    plt = _pyplot(path)
    if plt is None:
        return
    fig, (mean_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for batch in dict.fromkeys(r["batch"] for r in rows):
        mine = [r for r in rows if r["batch"] == batch]
        for a in E2E:
            for ax, key in ((mean_ax, "mean_ms"), (p99_ax, "p99_ms")):
                ax.plot([r["R"] for r in mine], [r[a][key] for r in mine], marker="o", label=f"{a} b{batch}")
    mean_ax.set(xlabel="tenants R", ylabel="ms per round", title="mean latency", yscale="log")
    p99_ax.set(xlabel="tenants R", ylabel="ms per round", title="p99 latency", yscale="log")
    for ax in (mean_ax, p99_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, plt, path, title)


# ---------------------------------------------------------------- plumbing

def _pyplot(path: Path):
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed (pip install 'stfuse[plot]'); {path} not written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, path: Path, title: str) -> None:
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few R, scaled-down ResNet-50, few repetitions (CPU)")
    ap.add_argument("--only", choices=["gemm", "e2e"], help="run one experiment")
    ap.add_argument("--rs", type=int, nargs="+", help="R values of the GEMM sweep")
    ap.add_argument("--tenants", type=int, nargs="+", help="R values of the end-to-end sweep")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes of the end-to-end sweep")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=OUT / "paper.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest")  # IEEE fp32, as the paper's SGEMM
    where = machine(device)
    print(where)
    results = {"machine": where, "quick": args.quick}

    if args.only in (None, "gemm"):
        rs = args.rs or ([1, 2, 4, 8, 16] if args.quick else list(range(1, 119)))
        repeat = 10 if args.quick else 50
        rows = []
        for case in GEMMS:
            for R in rs:
                rows.append(gemm_row(case, R, device, repeat))
                print(f"  gemm {case} R={R}: " + ", ".join(f"{a} {v:.3f} ms" for a, v in rows[-1]["ms"].items()),
                      flush=True)
        print(gemm_table(rows))
        text, summary = table1(rows)
        print(text)
        results["gemm"], results["table1"] = rows, summary
        plot_gemm(rows, args.out.parent / "paper_fig7.png", f"Fig. 7: GEMMs over R tenants; {where}")

    if args.only in (None, "e2e"):
        tenants = args.tenants or ([1, 2, 4] if args.quick else [1, 2, 4, 8, 16])
        batches = args.batches or ([1] if args.quick else [1, 4])
        repeat = 10 if args.quick else 50
        rows = []
        for batch in batches:
            for R in tenants:
                rows.append(e2e_row(R, batch, args.quick, device, repeat))
                print(f"  e2e R={R} b={batch}: " + ", ".join(f"{a} {rows[-1][a]['mean_ms']:.2f} ms" for a in E2E),
                      flush=True)
        cfg, size = resnet50_config(args.quick)
        title = (f"ResNet-50-shaped (bottleneck [3,4,6,3], widths {cfg.hidden_sizes}, {size}x{size}), "
                 f"random weights per tenant; {where}")
        print(e2e_table(rows, title))
        results["e2e"] = rows
        plot_e2e(rows, args.out.parent / "paper_fig3.png", f"Fig. 3: {title}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
