"""lower: the executable program, an fx.GraphModule calling the stfuse:: ops.

Each fused group becomes one call of a registered custom op; every other call
node is emitted as it was traced. The program takes every active tenant's flat
inputs (tenant order) and returns their flat outputs, so it can itself be
traced, exported and compiled.

Two forms per group (kernels/reference.py): ``stacked_*`` when the members
have equal shapes (uniform_key) and the call runs them at one batch size, else
``grouped_*``. A stacked group's output stays stacked, and the next group whose
inputs are exactly those members' outputs takes it as is; a tenant's own op
reading one member selects it (a view). Weights of uniform groups are packed
once into one [R, ...] tensor; each tenant's parameter becomes a view of it,
so packing copies nothing at run time and keeps one copy of the weights.

Before/after (program text, two tenants)::

    schedule [g0 = linear{a, b} + relu]      x = stack([a_x, b_x])
                                        ->   y = stacked_linear(x, g0_w, g0_b, "relu", [], [])
                                             a_out = select(y, 0, 0); b_out = select(y, 0, 1)
"""

from __future__ import annotations

import operator
import re

import torch
import torch.utils._pytree as pytree

from stfuse import ir
from stfuse.ir import Ref
from stfuse.kernels.ops import op

from . import optable, stacked_calls
from .match import uniform_key

aten = torch.ops.aten

def _uniform(g, members) -> bool:
    if len({uniform_key(g, k) for k in members}) != 1:
        return False
    row = optable.OP_CLASSES[g.nodes[members[0]]["op_class"]]
    return row.uniform(row.extras([g.nodes[k]["args"] for k in members]))


def arrives_stacked(g, members) -> bool:
    """The members' first inputs are distinct outputs of one group: a stacked tensor, no copy.

    Members of one tenant may read one tensor (Q, K and V of one input): stacking
    that tensor R times is a copy, however it was produced. Views between (a flatten
    to [B * S, C]) are looked through: lowering runs them on the stack
    (passes/stacked_calls.py).
    """
    srcs = [[stacked_calls.view_source(g, r) for r in ir.refs(g.nodes[k]["args"][:1])] for k in members]
    gids = {g.nodes[s[0]]["group"] if s else None for s in srcs}
    firsts = [s[0] for s in srcs if s]
    return len(gids) == 1 and None not in gids and len(set(firsts)) == len(firsts)


def _uniform_operands(g, ext) -> bool:
    """Every tensor step's operands have one sig across the members (equal shapes at
    every common batch), so they stack. A [1, S, C] position embedding in one tenant
    and a [B, S, C] one in another fold into the same ``add:tensor`` step but stack
    only at batch 1: such a group runs grouped, each operand broadcasting on its own."""
    return all(len({g.nodes[e[j]]["sig"] for e in ext}) == 1 and g.nodes[ext[0][j]]["sig"] is not None
               for j in range(len(ext[0]) if ext else 0))


def pack_weights(g):
    """Pack the weights of uniform groups into one tensor each; returns a new graph."""
    g = g.copy()
    packed = {}
    for gid, grp in g.graph["groups"].items():
        pos = optable.OP_CLASSES[grp.op_class].params
        if pos is None or not _uniform(g, grp.members):
            continue
        entry = {}
        for role, p in zip(("w", "b"), pos):
            refs = [optable.arg_or(g.nodes[m]["args"], p) for m in grp.members]
            if not all(isinstance(r, Ref) and g.nodes[r.key]["kind"] == "param" for r in refs):
                continue
            if len({r.key for r in refs}) != len(refs) or any(
                    len(list(g.successors(r.key))) != 1 for r in refs):
                continue  # a weight shared with another op keeps its own storage
            values = [g.nodes[r.key]["value"] for r in refs]
            stack = optable.OP_CLASSES[grp.op_class].pack_weight(values) if role == "w" else torch.stack(values)
            for i, r in enumerate(refs):
                g.nodes[r.key]["value"] = stack[i]
            entry[role] = stack
        if entry:
            packed[gid] = entry
    g.graph["packed"] = packed
    return g


