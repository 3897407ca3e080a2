"""End to end on transformers models: stfuse against eager, torch.compile, one compiled wrapper, and vmap.

    python benchmarks/bench_models.py --quick          # CPU, under 2 minutes on 2 cores
    python benchmarks/bench_models.py                  # full-size models, N = 2, 4, 8, batch 1 and 8 (a GPU)
    python benchmarks/bench_models.py --no-compile     # without the four inductor columns
    python benchmarks/bench_models.py --quick --only-lengths   # 4 BERTs, request lengths 8-128

Tenant sets, built from transformers configs with random weights (different per tenant):
  bert     BERT-base-sized encoder (hidden 768, 12 layers, 12 heads, FFN 3072), sequence 128
  vit      ViT-base (hidden 768, 12 layers, 224x224, patch 16)
  resnet50 ResNet-50 (bottleneck [3, 4, 6, 3], widths 256..2048, 224x224)
  gpt2     GPT-2 small (768, 12 layers, 12 heads), sequence 128
  mixed    one of each family per 4 tenants (different architectures)
--quick keeps every family's layer shape (hidden 768 for the transformers) but uses 2 layers,
sequence 32, 64x64 images, a 1000-token vocabulary and ResNet-50's layout at an eighth of its
widths, with N = 4 at batch 1 (the first set also at batch 8).

Alternatives, on the same models and inputs, one request per tenant per round:
  eager     the N models in turn (sequential eager)
  vmap      torch.func.stack_module_state + functional_call under torch.vmap: one batched
            call over the stacked weights (same architecture only)
  compile   torch.compile (inductor) of each model, run in turn
  wrapper   torch.compile (inductor) of one nn.Module whose forward calls every tenant:
            inductor sees all N models in one graph and may fuse across them itself
  backend   torch.compile(model, backend="stfuse") of each model (stfuse's passes within a
            model, then Inductor: the backend's defaults), run in turn
  stfuse+inductor  stfuse.compile(..., codegen="inductor"): the fused program compiled by Inductor
  stfuse    stfuse.compile of the N tenants, one call (codegen="direct", the default)
--lengths adds a row of 4 BERT tenants whose request lengths are drawn per round from
8-128 tokens (log-uniform): stfuse with the sequence declared dynamic (compile(dynamic=))
against eager at each request's own length and against stfuse with every request padded
to 128 (what a fixed-shape program makes a server do).
With --quick the four inductor columns (compile, wrapper, backend, stfuse+inductor) run on the
first set only (inductor takes tens of seconds per graph on 2 CPU cores; --compile-all runs them
on every set); --no-compile drops them.

Prints, per set: mean and p99 latency of a round, throughput (samples/s over all
tenants) and every alternative's time over stfuse's (> 1: stfuse is faster). Eager and
stfuse are timed in 3 rounds of blocks taken in turns, and the lowest and highest of
the rounds' ratios are printed: the noise within which "never slower" is claimed.
Every stfuse result is first checked against a float64 reference with the
tolerance table (bench_paper.check_against_float64). JSON: benchmarks/out/models.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

# Compile in this process: inductor's worker pool would keep compiling in the
# background and disturb the timings of the next rows.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

import stfuse
from stfuse.runtime.stats import percentile
from stfuse.tolerances import assert_close

from common import check_against_float64, latencies_ms, machine, paired_latencies_ms, resnet50_config, sync

OUT = Path(__file__).parent / "out"
FAMILIES = ("bert", "vit", "resnet50", "gpt2")
ALTS = ("eager", "vmap", "compile", "wrapper", "backend", "stfuse+inductor", "stfuse")
COMPILED = ("compile", "wrapper", "backend", "stfuse+inductor")  # the columns --no-compile drops


def build(family: str, seed: int, batch: int, quick: bool, device: torch.device):
    """(model in eval mode, example input) with random weights from ``seed``."""
    import transformers as T

    torch.manual_seed(seed)
    layers, seq, vocab, image = (2, 32, 1000, 64) if quick else (12, 128, None, 224)
    if family == "bert":
        cfg = T.BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                           intermediate_size=3072, **({"vocab_size": vocab} if vocab else {}))
        model, x = T.BertModel(cfg), torch.randint(0, cfg.vocab_size, (batch, seq))
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=768, n_layer=layers, n_head=12, use_cache=False,
                           **({"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0} if vocab else {}))
        model, x = T.GPT2Model(cfg), torch.randint(0, cfg.vocab_size, (batch, seq))
    elif family == "vit":
        cfg = T.ViTConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                          intermediate_size=3072, image_size=image, patch_size=16)
        model, x = T.ViTModel(cfg), torch.randn(batch, 3, image, image)
    elif family == "resnet50":
        cfg, size = resnet50_config(quick)
        model, x = T.ResNetModel(cfg), torch.randn(batch, 3, size, size)
    else:
        raise ValueError(f"unknown family {family!r}")
    return model.eval().to(device), x.to(device)


def tenant_set(name: str, n: int, batch: int, quick: bool, device: torch.device):
    families = [FAMILIES[i % len(FAMILIES)] for i in range(n)] if name == "mixed" else [name] * n
    built = [build(f, 100 + i, batch, quick, device) for i, f in enumerate(families)]
    return [m for m, _ in built], [x for _, x in built]


class Wrapper(nn.Module):
    """Every tenant in one module, so that one torch.compile sees them all in one graph."""

    def __init__(self, models):
        super().__init__()
        self.tenants = nn.ModuleList(models)

    def forward(self, *xs):
        return tuple(m(x) for m, x in zip(self.tenants, xs))


def vmapped(models, xs):
    """One call over stacked weights, or None where the architectures differ."""
    if len({type(m) for m in models}) != 1 or len({x.shape for x in xs}) != 1:
        return None
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    fn = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), randomness="same")
    xstack = torch.stack(xs)
    return lambda: fn(params, buffers, xstack)


def compiled(alt: str, models, xs):
    """One round of the compiled column ``alt`` (every tenant once), compiled on its first call."""
    if alt == "stfuse+inductor":
        fused = stfuse.compile(models, [(x,) for x in xs], codegen="inductor")
        return lambda: fused(*xs)
    if alt == "wrapper":
        c = torch.compile(Wrapper(models))
        return lambda: c(*xs)
    # per model: inductor ("compile") or stfuse's backend with its defaults ("backend")
    cs = [torch.compile(m, **({"backend": "stfuse"} if alt == "backend" else {})) for m in models]
    return lambda: [c(x) for c, x in zip(cs, xs)]


def run_set(name: str, n: int, batch: int, args, device: torch.device, with_compile: bool) -> dict:
    models, xs = tenant_set(name, n, batch, args.quick, device)
    row = {"set": name, "tenants": n, "batch": batch, "errors": {}}
    t = time.perf_counter()
    fused = stfuse.compile(models, [(x,) for x in xs])
    row["stfuse_compile_s"] = time.perf_counter() - t
    check_against_float64(fused, models, xs, f"{name} x{n} b{batch}")
    stats = fused.plan.stats
    row.update(groups=stats["fused_groups"], coverage=stats["coverage"],
               launches=f"{stats['launches_before']}->{stats['launches_after']}")

    alts = {"eager": lambda: [m(x) for m, x in zip(models, xs)], "stfuse": lambda: fused(*xs)}
    with torch.no_grad():
        try:
            fn = vmapped(models, xs)
            if fn is not None:
                fn()
                alts["vmap"] = fn
        except Exception as e:  # noqa: BLE001  (a model vmap cannot batch: recorded, not fatal)
            row["errors"]["vmap"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if with_compile:
            for alt in COMPILED:
                try:
                    t = time.perf_counter()
                    fn = compiled(alt, models, xs)
                    fn()  # compile outside the timing
                    row[f"{alt}_compile_s"] = time.perf_counter() - t
                    if alt in ("backend", "stfuse+inductor"):  # stfuse's: checked as the default mode is
                        check_against_float64(lambda *a, fn=fn: fn(), models, xs, f"{alt} {name} x{n} b{batch}")
                    alts[alt] = fn
                except Exception as e:  # noqa: BLE001
                    row["errors"][alt] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        # eager and stfuse in turns of blocks: the spread of their ratio over the rounds
        lats = {}
        lats["eager"], lats["stfuse"], ratios = paired_latencies_ms(alts["eager"], alts["stfuse"], device, args.repeat)
        row["x_eager_range"] = (min(ratios), max(ratios))
        for alt in ALTS:
            if alt in alts:
                lat = sorted(lats[alt] if alt in lats else latencies_ms(alts[alt], device, args.repeat))
                mean = statistics.fmean(lat)
                row[alt] = {"mean_ms": mean, "p99_ms": percentile(lat, 99),
                            "samples_per_s": n * batch / mean * 1e3}
    sync(device)
    print(f"  {name} x{n} b{batch}: " + ", ".join(f"{a} {row[a]['mean_ms']:.2f} ms" for a in ALTS if a in row)
          + (f"  (failed: {', '.join(row['errors'])})" if row["errors"] else ""), flush=True)
    return row


def request_lengths(n: int, rounds: int, seed: int, low: int = 8, high: int = 128) -> list[list[int]]:
    """Per round, one request length per tenant: log-uniform over [low, high] (short
    requests common, long ones rare, as chat and search traffic is), seeded."""
    rng = random.Random(seed)
    return [[int(round(math.exp(rng.uniform(math.log(low), math.log(high))))) for _ in range(n)]
            for _ in range(rounds)]


def run_lengths(n: int, args, device: torch.device) -> dict:
    """N BERT tenants at request lengths drawn per round (8-128 tokens): stfuse with the
    sequence declared dynamic, against eager at each request's own length, and against
    stfuse with every request padded to 128 (the attention mask hides the padding)."""
    import transformers as T

    def bert(seed):
        torch.manual_seed(seed)
        cfg = T.BertConfig(hidden_size=768, num_hidden_layers=2 if args.quick else 12, num_attention_heads=12,
                           intermediate_size=3072, vocab_size=1000)
        return T.BertModel(cfg).eval().to(device)

    def call(length, pad_to=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 1000, (1, pad_to or length), generator=g)
        mask = torch.zeros(1, pad_to or length, dtype=torch.long)
        mask[:, :length] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    names = [f"b{i}" for i in range(n)]
    models = {t: bert(200 + i) for i, t in enumerate(names)}
    seq = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    t = time.perf_counter()
    dynamic = stfuse.compile(models, {t: call(16) for t in names}, dynamic={t: seq for t in names})
    row = {"set": "bert lengths 8-128", "tenants": n, "batch": 1, "errors": {},
           "stfuse_compile_s": time.perf_counter() - t}
    padded = stfuse.compile(models, {t: call(128) for t in names})
    rounds = request_lengths(n, args.repeat, seed=7)
    calls = [{t: call(L, seed=i) for i, (t, L) in enumerate(zip(names, lens))} for lens in rounds]
    pads = [{t: call(L, 128, seed=i) for i, (t, L) in enumerate(zip(names, lens))} for lens in rounds]
    with torch.no_grad():
        for c in calls[:2]:  # stfuse at each length against the model itself
            got = dynamic.run(c)
            for t in names:
                assert_close(got[t].last_hidden_state, models[t](**c[t]).last_hidden_state, msg=f"{t} at {c[t]}")
        alts = {"eager": lambda c: [models[t](**c[t]) for t in names], "stfuse": dynamic.run}
        for alt, inputs, fn in (("eager", calls, alts["eager"]), ("stfuse", calls, alts["stfuse"]),
                                ("padded", pads, padded.run)):
            fn(inputs[0])
            lat = []
            for c in inputs:
                sync(device)
                start = time.perf_counter()
                fn(c)
                sync(device)
                lat.append((time.perf_counter() - start) * 1e3)
            row[alt] = {"mean_ms": statistics.fmean(lat), "p99_ms": percentile(sorted(lat), 99)}
    stats = dynamic.plan.stats
    row.update(groups=stats["fused_groups"], coverage=stats["coverage"],
               launches=f"{stats['launches_before']}->{stats['launches_after']}",
               mean_length=statistics.fmean(L for lens in rounds for L in lens))
    print(f"  {row['set']} x{n}: " + ", ".join(f"{a} {row[a]['mean_ms']:.2f} ms" for a in ("eager", "stfuse", "padded"))
          + f"  (mean length {row['mean_length']:.0f})", flush=True)
    return row


def lengths_table(row: dict) -> str:
    st = row["stfuse"]["mean_ms"]
    return (f"{row['set']} x{row['tenants']} (mean length {row['mean_length']:.0f}): "
            + ", ".join(f"{a} {row[a]['mean_ms']:.2f} ms (p99 {row[a]['p99_ms']:.2f}, {row[a]['mean_ms'] / st:.2f}x stfuse)"
                        for a in ("eager", "stfuse", "padded")))


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["set", "N", "batch"] + [f"{a} ms (p99)" for a in ALTS] + [f"{a}/stfuse" for a in ALTS[:-1]] + [
        "eager/stfuse per round", "fastest", "stfuse samples/s", "groups", "coverage", "launches"]
    body = []
    for r in rows:
        st = r["stfuse"]["mean_ms"]
        body.append([r["set"], str(r["tenants"]), str(r["batch"])]
                    + [f"{r[a]['mean_ms']:.2f} ({r[a]['p99_ms']:.2f})" if a in r else "-" for a in ALTS]
                    + [f"{r[a]['mean_ms'] / st:.2f}" if a in r else "-" for a in ALTS[:-1]]
                    + ["{:.2f}-{:.2f}".format(*r["x_eager_range"]) if "x_eager_range" in r else "-"]
                    + [min((a for a in ALTS if a in r), key=lambda a: r[a]["mean_ms"]),
                       f"{r['stfuse']['samples_per_s']:.0f}", str(r["groups"]), f"{r['coverage']:.0%}",
                       r["launches"]])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head] + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, N = 4, batch 1, few repetitions")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (needs a C++ compiler on CPU)")
    ap.add_argument("--compile-all", action="store_true",
                    help="with --quick: the inductor columns on every set, not only the first")
    ap.add_argument("--sets", nargs="+", choices=FAMILIES + ("mixed",), default=None)
    ap.add_argument("--tenants", type=int, nargs="+", help="N values")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds per alternative")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=OUT / "models.json")
    ap.add_argument("--lengths", action="store_true",
                    help="also the variable-length row: 4 BERTs at request lengths 8-128")
    ap.add_argument("--only-lengths", action="store_true", help="just the variable-length row")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sets = args.sets or list(FAMILIES + ("mixed",))
    tenants = args.tenants or ([4] if args.quick else [2, 4, 8])
    batches = args.batches or ([1] if args.quick else [1, 8])
    args.repeat = args.repeat or (10 if args.quick else 50)
    where = machine(device)
    print(where)

    cases = [(s, n, b) for s in sets for b in batches for n in tenants]
    if args.quick and not args.batches:
        cases.insert(1, (sets[0], tenants[0], 8))  # the batch-8 end of the target, on the first set
    rows = []
    if args.only_lengths:
        cases = []
    for i, (s, n, b) in enumerate(cases):
        with_compile = not args.no_compile and (not args.quick or i == 0 or args.compile_all)
        rows.append(run_set(s, n, b, args, device, with_compile))
    lengths = run_lengths(4, args, device) if args.lengths or args.only_lengths else None
    print(f"\nmean (p99) ms per round, one request per tenant; ratios: alternative time / stfuse time; {where}")
    print(table(rows) if rows else "")
    if lengths is not None:
        print(lengths_table(lengths))
    for r in rows:
        for alt, err in r["errors"].items():
            print(f"  {r['set']} x{r['tenants']} b{r['batch']}: {alt} failed: {err}")
    if args.markdown:
        print()
        print(table(rows, markdown=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": where, "quick": args.quick, "rows": rows, "lengths": lengths},
                                   indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
