"""Python's cyclic garbage collector kept off the compiled program while a Runtime serves.

A full (generation 2) collection walks every object the process tracks. Beside a
compiled program that is hundreds of thousands of objects (traced graphs, fx
modules, the models themselves): 345k for four small MLP tenants, a 170 ms
collection on the 2-core CPU, and request traffic (futures, requests, tensors)
triggers one every second or so. The collecting thread holds the GIL throughout,
so every request queued meanwhile waits: in bench_isolation, 8 such pauses in a
4 s run. ``gc.freeze()`` moves the objects alive now to the permanent generation,
which collections skip (a full collection then took 1 us); objects made later are
collected as always. The freeze holds while any Runtime serves (``hold`` /
``release``, counted); when the last one stops, ``gc.unfreeze()`` hands the
objects back, and garbage among them is collected again.
"""

from __future__ import annotations

import atexit
import gc
import threading

_lock = threading.Lock()
_holders = 0


def hold() -> None:
    """Collect, then freeze what is alive: called as a Runtime starts (a few hundred ms
    once, for the full collection that keeps garbage out of the permanent generation)."""
    global _holders
    with _lock:
        gc.collect()
        gc.freeze()
        _holders += 1


def release() -> None:
    """A Runtime stopped: unfreeze once none is left."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        if _holders == 0:
            gc.unfreeze()


def holders() -> int:
    return _holders


@atexit.register
def _unfreeze_at_exit() -> None:
    # objects left frozen are never finalised at exit, and Triton's nanobind reports each as leaked
    gc.unfreeze()
