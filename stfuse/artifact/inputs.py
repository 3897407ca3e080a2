"""Random inputs of a loaded program's recorded specs: what ``stfuse run`` times and what
``stfuse serve`` measures its latency profile and output shapes on."""

from __future__ import annotations

import math

import torch

from stfuse.calls import call_of
from stfuse.errors import StfuseError


def input_bytes(spec, batch: int | None) -> int:
    """Bytes of one call's inputs at ``batch`` rows (None: the example's)."""
    total = 0
    for s in spec.inputs:
        shape = ((batch or s.shape[0]), *s.shape[1:]) if s.batched else s.shape
        total += math.prod(shape) * s.dtype.itemsize
    return total


def random_inputs(prog, names: list[str], batch: int | None, seed: int, max_mb: int) -> dict:
    """Random inputs of the recorded specs for ``names``; refuses (before allocating) a
    batch whose inputs would take more than ``max_mb``."""
    need = sum(input_bytes(prog.specs[n], batch) for n in names if n in prog.specs)
    if need > max_mb * 2**20:
        raise StfuseError(f"the inputs at batch {batch} would take {need / 2**20:,.0f} MiB, more than "
                          f"--max-input-mb {max_mb}; pass a smaller --batch or raise the limit")
    gen = torch.Generator().manual_seed(seed)
    ranges = {t["name"]: [i.get("value_range") for i in t["inputs"]] for t in prog.manifest["tenants"]}
    inputs = {}
    for name in names:
        spec = prog.specs.get(name)
        if spec is None:
            inputs[name] = None  # run() names the unknown tenant
            continue
        leaves = []
        for s, rng in zip(spec.inputs, ranges[name]):
            shape = ((batch or s.shape[0]), *s.shape[1:]) if s.batched else s.shape
            if s.dtype.is_floating_point:
                x = torch.randn(shape, generator=gen).to(s.dtype)
            elif s.dtype == torch.bool:
                x = torch.randint(0, 2, shape, generator=gen).bool()
            else:  # integers: the example's range where it was recorded (token ids), else zeros
                lo, hi = rng if rng else (0, 0)
                x = torch.randint(lo, hi + 1, shape, generator=gen).to(s.dtype)
            leaves.append(x.to(s.device))
        inputs[name] = call_of(leaves, spec.in_spec, spec.constants)
    return inputs
