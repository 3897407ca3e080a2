"""Frontend: trace each tenant model into a TenantGraph.

``torch.export`` gives the ATen-level FX graph (parameters and buffers lifted to
placeholders, dim 0 of every batched input symbolic, and the declared dynamic
dims of stfuse/dims.py). A tenant's example inputs take any call form of
stfuse/calls.py (args, kwargs, or both). Where export fails the tenant falls
back to ``torch.fx.symbolic_trace`` plus shape propagation, and runs as one
opaque call (correct, never fused). Where both fail, TraceError names the
tenant and both reasons.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim, ShapesCollection

from . import dims
from .calls import (CONSTANT_TYPES, InputSpec, call_of, call_parts, call_problem, input_keywords,
                    split_constants)
from .errors import TraceError


@dataclass
class TenantGraph:
    """A traced tenant: its graph, lifted tensors and input/output specs."""

    name: str
    gm: torch.fx.GraphModule
    method: str  # "export" or "fx"
    tensors: dict[str, torch.Tensor]  # placeholder name -> parameter / buffer / constant
    inputs: list[InputSpec]  # flat user inputs, in call order
    in_spec: Any  # pytree spec of the call, (args tuple, kwargs dict)
    out_spec: Any  # pytree spec of the model's output
    batch: int  # example batch size
    dynamic: bool  # batch size may change between calls
    device: torch.device
    meta: dict = field(default_factory=dict)
    # Batch sizes the graph is valid for, (low, high or None): export narrows the batch
    # symbol's range where the model branches on it; calls outside it must not run this graph.
    batch_range: tuple = (1, None)
    model: Any = None  # the module traced (eval mode on call), for calls outside batch_range
    # Declared dynamic dims (stfuse/dims.py): name -> (low, high or None), checked per call.
    dim_ranges: dict = field(default_factory=dict)
    # Keyword arguments that are not tensors (return_dict=False): bound when traced, and
    # every call must pass the same values (calls.split_constants)
    constants: dict = field(default_factory=dict)


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
    return call_of(leaves, tg.in_spec, tg.constants)


def _device_of(model: torch.nn.Module, args) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()) + _tensor_leaves(args):
        return t.device
    return torch.device("cpu")


class _TrialExports(logging.Filter):
    """Drops torch's fake-tensor error records on a thread while it runs fake tensors
    that may fail: the dynamic-batch attempt below, and the annotate pass's shape
    probes at batch 3 (passes/annotate.py). A graph whose views bake the batch into
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


def quiet_trials():
    """Inside: torch's fake-tensor error records on this thread are dropped (_TrialExports)."""
    return _TRIALS.quiet()


class _Bound(torch.nn.Module):
    """``model`` called with its flat tensor inputs (``in_spec``: the call's pytree spec)
    and the constant keywords bound. torch.export cannot match dynamic shapes to the
    non-tensor keywords of a ``**kwargs`` forward (transformers' models: "Must provide a
    tree_name"); this forward takes tensors alone, in the order stfuse flattens calls."""

    def __init__(self, model: torch.nn.Module, in_spec, constants: dict):
        super().__init__()
        self.model = model
        self.in_spec = in_spec
        self.constants = constants

    def forward(self, *leaves):
        args, kwargs = call_of(leaves, self.in_spec, self.constants)
        return self.model(*args, **kwargs)


def _export(name, model, args, kwargs, batch, leaf_dims, constants=None):
    """Export with dim 0 of batched inputs dynamic, and the declared dims (``leaf_dims``,
    per flat input: stfuse/dims.py); returns (ExportedProgram, batch is dynamic). Where
    the dynamic batch fails, the batch is fixed; where the declared dims fail, TraceError
    names them with export's reason."""
    # A batch of 1 would be specialised by export (0/1 specialisation): trace at 2.
    trace_batch = max(batch, 2)
    declared = dims.export_shapes(leaf_dims)

    def attempt(call, batch_dims: bool):
        shapes = ShapesCollection()  # keyed by tensor: positional and keyword inputs alike
        for a, batched, spec in zip(pytree.tree_leaves(call), _batched_mask(call, trace_batch), declared):
            if (batched and batch_dims) or spec:
                shapes[a] = {**({0: Dim.AUTO} if batched and batch_dims else {}), **spec}
        root = model
        if constants:
            leaves, in_spec = pytree.tree_flatten(call)
            root, call = _Bound(model, in_spec, constants), (tuple(leaves), {})
        return torch.export.export(root, *call, strict=False,
                                   dynamic_shapes=shapes.dynamic_shapes(root, *call))

    try:
        call = with_batch((args, kwargs), trace_batch, batch) if trace_batch != batch else (args, kwargs)
        with _TRIALS.quiet():
            ep = attempt(call, True)
        dynamic = _batch_is_symbolic(ep)
        if dynamic or trace_batch == batch:
            return ep, dynamic
    except Exception:  # noqa: BLE001 - any failure: retry with the batch fixed
        pass
    try:
        return attempt((args, kwargs), False), False
    except Exception as err:
        if any(leaf_dims):
            named = sorted({n for d in leaf_dims for _, n in d})
            raise TraceError(f"tenant {name!r}: cannot trace with the declared dynamic dim(s) {named}: "
                             f"{type(err).__name__}: {_first_line(err)}") from err
        raise


