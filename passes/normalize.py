"""normalize: canonical op forms, so that matching sees one form per operator.

Rewrites, one table row each (``RULES``):

- ``addmm(b, x, t(w))`` / ``mm(x, t(w))`` / ``matmul(x, w)`` with a parameter
  weight  ->  ``linear(x, w, b)`` (a [K, N] weight becomes a new transposed
  [N, K] parameter);
- ``batch_norm(conv2d(x, w, b), ...)`` in eval mode  ->  ``conv2d(x, w', b')``
  with the normalisation folded into new parameters;
- ``dropout(x, p, train=False)``  ->  ``x``;
- an in-place op on a tensor nobody else reads (``add_``)  ->  its functional
  form (``add``); never one that writes through a view (``slice(m).fill_``),
  whose write must reach ``m``.

Before/after for one tenant (GPT-2's Conv1D, then an eval dropout)::

    %w = param [32, 96]                    %w_T = param [96, 32]
    %mm = addmm(%b, %x, %w)          ->    %mm = linear(%x, %w_T, %b)
    %d = dropout(%mm, 0.1, False)          (%d's readers read %mm)
"""

from __future__ import annotations

import math

import torch

from stfuse import ir
from stfuse.ir import Ref

aten = torch.ops.aten

# Ops that may be deleted once nothing reads them.
_PURE = {aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default,
         aten.reshape.default, aten.conv2d.default, aten.linear.default, aten.mul.Tensor,
         aten.add.Tensor, aten.pow.Tensor_Scalar, aten.tanh.default}


def _param(g, v) -> torch.Tensor | None:
    """The tensor of a parameter node referenced by v, else None."""
    if isinstance(v, Ref) and g.nodes[v.key]["kind"] == "param":
        return g.nodes[v.key]["value"]
    return None


def _transposed_param(g, v) -> Ref | None:
    """Ref to a 2-D parameter w where v is ``t(w)`` (or an equivalent permute/transpose)."""
    if not isinstance(v, Ref) or g.nodes[v.key]["kind"] != "call":
        return None
    a = g.nodes[v.key]
    target, args = a["target"], a["args"]
    is_t = (target is aten.t.default
            or (target is aten.permute.default and list(args[1]) == [1, 0])
            or (target is aten.transpose.int and sorted(a["args"][1:3]) in ([0, 1], [-2, -1], [-1, 0])))
    if is_t:
        w = _param(g, args[0])
        if w is not None and w.dim() == 2:
            return args[0]
    return None


def _new_param(g, near: str, suffix: str, value: torch.Tensor) -> Ref:
    a = g.nodes[near]
    name = f"{a['name']}{suffix}"
    k = ir.key(a["tenant"], name)
    g.add_node(k, **ir.node_attrs(tenant=a["tenant"], name=name, kind="param", pos=a["pos"],
                                  value=value.detach().contiguous()))
    return Ref(k)


def _weight_nk(g, v, near: str) -> Ref | None:
    """A Ref to an [N, K] weight for a GEMM whose right operand is v ([K, N])."""
    wt = _transposed_param(g, v)
    if wt is not None:
        return wt
    w = _param(g, v)
    if w is not None and w.dim() == 2:
        return _new_param(g, near, "_weight_T", w.t())
    return None


def _set_call(g, k, target, args, kwargs=None) -> None:
    old = ir.refs((g.nodes[k]["args"], g.nodes[k]["kwargs"]))
    g.nodes[k].update(target=target, args=tuple(args), kwargs=kwargs or {})
    ir.rewire(g, k)
    for src in old:
        _drop_if_dead(g, src)


def _replace_uses(g, old: str, new: Ref) -> None:
    for u in ir.users(g, old):
        a = g.nodes[u]
        a["args"], a["kwargs"] = _subst((a["args"], a["kwargs"]), old, new)
        ir.rewire(g, u)


def _subst(obj, old: str, new: Ref):
    import torch.utils._pytree as pytree
    return pytree.tree_map(lambda v: new if isinstance(v, Ref) and v.key == old else v, obj)


