"""The ``stfuse`` command line: demo, compile, inspect, run.

    stfuse demo                                   compile bundled tenants, check and time them
    stfuse compile [NAME=]MODULE:FACTORY ... -o OUT
    stfuse inspect OUT [--kernels] [--draw plan.png]
    stfuse run OUT [--batch N] [--tenants a,b] [--repeat N]
    stfuse kernels [--arch sm_80,sm_90] [--json FILE] [--quick] [--kernels gemm,conv] [--jobs N]
    stfuse serve OUT [OUT ...] [--host H] [--port P] [--slo-ms [NAME=]MS ...] [--replicas N]
    stfuse place TENANTS... --replicas N --memory-mb MB [--rate [NAME=]RPS] [--slo-ms [NAME=]MS]

A factory is a function of no arguments returning ``(model, example_inputs)``,
or ``({name: model}, {name: example_inputs})`` for several tenants at once
(``stfuse.demo:tenants`` is a bundled one). MODULE is a dotted module name
(importable from the current directory) or a path to a ``.py`` file.
Exit status: 0 on success, 1 for an stfuse error (message on stderr), 2 for
bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

from .errors import StfuseError
from .serve import place_command


class _Progress:
    """One line per long step on stderr, with its time."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _count(low: int, high: int):
    """An argparse type: an integer in [low, high], else a one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value
    return parse


_DRAW_SUFFIXES = (".png", ".svg", ".pdf")


def _draw_path(text: str) -> Path:
    if Path(text).suffix.lower() not in _DRAW_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: the drawing's format comes from its suffix, "
                                         f"one of {', '.join(_DRAW_SUFFIXES)}")
    return Path(text)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit status 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stfuse", description="Multi-tenant inference compiler: "
                                     "fuse operators across PyTorch models, save and run the result.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="compile bundled tenants, check them against eager, time them",
                          description="Compile four bundled tenants, check them against eager, time them.")
    demo.add_argument("--repeat", type=_count(1, 10**6), default=50, help="timed repetitions (default 50)")

    comp = sub.add_parser("compile", help="compile models from factories into an artifact",
                          description="Compile the tenants that factories return and save an artifact. "
                          "A factory takes no arguments and returns (model, example_inputs), or "
                          "({name: model}, {name: example_inputs}); e.g. stfuse.demo:tenants.")
    comp.add_argument("factories", nargs="+", metavar="[NAME=]MODULE:FACTORY",
                      help="MODULE is a dotted module name or a path to a .py file; NAME names the tenant "
                           "(default: the factory's name)")
    comp.add_argument("-o", "--output", required=True, type=Path, help="artifact directory to write")
    comp.add_argument("--subset", action="append", default=[], metavar="A,B",
                      help="also save a fused program for this subset of tenants (repeatable)")
    comp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    insp = sub.add_parser("inspect", help="show an artifact: tenants, groups, launches, FLOPs",
                          description="Check an artifact's files and show its tenants, fused groups, "
                          "launches before/after and FLOPs.")
    insp.add_argument("artifact", type=Path)
    insp.add_argument("--kernels", action="store_true", help="print the generated Triton kernel sources")
    insp.add_argument("--draw", type=_draw_path, metavar="PATH",
                      help="draw the plan (png, svg or pdf; needs matplotlib)")

    run = sub.add_parser("run", help="run an artifact on random inputs of its recorded specs",
                         description="Load an artifact and run it on random inputs of the recorded "
                         "shapes and dtypes; prints each tenant's outputs and the time per call.")
    run.add_argument("artifact", type=Path)
    run.add_argument("--batch", type=_count(1, 2**20), default=None,
                     help="batch size (default: each tenant's example)")
    run.add_argument("--tenants", default=None, metavar="A,B", help="run only these tenants")
    run.add_argument("--repeat", type=_count(1, 10**6), default=10, help="timed calls (default 10)")
    run.add_argument("--device", default=None, help="device to run on (default: the saved one)")
    run.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default 0)")
    run.add_argument("--max-input-mb", type=_count(1, 2**30), default=1024,
                     help="refuse a batch whose random inputs take more (default 1024)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    kern = sub.add_parser("kernels", help="compile every Triton kernel variant for NVIDIA GPUs (no GPU needed)",
                          description="Compile every kernel variant the launchers can run for the given "
                          "architectures with the real Triton compiler (no GPU needed) and report registers, "
                          "spills, shared memory, occupancy, tensor cores, async copies and vector loads.")
    kern.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    kern.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    kern.add_argument("--quick", action="store_true",
                      help="first config per kernel and dtype, epilogue chain only (the CI tier)")
    kern.add_argument("--kernels", default=None, metavar="K1,K2",
                      help="only these kernel kinds: gemm, conv, layer_norm, group_norm, pointwise (default all)")
    kern.add_argument("--jobs", type=_count(1, 1024), default=1, metavar="N",
                      help="compile in N processes (default 1; the sweep is one compile per variant)")
    kern.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    _serve_arguments(sub)
    place_command.add_arguments(sub, _count)
    return parser


def _serve_arguments(sub) -> None:
    serve = sub.add_parser("serve", help="serve artifacts over HTTP (Open Inference Protocol, KServe v2)",
                           description="Serve the tenants of artifacts as models over HTTP with the Open "
                           "Inference Protocol (KServe v2): one process by default, replicas on Ray Serve "
                           "with --replicas N > 1 (needs the serve extra). SIGINT or SIGTERM drains and "
                           "exits 0. See docs/serve.md.")
    serve.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_count(0, 65535), default=8000,
                       help="port (default 8000; 0: any free port, printed; one process only)")
    serve.add_argument("--policy", default="space-time", help="the runtime's policy (default space-time)")
    serve.add_argument("--slo-ms", nargs="+", action="extend", default=[], metavar="[NAME=]MS",
                       help="latency SLO: MS for every model, or NAME=MS per model (default 100)")
    serve.add_argument("--slice-ms", type=float, default=2.0, help="the runtime's batching window (default 2)")
    serve.add_argument("--max-batch", type=_count(1, 2**16), default=32, help="rows per launch (default 32)")
    serve.add_argument("--max-queue", type=_count(1, 2**24), default=1024,
                       help="queued requests per model before 429 (default 1024)")
    serve.add_argument("--device", default=None, help="device to run on (default: the saved one)")
    serve.add_argument("--replicas", type=_count(1, 4096), default=1,
                       help="replicas on Ray Serve (default 1: one process, no Ray)")
    serve.add_argument("--ray", action="store_true", help="deploy on Ray Serve even with one replica")
    serve.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="a running Ray cluster (default: RAY_ADDRESS, else start a local one)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per Ray replica (default 1)")
    serve.add_argument("--timeout-s", type=float, default=60.0,
                       help="on Ray: seconds before an unanswered request gets 503 (default 60)")
    serve.add_argument("--drain-s", type=float, default=30.0,
                       help="on SIGINT/SIGTERM: seconds to finish requests in flight (default 30)")
    serve.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


# ------------------------------------------------------------------------- compile

def _import(module: str):
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise StfuseError(f"no such file {module}")
        spec = importlib.util.spec_from_file_location(f"stfuse_factory_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would
    return importlib.import_module(module)


def _line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def load_factories(specs: list[str]) -> tuple[dict, dict]:
    """({name: model}, {name: example_inputs}) from ``[NAME=]MODULE:FACTORY`` specs."""
    models, inputs = {}, {}
    for spec in specs:
        name, _, target = spec.rpartition("=") if "=" in spec.split(":")[0] else ("", "", spec)
        module, _, attr = target.rpartition(":")
        if not module or not attr:
            raise StfuseError(f"{spec!r}: expected [NAME=]MODULE:FACTORY")
        try:
            factory = getattr(_import(module), attr)
        except Exception as err:  # noqa: BLE001 - the user's module: any error is theirs, in one line
            raise StfuseError(f"{spec!r}: cannot load the factory: importing {module} raised "
                              f"{type(err).__name__}: {_line(err)}") from err
        if not callable(factory):
            raise StfuseError(f"{spec!r}: {attr} is a {type(factory).__name__}, not a function")
        try:
            result = factory()
        except Exception as err:  # noqa: BLE001 - likewise
            raise StfuseError(f"{spec!r}: the factory raised {type(err).__name__}: {_line(err)}") from err
        if not (isinstance(result, tuple) and len(result) == 2):
            raise StfuseError(f"{spec!r}: a factory returns (model, example_inputs) or "
                              f"({{name: model}}, {{name: inputs}}), got {type(result).__name__}")
        got = result[0] if isinstance(result[0], dict) else {name or attr: result[0]}
        args = result[1] if isinstance(result[0], dict) else {name or attr: result[1]}
        for n in got:
            if n in models:
                raise StfuseError(f"tenant name {n!r} is used twice; name tenants as NAME=MODULE:FACTORY")
        models.update(got)
        inputs.update({n: args[n] for n in got} if isinstance(args, dict) else {})
        if set(got) - set(inputs):
            raise StfuseError(f"{spec!r}: no example inputs for {sorted(set(got) - set(inputs))}")
    return models, inputs


def _check_writable(out: Path) -> None:
    """Fail before compiling (which takes a while) where the artifact cannot be written."""
    from .artifact import MANIFEST

    if out.exists() and not (out / MANIFEST).is_file():
        raise StfuseError(f"{out} exists and is not an stfuse artifact; refusing to overwrite it")
    parent = out.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StfuseError(f"cannot write an artifact at {out}: {parent} is not a writable directory")


def _compile(args) -> int:
    from .api import compile as stfuse_compile
    from .artifact import save

    _check_writable(args.output)
    say = _Progress(args.quiet)
    say(f"loading {len(args.factories)} factor{'y' if len(args.factories) == 1 else 'ies'}")
    models, inputs = load_factories(args.factories)
    say(f"compiling {len(models)} tenants: {', '.join(models)}")
    fused = stfuse_compile(models, inputs)
    subsets = [tuple(s.split(",")) for s in args.subset]
    save(fused, args.output, subsets=subsets, progress=say,
         example_inputs={n: a if isinstance(a, tuple) else (a,) for n, a in inputs.items()})
    print(fused.plan.summary())
    size = sum(f.stat().st_size for f in args.output.rglob("*") if f.is_file())
    print(f"\nsaved {args.output} ({size / 1e6:.2f} MB)")
    return 0


# ------------------------------------------------------------------------- inspect

def _flops(n: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _inspect(args) -> int:
    import json

    from .artifact import read, read_plan
    from .calls import InputSpec

    manifest, data = read(args.artifact)
    plan = read_plan(args.artifact, data)
    v = manifest["versions"]
    print(f"artifact  {args.artifact}  (format {manifest['format_version']}; saved with stfuse "
          f"{v['stfuse']}, torch {v['torch']}, triton {v['triton'] or '-'})")
    print(f"files     {len(manifest['files'])}, sha256 verified")
    print(f"tenants   {len(manifest['tenants'])}")
    for t in manifest["tenants"]:
        ins = ", ".join([InputSpec(i["name"], tuple(i["shape"]), i["dtype"], t["device"], i["batched"])
                         .describe() for i in t["inputs"]]
                        + [f"{k}={v!r}" for k, v in (t.get("constants") or {}).items()])
        out_type = json.loads(t["out_spec"])[1].get("type") or "Tensor"
        print(f"  {t['name']:<12} in: {ins}   out: {out_type.rpartition('.')[2]}")
    print("programs  " + ", ".join(f"{n} [{', '.join(p['tenants'])}]" for n, p in manifest["programs"].items()))
    print()
    print(plan.summary())
    s = plan.stats
    print(f"\nlaunches before {s['launches_before']}  after {s['launches_after']}")
    print(f"FLOPs     {_flops(s['flops'])} per call at the example batch")
    if args.kernels:
        for op, epi, src in kernel_sources(manifest):
            print(f"\n# ---- kernel {op} epilogue={epi or '-'}\n{src}")
    if args.draw:
        plan.draw(args.draw)
        print(f"\ndrew {args.draw}")
    return 0


def kernel_sources(manifest: dict) -> list[tuple[str, str, str]]:
    """(op, epilogue, generated Triton source or why it is unavailable) per distinct kernel,
    rendered now by kernels/codegen and compared with the hash recorded at save."""
    out = []
    kernels = sorted({tuple(k) for p in manifest["programs"].values() for k in p["kernels"]})
    for op, epi in kernels:
        try:
            from stfuse.kernels import codegen

            src = codegen.source_for(op, epi)
            saved = manifest.get("kernel_hashes", {}).get(f"{op}|{epi}")
            note = ("same source as at save" if saved == codegen.source_hash(src) else
                    "source hash differs from save (stfuse's templates changed)" if saved else
                    "no hash recorded at save")
            out.append((op, epi, f"# {note}\n{src}"))
        except Exception as err:  # noqa: BLE001 - e.g. Triton not installed
            out.append((op, epi, f"# source unavailable: {type(err).__name__}: {err}"))
    return out


# ----------------------------------------------------------------------------- run

def _describe_output(out) -> str:
    import torch
    import torch.utils._pytree as pytree

    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    parts = [f"[{', '.join(map(str, x.shape))}] {str(x.dtype).removeprefix('torch.')}" for x in leaves]
    finite = all(bool(torch.isfinite(x).all()) for x in leaves if x.is_floating_point())
    return f"{type(out).__name__}: {'; '.join(parts)}{'' if finite else '  (NOT FINITE)'}"


def _run(args) -> int:
    import torch

    from .artifact import load
    from .artifact.inputs import random_inputs

    say = _Progress(args.quiet)
    say(f"loading {args.artifact}")
    prog = load(args.artifact, device=args.device)
    names = args.tenants.split(",") if args.tenants else prog.tenants
    inputs = random_inputs(prog, names, args.batch, args.seed, args.max_input_mb)
    say(f"running {', '.join(inputs)} on {prog.device}")
    with torch.no_grad():
        outs = prog.run(inputs)
        times = []
        for _ in range(max(args.repeat, 1)):
            start = time.perf_counter()
            prog.run(inputs)
            if prog.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    for name, out in outs.items():
        print(f"  {name:<12} {_describe_output(out)}")
    print(f"ran {len(outs)} tenants: median {statistics.median(times) * 1e3:.3f} ms per call "
          f"over {len(times)} calls")
    return 0


# ----------------------------------------------------------------------------- serve

def _serve(args) -> int:
    from .serve.command import serve

    return serve(args, _Progress(args.quiet))


# ----------------------------------------------------------------------------- kernels

def _kernels(args) -> int:
    import json

    from stfuse.kernels import aot

    kinds = None if args.kernels is None else tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    rows = aot.compile_all(tuple(a.strip() for a in args.arch.split(",") if a.strip()), args.quick,
                           progress=_Progress(args.quiet), kernels=kinds, jobs=args.jobs)
    print(aot.table(rows))
    failed = sum(not r["ok"] for r in rows)
    spilling = sum(bool(r["spill_bytes"]) for r in rows)
    print(f"\n{len(rows)} variants: {len(rows) - failed} compiled, {failed} failed, {spilling} spill")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- place

def _place(args) -> int:
    return place_command.place(args, _Progress(args.quiet), load_factories)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(repeat=args.repeat)
    commands = {"compile": _compile, "inspect": _inspect, "run": _run, "kernels": _kernels, "serve": _serve,
                "place": _place}
    try:
        return commands[args.command](args)
    except StfuseError as err:
        message = " ".join(str(err).split())  # one line, whatever the error's own layout
        print(f"stfuse {args.command}: error: {message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `stfuse inspect ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:  # a path the user named: unreadable, unwritable, missing
        print(f"stfuse {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
