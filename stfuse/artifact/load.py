"""``stfuse.load(path)``: check an artifact, then build a LoadedProgram from it.

Nothing is deserialised before its bytes have passed their checks (validate.py),
and nothing is returned half-loaded: every failure is an ArtifactError.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from stfuse.errors import ArtifactError, StfuseError
from stfuse.calls import InputSpec, input_keywords, tenant_name_problem
from stfuse.plan import Plan
from stfuse import config
from stfuse.program import TenantSpec, varying_dims

from . import validate
from .format import DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, OLDEST_READ, PLAN, WEIGHTS
from .loaded import BoundProgram, LoadedProgram

_SAFE_FILE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def _fail(path, msg: str):
    raise ArtifactError(f"artifact {path}: {msg}")


def _check_manifest(path, manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        _fail(path, f"{MANIFEST} is not an stfuse manifest (format {FORMAT!r} expected)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        _fail(path, f"invalid format version {version!r}")
    if version > FORMAT_VERSION:
        stfuse = manifest.get("versions", {}).get("stfuse", "?") if isinstance(
            manifest.get("versions"), dict) else "?"
        _fail(path, f"format version {version} is newer than this stfuse reads "
                    f"({FORMAT_VERSION}); it was written by stfuse {stfuse}: upgrade stfuse to load it")
    if version < OLDEST_READ:
        _fail(path, f"format version {version} stores programs as zip archives, which this stfuse "
                    "no longer reads (their checks and torch's reader could disagree); save the "
                    "program again with this stfuse")
    try:
        validate.conform(manifest, validate.MANIFEST_SCHEMA, MANIFEST)
    except ArtifactError as err:
        _fail(path, str(err))
    names = [t["name"] for t in manifest["tenants"]]
    for n in names:
        if problem := tenant_name_problem(n):
            _fail(path, f"{MANIFEST}: tenant {n!r}: {problem}")
    if not names or len(set(names)) != len(names):
        _fail(path, f"{MANIFEST}: tenant names {names[:5]} are empty or repeated")
    for t in manifest["tenants"]:
        low, high = t["batch_range"]
        if low < 0 or (high is not None and high < low):
            _fail(path, f"{MANIFEST}: tenant {t['name']!r} has an invalid batch range {t['batch_range']}")
        for dim, (low, high) in (t.get("dim_ranges") or {}).items():
            if not dim.isidentifier() or low < 2 or (high is not None and high < low):
                _fail(path, f"{MANIFEST}: tenant {t['name']!r} has an invalid range {[low, high]} for dim {dim!r}")
        for i in t["inputs"]:
            for d, dim in i.get("dims") or ():
                if dim not in (t.get("dim_ranges") or {}) or not 1 <= d < len(i["shape"]):
                    _fail(path, f"{MANIFEST}: tenant {t['name']!r}: input {i['name']!r} declares dim {d} "
                                f"({dim!r}) without a range or outside its shape")
        for i in t["inputs"]:
            if i["dtype"] not in DTYPES or min(i["shape"], default=0) < 0:
                _fail(path, f"{MANIFEST}: tenant {t['name']!r}: input {i['name']!r} has an invalid "
                            f"dtype or shape")
    for name, p in manifest["programs"].items():
        if [t for t in p["tenants"] if t not in names] or len(p["counts"]) != len(p["tenants"]):
            _fail(path, f"{MANIFEST}: program {name!r} names unknown tenants or output counts")
        if [w for w in p["weights"] if w not in manifest["tensors"]]:
            _fail(path, f"{MANIFEST}: program {name!r} uses weights the manifest does not list")
    for tid, v in manifest["tensors"].items():
        if v["storage"] not in manifest["storages"] or v["dtype"] not in DTYPES:
            _fail(path, f"{MANIFEST}: tensor {tid} names an unknown storage or dtype")
    for sid, s in manifest["storages"].items():
        if s["dtype"] not in DTYPES or s["numel"] < 0:
            _fail(path, f"{MANIFEST}: storage {sid} has an invalid dtype or size")


def read(path) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {file: bytes}) after every check that needs no deserialising: an
    artifact directory, a known format version, a manifest of the right shape, and
    each listed file present, a regular file inside the directory, of the recorded
    size and sha256."""
    path = Path(path)
    if not path.is_dir() or not (path / MANIFEST).is_file():
        _fail(path, f"not an stfuse artifact (expected a directory holding {MANIFEST})")
    try:
        blob = (path / MANIFEST).read_bytes()
    except OSError as err:
        _fail(path, f"cannot read {MANIFEST}: {err}")
    try:
        manifest = validate.parse_json(blob, MANIFEST)
    except ArtifactError as err:
        _fail(path, str(err))
    _check_manifest(path, manifest)
    files = manifest["files"]
    needed = {PLAN, WEIGHTS} | {p["file"] for p in manifest["programs"].values()}
    for name in sorted(needed - set(files)):
        _fail(path, f"manifest does not list {name!r}")
    root, data = path.resolve(), {}
    for name, meta in files.items():
        if not _SAFE_FILE.fullmatch(name) or ".." in name.split("/") or name == MANIFEST:
            _fail(path, f"manifest lists an unsafe file name {name[:80]!r}")
        f = path / name
        if f.is_symlink() or (f.exists() and root not in f.resolve().parents):
            _fail(path, f"{name} is a link; refusing to follow it")
        if not f.is_file():
            _fail(path, f"missing file {name}")
        if f.stat().st_size != meta["bytes"]:
            _fail(path, f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']} "
                        "(truncated or replaced)")
        blob = f.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            _fail(path, f"{name} does not match its sha256 in the manifest (corrupted or modified)")
        data[name] = blob
    return manifest, data


