"""annotate: shapes, dtypes, op classes, FLOPs and bytes on every node.

Shapes come from running each tenant's graph on fake tensors (no data, no
compute) at two batch sizes, 2 and 3. A dimension that differs between the two
depends on the batch (dims are affine in the batch: M = B * S), so two nodes
whose (shape@2, shape@3) agree have equal shapes at every common batch size:
that pair is the node's ``sig``. ``shape`` is the affine extrapolation to the
tenant's example batch. A node that cannot run on fake tensors (data-dependent
output shapes) gets shape None and is never fused.

Declared dynamic dims (stfuse/dims.py) are probed too: every name at one base
size shared by the tenants declaring it (``dims.probes``), and once more per
name with that size moved (batch 2). The sig is then (shape@2, shape@3, then
per name in sorted order: shape@2 with that size moved, tagged with the base,
or just shape@2 where the node does not depend on it), so two nodes whose sigs
agree have equal shapes whenever their tenants share the batch and the sizes
of every name (what program.py calls stacked). ``shape`` is then propagated at
the tenant's example sizes themselves.

Before/after (one node)::

    %mm = linear(%x, %w)       ->   %mm = linear(%x, %w)  op_class=linear
                                    shape=(8, 64) sig=((2, 64), (3, 64))
                                    dtype=float32 flops=2*8*64*32 bytes=...
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from stfuse import dims, ir
from stfuse.frontend import quiet_trials
from stfuse.ir import Ref

from . import optable

PROBE_BATCHES = (2, 3)


def _propagate(g, tenant: str, tg, batch: int | None, sizes: dict | None = None) -> dict:
    """Fake value of every node of ``tenant`` at ``batch`` (None: the example batch) and
    the declared dims' ``sizes`` ({name: size}; others at the example)."""
    vals: dict[str, object] = {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    order = ir.tenant_order(g, tenant)
    # Leaves first: parameters made by normalize sit at their reader's position.
    order = [k for k in order if g.nodes[k]["kind"] != "call"] + [
        k for k in order if g.nodes[k]["kind"] == "call"]
    # a node that fails on fake tensors is expected (a graph that holds only at its
    # traced batch, data-dependent shapes): torch would log each at error level
    with mode, quiet_trials():
        for k in order:
            a = g.nodes[k]
            if a["kind"] == "input":
                spec = tg.inputs[a["index"]]
                shape = list((batch,) + spec.shape[1:] if (batch and spec.batched) else spec.shape)
                for d, name in spec.dims:
                    shape[d] = (sizes or {}).get(name, shape[d])
                vals[k] = torch.empty(shape, dtype=spec.dtype, device=spec.device)
            elif a["kind"] == "param":
                vals[k] = mode.from_tensor(a["value"])
            elif a["kind"] == "call":
                vals[k] = _run(a, vals)
    return vals


_MISSING = object()


def _run(a, vals):
    leaves = pytree.tree_leaves((a["args"], a["kwargs"]))
    if any(isinstance(v, Ref) and vals.get(v.key, _MISSING) is _MISSING for v in leaves):
        return _MISSING

    def value(v):
        return vals[v.key] if isinstance(v, Ref) else v

    args, kwargs = pytree.tree_map(value, (a["args"], a["kwargs"]))
    try:
        return a["target"](*args, **kwargs)
    except Exception:  # noqa: BLE001 - data-dependent or unsupported on fake tensors
        return _MISSING


def _shape(v):
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def _extrapolate(s2, s3, batch):
    return tuple(d2 + (batch - 2) * (d3 - d2) for d2, d3 in zip(s2, s3))


def _sigs(g, tenant: str, tg, probes: dict, names: list) -> dict:
    """{node: (sig, shape, fake value at batch 2)} of one tenant (module docstring);
    ``probes``: the tenant's {name: (base, other)}, ``names``: every tenant's names."""
    base = {n: b for n, (b, _) in probes.items()}
    if tg.dynamic:
        v2, v3 = (_propagate(g, tenant, tg, b, base) for b in PROBE_BATCHES)
    else:
        v2 = v3 = _propagate(g, tenant, tg, None, base)
    moved = {n: _propagate(g, tenant, tg, PROBE_BATCHES[0] if tg.dynamic else None,
                           {**base, n: probes[n][1]}) for n in base}
    example = _propagate(g, tenant, tg, None) if base else None
    out = {}
    for k in ir.tenant_order(g, tenant):
        s2, s3 = _shape(v2.get(k)), _shape(v3.get(k))
        known = s2 is not None and s3 is not None and len(s2) == len(s3)
        sig = None
        if known:
            sig = (s2, s3)
            for n in names:  # a node that does not depend on n matches one of a tenant without n
                sn = _shape(moved[n].get(k)) if n in moved else s2
                sig += (s2 if sn == s2 else (probes[n][0], sn),)
        if example is not None:
            shape = _shape(example.get(k)) if known else None
        else:
            shape = (_extrapolate(s2, s3, tg.batch) if tg.dynamic else s2) if known else None
        out[k] = (sig, shape, v2.get(k))
    return out


def annotate(g):
    """Set op_class, shape, sig, dtype, flops and bytes on every node; returns a new graph."""
    g = g.copy()
    probes = dims.probes(g.graph["tenants"].values())
    names = sorted({n for p in probes.values() for n in p})
    for tenant, tg in g.graph["tenants"].items():
        for k, (sig, shape, val) in _sigs(g, tenant, tg, probes.get(tenant, {}), names).items():
            g.nodes[k].update(shape=shape, sig=sig,
                              dtype=val.dtype if isinstance(val, torch.Tensor) else None)
    g.graph["op_classes"] = optable.FUSABLE  # what ir.verify accepts as a node's op_class
    for k in g.nodes:
        cls = optable.classify(g, k)
        g.nodes[k]["op_class"] = cls
        g.nodes[k]["flops"] = optable.flops(g, k, cls)
        g.nodes[k]["bytes"] = _bytes(g, k) if cls not in ("view", "input", "param", "output") else 0
    return g


def _nbytes(a) -> int:
    if a["shape"] is None or a["dtype"] is None:
        return 0
    n = 1
    for d in a["shape"]:
        n *= d
    return n * a["dtype"].itemsize


def _bytes(g, k) -> int:
    a = g.nodes[k]
    srcs = set(ir.refs((a["args"], a["kwargs"])))
    return _nbytes(a) + sum(_nbytes(g.nodes[s]) for s in srcs)
