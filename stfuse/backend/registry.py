"""State the backend's modules share: locks, the live compiled graphs, the named groups."""

from __future__ import annotations

import itertools
import threading
import weakref

OPTIONS = ("group", "strict", "verify", "passes", "codegen")
# Traced programs per set of weights of a compiled graph (other data shapes, scalars);
# further shapes of those weights run eagerly.
MAX_SPECIALIZATIONS = 8
# Live weight sets per compiled graph. Dynamo shares one graph between all models of one
# class and shape (their weights are graph inputs), so each model is one weight set:
# a cap of 8 in all made the 9th model of a class run eagerly (issue 11, item 8).
MAX_MODELS = 256

# One lock for everything that traces, compiles or changes membership (rare);
# calls that find their program take no lock. The registries have their own lock,
# which backend() takes while Dynamo compiles: never held while tracing.
_LOCK = threading.RLock()
_REGISTRY_LOCK = threading.Lock()
_GRAPHS: list[weakref.ref] = []
_GROUPS: dict = {}  # name -> Group
_names = itertools.count()




def graphs() -> list:
    """Live compiled graphs, oldest first (for inspection: ``graphs()[-1].programs[0].plan``)."""
    return [cg for cg in (r() for r in _GRAPHS) if cg is not None]


def register(cg) -> None:
    with _REGISTRY_LOCK:
        _GRAPHS[:] = [r for r in _GRAPHS if r() is not None]
        _GRAPHS.append(weakref.ref(cg))