def _drop_if_dead(g, k) -> None:
    """Remove k (and then its inputs) if nothing reads it and dropping it changes nothing."""
    if k not in g or any(True for _ in g.successors(k)):
        return
    a = g.nodes[k]
    if a["kind"] == "param" or (a["kind"] == "call" and a["target"] in _PURE):
        srcs = list(g.predecessors(k))
        g.remove_node(k)
        for s in srcs:
            _drop_if_dead(g, s)


def _remove(g, k, replacement: Ref) -> None:
    _replace_uses(g, k, replacement)
    srcs = list(g.predecessors(k))
    g.remove_node(k)
    for s in srcs:
        _drop_if_dead(g, s)


# --- rules: each takes (g, k) and rewrites in place on the pass's own copy ---------


def _addmm_to_linear(g, k) -> None:
    a = g.nodes[k]
    if a["kwargs"].get("beta", 1) != 1 or a["kwargs"].get("alpha", 1) != 1:
        return
    bias, x, w = a["args"][:3]
    b = g.nodes[bias.key] if isinstance(bias, Ref) else None
    if b is None or b["shape"] is not None and len(b["shape"]) != 1:
        return
    if _param(g, bias) is None or _param(g, bias).dim() != 1:
        return
    wk = _weight_nk(g, w, k)
    if wk is not None:
        _set_call(g, k, aten.linear.default, (x, wk, bias))


def _mm_to_linear(g, k) -> None:
    x, w = g.nodes[k]["args"][:2]
    wk = _weight_nk(g, w, k)
    if wk is not None:
        _set_call(g, k, aten.linear.default, (x, wk))


def _drop_dropout(g, k) -> None:
    args = g.nodes[k]["args"]
    train = args[2] if len(args) > 2 else g.nodes[k]["kwargs"].get("train", True)
    if train is False:
        _remove(g, k, args[0])


def _fold_batch_norm(g, k) -> None:
    a = g.nodes[k]
    x, gamma, beta, mean, var, training, _momentum, eps = a["args"][:8]
    conv = x.key if isinstance(x, Ref) else None
    if training or conv is None or g.nodes[conv]["target"] is not aten.conv2d.default:
        return
    if len(ir.users(g, conv)) != 1:
        return
    cargs = list(g.nodes[conv]["args"])
    w, b = _param(g, cargs[1]), _param(g, cargs[2]) if len(cargs) > 2 else None
    mean_t, var_t = _param(g, mean), _param(g, var)
    if w is None or mean_t is None or var_t is None or (len(cargs) > 2 and cargs[2] is not None and b is None):
        return
    gamma_t = _param(g, gamma) if gamma is not None else torch.ones_like(mean_t)
    beta_t = _param(g, beta) if beta is not None else torch.zeros_like(mean_t)
    if gamma_t is None or beta_t is None:
        return
    # Fold in float64, then back to the weight's dtype.
    scale = gamma_t.double() / torch.sqrt(var_t.double() + eps)
    new_w = (w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype)
    old_b = b.double() if b is not None else torch.zeros_like(scale)
    new_b = ((old_b - mean_t.double()) * scale + beta_t.double()).to(w.dtype)
    cargs[1] = _new_param(g, k, "_folded_weight", new_w)
    while len(cargs) < 3:
        cargs.append(None)
    cargs[2] = _new_param(g, k, "_folded_bias", new_b)
    _set_call(g, conv, aten.conv2d.default, cargs, g.nodes[conv]["kwargs"])
    _remove(g, k, Ref(conv))