def read_plan(path, data: dict[str, bytes]) -> Plan:
    """The checked plan.json of an artifact (``read``'s data) as a Plan."""
    try:
        record = validate.plan_record(validate.parse_json(data[PLAN], PLAN), PLAN)
    except ArtifactError as err:
        _fail(path, str(err))
    return Plan.from_record(record)


def _treespec(text: str, tenant: str):
    """treespec_loads, importing transformers' output classes when the spec names one."""
    model = validate.parse_json(text.encode(), f"tenant {tenant!r}: pytree spec")
    for key, value in validate._walk(model):
        if key == "type" and value and value not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            module = str(value).rpartition(".")[0]
            if not re.fullmatch(r"transformers(\.[A-Za-z][A-Za-z0-9_]*)+", module):
                raise ArtifactError(f"tenant {tenant!r}: output type {str(value)[:80]!r} is not "
                                    "registered with torch.utils._pytree; register it before stfuse.load")
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ArtifactError(f"tenant {tenant!r} returns {value}; loading it needs "
                                    f"transformers installed ({err})") from err
    try:
        return pytree.treespec_loads(text)
    except Exception as err:  # noqa: BLE001 - any malformed spec
        raise ArtifactError(f"tenant {tenant!r}: unreadable pytree spec ({err})") from err


def _call_spec(in_spec, version: int, tenant: str):
    """A tenant's call spec, (args tuple, kwargs dict with string keys); a version 2
    artifact recorded the args tuple alone."""
    if version == 2 and in_spec.type is tuple:
        args = pytree.tree_unflatten([0] * in_spec.num_leaves, in_spec)
        return pytree.tree_structure((args, {}))
    kids = list(in_spec.children()) if in_spec.type is tuple else []
    if (len(kids) != 2 or kids[0].type is not tuple or kids[1].type is not dict
            or not all(isinstance(k, str) for k in kids[1].context)):
        raise ArtifactError(f"tenant {tenant!r}: its input spec is not a call (args, kwargs)")
    return in_spec


def _tenant_specs(manifest, device) -> dict[str, TenantSpec]:
    specs = {}
    for t in manifest["tenants"]:
        name = t["name"]
        in_spec = _call_spec(_treespec(t["in_spec"], name), manifest["format_version"], name)
        if in_spec.num_leaves != len(t["inputs"]):
            raise ArtifactError(f"tenant {name!r}: its pytree spec has {in_spec.num_leaves} inputs, "
                                f"the manifest lists {len(t['inputs'])}")
        inputs = tuple(InputSpec(i["name"], tuple(i["shape"]), DTYPES[i["dtype"]], device, i["batched"], kw,
                                 tuple((d, n) for d, n in i.get("dims") or ()))
                       for i, kw in zip(t["inputs"], input_keywords(in_spec)))
        constants = t.get("constants") or {}
        if both := sorted(set(constants) & set(pytree.tree_unflatten([None] * in_spec.num_leaves, in_spec)[1])):
            raise ArtifactError(f"tenant {name!r}: keyword(s) {both} are both inputs and constants")
        specs[name] = TenantSpec(name, inputs, in_spec, _treespec(t["out_spec"], name),
                                 t["batch"], t["dynamic"], tuple(t["batch_range"]),
                                 {n: tuple(r) for n, r in (t.get("dim_ranges") or {}).items()}, constants)
    return specs


