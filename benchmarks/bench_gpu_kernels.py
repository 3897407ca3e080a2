"""The paper's GEMM experiment on the stfuse grouped GEMM kernel, plus mixed shapes.

Jain et al. (arXiv:1901.00041) fused R tenants' copies of one ResNet-18 GEMM
(M=256, N=128, K=1152, fp32) and compared, for R = 1..118:

- time-only: the R GEMMs one after another (here: R torch.mm calls in turn);
- space-only: the R GEMMs on R CUDA streams;
- fused: one batched call (theirs: cublasSgemmBatched; here torch.bmm as the
  vendor baseline, and stfuse's Triton kernel through torch.ops.stfuse).

This prints GFLOP/s, the fraction of a measured peak (a large torch.mm in the
same dtype), stfuse's speedups and their geometric means, for fp32 (IEEE, as
the paper's SGEMM; --tf32 to allow TF32) and bf16. A second sweep gives the
members different N and K, which bmm cannot batch. Every stfuse result is
checked against the torch reference (kernels/reference.py) with the tolerance
table first. Results go to benchmarks/out/gpu_kernels.json.

    python benchmarks/bench_gpu_kernels.py            # R in a spread over 1..118
    python benchmarks/bench_gpu_kernels.py --full     # every R in 1..118, as the paper
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import bench, geomean, space_only, time_only

M, N, K = 256, 128, 1152
SPREAD = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 118]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIXED_N = (64, 128, 256)
MIXED_K = (576, 1152, 2304)


def measured_peak(dtype: torch.dtype) -> float:
    """GFLOP/s of one large torch.mm in ``dtype``: the roof the fractions refer to."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    return 2 * n ** 3 / bench(lambda: torch.mm(a, b, out=out)) / 1e6


def check(outs, xs, ws) -> None:
    from stfuse.kernels import reference
    from stfuse.tolerances import assert_close

    refs = reference.grouped_linear([x.double() for x in xs], [w.double() for w in ws], [None] * len(xs),
                                    "", [], [])
    tf32 = torch.get_float32_matmul_precision() != "highest"
    assert_close(list(outs), refs, k=max(x.shape[1] for x in xs), tf32=tf32, msg="stfuse grouped GEMM")


def sweep_same_shape(dtype: torch.dtype, rs, peak: float) -> list[dict]:
    rows = []
    print(f"\nGEMM M={M} N={N} K={K} {dtype}, R tenants (GFLOP/s; speedups of stfuse stacked)")
    print(f"{'R':>4} {'time-only':>10} {'space-only':>10} {'bmm':>10} {'stfuse':>10} {'grouped':>10} "
          f"{'%peak':>6} {'x time':>7} {'x space':>7} {'x bmm':>7}")
    for R in rs:
        x = torch.randn(R, M, K, device="cuda", dtype=dtype)
        w = torch.randn(R, N, K, device="cuda", dtype=dtype) / K ** 0.5
        outs = torch.empty(R, M, N, device="cuda", dtype=dtype)
        xs, ws = list(x.unbind()), list(w.unbind())
        check(torch.ops.stfuse.stacked_linear(x, w, None, "", [], []).unbind(), xs, ws)
        flop = 2 * R * M * N * K
        ms = {
            "time_only": bench(time_only(xs, ws, list(outs.unbind()))),
            "space_only": bench(space_only(xs, ws, list(outs.unbind()))),
            "bmm": bench(lambda: torch.bmm(x, w.transpose(1, 2), out=outs)),
            "stfuse": bench(lambda: torch.ops.stfuse.stacked_linear(x, w, None, "", [], [])),
            "stfuse_grouped": bench(lambda: torch.ops.stfuse.grouped_linear(xs, ws, [None] * R, "", [], [])),
        }
        g = {k: flop / v / 1e6 for k, v in ms.items()}
        row = dict(R=R, dtype=str(dtype), ms=ms, gflops=g, peak_fraction=g["stfuse"] / peak,
                   vs_time=ms["time_only"] / ms["stfuse"], vs_space=ms["space_only"] / ms["stfuse"],
                   vs_bmm=ms["bmm"] / ms["stfuse"])
        rows.append(row)
        print(f"{R:>4} {g['time_only']:>10.0f} {g['space_only']:>10.0f} {g['bmm']:>10.0f} {g['stfuse']:>10.0f} "
              f"{g['stfuse_grouped']:>10.0f} {100 * row['peak_fraction']:>5.1f}% {row['vs_time']:>7.2f} "
              f"{row['vs_space']:>7.2f} {row['vs_bmm']:>7.2f}")
    print(f"geomean speedup of stfuse: {geomean([r['vs_time'] for r in rows]):.2f}x over time-only, "
          f"{geomean([r['vs_space'] for r in rows]):.2f}x over space-only, "
          f"{geomean([r['vs_bmm'] for r in rows]):.2f}x over bmm "
          f"(paper, V100 fp32: 7.7x over time-only, 3.23x over space-only)")
    return rows