def _batch_is_symbolic(ep) -> bool:
    user = set(ep.graph_signature.user_inputs)
    dims = [n.meta["val"].shape[0] for n in ep.graph.nodes
            if n.op == "placeholder" and n.name in user
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0]
    return bool(dims) and any(isinstance(d, torch.SymInt) for d in dims)


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
        lo = int(vr.lower) if dims.finite(vr.lower) else 1
        low = max(low, 1 if lo <= 2 else lo)
        if dims.finite(vr.upper):
            high = int(vr.upper) if high is None else min(high, int(vr.upper))
    return low, high


def _from_export(name, model, args, kwargs, batch, device, dynamic_dims=None, constants=None) -> TenantGraph:
    leaf_dims = dims.declared(name, args, kwargs, dynamic_dims)
    ep, dynamic = _export(name, model, args, kwargs, batch, leaf_dims, constants)
    sig = ep.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        raise TraceError(f"tenant {name!r}: the model mutates buffers or inputs during forward, "
                         "which an inference program cannot replay")
    state = dict(ep.state_dict)
    state.update(ep.constants)
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **sig.inputs_to_lifted_tensor_constants}
    tensors = {ph: state[target].detach() for ph, target in lifted.items()}
    flat_args, in_spec = pytree.tree_flatten((args, kwargs))
    mask = _batched_mask((args, kwargs), batch)
    user = sig.user_inputs
    if len(user) != len(flat_args):
        raise TraceError(f"tenant {name!r}: only tensor inputs are supported "
                         f"(got {len(flat_args)} leaves, export kept {len(user)})")
    inputs = []
    for i, (ph, a, batched, kw, ds) in enumerate(zip(user, flat_args, mask, input_keywords(in_spec), leaf_dims)):
        if not isinstance(a, torch.Tensor):
            what = f"input {kw!r}" if kw else f"positional input {i} ({a!r})"
            raise TraceError(f"tenant {name!r}: {what} is a {type(a).__name__}; "
                             f"only tensor inputs are supported{_keyword_hint(model, args, i, a)}")
        inputs.append(InputSpec(ph, tuple(a.shape), a.dtype, a.device, batched and dynamic, kw, ds))
    gm = ep.graph_module
    tg = TenantGraph(name, gm, "export", tensors, inputs, in_spec, ep.call_spec.out_spec,
                     batch, dynamic, device, model=model, dim_ranges=dims.ranges(name, ep, leaf_dims),
                     constants=dict(constants or {}))
    call = (args, {**kwargs, **tg.constants})  # the model's own call
    dims.check_holds(tg, model, call, graph_matches)
    if dynamic:
        low, high = batch_range(ep, max(batch, 2))
        if low == 1 and not _holds_at_one(tg, model, call, batch):
            low = 2  # batch 1 takes another path (0/1 specialisation hid it): calls at 1 run apart
        tg.batch_range = (low, high)
    else:
        tg.batch_range = (batch, batch)
    return tg


def _keyword_hint(model, args: tuple, leaf: int, value) -> str:
    """Where flat input ``leaf`` is the first of positional arguments that are each a
    bool, int, float or str (after plain tensors), how to pass them instead: by keyword,
    which makes them constants of the program ("" where their parameters have no names)."""
    rest = args[leaf:]
    if leaf >= len(args) or args[leaf] is not value or any(type(a) not in CONSTANT_TYPES for a in rest) or \
            any(not isinstance(a, torch.Tensor) for a in args[:leaf]):
        return ""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return ""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if len(args) > len(params) or any(p.kind not in keyword for p in params[leaf:len(args)]):
        return ""
    named = {p.name: a for p, a in zip(params[leaf:], rest)}
    tensors = ", ".join(p.name for p in params[:leaf]) + ("," if leaf == 1 else "")  # a tuple's text
    return (f"; pass {', '.join(f'{k}={v!r}' for k, v in named.items())} by keyword instead, where "
            f"{'it is a constant' if len(named) == 1 else 'they are constants'} of the program: "
            f"(({tensors}), {named!r})")


