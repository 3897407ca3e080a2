"""CUDA graphs: a whole bound program captured per input signature, then replayed.

A bound program is one per tenant subset (and stacked or grouped form,
stfuse/program.py), so keying its graphs by the flat inputs' shapes, strides
and dtypes keys them by (tenant subset, batch sizes): the batch buckets the
runtime forms (stfuse/runtime/batching.py) each get one graph. A replay costs
one ``copy_`` per input, one ``cudaGraphLaunch`` and one ``clone`` per output,
whatever the number of fused ops and members inside.

What runs eagerly instead (the program as bound, never a wrong answer):

| case                                               | why                                      |
|----------------------------------------------------|------------------------------------------|
| not CUDA, or an input off the program's device      | nothing to capture                       |
| a non-tensor input that is not hashable             | it cannot key a graph                    |
| the first ``warmup`` calls of a signature           | kernels compile, launch plans fill       |
| a signature beyond ``max_graphs`` captured ones     | shapes not bucketed: each would capture  |
| a signature whose capture failed                    | an op syncs (``.item()``, a host copy) or is not capturable; never retried |
| inside ``launch.tuning()``                          | a warm-up times configs eagerly          |

Capture warms up on a side stream first (as torch asks), then records under
``launch.keep_captured``: every launch table and pinned staging block the
captured work reads stays alive with the graph. Planned sites (kernels/arena.py)
run unplanned while capturing: the graph's private pool is their arena.
Replays of one graph are serialised (a lock for the host side, an event so a
replay on another stream waits for the last one's output clones).

``backend`` does the CUDA work (``CudaGraphs``); tests pass a fake, so the keying
and the fallbacks are tested on CPU.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from . import launch

_FAILED = object()  # a signature whose capture failed: eager from then on


class CudaGraphs:
    """Captures and replays with ``torch.cuda.CUDAGraph``."""

    def __init__(self):
        self._side = None  # the warm-ups' stream: planned sites keep one arena set for it

    def usable(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def capture(self, program: Callable, flat: tuple, device: torch.device) -> Callable[[tuple], tuple]:
        """``replay(flat) -> outputs`` for ``program`` at ``flat``'s signature; raises where capture fails."""
        with torch.cuda.device(device):
            static_in = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in flat)
            side = self._side = self._side or torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                program(*static_in)  # warm-up: compiles, fills plans and arenas for the side stream
            torch.cuda.current_stream().wait_stream(side)
            graph, keep = torch.cuda.CUDAGraph(), []
            try:
                # thread_local: the runtime's other threads may use CUDA meanwhile; a stream of
                # its own: a failed capture leaves nothing behind on a stream another one uses
                with (launch.keep_captured(keep), torch.no_grad(),
                      torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local")):
                    static_out = program(*static_in)
            except Exception:
                torch.cuda.synchronize()  # let a broken capture's work drain before going on
                raise
        return _Replay(graph, static_in, static_out, keep)


class _Replay:
    """One captured graph: copy inputs in, replay, clone outputs out."""

    def __init__(self, graph, static_in: tuple, static_out, keep: list):
        self.graph, self.static_in, self.static_out, self.keep = graph, static_in, static_out, keep
        self.lock = threading.Lock()
        self.done = None  # event after the last replay's output clones

    def __call__(self, flat: tuple) -> tuple:
        with self.lock:
            stream = torch.cuda.current_stream()
            if self.done is not None:
                stream.wait_event(self.done)
            for s, t in zip(self.static_in, flat):
                if isinstance(t, torch.Tensor):
                    s.copy_(t)
            self.graph.replay()
            out = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in self.static_out)
            self.done = torch.cuda.Event()
            self.done.record(stream)
        return out


class GraphedProgram(torch.nn.Module):
    """A bound program that replays a CUDA graph per input signature (see the module docstring)."""

    def __init__(self, program: torch.fx.GraphModule, device: torch.device, backend=None,
                 max_graphs: int = 8, warmup: int = 1):
        super().__init__()
        self.program, self.device = program, device
        self.backend = backend if backend is not None else CudaGraphs()
        self.max_graphs, self.warmup = max_graphs, warmup
        self._graphs: dict[tuple, object] = {}  # signature -> replay, or _FAILED
        self._seen: dict[tuple, int] = {}  # signature -> eager calls so far
        self._lock = threading.Lock()
        # what each call did: replayed, captured, eager (by reason), failed captures
        self.counts = {"replay": 0, "capture": 0, "failed": 0, "eager": 0}

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    @property
    def code(self) -> str:
        return self.program.code

    def signature(self, flat: tuple) -> tuple | None:
        """What a graph is keyed by: each input's shape, stride and dtype (a non-tensor: its
        value); None where the call cannot replay (an input elsewhere, an unhashable value)."""
        key, want = [], self.device
        for t in flat:
            if isinstance(t, torch.Tensor):
                at = t.device  # "cuda" (no index) stands for any CUDA device
                if at.type != want.type or (want.index is not None and at.index != want.index):
                    return None
                key.append((t.shape, t.stride(), t.dtype))
            else:
                try:
                    hash(t)
                except TypeError:
                    return None
                key.append((type(t), t))
        return tuple(key)

    def forward(self, *flat):
        replay = self._replay_for(flat)
        if replay is None or replay is _FAILED:
            self.counts["eager"] += 1
            return self.program(*flat)
        self.counts["replay"] += 1
        return replay(flat)

    def _replay_for(self, flat: tuple):
        if launch.tuning_now() or not self.backend.usable(self.device):
            return None
        key = self.signature(flat)
        if key is None:
            return None
        replay = self._graphs.get(key)
        if replay is not None:
            return replay
        with self._lock:  # one capture per signature, whatever the threads
            if key in self._graphs:
                return self._graphs[key]
            seen = self._seen[key] = self._seen.get(key, 0) + 1
            if seen <= self.warmup or len(self._graphs) >= self.max_graphs:
                return None
            try:
                replay = self.backend.capture(self.program, flat, self.device)
                self.counts["capture"] += 1
            except Exception:  # noqa: BLE001 - not capturable: the program runs as it is
                replay = _FAILED
                self.counts["failed"] += 1
            self._graphs[key] = replay
            self._seen.pop(key, None)
            return replay
