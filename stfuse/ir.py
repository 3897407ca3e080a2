"""The multi-tenant IR: one networkx.DiGraph over every tenant's nodes.

Node key: ``"<tenant>:<fx node name>"``. Edges run from producer to consumer
(plus ordering edges, ``order_only=True``, that keep in-place ops after the
earlier readers of the tensor they overwrite).

Node schema (every node carries every key; ``verify`` checks it):

=========  ===============================================================
tenant     tenant name
name       node name, unique within the tenant
kind       "input" (a user input), "param" (parameter / buffer / constant),
           "call" (an operator), "output" (the tenant's flat outputs)
target     the operator (an OpOverload, a Python callable, or an nn.Module
           for an opaque fallback tenant); None unless kind == "call"
args       positional args; references to other nodes are ``Ref(key)``; a
           higher-order op's subgraph (``torch.cond`` branches, a
           ``wrap_with_autocast`` region) is the GraphModule itself, so the
           op runs as the tenant's own unfused call
kwargs     keyword args, same convention
pos        position in the tenant's original order (new nodes take the
           position of the node they replace); ties sort by name
value      the tensor of a "param" node, else None
index      flat input index of an "input" node, else None
op_class   a fusable class (a row of passes/optable.OP_CLASSES: "linear",
           "conv2d", "layer_norm", "group_norm", "pointwise"), "view" (no
           kernel launch) or "other" for calls; the kind otherwise. Set by
           annotate, None before.
shape      output shape at the tenant's example batch, or None if unknown
sig        (shape at batch 2, shape at batch 3, then one entry per declared
           dynamic dim name, passes/annotate.py): members whose sigs agree
           have equal shapes at every common batch size (and common sizes
           of the declared dims)
dtype      output dtype or None
flops      floating point operations at the example batch (int)
bytes      bytes read + written at the example batch (int)
group      fusion group id, or None
=========  ===============================================================

Graph attributes: ``tenants`` (name -> TenantGraph, in order), ``op_classes``
(the fusable classes, from passes/optable.py, set by annotate), ``groups``
(id -> FusedOp), ``schedule`` (list of Stage, after schedule), ``program``
(after lower), ``tune`` (the tuning mode stfuse.compile asked for, if any),
``tuning`` (what the cost passes and the program check priced: passes/tune.py) and
``bound`` (the program check's (program, program bound to the device) where it timed
the program it chose: stfuse/program.py runs it rather than binding it again).
"""

from __future__ import annotations

from dataclasses import dataclass
import operator
from typing import Any

import networkx as nx
import torch
import torch.utils._pytree as pytree

from .errors import StfuseError

KINDS = ("input", "param", "call", "output")
UNFUSED_CLASSES = ("view", "other")  # besides the fusable ones (graph attribute op_classes)
SCHEMA = ("tenant", "name", "kind", "target", "args", "kwargs", "pos", "value", "index",
          "op_class", "shape", "sig", "dtype", "flops", "bytes", "group")


@dataclass(frozen=True)
class Ref:
    """A reference to another node's output inside ``args``/``kwargs``."""

    key: str

    def __repr__(self) -> str:
        return f"%{self.key}"


@dataclass(frozen=True)
class FusedOp:
    """A horizontally fused operator over independent member nodes: one per tenant
    (match_groups, in tenant order) or several of one tenant (group_siblings, in
    that tenant's order); no member depends on another.

    ``folded[i]`` are the pointwise nodes of member i folded into the epilogue,
    ``epilogue`` the steps they compute (kernels/epilogue.py) and ``operands[i]``
    member i's epilogue operands: ``Ref`` for tensor steps, floats for scalar steps.
    """

    id: str
    op_class: str
    members: tuple[str, ...]
    epilogue: str = ""
    folded: tuple[tuple[str, ...], ...] = ()
    operands: tuple[tuple[Any, ...], ...] = ()

    def nodes(self) -> list[str]:
        """Every node the group computes: members and their folded epilogue nodes."""
        out = list(self.members)
        for f in self.folded:
            out.extend(f)
        return out

    def outputs(self) -> tuple[str, ...]:
        """Per member, the node whose value the group produces (last folded, else the member)."""
        if not self.folded:
            return self.members
        return tuple(f[-1] if f else m for m, f in zip(self.members, self.folded))


def key(tenant: str, name: str) -> str:
    return f"{tenant}:{name}"


