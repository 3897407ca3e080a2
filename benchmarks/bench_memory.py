"""Memory of a compiled program: RSS of 4 BERT-base tenants before and after stfuse.compile.

    python benchmarks/bench_memory.py [--layers 12] [--fuse-all]

The packed [R, ...] weights of fused groups are copies: the tenants' traced graphs keep
the original parameters (for subsets, respecialising and the self-check), so every packed
group adds its weights' size once more. By default groups are priced by the CPU cost model
(``tune="model"``, the numbers in RESULTS.md); ``--fuse-all`` keeps every group the matcher
forms (``tune="off"``): the worst case. Linux only (reads VmRSS from /proc/self/status).
"""

from __future__ import annotations

import argparse
import gc
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (BERT-base: 12)")
    ap.add_argument("--fuse-all", action="store_true", help='keep every group (tune="off")')
    args = ap.parse_args(argv)
    import torch
    import transformers as T

    import stfuse

    start = time.perf_counter()
    cfg = T.BertConfig(num_hidden_layers=args.layers)
    models = {}
    for i in range(4):
        torch.manual_seed(i)
        models[f"bert{i}"] = T.BertModel(cfg).eval()
    params = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters()) / 2**20
    gc.collect()
    before = rss_mib()
    fused = stfuse.compile(models, {n: torch.randint(0, 1000, (1, 32)) for n in models},
                           tune="off" if args.fuse_all else "model")
    gc.collect()
    after = rss_mib()
    packed = sum(t.numel() * t.element_size() for entry in fused.graph.graph.get("packed", {}).values()
                 for t in entry.values()) / 2**20
    s = fused.plan.stats
    print(f"4 BERT tenants ({args.layers} layers, hidden 768), {'every group kept' if args.fuse_all else 'CPU cost model'}")
    print(f"parameters {params:.0f} MiB; RSS {before:.0f} MiB with the models, {after:.0f} MiB after compile "
          f"(+{after - before:.0f} MiB); packed group weights {packed:.0f} MiB; coverage {s['coverage']:.0%}, "
          f"{s['fused_groups']} groups; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