class _Builder:
    """Writes one program: the schedule restricted to ``active`` tenants."""

    def __init__(self, g, active: tuple[str, ...], stacked: bool):
        self.g, self.active, self.stacked = g, set(active), stacked
        self.order = active
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[str, object] = {}
        self.lazy: dict[str, tuple] = {}  # member output -> (stacked node, index)
        self.stacked_of: dict[str, tuple] = {}  # every stacked value's member -> (node, index)
        self.members: dict[torch.fx.Node, tuple] = {}  # stacked node -> its member keys
        self.deferred: set[str] = set()  # stacked views' members: their own op runs where read
        self.stacks: dict[tuple, torch.fx.Node] = {}  # member keys -> stacked node
        self.unbound: dict[torch.fx.Node, torch.fx.Node] = {}  # stacked node -> its unbind
        self.names: set[str] = set()
        self.modules: dict[int, str] = {}  # id of a higher-order op's subgraph -> attr name

    # -- values ---------------------------------------------------------------

    def unique(self, hint: str) -> str:
        """A fresh Python identifier that reads like ``hint``."""
        name = re.sub(r"\W", "_", hint)
        if not name or name[0].isdigit():
            name = "t" + name
        base, i = name, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def _attr(self, hint: str, tensor: torch.Tensor) -> torch.fx.Node:
        name = self.unique(hint)
        self.root.register_buffer(name, tensor)
        return self.graph.get_attr(name)

    def value(self, k: str):
        if k in self.env:
            return self.env[k]
        if k in self.deferred:  # a stacked view's member read on its own: its own (cheap) view
            self.deferred.discard(k)
            self.emit(k)
            return self.env[k]
        if k in self.lazy:
            stacked, i = self.lazy.pop(k)
            if stacked not in self.unbound:  # one unbind serves every member
                self.unbound[stacked] = self.graph.call_function(aten.unbind.int, (stacked,))
            self.env[k] = self.graph.call_function(operator.getitem, (self.unbound[stacked], i))
            return self.env[k]
        a = self.g.nodes[k]
        if a["kind"] != "param":
            raise RuntimeError(f"lower: {k} is read before it is computed")
        self.env[k] = self._attr(k, a["value"])
        return self.env[k]

    def submodule(self, mod: torch.nn.Module) -> torch.fx.Node:
        """A higher-order op's subgraph, registered once on the program's root."""
        if id(mod) not in self.modules:
            name = self.unique("subgraph")
            self.root.add_module(name, mod)
            self.modules[id(mod)] = name
        return self.graph.get_attr(self.modules[id(mod)])

    def map(self, obj):
        def one(v):
            if isinstance(v, Ref):
                return self.value(v.key)
            return self.submodule(v) if isinstance(v, torch.nn.Module) else v
        return pytree.tree_map(one, obj)

    def stack(self, keys: list) -> torch.fx.Node | None:
        if all(k is None for k in keys):
            return None
        keys = tuple(keys)
        if keys not in self.stacks:
            self.stacks[keys] = self.graph.call_function(aten.stack.default, ([self.value(k) for k in keys],))
        return self.stacks[keys]

    def stack_operand(self, keys: list, out: str) -> torch.fx.Node:
        """Members' epilogue operands stacked to [R, 1, ..., 1, *operand shape], so that
        they broadcast against the stacked output [R, *out shape] dim for dim.

        Broadcasting aligns trailing dims: a per-channel [C] operand stacked to [R, C]
        against an output [R, B, C] would pair R with B (a crash, or with B == R or
        B == 1 a silently wrong value). Members are uniform, so one rank serves all.
        """
        stacked = self.stack(keys)
        pad = len(self.g.nodes[out]["shape"]) - len(self.g.nodes[keys[0]]["shape"])
        for _ in range(pad):
            stacked = self.graph.call_function(aten.unsqueeze.default, (stacked, 1))
        return stacked

    def kernel(self, name: str):
        """The registered custom op (kernels/bind.py picks what runs on the device)."""
        return op(name)

    # -- stages ---------------------------------------------------------------

    def call(self, k: str) -> None:
        """Node k of the schedule: once over a stacked value with its siblings
        (passes/stacked_calls.py), already done so, or the tenant's own op."""
        if k in self.deferred or k in self.lazy or k in self.env:
            return
        if not self.stacked_call(k):
            self.emit(k)

    def emit(self, k: str) -> None:
        a = self.g.nodes[k]
        args, kwargs = self.map(a["args"]), self.map(a["kwargs"])
        if isinstance(a["target"], torch.nn.Module):
            name = self.unique(f"mod_{k}")
            self.root.add_module(name, a["target"])
            self.env[k] = self.graph.call_module(name, args, kwargs)
        else:
            self.env[k] = self.graph.call_function(a["target"], args, kwargs)

    def register(self, node: torch.fx.Node, keys, tensor: bool = True) -> None:
        """``node`` holds the members ``keys`` stacked: a group or stacked call reads it as is."""
        if tensor:  # a stacked list (split) is no operand; its stacked items are
            self.stacks[tuple(keys)] = node
        self.members[node] = tuple(keys)
        for i, k in enumerate(keys):
            self.stacked_of.setdefault(k, (node, i))

    def stacked_call(self, k: str) -> bool:
        """Emit node k and its siblings (one per member of the stacked value k reads) as
        one call on that value (passes/stacked_calls.py); False where they cannot be."""
        g, a = self.g, self.g.nodes[k]
        row = stacked_calls.STACKED.get(a["target"]) if not isinstance(a["target"], torch.nn.Module) else None
        if row is None or not self.stacked or not a["args"] or not isinstance(a["args"][0], Ref):
            return False
        if a["args"][0].key not in self.stacked_of:
            return False
        y, _ = self.stacked_of[a["args"][0].key]
        taken = set(self.env) | self.deferred | set(self.lazy)
        sibs = stacked_calls.siblings(g, k, self.members[y], taken)
        if sibs is None:
            return False
        if row.view:
            rest = self.map(tuple(a["args"][1:]))
            node = self.graph.call_function(row.target, row.args(y, (None, *rest), len(sibs)))
            self.deferred.update(sibs)
        else:
            node = self._stacked_attention(y, sibs)
            if node is None:
                return False
            for i, s in enumerate(sibs):
                self.lazy[s] = (node, i)
        self.register(node, sibs, tensor=a["dtype"] is not None)
        return True

    def _stacked_from(self, keys):
        """The stacked node holding ``keys`` in this order, or None."""
        nodes = {self.stacked_of.get(k, (None, -1))[0] for k in keys}
        node = nodes.pop() if len(nodes) == 1 else None
        return node if node is not None and self.members[node] == tuple(keys) else None

    def _stacked_attention(self, q, sibs):
        """scaled_dot_product_attention of R members at once: q, k, v [R, B, H, S, D]
        flattened to [R * B, H, S, D] (views), the members' masks stacked (a copy, made
        once per set of masks), the output unflattened to [R, B, H, S, D]. None where
        k or v does not arrive stacked, or a mask is not there yet."""
        g = self.g
        a = g.nodes[sibs[0]]
        kv = [self._stacked_from([g.nodes[s]["args"][i].key for s in sibs]) for i in (1, 2)]
        masks = [optable.arg_or(g.nodes[s]["args"], 3, g.nodes[s]["kwargs"].get("attn_mask")) for s in sibs]
        if None in kv or len(a["shape"] or ()) != 4:
            return None
        q0 = _dim0(g, g.nodes[sibs[0]]["args"][0].key)
        if any(len(g.nodes[t]["shape"] or ()) != 4 or _dim0(g, t) != q0  # k, v broadcast over the batch
               for i in (1, 2) for t in (g.nodes[sibs[0]]["args"][i].key,)):
            return None
        if any(isinstance(m, Ref) for m in masks):
            keys = [m.key for m in masks]
            if not all(isinstance(m, Ref) and len(g.nodes[m.key]["shape"] or ()) == 4 for m in masks) or any(
                    k not in self.env and k not in self.lazy and k not in self.deferred
                    and g.nodes[k]["kind"] != "param" for k in keys):
                return None
        elif any(m is not None for m in masks):
            return None
        flat = [self.graph.call_function(aten.flatten.using_ints, (t, 0, 1)) for t in (q, *kv)]
        mask = None
        if masks[0] is not None:
            mask = self._stacked_from(keys) or self.stacks.get(tuple(keys))
            if mask is None and all(g.nodes[k]["kind"] == "param" for k in keys):  # constants: stacked here
                mask = self._attr(f"{keys[0]}_stacked", torch.stack([g.nodes[k]["value"] for k in keys]))
                self.stacks[tuple(keys)] = mask
            elif mask is None:
                mask = self.stack(keys)
            if _dim0(g, keys[0]) != _dim0(g, sibs[0]):  # a mask broadcast over the batch
                batch = self.graph.call_function(aten.sym_size.int, (q, 1))
                mask = self.graph.call_function(aten.expand.default, (mask, [-1, batch, -1, -1, -1]))
            mask = self.graph.call_function(aten.flatten.using_ints, (mask, 0, 1))
        kwargs = {n: v for n, v in a["kwargs"].items() if n != "attn_mask"}
        out = self.graph.call_function(a["target"], (*flat, mask, *a["args"][4:]), kwargs)
        return self.graph.call_function(aten.unflatten.int, (out, 0, [len(sibs), -1]))

    def group(self, grp) -> None:
        g = self.g
        idx = [i for i, m in enumerate(grp.members) if g.nodes[m]["tenant"] in self.active]
        if not idx:
            return
        members = [grp.members[i] for i in idx]
        outs = [grp.outputs()[i] for i in idx]
        operands = [grp.operands[i] if grp.operands else () for i in idx]
        ext = [[v.key for v in ops if isinstance(v, Ref)] for ops in operands]
        scalars = [float(v) for ops in operands for v in ops if not isinstance(v, Ref)]
        stacked = (self.stacked and len(members) >= 2 and _uniform(g, members)
                   and _uniform_operands(g, ext))
        inputs = _member_inputs(g, grp.op_class, members)
        if stacked:
            exts = [self.stack_operand([e[j] for e in ext], outs[0]) for j in range(len(ext[0]))]
            args = self._stacked_args(grp, idx, inputs)
            y = self.graph.call_function(self.kernel(f"stacked_{grp.op_class}"),
                                         (*args, grp.epilogue, exts, scalars))
            self.register(y, outs)
            for j, k in enumerate(outs):
                self.lazy[k] = (y, j)
        else:
            flat_ext = [self.value(k) for e in ext for k in e]
            args = self._grouped_args(grp.op_class, inputs)
            ys = self.graph.call_function(self.kernel(f"grouped_{grp.op_class}"),
                                          (*args, grp.epilogue, flat_ext, scalars))
            for j, k in enumerate(outs):
                self.env[k] = self.graph.call_function(operator.getitem, (ys, j))

    def _tensors(self, keys):
        return [None if k is None else self.value(k) for k in keys]

    def _grouped_args(self, cls, inputs):
        x = self._tensors(inputs["x"])
        row = optable.OP_CLASSES[cls]
        if row.params is None:
            return (x,)
        return (x, self._tensors(inputs["w"]), self._tensors(inputs["b"]), *row.grouped_extras(inputs))

    def _packed(self, grp, idx, role, keys):
        """The stacked weight of the active members: a view of the packed tensor where
        the members are a contiguous run, else stacked at run time."""
        packed = self.g.graph.get("packed", {}).get(grp.id, {}).get(role)
        if packed is not None and idx == list(range(idx[0], idx[-1] + 1)):
            return self._attr(f"{grp.id}_{role}", packed[idx[0]:idx[-1] + 1])
        return self.stack(keys)

    def _stacked_args(self, grp, idx, inputs):
        x = self.stack(inputs["x"])
        row = optable.OP_CLASSES[grp.op_class]
        if row.params is None:
            return (x,)
        w = self._packed(grp, idx, "w", inputs["w"])
        b = self._packed(grp, idx, "b", inputs["b"])
        return (x, w, b, *row.stacked_extras(inputs))

    def output(self) -> list[int]:
        flat, counts = [], []
        for t in self.order:
            out_node = f"{t}:" + next(a["name"] for k, a in self.g.nodes(data=True)
                                       if a["tenant"] == t and a["kind"] == "output")
            leaves = self.map(self.g.nodes[out_node]["args"][0])
            leaves = list(leaves) if isinstance(leaves, (tuple, list)) else [leaves]
            flat.extend(leaves)
            counts.append(len(leaves))
        self.graph.output(tuple(flat))
        return counts