def _functionalize_inplace(g, k) -> None:
    """``add_(a, b)`` -> ``add(a, b)`` when a is an intermediate that only this op reads."""
    a = g.nodes[k]
    target = a["target"]
    packet = target.overloadpacket.__name__
    if not packet.endswith("_") or packet.startswith("_") or not a["args"]:
        return
    mutated = a["args"][0]
    if not isinstance(mutated, Ref) or g.nodes[mutated.key]["kind"] != "call":
        return
    view = g.nodes[mutated.key]
    src = view["args"][0] if view["args"] else None
    if ir.returns_alias(view["target"], g.nodes[src.key]["target"] if isinstance(src, Ref) else None):
        return  # a write through a view (``m[0:2].fill_(1)``) must reach the viewed tensor
    if any(True for u in g.successors(mutated.key) if u != k):
        return
    functional = getattr(getattr(aten, packet[:-1], None), target._overloadname, None)
    if functional is not None:
        _set_call(g, k, functional, a["args"], a["kwargs"])


def _scalar_operand(g, v, target, scalar: float) -> Ref | None:
    """The tensor operand of v where v is ``target(t, scalar)`` (either order), read once."""
    if not isinstance(v, Ref) or g.nodes[v.key]["kind"] != "call" or len(ir.users(g, v.key)) != 1:
        return None
    a = g.nodes[v.key]
    if a["target"] is not target or a["kwargs"] or len(a["args"]) != 2:
        return None
    for t, c in (a["args"], a["args"][::-1]):
        if isinstance(t, Ref) and isinstance(c, float) and math.isclose(c, scalar, rel_tol=1e-9):
            return t
    return None


def _gelu_tanh(g, k) -> None:
    """``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))`` (GPT-2's gelu_new,
    eight ops as exported)  ->  ``gelu(x, approximate="tanh")``: one pass over the
    activations instead of eight (GPT-2's MLP: 4.9 ms of a 62 ms program for 4 quick
    GPT-2 tenants, one thread of the 2-core CPU), and a step an epilogue can take.
    ``k`` is the tanh."""
    inner = _scalar_operand(g, g.nodes[k]["args"][0], aten.mul.Tensor, math.sqrt(2 / math.pi))
    a = g.nodes[inner.key] if inner is not None and len(ir.users(g, inner.key)) == 1 else None
    if a is None or a["target"] is not aten.add.Tensor or a["kwargs"] or len(a["args"]) != 2:
        return
    for x, cube in (a["args"], a["args"][::-1]):
        cubed = _scalar_operand(g, cube, aten.mul.Tensor, 0.044715)
        if isinstance(x, Ref) and cubed is not None and _scalar_operand(g, cubed, aten.pow.Tensor_Scalar, 3.0) == x:
            break
    else:
        return
    one = ir.users(g, k)
    if len(one) != 1 or _scalar_operand(g, Ref(one[0]), aten.add.Tensor, 1.0) != Ref(k):
        return
    out = ir.users(g, one[0])
    half = g.nodes[out[0]]["args"] if len(out) == 1 and g.nodes[out[0]]["target"] is aten.mul.Tensor else ()
    if len(half) == 2 and not g.nodes[out[0]]["kwargs"] and Ref(one[0]) in half:
        other = half[1] if half[0] == Ref(one[0]) else half[0]
        if _scalar_operand(g, other, aten.mul.Tensor, 0.5) == x:
            _set_call(g, out[0], aten.gelu.default, (x,), {"approximate": "tanh"})


RULES = {
    aten.tanh.default: _gelu_tanh,
    aten.addmm.default: _addmm_to_linear,
    aten.mm.default: _mm_to_linear,
    aten.matmul.default: _mm_to_linear,
    aten.dropout.default: _drop_dropout,
    aten.batch_norm.default: _fold_batch_norm,
}


def normalize(g):
    """Rewrite every tenant's ops into canonical forms; returns a new graph."""
    g = g.copy()
    for k in sorted(g.nodes, key=lambda k: (g.nodes[k]["tenant"], g.nodes[k]["pos"], k)):
        if k not in g or g.nodes[k]["kind"] != "call":
            continue
        target = g.nodes[k]["target"]
        rule = RULES.get(target)
        if rule is not None:
            rule(g, k)
        elif isinstance(target, torch._ops.OpOverload):
            _functionalize_inplace(g, k)
    return g
