"""codegen="inductor": the canonical program compiled by torch.compile's Inductor.

The canonical program (passes/lower.py) is a plain FX graph of aten ops and
``stfuse::`` custom ops with fakes (kernels/ops.py), so Inductor takes it as
it is: it generates code for the aten ops (fusing pointwise and norm chains,
the tenants' unfused ops and the stack/unbind copies around groups), and each
``stfuse::`` op stays one call, an extern kernel (the torch reference through
the dispatcher on CPU, the Triton kernel on CUDA). Before/after::

    s = aten.stack([x0, x1])                 s = aten.stack([x0, x1])   (Inductor: one copy kernel)
    y = stfuse.stacked_linear(s, w, b, ...)  y = stfuse.stacked_linear(s, w, b, ...)   (extern call)
    z = aten.gelu(aten.add(y0, r0))          z = cpp_fused_add_gelu_0(y0, r0)   (generated)

Shapes: on the first calls the program's varying dims (dim 0 of every batched
input of a dynamic tenant, and every declared dynamic dim, stfuse/dims.py) are
marked dynamic on aliases of the inputs (the caller's tensors are not touched),
so one compiled graph serves every batch size. Dynamo specialises sizes 0 and 1,
so a call at batch 1 compiles once more; a later guard failure recompiles with
Dynamo's automatic dynamic shapes.

Compilation happens on the first call of each program, in the calling process;
nothing compiled is ever saved or loaded (artifacts store the canonical program,
stfuse/artifact/). Where Inductor fails to compile or run a program, the
program runs as codegen="direct" from then on (kernels/bind.py), with a
warning naming the error: a compiler failure never fails a call.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class InductorProgram:
    """``forward(*flat)`` runs ``gm`` compiled by Inductor; ``direct`` (the program bound for
    codegen="direct") runs instead once Inductor has failed on it."""

    def __init__(self, gm: torch.fx.GraphModule, direct, dynamic: list[tuple[int, ...]]):
        self.canonical = gm
        self.direct = direct
        # per flat input: the dims that vary between calls (marked dynamic while compiling)
        self.dynamic = [tuple(d) for d in dynamic]
        self.error: str | None = None  # why Inductor was given up on (None: it runs)
        self.compiles = 0  # graphs Inductor compiled for this program (a recompile counts again)
        self.runs = 0  # calls the compiled program ran
        self._compiled = torch.compile(gm, backend=self._inductor)
        self._marking = any(self.dynamic)

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs):
        """The Dynamo backend: Inductor, counted."""
        self.compiles += 1
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    def _marked(self, flat) -> tuple[tuple, bool]:
        """Aliases of the inputs with their varying dims marked dynamic, and whether every
        such dim is 2 or more (then no 0/1 specialisation hid one, and marking can stop)."""
        out, wide = [], True
        for x, ds in zip(flat, self.dynamic):
            if ds and isinstance(x, torch.Tensor):
                x = x.view(x.shape)
                for d in ds:
                    torch._dynamo.maybe_mark_dynamic(x, d)
                    wide = wide and x.shape[d] >= 2
            out.append(x)
        return tuple(out), wide

    def forward(self, *flat):
        if self.error is not None:
            return self.direct.forward(*flat)
        args, wide = self._marked(flat) if self._marking else (flat, False)
        try:
            out = self._compiled(*args)
        except Exception as err:  # noqa: BLE001 - the direct program computes the same values
            self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            log.warning("stfuse: Inductor failed on a program (%s); it runs with codegen='direct'",
                        self.error[:300])
            return self.direct.forward(*flat)
        self.runs += 1
        if wide:
            self._marking = False
        return out

    __call__ = forward
