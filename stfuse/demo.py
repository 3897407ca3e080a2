"""``stfuse demo``: compile a bundled set of tenants, check them, time them."""

from __future__ import annotations

import copy
import statistics
import time

import torch

from . import zoo
from .api import compile as stfuse_compile
from .tolerances import assert_close


def tenants() -> tuple[dict, dict]:
    """Four small tenants: two MLPs, two residual CNNs (same architecture, other weights)."""
    torch.manual_seed(0)
    models = {
        "mlp_a": zoo.mlp(64, 256, 10), "mlp_b": zoo.mlp(64, 256, 10),
        "cnn_a": zoo.resnet(16, 2), "cnn_b": zoo.resnet(16, 2),
    }
    inputs = {n: (torch.randn(1, 64),) if n.startswith("mlp") else (torch.randn(1, 3, 16, 16),)
              for n in models}
    return models, inputs


def median_us(fn, repeat: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main(repeat: int = 50) -> int:
    models, inputs = tenants()
    print(f"compiling {len(models)} tenants: {', '.join(models)}")
    t = time.perf_counter()
    fused = stfuse_compile(models, inputs)
    print(f"compiled in {time.perf_counter() - t:.2f} s\n")
    print(fused.plan.summary())
    outs = fused.run(inputs)
    for name, model in models.items():
        ref = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            want = ref(*(a.double() for a in inputs[name]))
        assert_close(outs[name], want, msg=f"tenant {name}")
    print("\noutputs match eager (float64 reference, float32 tolerance 1e-4) for every tenant")

    for m in models.values():
        m.eval()

    def sequential():
        with torch.no_grad():
            for name, m in models.items():
                m(*inputs[name])

    eager = median_us(sequential, repeat)
    fused_us = median_us(lambda: fused.run(inputs), repeat)
    print(f"\nsequential eager {eager:8.0f} us   stfuse {fused_us:8.0f} us   "
          f"speed-up {eager / fused_us:.2f}x  (median of {repeat}, batch 1, {torch.get_num_threads()} threads)")
    return 0