def refs(obj) -> list[str]:
    """Keys of every Ref inside a pytree of args."""
    return [leaf.key for leaf in pytree.tree_leaves(obj) if isinstance(leaf, Ref)]


def node_attrs(**kw) -> dict:
    """A node's attribute dict with every schema key (defaults None / empty)."""
    attrs = dict.fromkeys(SCHEMA)
    attrs.update(args=(), kwargs={}, flops=0, bytes=0)
    attrs.update(kw)
    return attrs


def _to_refs(tenant: str, obj, modules: dict | None = None):
    """fx args with nodes as Refs, and subgraph get_attrs as the subgraphs themselves."""
    modules = modules or {}
    return pytree.tree_map(
        lambda a: (modules[a] if a in modules else Ref(key(tenant, a.name)))
        if isinstance(a, torch.fx.Node) else a, obj)


def _fetch_attr(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def mutated_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node arguments an in-place or out= op writes to (from its schema's alias info)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for arg, value in zip(schema.arguments, node.args):
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.fx.Node):
            out.append(value)
    return out


def returns_alias(target, source=None) -> bool:
    """True if a call of ``target`` may return storage of its first input: a view such
    as ``slice`` or ``view``, or an in-place op's result (per the op's schema), or a
    ``getitem`` of such a ``source`` op (an item of ``chunk`` / ``split`` / ``unbind``)."""
    if target is operator.getitem:
        return source is not None and returns_alias(source)
    schema = getattr(target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _alias_root(n: torch.fx.Node) -> torch.fx.Node:
    """The node owning the storage that n's value lives in (n itself unless n is a view)."""
    while n.op == "call_function" and n.args and isinstance(n.args[0], torch.fx.Node):
        src = n.args[0]
        if not returns_alias(n.target, src.target if src.op == "call_function" else None):
            break
        n = src
    return n


def build(tenants: dict) -> nx.DiGraph:
    """The multi-tenant graph of ``tenants`` (name -> TenantGraph)."""
    g = nx.DiGraph(tenants=dict(tenants), groups={})
    for tname, tg in tenants.items():
        user = {spec.name: i for i, spec in enumerate(tg.inputs)}
        order = {n: i for i, n in enumerate(tg.gm.graph.nodes)}
        modules: dict[torch.fx.Node, torch.nn.Module] = {}  # subgraph get_attrs
        for n in tg.gm.graph.nodes:
            k = key(tname, n.name)
            if n.op == "get_attr":
                # export turns torch.cond, autocast and set_grad_enabled regions into
                # higher-order ops over submodules: the op keeps its subgraph as a
                # constant arg and runs unfused; a tensor attr is a parameter.
                attr = _fetch_attr(tg.gm, n.target)
                if isinstance(attr, torch.nn.Module):
                    modules[n] = attr
                    continue
                if not isinstance(attr, torch.Tensor):
                    raise StfuseError(f"tenant {tname!r}: unsupported fx node get_attr {n.name} "
                                      f"({type(attr).__name__})")
                g.add_node(k, **node_attrs(tenant=tname, name=n.name, kind="param",
                                           pos=order[n], value=attr.detach()))
                continue
            if n.op == "placeholder":
                if n.name in user:
                    g.add_node(k, **node_attrs(tenant=tname, name=n.name, kind="input",
                                               pos=order[n], index=user[n.name]))
                else:
                    g.add_node(k, **node_attrs(tenant=tname, name=n.name, kind="param",
                                               pos=order[n], value=tg.tensors[n.name]))
            elif n.op in ("call_function", "call_module"):
                target = tg.gm.get_submodule(n.target) if n.op == "call_module" else n.target
                g.add_node(k, **node_attrs(tenant=tname, name=n.name, kind="call", target=target,
                                           args=_to_refs(tname, n.args, modules),
                                           kwargs=_to_refs(tname, n.kwargs, modules), pos=order[n]))
            elif n.op == "output":
                g.add_node(k, **node_attrs(tenant=tname, name=n.name, kind="output",
                                           args=_to_refs(tname, n.args), pos=order[n]))
            else:
                raise StfuseError(f"tenant {tname!r}: unsupported fx node {n.op} {n.name}")
            for src in refs((g.nodes[k]["args"], g.nodes[k]["kwargs"])):
                g.add_edge(src, k)
        # In-place ops: keep every other reader of the overwritten storage on its side.
        # That is every reader of the tensor and of every view sharing its storage:
        # ``m[0:2] = 1`` writes through a slice into m, which later ops read directly.
        views: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for n in tg.gm.graph.nodes:
            views.setdefault(_alias_root(n), []).append(n)
        for n in tg.gm.graph.nodes:
            for m in mutated_args(n) if n.op == "call_function" else ():
                root = _alias_root(m)
                if root.op == "placeholder":
                    # A program replayed for every request cannot overwrite its weights
                    # or the caller's inputs (e.g. BatchNorm statistics in training mode).
                    raise StfuseError(f"tenant {tname!r}: {n.target} overwrites "
                                      f"{'input' if root.name in user else 'parameter/buffer'} "
                                      f"{root.name!r} in forward; an inference program cannot")
                for u in {u for v in views[root] for u in v.users}:
                    a, b = (u, n) if order[u] < order[n] else (n, u)
                    ka, kb = key(tname, a.name), key(tname, b.name)
                    if u is not n and not g.has_edge(ka, kb):  # never relabel a data edge
                        g.add_edge(ka, kb, order_only=True)
    return g


def rewire(g: nx.DiGraph, k: str) -> None:
    """Recompute ``k``'s data edges from its args (for a graph being built by a pass)."""
    for src in [s for s in g.predecessors(k) if not g.edges[s, k].get("order_only")]:
        g.remove_edge(src, k)
    for src in refs((g.nodes[k]["args"], g.nodes[k]["kwargs"])):
        g.add_edge(src, k)


def users(g: nx.DiGraph, k: str) -> list[str]:
    """Data consumers of ``k`` (not ordering edges), sorted by position."""
    out = [u for u in g.successors(k) if not g.edges[k, u].get("order_only")]
    return sorted(out, key=lambda u: (g.nodes[u]["pos"], u))


def tenant_order(g: nx.DiGraph, tenant: str) -> list[str]:
    """The tenant's nodes in original order."""
    nodes = [k for k, a in g.nodes(data=True) if a["tenant"] == tenant]
    return sorted(nodes, key=lambda k: (g.nodes[k]["pos"], k))


GROUP_PREFIX = "::group:"  # no node key starts with ':' (tenant names are non-empty)


def quotient(g: nx.DiGraph, groups: dict | None = None) -> nx.DiGraph:
    """The graph with every group (default: g's own) contracted to one node ``"::group:<id>"``."""
    owner = {}
    for gid, grp in (g.graph["groups"] if groups is None else groups).items():
        for k in grp.nodes():
            owner[k] = GROUP_PREFIX + gid
    q = nx.DiGraph()
    q.add_nodes_from(owner.get(k, k) for k in g.nodes)
    for a, b in g.edges:
        qa, qb = owner.get(a, a), owner.get(b, b)
        if qa != qb:
            q.add_edge(qa, qb)
    return q


def set_groups(g: nx.DiGraph, groups: dict) -> None:
    """Make ``groups`` g's groups, in place (on a copy a pass owns): a member's
    ``group`` is its group's id, every other node's None (folded nodes too)."""
    for k in g.nodes:
        g.nodes[k]["group"] = None
    for gid, grp in groups.items():
        for k in grp.members:
            g.nodes[k]["group"] = gid
    g.graph["groups"] = groups


def on_cycle(g: nx.DiGraph, groups: dict, nodes) -> bool:
    """Whether, with ``groups`` contracted (as quotient does), the group or lone node
    holding any of ``nodes`` lies on a cycle. A pass that changes a few groups of an
    acyclic plan asks this of the nodes it moved: a new cycle runs through a changed
    group. A walk forward from each, in g, without building the quotient graph
    (building it per trial was a fifth of fold_epilogues on ResNet-50/8 x4)."""
    owner = {k: (gid,) for gid, grp in groups.items() for k in grp.nodes()}  # (gid,): never a node key

    def members(q):
        return groups[q[0]].nodes() if isinstance(q, tuple) else (q,)

    for start in {owner.get(k, k) for k in nodes}:
        stack = [w for m in members(start) for w in g.successors(m) if owner.get(w, w) != start]
        seen = set()
        while stack:
            w = stack.pop()
            q = owner.get(w, w)
            if q == start:
                return True
            if q not in seen:
                seen.add(q)
                stack.extend(u for m in members(q) for u in g.successors(m))
    return False


def verify(g: nx.DiGraph) -> None:
    """Check the node schema, edges, acyclicity, groups and schedule; raise StfuseError."""
    tenants = g.graph.get("tenants")
    if not isinstance(tenants, dict):
        raise StfuseError("ir.verify: graph has no 'tenants' attribute")
    # the fusable classes annotate recorded from the op table (ir imports no pass)
    op_classes = tuple(g.graph.get("op_classes", ())) + UNFUSED_CLASSES + KINDS
    for k, a in g.nodes(data=True):
        missing = [f for f in SCHEMA if f not in a]
        if missing:
            raise StfuseError(f"ir.verify: node {k} lacks {missing}")
        if a["tenant"] not in tenants or key(a["tenant"], a["name"]) != k:
            raise StfuseError(f"ir.verify: node {k} has tenant/name {a['tenant']}/{a['name']}")
        if a["kind"] not in KINDS:
            raise StfuseError(f"ir.verify: node {k} has kind {a['kind']!r}")
        if (a["kind"] == "call") != (a["target"] is not None):
            raise StfuseError(f"ir.verify: node {k} of kind {a['kind']} has target {a['target']}")
        if (a["kind"] == "param") != isinstance(a["value"], torch.Tensor):
            raise StfuseError(f"ir.verify: node {k}: only param nodes carry a tensor value")
        if a["op_class"] is not None and a["op_class"] not in op_classes:
            raise StfuseError(f"ir.verify: node {k} has op_class {a['op_class']!r}")
        for src in refs((a["args"], a["kwargs"])):
            if not g.has_edge(src, k):
                raise StfuseError(f"ir.verify: node {k} reads {src} without an edge")
            if g.nodes[src]["tenant"] != a["tenant"]:
                raise StfuseError(f"ir.verify: node {k} reads {src} of another tenant")
    if not nx.is_directed_acyclic_graph(g):
        raise StfuseError(f"ir.verify: cycle {nx.find_cycle(g)}")
    seen = set()
    for gid, grp in g.graph["groups"].items():
        if gid != grp.id or len(grp.members) < 1:
            raise StfuseError(f"ir.verify: malformed group {gid}")
        _verify_independent(g, grp)
        for k in grp.nodes():
            if k not in g or k in seen:
                raise StfuseError(f"ir.verify: group {gid} node {k} missing or in two groups")
            seen.add(k)
        for m in grp.members:
            if g.nodes[m]["group"] != gid or g.nodes[m]["op_class"] != grp.op_class:
                raise StfuseError(f"ir.verify: member {m} does not agree with group {gid}")
    if g.graph["groups"] and not nx.is_directed_acyclic_graph(quotient(g)):
        raise StfuseError("ir.verify: fusion groups create a cycle")
    if "schedule" in g.graph:
        _verify_schedule(g)


def _verify_independent(g: nx.DiGraph, grp: FusedOp) -> None:
    """No member (with its folded nodes) reads another member's: members may share a
    tenant but must be independent. A longer path between two members leaves the group
    and comes back, which the quotient's acyclicity check below catches."""
    chain = {}
    for i, m in enumerate(grp.members):
        for k in (m, *(grp.folded[i] if grp.folded else ())):
            chain[k] = i
    for k, i in chain.items():
        for u in g.successors(k) if k in g else ():
            if chain.get(u, i) != i:
                raise StfuseError(f"ir.verify: group {grp.id} member {u} depends on {k} "
                                  "of another member")


def _verify_schedule(g: nx.DiGraph) -> None:
    done = set()
    for stage in g.graph["schedule"]:
        nodes = g.graph["groups"][stage.group].nodes() if stage.group else [stage.node]
        for k in nodes:
            for src in g.predecessors(k):
                if src not in done and src not in nodes and g.nodes[src]["kind"] == "call":
                    raise StfuseError(f"ir.verify: schedule runs {k} before its input {src}")
        done.update(nodes)
    calls = {k for k, a in g.nodes(data=True) if a["kind"] == "call"}
    if calls - done:
        raise StfuseError(f"ir.verify: schedule misses {sorted(calls - done)[:5]}")


@dataclass(frozen=True)
class Stage:
    """One step of the schedule: a fused group, or one unfused call node."""

    group: str | None = None
    node: str | None = None
