"""What the benchmarks share: timers, GEMM baselines, the float64 check, machine line.

Each ``bench_<scenario>.py`` runs as a script (``python benchmarks/bench_x.py``), so
this directory is on ``sys.path`` and ``from common import ...`` needs no path edits.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time

import torch

from stfuse.demo import median_us
from stfuse.tolerances import assert_close

__all__ = ["bench", "geomean", "time_only", "space_only", "sync", "time_ms", "latencies_ms", "machine",
           "resnet50_config", "check_against_float64", "median_us"]


def bench(fn) -> float:
    """Median milliseconds of ``fn`` on CUDA (CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    from stfuse.kernels.launch import tuning

    with tuning():  # the explicit warm-up: compiles, and times stfuse's configs (never done on a call)
        fn()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def time_only(xs, ws, outs):
    """The paper's time-only baseline: the tenants' GEMMs one after another."""
    def run():
        for x, w, out in zip(xs, ws, outs):
            torch.mm(x, w.t(), out=out)
    return run


def space_only(xs, ws, outs):
    """The paper's space-only baseline on CUDA: one stream per tenant."""
    streams = [torch.cuda.Stream() for _ in xs]

    def run():
        main = torch.cuda.current_stream()
        for s, x, w, out in zip(streams, xs, ws, outs):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                torch.mm(x, w.t(), out=out)
        for s in streams:
            main.wait_stream(s)
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, repeat: int) -> float:
    """Median milliseconds of fn: CUDA events via triton's do_bench on a GPU, wall clock on CPU."""
    if device.type == "cuda":
        return bench(fn)
    return median_us(fn, repeat, warmup=max(2, repeat // 5)) / 1e3


def latencies_ms(fn, device: torch.device, repeat: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def paired_latencies_ms(first, second, device: torch.device, repeat: int,
                        rounds: int = 3) -> tuple[list, list, list]:
    """``latencies_ms`` of two alternatives in ``rounds`` turns of blocks (about repeat /
    rounds calls each, after one untimed call), and per round the ratio of their mean
    times (first / second): a noisy spell hits both, and the ratios give the spread.
    Blocks, not single calls in turn: alternating call by call slowed stfuse's programs
    by about 10% on CPU (bench_models --quick, GPT-2 x4: 15.4 against 13.6 ms), each
    call starting where the other library left the caches and threads."""
    per = max(1, repeat // rounds)
    a, b, ratios = [], [], []
    for _ in range(rounds):
        la, lb = latencies_ms(first, device, per, 1), latencies_ms(second, device, per, 1)
        a, b = a + la, b + lb
        ratios.append(statistics.fmean(la) / statistics.fmean(lb))
    return a, b, ratios


def machine(device: torch.device) -> str:
    where = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return f"{where}, torch {torch.__version__}, Python {platform.python_version()}"


def resnet50_config(quick: bool):
    import transformers as T

    if quick:  # ResNet-50's layout (bottleneck, [3, 4, 6, 3]) at an eighth of its widths
        return T.ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3],
                              layer_type="bottleneck"), 64
    return T.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                          layer_type="bottleneck"), 224


def check_against_float64(fused, models, xs, msg: str) -> None:
    """stfuse within the tolerance table of a float64 reference, or, where eager fp32 itself misses that
    table (a 50-layer fp32 network's rounding, not stfuse's), within twice eager's own error."""
    with torch.no_grad():
        for i, (m, x, y) in enumerate(zip(models, xs, fused(*xs))):
            ref = copy.deepcopy(m).double()(x.double() if x.is_floating_point() else x)
            try:
                assert_close(y, ref, msg=f"{msg} tenant {i}")
            except AssertionError:
                eager = m(x)
                err = max((a.double() - r).abs().max().item() for a, r in
                          zip(torch.utils._pytree.tree_leaves(y), torch.utils._pytree.tree_leaves(ref)))
                eager_err = max((a.double() - r).abs().max().item() for a, r in
                                zip(torch.utils._pytree.tree_leaves(eager), torch.utils._pytree.tree_leaves(ref)))
                assert err <= 2 * eager_err, f"{msg} tenant {i}: stfuse error {err:.2e}, eager fp32 {eager_err:.2e}"
