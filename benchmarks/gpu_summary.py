"""The markdown summary of one gpu_check.sh run: what ran, and a table per result file.

    python benchmarks/gpu_summary.py OUT_DIR "step: status" ...

Reads what the steps wrote under OUT_DIR (kernels.json, gpu_kernels.json,
host_overhead.json, graphs.json, models.json); a file that is missing (a skipped or failed step)
gets a line saying so. Prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _load(out: Path, name: str):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def variant_class(row) -> str:
    """The flags part of a row's config ("K_CONTIGUOUS=1,VEC=8"), "-" for none."""
    return row["config"].partition(" ")[2] or "-"


def kernels(rows) -> list[str]:
    """One line per (kernel, variant class, dtype): variants over all archs, failures,
    spills, max regs and occupancy per arch, and the compiled code's facts."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["kernel"], variant_class(r), r["dtype"]].append(r)
    archs = sorted({r["arch"] for r in rows})

    def share(rs, field):
        n = sum(bool(r[field]) for r in rs)
        return "all" if n == len(rs) else "none" if n == 0 else f"{n}/{len(rs)}"

    def per_arch(rs, fmt):
        return " / ".join(fmt([r for r in rs if r["arch"] == a]) for a in archs)
    out = []
    for (kernel, cls, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        out.append([kernel, cls, dtype, len(rs), len(rs) - len(ok), sum(r["spill_bytes"] > 0 for r in ok),
                    max((r["spill_bytes"] for r in ok), default="-"),
                    per_arch(ok, lambda g: str(max((r["regs"] for r in g), default="-"))),
                    per_arch(ok, lambda g: f"{min((r['occupancy'] for r in g), default=0):.2f}-"
                                           f"{max((r['occupancy'] for r in g), default=0):.2f}"),
                    share(ok, "tensor_cores"), share(ok, "async_copy"), share(ok, "vector_loads")])
    return _table(["kernel", "flags", "dtype", "variants", "failed", "spilling", "max spill B", f"max regs ({' / '.join(archs)})",
                   "occupancy", "tensor cores", "async copy", "vector loads"], out)


def gemm(results) -> list[str]:
    lines = [f"device: {results['device']}"]
    for name, run in results["runs"].items():
        rows = [[r["R"], f"{r['gflops']['time_only']:.0f}", f"{r['gflops']['space_only']:.0f}",
                 f"{r['gflops']['bmm']:.0f}", f"{r['gflops']['stfuse']:.0f}", f"{r['gflops']['stfuse_grouped']:.0f}",
                 f"{100 * r['peak_fraction']:.1f}%", f"{r['vs_time']:.2f}", f"{r['vs_space']:.2f}"]
                for r in run["same_shape"]]
        lines += ["", f"{name}, measured peak {run['peak_gflops']:.0f} GFLOP/s (GFLOP/s per column):", ""]
        lines += _table(["R", "time-only", "space-only", "bmm", "stfuse", "grouped", "% peak", "x time", "x space"],
                        rows)
    return lines


def host(results) -> list[str]:
    rows = [[r["kind"], r["R"], f"{r['total_us']:.1f}", f"{r['records_us']:.1f}", f"{r['tables_us']:.1f}",
             f"{r['launch_us']:.1f}"] for r in results["rows"]]
    note = "launch STUBBED (no CUDA)" if results["stubbed"] else "real launches"
    return [f"{results['machine']}; {note}", ""] + _table(["kind", "R", "total us", "records", "tables", "launch"],
                                                           rows)


def graphs(results) -> list[str]:
    rows = [[r["form"], r["R"], f"{r['graphs_us']:.1f}", f"{r['eager_us']:.1f}",
             f"{r['eager_us'] / r['graphs_us']:.2f}x", r["replays"]] for r in results["rows"]]
    return [results["machine"], ""] + _table(["form", "R", "graphs us", "op by op us", "speedup", "replays"], rows)


def models(results) -> list[str]:
    rows = results if isinstance(results, list) else results.get("rows", [])
    if not rows:
        return ["(no rows)"]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    return _table(keys, [[r.get(k, "") for k in keys] for r in rows])


SECTIONS = [("kernels.json", "stfuse kernels (local arch)", kernels),
            ("gpu_kernels.json", "bench_gpu_kernels.py: the paper's GEMM", gemm),
            ("host_overhead.json", "bench_host_overhead.py", host),
            ("graphs.json", "bench_graphs.py: CUDA graphs against op by op", graphs),
            ("models.json", "bench_models.py --quick", models)]


def main(argv: list[str]) -> int:
    out, status = Path(argv[0]), argv[1:]
    lines = ["## gpu_check.sh", "", *[f"- {s}" for s in status]]
    for name, title, render in SECTIONS:
        data = _load(out, name)
        lines += ["", f"### {title}", ""]
        lines += render(data) if data is not None else [f"({name} not written: step skipped or failed)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
