"""Compile every Triton kernel variant stfuse can launch for NVIDIA GPUs, without a GPU.

The real Triton compiler needs no device: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` lowers to PTX and runs ptxas to a cubin on
any machine. For each variant (kernel template x the configs its launcher
really tries x dtype x epilogue) this reports what the compiler made: registers,
spill bytes, shared memory, blocks per SM and occupancy on the target, and
whether the code uses tensor cores (``mma``/``wgmma``), async copies
(``cp.async``, TMA) and vector loads (``ld.global.v2/v4``). ``stfuse kernels``
prints the table; tests/test_aot.py runs a quick sweep in CI.

Runs only with Triton's interpreter off (``TRITON_INTERPRET`` unset before
Triton is imported): under the interpreter ``@triton.jit`` makes no compilable
function. ``stfuse kernels`` is its own process, so it always can.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from stfuse.errors import StfuseError

# Per-SM limits used for occupancy (CUDA occupancy tables): max resident warps,
# blocks, 32-bit registers and shared memory per SM.
ARCHS = {
    "sm_80": {"capability": 80, "warps": 64, "blocks": 32, "regs": 65536, "smem": 164 * 1024},
    "sm_86": {"capability": 86, "warps": 48, "blocks": 16, "regs": 65536, "smem": 100 * 1024},
    "sm_89": {"capability": 89, "warps": 48, "blocks": 24, "regs": 65536, "smem": 100 * 1024},
    "sm_90": {"capability": 90, "warps": 64, "blocks": 32, "regs": 65536, "smem": 228 * 1024},
}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# An epilogue that exercises a tensor operand load and a transcendental, and none at all.
EPILOGUES = ("", "add:tensor,gelu")
NORM_WIDTHS = (1024, 4096)  # layer/group-norm row widths whose BLOCK_D the launcher picks


@dataclass(frozen=True)
class Variant:
    kernel: str  # template kind: gemm, conv, layer_norm, group_norm, pointwise
    config: str  # the launcher's config, e.g. "BLOCK_M=128,BLOCK_N=64,BLOCK_K=32,w4,s4"
    dtype: str  # fp32, tf32, fp16 or bf16
    epilogue: str
    constexprs: tuple  # ((name, value), ...) passed to the kernel besides its three tables
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def variants(quick: bool = False, arch: str = "sm_90", kernels=None) -> list[Variant]:
    """Every (kernel, config, flags, dtype, epilogue) the launchers can run on ``arch``.
    ``quick``: the first config of each kernel, dtype and flag set, with the epilogue chain
    only (a CI-sized subset). ``kernels``: only these kinds (gemm, conv, ...; None: all)."""
    from . import triton_conv, triton_gemm, triton_group_norm, triton_norm
    from .triton_common import TL_DTYPE, dot_precision

    out = []
    cap = ARCHS[arch]["capability"]

    def add(kind, template, configs, dtype_name, epilogues=EPILOGUES, **constexprs):
        if kernels is not None and kind not in kernels:
            return
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()
                         if k not in ("INPUT_PRECISION", "IDX"))
        for cfg in configs[:1] if quick else configs:
            name = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"
            name += f" {flags}" if flags else ""
            for epi in epilogues[-1:] if quick else epilogues:
                consts = {"DTYPE": TL_DTYPE[DTYPES[dtype_name]], **constexprs, **cfg.kwargs}
                out.append(Variant(kind, name, dtype_name, epi, tuple(consts.items()), cfg.num_warps,
                                   cfg.num_stages))

    for name, dtype in DTYPES.items():
        precision = dot_precision(dtype, name == "tf32")
        vec, i32 = 16 // dtype.itemsize, tl_int32()
        # aligned (vector loads); unaligned, K strided, 64-bit offsets (scalar loads)
        vector = triton_gemm.gemm_configs(name, cap, True)
        add("gemm", triton_gemm.GEMM, vector, name, K_CONTIGUOUS=True, VEC=vec, IDX=i32, INPUT_PRECISION=precision,
            SPLIT=0)
        scalar = triton_gemm.gemm_configs(name, cap, False)
        add("gemm", triton_gemm.GEMM, scalar, name, K_CONTIGUOUS=True, VEC=1, IDX=i32, INPUT_PRECISION=precision,
            SPLIT=0)
        add("gemm", triton_gemm.GEMM, scalar, name, K_CONTIGUOUS=False, VEC=1, IDX=tl_int32(64),
            INPUT_PRECISION=precision, SPLIT=0)
        # split-K (aligned members only): the partial pass with any vector config, never an
        # epilogue; the reduce pass with its one tile, every epilogue
        add("gemm", triton_gemm.GEMM, triton_gemm.split_configs(vector), name, ("",), K_CONTIGUOUS=True, VEC=vec, IDX=i32,
            INPUT_PRECISION=precision, SPLIT=1)
        add("gemm", triton_gemm.GEMM, (triton_gemm.reduce_config(cap),), name, K_CONTIGUOUS=True, VEC=vec, IDX=i32,
            INPUT_PRECISION=precision, SPLIT=2)
        # aligned channels_last x and w; channels_last x, 3x3 NCHW w; NCHW x, 1x1 (or channels_last)
        # w; anything unaligned (the launcher drops the unit flags where VEC is 1). fp16/bf16 x goes
        # channels_last wherever VEC can be 8 (triton_conv.vector_x), so NCHW x with vector w is
        # fp32/tf32 only: half convs run (1, 1) with weights packed at binding, (1, 0) with weights
        # the program does not own, (0, 0) where channels per group are not a multiple of 8
        units = ((True, True), (True, False), (False, False))
        for x_unit, w_unit in units + (((False, True),) if name in ("fp32", "tf32") else ()):
            add("conv", triton_conv.CONV, triton_conv.conv_configs(name, cap, x_unit), name, X_C_UNIT=x_unit,
                W_C_UNIT=w_unit, VEC=vec if x_unit or w_unit else 1, IDX=i32, INPUT_PRECISION=precision)
        if name == "tf32":
            continue  # no dot products: tf32 is fp32 there
        for width in NORM_WIDTHS[:1] if quick else NORM_WIDTHS:
            add("layer_norm", triton_norm.LAYER_NORM, triton_norm.norm_configs(width), name, VEC=vec, IDX=i32)
            add("layer_norm", triton_norm.LAYER_NORM, triton_norm.norm_configs(width), name, VEC=1, IDX=i32)
            add("group_norm", triton_group_norm.GROUP_NORM, triton_norm.norm_configs(width), name)
        add("pointwise", triton_norm.POINTWISE, triton_norm.pointwise_configs(), name, VEC=vec, IDX=i32)
        add("pointwise", triton_norm.POINTWISE, triton_norm.pointwise_configs(), name, VEC=1, IDX=i32)
    return out


def tl_int32(bits: int = 32):
    import triton.language as tl

    return tl.int64 if bits == 64 else tl.int32


def _template(kind: str):
    """The template of kernel kind ``kind`` (gemm, conv, ...), from codegen's table of op classes."""
    from . import codegen

    templates = (codegen.template_for(f"grouped_{op_class}") for op_class in codegen.TEMPLATE_OF)
    return next(t for t in templates if t.kind == kind)


