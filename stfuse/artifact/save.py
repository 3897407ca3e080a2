"""``fused.save(path)``: write a FusedProgram as an artifact directory (layout in __init__)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.utils._sympy.numbers import int_oo

from stfuse.errors import ArtifactError

from . import validate
from .format import DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, PLAN, WEIGHTS


def _versions() -> dict:
    from stfuse import __version__

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {"stfuse": __version__, "torch": torch.__version__, "triton": triton,
            "python": sys.version.split()[0]}


def _spec_record(spec, examples) -> dict:
    from stfuse.calls import call_problem

    leaves = call_problem(spec.name, spec.in_spec, spec.inputs, examples, spec.constants)[0] \
        if examples is not None else None
    ranges = [[int(x.min()), int(x.max())] if isinstance(x, torch.Tensor) and x.numel()
              and not x.is_floating_point() and not x.is_complex() else None for x in leaves or ()]
    ranges = ranges if len(ranges) == len(spec.inputs) else [None] * len(spec.inputs)
    try:
        in_spec, out_spec = pytree.treespec_dumps(spec.in_spec), pytree.treespec_dumps(spec.out_spec)
    except Exception as err:  # noqa: BLE001 - reported with the tenant named
        raise ArtifactError(f"tenant {spec.name!r}: its input/output structure cannot be written "
                            f"as JSON ({err}); register the type with torch.utils._pytree "
                            "with a serialized_type_name") from err
    return {"name": spec.name, "batch": spec.batch, "dynamic": spec.dynamic,
            "batch_range": list(spec.batch_range),  # checked on every call (TenantSpec.in_range)
            "device": str(spec.inputs[0].device) if spec.inputs else "cpu",
            "inputs": [{"name": s.name, "shape": list(s.shape), "batched": s.batched,
                        "dtype": str(s.dtype).removeprefix("torch."), "value_range": r,
                        "dims": [[d, n] for d, n in s.dims]}  # declared dynamic dims (stfuse/dims.py)
                       for s, r in zip(spec.inputs, ranges)],
            "dim_ranges": {n: list(r) for n, r in spec.dim_ranges.items()},  # checked on every call
            "constants": dict(spec.constants),  # keywords every call passes with these values
            "in_spec": in_spec, "out_spec": out_spec}


class _Tensors:
    """Weight views deduplicated by (storage, offset, shape, stride, dtype); storages saved once."""

    def __init__(self):
        self.views: dict[tuple, str] = {}
        self.table: dict[str, dict] = {}
        self.storages: dict[int, tuple[str, torch.dtype]] = {}
        self.bases: dict[str, torch.Tensor] = {}

    def add(self, t: torch.Tensor) -> str:
        t = t.detach()
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise ArtifactError(f"a weight has dtype {t.dtype}, which artifacts do not store")
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.storages and self.storages[ptr][1] != t.dtype:
            t = t.clone()  # one storage read as two dtypes: this view gets its own copy
            ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key not in self.views:
            if ptr not in self.storages:
                sid = f"s{len(self.storages)}"
                self.storages[ptr] = (sid, t.dtype)
                numel = t.untyped_storage().nbytes() // t.element_size()
                self.bases[sid] = t.new_empty(0).set_(t.untyped_storage(), 0, (numel,), (1,)).cpu()
            tid = self.views[key] = f"t{len(self.views)}"
            self.table[tid] = {"storage": self.storages[ptr][0], "offset": t.storage_offset(),
                               "shape": list(t.shape), "stride": list(t.stride()),
                               "dtype": str(t.dtype).removeprefix("torch.")}
        return self.views[key]


def _weights_as_inputs(gm: torch.fx.GraphModule):
    """The program with each weight (a get_attr) turned into a leading placeholder."""
    graph, env, weights = torch.fx.Graph(), {}, []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            if isinstance(getattr(gm, n.target), torch.nn.Module):
                raise ArtifactError("the program calls a higher-order op over a subgraph (a "
                                    "torch.cond, autocast or grad-mode region, run unfused); "
                                    "such programs cannot be saved yet")
            env[n] = graph.placeholder(f"w_{n.target}")
            weights.append(gm.get_buffer(n.target))
        elif n.op == "call_module":
            raise ArtifactError("the program calls a module (an opaque fallback tenant); "
                                "only tenants traced by torch.export can be saved")
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            env[n] = graph.node_copy(n, lambda m: env[m])
    return torch.fx.GraphModule(torch.nn.Module(), graph), weights


def _example(spec, batch: int, sizes: dict) -> list[torch.Tensor]:
    out = []
    for s in spec.inputs:
        shape = [batch, *s.shape[1:]] if s.batched else list(s.shape)
        for d, name in s.dims:
            shape[d] = sizes[name]
        out.append(torch.zeros(shape, dtype=s.dtype, device=s.device))
    return out


def _dim_sizes(specs, stacked: bool) -> list[dict]:
    """Per tenant, {name: (export Dim, example size)} for its declared dims: stacked, one
    Dim per name shared by the tenants (over the intersection of their ranges), else one
    per tenant. Sizes are odd, distinct and not a batch size used (3 + i): export unifies
    symbols whose example sizes are equal, and a dim unified with the batch would be
    checked as one."""
    used = set(range(3, 4 + len(specs)))

    def dim(label, low, high):
        size = next((v for v in range(max(low, 5) | 1, (high or 1 << 20) + 1, 2) if v not in used), low)
        used.add(size)
        return Dim(label, min=low, max=int_oo if high is None else high), size

    shared = {}
    if stacked:
        for s in specs:
            for n, (low, high) in s.dim_ranges.items():
                lo, hi = shared.get(n, (low, high))
                shared[n] = (max(lo, low), hi if high is None else high if hi is None else min(hi, high))
        shared = {n: dim(f"dim_{n}", lo, hi) for n, (lo, hi) in sorted(shared.items())
                  if hi is None or lo <= hi}  # disjoint ranges: one Dim per tenant below
    return [{n: shared.get(n) or dim(f"dim_{n}_{i}", low, high) for n, (low, high) in sorted(s.dim_ranges.items())}
            for i, s in enumerate(specs)]


def _varies(spec) -> bool:
    """Whether a tenant's sizes vary per call (batch or declared dims): two such tenants
    need the mixed program, where each runs at its own sizes."""
    return spec.dynamic or bool(spec.dim_ranges)


def _kernels(gm) -> list[list[str]]:
    """The distinct (stfuse op, epilogue) pairs a program launches."""
    found = set()
    for n in gm.graph.nodes:
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "stfuse":
            names = [a.name for a in n.target._schema.arguments]
            found.add((n.target.name().split("::")[1], n.args[names.index("epilogue")]))
    return [list(k) for k in sorted(found)]


def _program_json(ep) -> bytes:
    """The ExportedProgram as torch's JSON schema text, without node metadata (stack
    traces, module paths: nothing the program needs, and nothing a loader should read)."""
    from torch._export.serde.serialize import serialize

    model = json.loads(serialize(ep).exported_program)
    for node in model["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    model["guards_code"] = []  # stfuse checks inputs itself; see validate.program
    return json.dumps(model, separators=(",", ":")).encode()


def _loadable(blob: bytes, active: tuple) -> None:
    """Refuse now, naming the op, a program that load() would refuse: one that calls an op
    outside the artifact allow-list (validate.target_allowed), such as a library's own
    custom op (transformers' MoE ``grouped_mm_fallback``). An artifact loads without the
    original code, so only aten and stfuse ops may run from it."""
    from stfuse.kernels.ops import OPS

    model = json.loads(blob)
    refused = sorted({n["target"] for n in model["graph_module"]["graph"]["nodes"]
                      if not validate.target_allowed(n["target"], OPS)})
    if refused:
        raise ArtifactError(f"the program for tenants {list(active)} calls {', '.join(refused[:3])}: "
                            "an artifact may call only aten and stfuse ops (it loads without the "
                            "original code); compile such models in the process that serves them")
    validate.program(blob, "the program", OPS)  # the loader's own check, so save and load agree


def _export_program(fused, active: tuple, stacked: bool, tensors: _Tensors, out: Path) -> dict:
    from stfuse.passes.lower import lower_program

    gm, counts = lower_program(fused.graph, active, stacked)
    wgm, weights = _weights_as_inputs(gm)
    specs = [fused.specs[t] for t in active]
    args, dyn = list(weights), [None] * len(weights)
    shared = Dim("batch", min=1)
    for i, (s, named) in enumerate(zip(specs, _dim_sizes(specs, stacked))):
        dim = shared if stacked else Dim(f"batch{i}", min=1)
        # distinct sizes keep the dims apart
        args += _example(s, 3 if stacked else 3 + i, {n: size for n, (_, size) in named.items()})
        dyn += [{**({0: dim} if x.batched else {}), **{d: named[n][0] for d, n in x.dims}} or None
                for x in s.inputs]
    try:
        ep = torch.export.export(wgm, tuple(args), dynamic_shapes=tuple(dyn), strict=False)
    except Exception as err:  # noqa: BLE001 - reported with the program named
        raise ArtifactError(f"torch.export of the program for tenants {list(active)} failed: "
                            f"{type(err).__name__}: {str(err).strip().splitlines()[0]}") from err
    if ep.state_dict or ep.constants:
        raise ArtifactError(f"the program for {list(active)} still holds tensors after export")
    ep.example_inputs = None
    blob = _program_json(ep)
    _loadable(blob, active)
    out.write_bytes(blob)
    return {"tenants": list(active), "stacked": stacked, "counts": list(counts),
            "weights": [tensors.add(w) for w in weights], "kernels": _kernels(gm)}


def _kernel_hashes(kernels) -> dict:
    try:
        from stfuse.kernels import codegen

        return {f"{op}|{epi}": codegen.source_hash(codegen.source_for(op, epi)) for op, epi in kernels}
    except Exception:  # noqa: BLE001 - Triton missing: sources are rendered at inspect time instead
        return {}


# Temporary directories of a save in progress: ".<name>.stfuse-<pid>-<random>" beside the
# artifact ("-old-" while an old artifact is swapped out). A save killed by SIGKILL leaves
# one behind; the next save at that path removes those whose process is gone.
_TMP = re.compile(r"\.(?P<name>.+)\.stfuse(-old)?-(?P<pid>\d+)-[A-Za-z0-9_]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or a pid we cannot judge: leave it
    return True


def _remove_stale(path: Path) -> None:
    for d in path.parent.glob(f".{glob.escape(path.name)}.stfuse*"):
        m = _TMP.fullmatch(d.name)
        if m and m["name"] == path.name and d.is_dir() and not d.is_symlink() and not _alive(int(m["pid"])):
            shutil.rmtree(d, ignore_errors=True)


def _mkdtemp(path: Path, kind: str = "") -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.stfuse{kind}-{os.getpid()}-", dir=path.parent))


def save(fused, path, *, subsets=(), example_inputs=None, progress=None) -> Path:
    """Write ``fused`` (a FusedProgram) as an artifact directory at ``path``.

    ``subsets``: extra tuples of tenant names to save a fused program for (the full
    set and each single tenant always are). ``example_inputs`` ({tenant: args}):
    records the value range of integer inputs, which ``stfuse run`` draws from.
    ``progress``: called with a line per step. An existing artifact at ``path`` is
    replaced only once the new one is complete; any other existing path is an error.
    """
    from safetensors.torch import save_file

    path, say = Path(path), progress or (lambda msg: None)
    if path.exists() and not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} exists and is not an stfuse artifact; refusing to overwrite it")
    names = fused.tenants
    for t, tg in fused.tenant_graphs.items():
        if tg.method != "export":
            raise ArtifactError(f"tenant {t!r} was traced with torch.fx (torch.export failed); "
                                "it runs as one opaque call and cannot be saved")
    examples = dict(example_inputs or {})
    tenants = [_spec_record(fused.specs[t], examples.get(t)) for t in names]
    wanted = [("full", tuple(names), True)]
    if sum(_varies(fused.specs[t]) for t in names) >= 2:
        wanted.append(("full_mixed", tuple(names), False))
    wanted += [(f"tenant_{i}", (t,), True) for i, t in enumerate(names) if len(names) > 1]
    for j, sub in enumerate(subsets):
        unknown = [t for t in sub if t not in names]
        if unknown or len(sub) < 2:
            raise ArtifactError(f"subset {list(sub)}: needs two or more of the tenants {names}")
        sub = tuple(t for t in names if t in sub)
        if sub == tuple(names):
            continue  # the full set is always saved
        wanted.append((f"subset_{j}", sub, True))
        if sum(_varies(fused.specs[t]) for t in sub) >= 2:
            wanted.append((f"subset_{j}_mixed", sub, False))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = _mkdtemp(path)
    except OSError as err:
        raise ArtifactError(f"cannot write an artifact at {path}: {err.strerror or err}") from err
    try:
        (tmp / "programs").mkdir()
        tensors, programs = _Tensors(), {}
        for k, (name, active, stacked) in enumerate(wanted):
            say(f"exporting program {name} ({k + 1}/{len(wanted)}): {', '.join(active)}")
            programs[name] = _export_program(fused, active, stacked, tensors, tmp / "programs" / f"{name}.json")
            programs[name]["file"] = f"programs/{name}.json"
        say(f"writing {len(tensors.bases)} weight storages ({len(tensors.table)} views)")
        save_file(tensors.bases, tmp / WEIGHTS)
        (tmp / PLAN).write_text(json.dumps(fused.plan.record(), indent=1))
        kernels = sorted({tuple(k) for p in programs.values() for k in p["kernels"]})
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                files[f.relative_to(tmp).as_posix()] = {"bytes": len(data),
                                                       "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
                    "tenants": tenants, "programs": programs, "tensors": tensors.table,
                    "storages": {sid: {"dtype": str(b.dtype).removeprefix("torch."), "numel": b.numel()}
                                 for sid, b in tensors.bases.items()},
                    "kernel_hashes": _kernel_hashes(kernels), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp made it private; the artifact is not
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        old = None
        if path.exists():  # swap the complete new artifact in for the old one
            old = _mkdtemp(path, "-old")
            os.replace(path, old / "artifact")
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / "artifact", path)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise ArtifactError(f"cannot write an artifact at {path}: {err}") from err
        raise
    say(f"saved {path}")
    return path