def _weights(manifest, blob: bytes, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        bases = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{WEIGHTS} is not a readable safetensors file ({err})") from err
    storages = manifest["storages"]
    if set(bases) != set(storages):
        raise ArtifactError(f"{WEIGHTS} holds {sorted(bases)[:5]}, the manifest lists {sorted(storages)[:5]}")
    for sid, meta in storages.items():
        b = bases[sid]
        if b.dim() != 1 or b.numel() != meta["numel"] or b.dtype != DTYPES[meta["dtype"]]:
            raise ArtifactError(f"{WEIGHTS}: storage {sid} is {b.dtype}[{b.numel()}], the manifest says {meta}")
        bases[sid] = b.to(device)
    tensors = {}
    for tid, v in manifest["tensors"].items():
        base = bases[v["storage"]]
        if base.dtype != DTYPES[v["dtype"]] or not validate.view_fits(v, base.numel()):
            raise ArtifactError(f"tensor {tid}: view {v} does not fit its storage")
        tensors[tid] = torch.as_strided(base, v["shape"], v["stride"], v["offset"])
    return tensors


def _program_of(meta, blob, tensors, specs, device, saved_device, codegen):
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    from stfuse.kernels.bind import bind
    from stfuse.kernels.ops import OPS

    where = f"program {meta['file']}"
    canonical = validate.program(blob, where, OPS)
    try:
        ep = deserialize(SerializedArtifact(exported_program=canonical, state_dict={}, constants={},
                                            example_inputs=None))
    except Exception as err:  # noqa: BLE001 - torch's own reason, with the versions
        raise ArtifactError(f"{where} cannot be read by torch {torch.__version__}: "
                            f"{type(err).__name__}: {str(err)[:300]}") from err
    weights = [tensors[tid] for tid in meta["weights"]]
    active = tuple(meta["tenants"])
    n_inputs = len(weights) + sum(len(specs[t].inputs) for t in active)
    validate.check_graph(ep.graph_module, n_inputs, where)
    validate.check_weights(ep.graph_module, weights, where)
    if device != saved_device:
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, device)
    # as FusedProgram binds its programs (the weights come first, and never vary), but no
    # CUDA graphs: the weights are inputs here, and a replay would copy every one of them
    # into the graph's buffers per call
    gm = bind(ep.graph_module, device, codegen, [()] * len(weights) + varying_dims(specs, active), graphs=False)
    return (active, meta["stacked"]), (BoundProgram(gm, weights), list(meta["counts"]))


def load(path, device=None, codegen=None) -> LoadedProgram:
    """Load an artifact written by ``fused.save(path)``; runs without the models' code.

    ``device``: where to run (default: where it was compiled). ``codegen`` ("direct" or
    "inductor", as for stfuse.compile; default STFUSE_CODEGEN, else "direct"): with
    "inductor" the saved canonical programs are compiled by Inductor in this process, on
    first call; an artifact holds no compiled code. Raises ArtifactError
    (a StfuseError) for a path that is not an artifact, a missing, truncated or
    modified file, another format version, or a program outside what stfuse writes;
    nothing is returned half-loaded.
    """
    try:
        wanted = None if device is None else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ArtifactError(f"invalid device {device!r}: {err}") from err
    codegen = config.bound_codegen(codegen)
    manifest, data = read(path)
    try:
        saved_device = torch.device(manifest["tenants"][0]["device"])
        device = saved_device if wanted is None else wanted
        if device.type == "cuda" and not torch.cuda.is_available():
            _fail(path, f"it runs on {device}, but CUDA is not available: pass device='cpu'")
        if device.type == "cuda" and device.index is None:  # inputs report cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        plan = read_plan(path, data)
        specs = _tenant_specs(manifest, device)
        tensors = _weights(manifest, data[WEIGHTS], device)
        programs = dict(_program_of(meta, data[meta["file"]], tensors, specs, device, saved_device, codegen)
                        for meta in manifest["programs"].values())
        names = tuple(specs)
        missing = [key for key in [(names, True)] + [((t,), True) for t in names] if key not in programs]
        if missing:
            _fail(path, f"no saved program for tenants {[list(k[0]) for k in missing]}")
    except StfuseError:
        raise
    except Exception as err:  # noqa: BLE001 - a manifest that does not say what it should
        raise ArtifactError(f"artifact {path}: malformed manifest or plan "
                            f"({type(err).__name__}: {str(err)[:300]})") from err
    return LoadedProgram(path, manifest, specs, programs, plan, device)