_PTXAS = {  # what ptxas -v reports, as Triton's TRITON_DUMP_PTXAS_LOG prints it
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_CUOBJDUMP = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_VECTOR_LOAD = re.compile(r"ld\.global(\.[a-z0-9]+)*\.v[248]|cp\.async\.c[ag]\.shared\.global[^;]*, (0x10|0x8|16|8)[,;]|cp\.async\.bulk")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    m = _CUOBJDUMP.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump reported no resource usage: {text[-200:]}")
    return dict(zip(("regs", "stack", "static_smem", "local"), map(int, m.groups())))


def occupancy(arch: str, regs: int, smem: int, num_warps: int) -> tuple[int, float]:
    """(blocks per SM, fraction of the SM's warps resident) for a kernel on ``arch``."""
    a = ARCHS[arch]
    threads = 32 * num_warps
    per_warp_regs = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated per warp, by 256
    limits = [a["blocks"], a["warps"] // num_warps, a["regs"] // (per_warp_regs * num_warps)]
    if smem:
        limits.append(a["smem"] // smem)
    blocks = max(0, min(limits)) if threads <= 1024 else 0
    return blocks, round(blocks * num_warps / a["warps"], 3)


def _compile(v: Variant, arch: str):
    """(Triton's compiled kernel, ptxas's log) of ``v`` for ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import codegen

    fn = codegen.load_kernel(_template(v.kernel), v.epilogue)
    consts = dict(v.constexprs)
    signature = {"table_ptr": "*i64", "tile_ptr": "*i64", "float_ptr": "*fp64",
                 **{name: "constexpr" for name in consts}}
    target = GPUTarget("cuda", ARCHS[arch]["capability"], 32)
    log = io.StringIO()
    env = {"TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}  # ptxas -v, not a cache hit
    with _environ(env), contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target,
                                  options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    return compiled, log


def ptx(v: Variant, arch: str) -> str:
    """The PTX of ``v`` for ``arch`` (what tests read instruction choices from)."""
    return _compile(v, arch)[0].asm["ptx"]


def compile_variant(v: Variant, arch: str) -> dict:
    """One row: the variant compiled for ``arch`` by the real Triton compiler, no GPU."""
    row = {"kernel": v.kernel, "config": v.config, "dtype": v.dtype, "epilogue": v.epilogue, "arch": arch,
           "ok": False, "error": None, "regs": None, "spill_bytes": None, "smem": None, "occupancy": None,
           "blocks_per_sm": None, "tensor_cores": None, "async_copy": None, "vector_loads": None}
    try:
        compiled, log = _compile(v, arch)
        text, res = compiled.asm["ptx"], _resources(compiled.asm["cubin"])
        found = {k: int(m.group(1)) for k, p in _PTXAS.items() if (m := p.search(log.getvalue()))}
        spills = (found["spill_stores"] + found["spill_loads"] if "spill_stores" in found
                  else res["stack"] + res["local"])  # no ptxas log (older Triton): stack + local memory
        smem = int(compiled.metadata.shared) + res["static_smem"]
        blocks, occ = occupancy(arch, res["regs"], smem, v.num_warps)
        row.update(ok=True, regs=res["regs"], spill_bytes=spills, smem=smem, blocks_per_sm=blocks,
                   occupancy=occ, tensor_cores=("mma.sync" in text or "wgmma" in text),
                   async_copy="cp.async" in text, vector_loads=bool(_VECTOR_LOAD.search(text)))
    except Exception as err:  # noqa: BLE001 - a row that says why is the report's job
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    return row


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


KERNELS = ("gemm", "conv", "layer_norm", "group_norm", "pointwise")


def compile_all(archs=("sm_80", "sm_90"), quick: bool = False, progress=None, kernels=None,
                jobs: int = 1) -> list[dict]:
    """Every variant compiled for every arch in ``archs``: one row each (see compile_variant).
    ``kernels``: only these kinds (a faster sweep while working on one kernel). ``jobs``:
    compiler processes (each variant is one single-threaded compile and ptxas run; the GPU
    machine's 16 cores take the full sweep in a fraction of one core's time). Rows come
    back in sweep order whatever order they finish in."""
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise StfuseError(f"unknown arch {unknown}; known: {', '.join(ARCHS)}")
    unknown = [k for k in kernels or () if k not in KERNELS]
    if unknown:
        raise StfuseError(f"unknown kernel {unknown}; known: {', '.join(KERNELS)}")
    if _interpreting():
        raise StfuseError("compiling kernels for a GPU needs TRITON_INTERPRET unset before Triton "
                          "is imported (run `stfuse kernels` in its own process)")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StfuseError(f"jobs must be an integer >= 1, got {jobs!r}")
    todo = [(v, a) for a in archs for v in variants(quick, a, kernels)]

    def say(i, v, arch):
        if progress:
            progress(f"compiling {i + 1}/{len(todo)}: {v.kernel} {v.dtype} {v.config} {v.epilogue or '-'} {arch}")
    if jobs == 1 or len(todo) < 2:
        rows = []
        for i, (v, arch) in enumerate(todo):
            say(i, v, arch)
            rows.append(compile_variant(v, arch))
        return rows
    import concurrent.futures
    import multiprocessing

    # spawn: fresh interpreters (no fork of a process that has imported torch's thread pools)
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(todo)), multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_variant, v, arch): i for i, (v, arch) in enumerate(todo)}
        rows = [None] * len(todo)
        for done, fut in enumerate(concurrent.futures.as_completed(futures)):
            i = futures[fut]
            say(done, *todo[i])
            rows[i] = fut.result()
    return rows


COLUMNS = ("kernel", "config", "dtype", "epilogue", "arch", "ok", "regs", "spill_bytes", "smem",
           "blocks_per_sm", "occupancy", "tensor_cores", "async_copy", "vector_loads")


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table, errors below it."""
    def cell(r, c):
        v = r[c]
        return "-" if v is None or v == "" else "yes" if v is True else "no" if v is False else str(v)
    cells = [COLUMNS] + [tuple(cell(r, c) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines += [f"error: {r['kernel']} {r['dtype']} {r['config']} {r['arch']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines)


__all__ = ["ARCHS", "KERNELS", "Variant", "variants", "compile_variant", "compile_all", "occupancy", "table"]