def _dim0(g, k):
    """The first dim of node k at every probed size (annotate's sig)."""
    return tuple(s[1][0] if len(s) == 2 and isinstance(s[1], tuple) else s[0] for s in g.nodes[k]["sig"])


def _member_inputs(g, cls: str, members) -> dict:
    """Per role, the members' input keys (None for an absent bias/affine), and the
    class's other arguments (optable.OpClass.extras)."""
    def key_of(v):
        return v.key if isinstance(v, Ref) else None

    row = optable.OP_CLASSES[cls]
    if row.params is None:  # pointwise: the main operand of each member's step
        return {"x": [optable.pointwise_step(g, m)[0].key for m in members]}
    rows = [g.nodes[m]["args"] for m in members]
    wp, bp = row.params
    return {"x": [key_of(r[0]) for r in rows], "w": [key_of(optable.arg_or(r, wp)) for r in rows],
            "b": [key_of(optable.arg_or(r, bp)) for r in rows], **row.extras(rows)}


def lower_program(g, active: tuple[str, ...], stacked: bool):
    """(GraphModule, output counts per tenant) running ``active`` tenants: the
    canonical program (aten and stfuse:: ops; kernels/bind.py binds it to a device).

    ``stacked`` says all active tenants with a dynamic batch share one batch size
    in this call, so uniform groups may run in stacked form.
    """
    b = _Builder(g, active, stacked)
    for t in active:
        for k, a in sorted(((k, a) for k, a in g.nodes(data=True)
                            if a["tenant"] == t and a["kind"] == "input"), key=lambda x: x[1]["index"]):
            b.env[k] = b.graph.placeholder(b.unique(f"{t}_{a['name']}"))
    for stage in g.graph["schedule"]:
        if stage.group is not None:
            b.group(g.graph["groups"][stage.group])
        elif g.nodes[stage.node]["tenant"] in b.active:
            b.call(stage.node)
    counts = b.output()
    # Dead code out first, then the module and its code, once (generating it before and
    # after was a third of lowering ResNet-50/8 x4's unfused program). Elimination asks
    # the owning module whether a node is impure (without one, a graph holding
    # ``aten.item``, as Dynamo's SymFloat dropout p, asserted): the root holds what the
    # program's nodes name.
    b.graph.owning_module = b.root
    b.graph.eliminate_dead_code()
    return torch.fx.GraphModule(b.root, b.graph), counts


def lower(g):
    """Pack weights and build the program for all tenants; returns a new graph."""
    g = pack_weights(g)
    g.graph["program"] = lower_program(g, tuple(g.graph["tenants"]), stacked=True)
    return g
