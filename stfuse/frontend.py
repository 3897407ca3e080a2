"""Frontend: trace each tenant model into a TenantGraph.

``torch.export`` gives the ATen-level FX graph (parameters and buffers lifted to
placeholders, dim 0 of every batched input symbolic). Where export fails the
tenant falls back to ``torch.fx.symbolic_trace`` plus shape propagation, and
runs as one opaque call (correct, never fused). Where both fail, TraceError
names the tenant and both reasons.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from .errors import TraceError


@dataclass(frozen=True)
class InputSpec:
    """One flat user input of a tenant."""

    name: str  # placeholder name in the tenant graph
    shape: tuple[int, ...]  # at the example batch
    dtype: torch.dtype
    device: torch.device
    batched: bool  # dim 0 is this tenant's batch dim

    def describe(self) -> str:
        dims = ["B" if (i == 0 and self.batched) else str(d) for i, d in enumerate(self.shape)]
        return f"Tensor[{', '.join(dims)}] {str(self.dtype).removeprefix('torch.')} on {self.device}"


def describe_value(t) -> str:
    """A call argument as error messages show it."""
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"[:80]
    return (f"Tensor[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')} "
            f"on {t.device}")


def input_problem(name: str, inputs, leaves) -> tuple[str | None, int | None]:
    """THE input check: why the flat ``leaves`` do not fit a tenant's ``inputs``
    (InputSpecs; None when they do), and their batch size (None: no batched input).

    Used by FusedProgram and loaded programs (``check_inputs``, which the runtime
    calls too) and by the torch.compile backend (which picks a specialisation)."""
    batch = None
    for i, (x, s) in enumerate(zip(leaves, inputs)):
        where = f"tenant {name!r}, argument {i} ({s.name})"
        if not isinstance(x, torch.Tensor):
            return f"{where}: expected {s.describe()}, got {describe_value(x)}", None
        if x.dtype != s.dtype:
            return f"{where}: expected dtype {s.dtype}, got {describe_value(x)}", None
        if x.device != s.device:
            return f"{where}: expected device {s.device}, got {describe_value(x)}", None
        fixed = s.shape[1:] if s.batched else s.shape
        got = tuple(x.shape[1:]) if s.batched else tuple(x.shape)
        if x.dim() != len(s.shape) or got != fixed:
            return f"{where}: expected shape {s.describe()}, got {describe_value(x)}", None
        if s.batched:
            if x.shape[0] < 1 or (batch is not None and x.shape[0] != batch):
                return (f"{where}: batch size {x.shape[0]} differs from the tenant's other inputs "
                        f"({batch}) or is empty"), None
            batch = x.shape[0]
    return None, batch


@dataclass
class TenantGraph:
    """A traced tenant: its graph, lifted tensors and input/output specs."""

    name: str
    gm: torch.fx.GraphModule
    method: str  # "export" or "fx"
    tensors: dict[str, torch.Tensor]  # placeholder name -> parameter / buffer / constant
    inputs: list[InputSpec]  # flat user inputs, in call order
    in_spec: Any  # pytree spec of the positional args tuple
    out_spec: Any  # pytree spec of the model's output
    batch: int  # example batch size
    dynamic: bool  # batch size may change between calls
    device: torch.device
    meta: dict = field(default_factory=dict)
    # Batch sizes the graph is valid for, (low, high or None): export narrows the batch
    # symbol's range where the model branches on it; calls outside it must not run this graph.
    batch_range: tuple = (1, None)
    model: Any = None  # the module traced (eval mode on call), for calls outside batch_range


def tenant_name_problem(name) -> str | None:
    """Why ``name`` cannot name a tenant (None: it can): any non-empty string without
    ':' (the node-key separator) and without control characters."""
    if not isinstance(name, str) or not name:
        return "tenant names are non-empty strings"
    if ":" in name:
        return "tenant names cannot contain ':'"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "tenant names cannot contain control characters"
    return None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Trace in inference mode (dropout off, BatchNorm on running stats), then restore."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _tensor_leaves(args) -> list[torch.Tensor]:
    return [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]


def example_batch(args) -> int:
    tensors = [t for t in _tensor_leaves(args) if t.dim() > 0]
    return tensors[0].shape[0] if tensors else 1


def _batched_mask(args, batch: int) -> list[bool]:
    return [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch
            for a in pytree.tree_leaves(args)]


def with_batch(args, batch: int, old: int):
    """``args`` with every batched tensor resized along dim 0 to ``batch`` (rows repeat cyclically)."""
    def resize(a):
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == old:
            idx = torch.arange(batch, device=a.device) % old
            return a.index_select(0, idx)
        return a
    return pytree.tree_map(resize, args)


def example_args(tg: TenantGraph) -> tuple:
    """The tenant's example inputs as traced, or tensors of the example shapes
    (normal floats, zero integers: a valid index for any embedding)."""
    if "example" in tg.meta:
        return tg.meta["example"]
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s.shape, generator=gen).to(s.dtype).to(s.device) if s.dtype.is_floating_point
              else torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in tg.inputs]
    return pytree.tree_unflatten(leaves, tg.in_spec)


def _device_of(model: torch.nn.Module, args) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()) + _tensor_leaves(args):
        return t.device
    return torch.device("cpu")


class _TrialExports(logging.Filter):
    """Drops torch's fake-tensor error records on a thread while it tries an export that
    may fail: the dynamic-batch attempt below. A graph whose views bake the batch into
    another dim (``view(x, [32, 256 * B])``, as a Dynamo graph traced at batch 1 has)
    fails there, and torch logs the failing meta kernel at error level before raising,
    though the static export that follows succeeds. Other threads still log."""

    LOGGER = "torch._subclasses.fake_tensor"

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "active", False)

    @contextlib.contextmanager
    def quiet(self):
        logger = logging.getLogger(self.LOGGER)
        if self not in logger.filters:
            logger.addFilter(self)
        self.local.active = True
        try:
            yield
        finally:
            self.local.active = False


_TRIALS = _TrialExports()


def _export(model, args, batch):
    """Export with dim 0 of batched inputs dynamic; returns (ExportedProgram, dynamic)."""
    # A batch of 1 would be specialised by export (0/1 specialisation): trace at 2.
    trace_batch = max(batch, 2)
    targs = with_batch(args, trace_batch, batch) if trace_batch != batch else args
    mask = iter(_batched_mask(targs, trace_batch))
    dyn = pytree.tree_map(lambda a: {0: Dim.AUTO} if next(mask) else None, targs)
    try:
        with _TRIALS.quiet():
            ep = torch.export.export(model, targs, dynamic_shapes=dyn, strict=False)
        dynamic = _batch_is_symbolic(ep)
        if dynamic or trace_batch == batch:
            return ep, dynamic
    except Exception:  # noqa: BLE001 - any failure: retry without dynamic shapes
        pass
    return torch.export.export(model, args, strict=False), False


def _batch_is_symbolic(ep) -> bool:
    user = set(ep.graph_signature.user_inputs)
    dims = [n.meta["val"].shape[0] for n in ep.graph.nodes
            if n.op == "placeholder" and n.name in user
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0]
    return bool(dims) and any(isinstance(d, torch.SymInt) for d in dims)


def _finite(v) -> bool:
    import sympy
    from torch.utils._sympy.numbers import int_oo

    return v not in (int_oo, -int_oo, sympy.oo, -sympy.oo)


def batch_range(ep, traced: int) -> tuple[int, int | None]:
    """The batch sizes an exported graph holds for: the range export inferred for the
    symbol of dim 0 of the batched inputs (``ep.range_constraints``), as (low, high or
    None). A model that branches on its batch size narrows it (``x.shape[0] > 4``
    traced at 4: [2, 4]). Export assumes every dynamic size is at least 2 (0/1
    specialisation) without recording a guard; a low of 2 is taken as 1, which is
    what stfuse always ran batch-1 calls with. Where dim 0 is an expression rather
    than a symbol, only the ``traced`` batch size is known to hold."""
    user = set(ep.graph_signature.user_inputs)
    low, high = 1, None
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if n.op != "placeholder" or n.name not in user or not isinstance(val, torch.Tensor) or not val.dim():
            continue
        d = val.shape[0]
        if not isinstance(d, torch.SymInt):
            continue
        vr = ep.range_constraints.get(d.node.expr)
        if vr is None:  # dim 0 is an expression, not a symbol: no range to read
            return traced, traced
        lo = int(vr.lower) if _finite(vr.lower) else 1
        low = max(low, 1 if lo <= 2 else lo)
        if _finite(vr.upper):
            high = int(vr.upper) if high is None else min(high, int(vr.upper))
    return low, high


def _from_export(name, model, args, batch, device) -> TenantGraph:
    ep, dynamic = _export(model, args, batch)
    sig = ep.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        raise TraceError(f"tenant {name!r}: the model mutates buffers or inputs during forward, "
                         "which an inference program cannot replay")
    state = dict(ep.state_dict)
    state.update(ep.constants)
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **sig.inputs_to_lifted_tensor_constants}
    tensors = {ph: state[target].detach() for ph, target in lifted.items()}
    flat_args, in_spec = pytree.tree_flatten(args)
    mask = _batched_mask(args, batch)
    user = sig.user_inputs
    if len(user) != len(flat_args):
        raise TraceError(f"tenant {name!r}: only tensor inputs are supported "
                         f"(got {len(flat_args)} leaves, export kept {len(user)})")
    inputs = []
    for ph, a, batched in zip(user, flat_args, mask):
        if not isinstance(a, torch.Tensor):
            raise TraceError(f"tenant {name!r}: input {ph!r} is a {type(a).__name__}; "
                             "only tensor inputs are supported")
        inputs.append(InputSpec(ph, tuple(a.shape), a.dtype, a.device, batched and dynamic))
    gm = ep.graph_module
    tg = TenantGraph(name, gm, "export", tensors, inputs, in_spec, ep.call_spec.out_spec,
                     batch, dynamic, device, model=model)
    if dynamic:
        low, high = batch_range(ep, max(batch, 2))
        if low == 1 and not _holds_at_one(tg, model, args, batch):
            low = 2  # batch 1 takes another path (0/1 specialisation hid it): calls at 1 run apart
        tg.batch_range = (low, high)
    else:
        tg.batch_range = (batch, batch)
    return tg


def run_graph(tg: TenantGraph, args) -> list:
    """The tenant's traced graph run eagerly on ``args``: its flat outputs."""
    user = dict(zip((s.name for s in tg.inputs), pytree.tree_leaves(args)))
    flat = [tg.tensors[n.name] if n.name in tg.tensors else user[n.name]
            for n in tg.gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        return list(tg.gm(*flat))


def _holds_at_one(tg: TenantGraph, model, args, batch: int) -> bool:
    """Whether the graph traced for batch >= 2 gives the model's own output at batch 1.

    Export assumes every dynamic size is at least 2 and records no guard for it, so
    ``y * 2 if x.shape[0] > 1 else y * 3`` traces as if batch 1 could not happen. One
    row of the example through both tells (a test, not a proof: branches that agree on
    this row are not told apart)."""
    from .tolerances import assert_close

    one = with_batch(args, 1, batch)
    try:
        with torch.no_grad():
            expected = pytree.tree_leaves(model(*one))
        assert_close(run_graph(tg, one), expected)
    except Exception:  # noqa: BLE001 - a different value, or a graph that cannot run at 1
        return False
    return True


def _from_fx(name, model, args, batch, device) -> TenantGraph:
    """Fallback: one opaque node that calls the fx-traced module."""
    from torch.fx.passes.shape_prop import ShapeProp

    traced = torch.fx.symbolic_trace(model)
    flat_args, in_spec = pytree.tree_flatten(args)
    with torch.no_grad():
        ShapeProp(traced).propagate(*args)
        out = traced(*args)
    flat_out, out_spec = pytree.tree_flatten(out)
    g = torch.fx.Graph()
    phs = [g.placeholder(f"arg{i}") for i in range(len(flat_args))]
    root = torch.nn.Module()
    root.tenant = traced
    call = g.call_module("tenant", tuple(pytree.tree_unflatten(phs, in_spec)))
    flat_call = g.call_function(_flatten_output, (call,))
    g.output(tuple(g.call_function(_getitem, (flat_call, i)) for i in range(len(flat_out))))
    gm = torch.fx.GraphModule(root, g)
    inputs = [InputSpec(f"arg{i}", tuple(a.shape), a.dtype, a.device, False)
              for i, a in enumerate(flat_args)]
    return TenantGraph(name, gm, "fx", {}, inputs, in_spec, out_spec, batch, False, device)


def _flatten_output(out):
    return pytree.tree_leaves(out)


def _getitem(seq, i):
    return seq[i]


def trace_tenant(name: str, model: torch.nn.Module, args: tuple) -> TenantGraph:
    """Trace one tenant at its example inputs (a tuple of positional args)."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"tenant {name!r}: expected a torch.nn.Module, got {type(model).__name__}")
    device = _device_of(model, args)
    batch = example_batch(args)
    with eval_mode(model), torch.no_grad():
        try:
            tg = _from_export(name, model, args, batch, device)
            tg.meta["example"] = args  # for the compile-time self-check (stfuse/selfcheck.py)
            return tg
        except TraceError:
            raise
        except Exception as export_err:  # noqa: BLE001 - reported with the fallback's reason
            try:
                return _from_fx(name, model, args, batch, device)
            except Exception as fx_err:  # noqa: BLE001
                raise TraceError(
                    f"tenant {name!r} cannot be traced: torch.export failed with "
                    f"{type(export_err).__name__}: {_first_line(export_err)}; torch.fx.symbolic_trace "
                    f"failed with {type(fx_err).__name__}: {_first_line(fx_err)}") from export_err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"