def run_graph(tg: TenantGraph, call) -> list:
    """The tenant's traced graph run eagerly on ``call`` (any call form): its flat outputs."""
    leaves, problem = call_problem(tg.name, tg.in_spec, tg.inputs, call, tg.constants)
    if problem is not None:
        raise TraceError(problem)
    user = dict(zip((s.name for s in tg.inputs), leaves))
    flat = [tg.tensors[n.name] if n.name in tg.tensors else user[n.name]
            for n in tg.gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        return list(tg.gm(*flat))


def _holds_at_one(tg: TenantGraph, model, call, batch: int) -> bool:
    """Whether the graph traced for batch >= 2 gives the model's own output at batch 1.

    Export assumes every dynamic size is at least 2 and records no guard for it, so
    ``y * 2 if x.shape[0] > 1 else y * 3`` traces as if batch 1 could not happen. One
    row of the example through both tells (a test, not a proof: branches that agree on
    this row are not told apart)."""
    return graph_matches(tg, model, with_batch(call, 1, batch))


def graph_matches(tg: TenantGraph, model, call) -> bool:
    """Whether the traced graph gives the model's own output (tolerance table) on ``call``."""
    from .tolerances import assert_close

    try:
        with torch.no_grad():
            expected = pytree.tree_leaves(model(*call[0], **call[1]))
        assert_close(run_graph(tg, call), expected)
    except Exception:  # noqa: BLE001 - a different value, or a graph that cannot run there
        return False
    return True


def _from_fx(name, model, args, kwargs, batch, device) -> TenantGraph:
    """Fallback: one opaque node that calls the fx-traced module."""
    from torch.fx.passes.shape_prop import ShapeProp

    if kwargs:  # symbolic_trace binds positional placeholders only (constants included)
        raise TraceError("torch.fx.symbolic_trace takes positional inputs only")
    traced = torch.fx.symbolic_trace(model)
    flat_args, in_spec = pytree.tree_flatten((args, {}))
    with torch.no_grad():
        ShapeProp(traced).propagate(*args)
        out = traced(*args)
    flat_out, out_spec = pytree.tree_flatten(out)
    g = torch.fx.Graph()
    phs = [g.placeholder(f"arg{i}") for i in range(len(flat_args))]
    root = torch.nn.Module()
    root.tenant = traced
    call = g.call_module("tenant", tuple(pytree.tree_unflatten(phs, in_spec)[0]))
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


def trace_tenant(name: str, model: torch.nn.Module, example, dynamic=None) -> TenantGraph:
    """Trace one tenant at its example inputs (any call form: ``call_parts``), with the
    dims ``dynamic`` declares ({input: {dim: name}}, stfuse/dims.py) symbolic."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"tenant {name!r}: expected a torch.nn.Module, got {type(model).__name__}")
    args, every_kwarg = call_parts(example)
    for k in every_kwarg:
        if not isinstance(k, str):
            raise TraceError(f"tenant {name!r}: keyword argument names are strings, got {k!r}")
    try:
        kwargs, constants = split_constants(name, every_kwarg)
    except ValueError as err:
        raise TraceError(str(err)) from None
    device = _device_of(model, (args, kwargs))
    batch = example_batch((args, kwargs))
    with eval_mode(model), torch.no_grad():
        try:
            tg = _from_export(name, model, args, kwargs, batch, device, dynamic, constants)
            tg.meta["example"] = (args, every_kwarg)  # for the compile-time self-check (stfuse/selfcheck.py)
            tg.meta["dynamic"] = dynamic  # as declared: a tenant traced again keeps its dims
            return tg
        except TraceError:
            raise
        except Exception as export_err:  # noqa: BLE001 - reported with the fallback's reason
            if dynamic:  # the fx fallback fixes every size: a declared dim cannot hold
                raise TraceError(f"tenant {name!r}: torch.export failed ({type(export_err).__name__}: "
                                 f"{_first_line(export_err)}), and its dynamic dims need it") from export_err
            try:
                return _from_fx(name, model, args, every_kwarg, batch, device)
            except Exception as fx_err:  # noqa: BLE001
                raise TraceError(
                    f"tenant {name!r} cannot be traced: torch.export failed with "
                    f"{type(export_err).__name__}: {_first_line(export_err)}; torch.fx.symbolic_trace "
                    f"failed with {type(fx_err).__name__}: {_first_line(fx_err)}{_hint(model, export_err)}"
                ) from export_err


def _hint(model, err: Exception) -> str:
    """What a user can do about an export failure stfuse recognises ("" otherwise)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) and "Cache" in str(err):
        # transformers decoders return a DynamicCache object by default, which is not a pytree
        return ("; the model returns a key/value cache object (its config has use_cache=True): "
                "set model.config.use_cache = False before compiling, or pass use_cache=False with "
                "the keyword inputs (a constant of the program: {'input_ids': ids, 'use_cache': False})")
    return ""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"