def sweep_mixed_shapes(dtype: torch.dtype, rs) -> list[dict]:
    rows = []
    print(f"\nMixed GEMMs M={M}, N in {MIXED_N}, K in {MIXED_K} {dtype} (bmm cannot batch these)")
    print(f"{'R':>4} {'time-only':>10} {'space-only':>10} {'stfuse':>10} {'x time':>7} {'x space':>7}")
    for R in rs:
        shapes = [(MIXED_N[r % 3], MIXED_K[(r // 3) % 3]) for r in range(R)]
        xs = [torch.randn(M, k, device="cuda", dtype=dtype) for _, k in shapes]
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for n, k in shapes]
        outs = [torch.empty(M, n, device="cuda", dtype=dtype) for n, _ in shapes]
        check(torch.ops.stfuse.grouped_linear(xs, ws, [None] * R, "", [], []), xs, ws)
        flop = sum(2 * M * n * k for n, k in shapes)
        ms = {
            "time_only": bench(time_only(xs, ws, outs)),
            "space_only": bench(space_only(xs, ws, outs)),
            "stfuse_grouped": bench(lambda: torch.ops.stfuse.grouped_linear(xs, ws, [None] * R, "", [], [])),
        }
        g = {k: flop / v / 1e6 for k, v in ms.items()}
        row = dict(R=R, dtype=str(dtype), ms=ms, gflops=g, vs_time=ms["time_only"] / ms["stfuse_grouped"],
                   vs_space=ms["space_only"] / ms["stfuse_grouped"])
        rows.append(row)
        print(f"{R:>4} {g['time_only']:>10.0f} {g['space_only']:>10.0f} {g['stfuse_grouped']:>10.0f} "
              f"{row['vs_time']:>7.2f} {row['vs_space']:>7.2f}")
    print(f"geomean speedup of stfuse: {geomean([r['vs_time'] for r in rows]):.2f}x over time-only, "
          f"{geomean([r['vs_space'] for r in rows]):.2f}x over space-only")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every R in 1..118 (slow), not a spread")
    parser.add_argument("--rs", type=int, nargs="+", help="the R values to run")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--tf32", action="store_true", help="let fp32 GEMMs (torch and stfuse) use TF32")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-shape sweep")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "gpu_kernels.json")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu_kernels: needs a CUDA GPU (the Triton kernels run on CUDA); skipping.")
        return 0

    import stfuse.kernels  # noqa: F401  (registers torch.ops.stfuse)

    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    rs = args.rs or (list(range(1, 119)) if args.full else SPREAD)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"fp32 matmul precision {torch.get_float32_matmul_precision()}")
    results = {"device": torch.cuda.get_device_name(), "M": M, "N": N, "K": K, "rs": rs, "runs": {}}
    for name in args.dtypes:
        dtype = DTYPES[name]
        peak = measured_peak(dtype)
        print(f"\nmeasured peak ({name}, 8192^3 torch.mm): {peak:.0f} GFLOP/s")
        results["runs"][name] = {"peak_gflops": peak, "same_shape": sweep_same_shape(dtype, rs, peak)}
        if not args.no_mixed:
            results["runs"][name]["mixed"] = sweep_mixed_shapes(dtype, rs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
