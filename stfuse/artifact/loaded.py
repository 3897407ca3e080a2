"""A program loaded from an artifact: the FusedProgram call API over the saved programs."""

from __future__ import annotations

from pathlib import Path

import torch

from stfuse.program import TenantCalls


class BoundProgram:
    """A program with its weights bound: ``forward(*flat inputs)``."""

    def __init__(self, gm, weights):
        self.gm, self.weights = gm, tuple(weights)

    def forward(self, *flat):
        return self.gm.forward(*self.weights, *flat)


class ChainedPrograms:
    """Several tenants' own programs run one after another (a subset saved unfused)."""

    def __init__(self, parts):
        self.parts = parts  # [(program, number of flat inputs)]

    def forward(self, *flat):
        out, i = [], 0
        for prog, n in self.parts:
            out.extend(prog.forward(*flat[i:i + n]))
            i += n
        return out


class LoadedProgram(TenantCalls):
    """An artifact loaded by ``stfuse.load`` (stfuse/artifact/load.py), with the call API of
    FusedProgram: ``prog(x1, x2)``, ``run``, ``tenants``, ``check_inputs``, ``plan``.

    ``programs`` maps (tenants, stacked) to the saved programs. A call on a subset
    with no saved program of its own chains its tenants' single-tenant programs:
    the same values within the tolerance table, without fusion across them."""

    def __init__(self, path, manifest, specs, programs, plan, device):
        self.path, self.manifest, self.device = Path(path), manifest, device
        self.plan = plan
        self._init_calls(specs)
        self._saved = programs  # (tenants, stacked) -> (BoundProgram, counts)
        self._programs.update(programs)

    @property
    def program(self) -> torch.fx.GraphModule:
        """The exported program running every tenant at one batch size."""
        return self._saved[(self._names, True)][0].gm

    def _program(self, active: tuple, stacked: bool):
        key = (active, stacked)
        if key not in self._programs:
            if (active, False) in self._saved:  # a per-tenant-batch program fits any call
                self._programs[key] = self._saved[(active, False)]
            else:
                singles = [self._saved[((t,), True)] for t in active]
                parts = [(prog, len(self._specs[t].inputs)) for t, (prog, _) in zip(active, singles)]
                self._programs[key] = (ChainedPrograms(parts), [c for _, counts in singles for c in counts])
        return self._programs[key]

    def __repr__(self) -> str:
        s = self.plan.stats
        return (f"LoadedProgram({str(self.path)!r}, tenants={self.tenants}, groups={s['fused_groups']}, "
                f"device={self.device})")
