"""Triton source for the fused operators: a kernel template plus an epilogue chain.

Each kernel kind (grouped GEMM, implicit-GEMM conv, layer norm, group norm,
pointwise) has one ``KernelTemplate``, kept beside its launcher in
``kernels/triton_*.py``.
A template is the kernel's source with two kinds of holes:

- ``$name``: the number of a problem-table column (``string.Template``
  syntax), plus ``$NCOLS`` (columns per row) and ``$NFLOAT`` (floats per row);
- one line ``#@epilogue``, replaced by the epilogue chain rendered from
  ``TRITON_UNARY`` / ``TRITON_BINARY`` in kernels/epilogue.py.

The problem table is one int64 row per member: the template's own columns,
then four per tensor step of the epilogue (``e<k>`` the operand's address,
``e<k>_outer`` / ``e<k>_inner`` / ``e<k>_col`` its strides). The float table
holds the template's float columns (layer norm's eps), then the member's
epilogue scalars. Since sizes, addresses and strides are all table data, one
compiled kernel serves any set of members and batch sizes.

``load_kernel`` writes the rendered module to ``config.cache_dir()`` under a
name keyed by a hash of its text (atomically: temp file + ``os.replace``),
imports it and returns the kernel; a second process finds the file and only
imports it. ``source_for(op_name, epilogue)`` returns the text for reading.

Before (GEMM template excerpt) and after, for ``epilogue="add:tensor,relu"``::

    y = acc                                  y = acc
    #@epilogue                               # epilogue: add:tensor,relu
                                     ->      e0_ptr = tl.load(prob + 15).to(tl.pointer_type(DTYPE))
                                             e0_offs = ep_outer * tl.load(prob + 16).to(IDX) + ...
                                             e0 = tl.load(e0_ptr + e0_offs, mask=mask, other=0.0).to(tl.float32)
                                             y = y + e0  # add:tensor
                                             y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import string
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from stfuse import config

from . import epilogue as ep

EPILOGUE_MARKER = "#@epilogue"

# Columns of one tensor operand of the epilogue, after the template's own columns.
EXT_FIELDS = ("", "_outer", "_inner", "_col")


@dataclass(frozen=True)
class KernelTemplate:
    kind: str  # names the generated file, e.g. "gemm"
    kernel: str  # the kernel function's name in the generated module
    source: str  # the template text (see the module docstring)
    columns: tuple[str, ...]  # the template's int64 problem-table columns, in order
    float_columns: tuple[str, ...] = ()  # per-member floats ahead of the epilogue scalars


# op class -> (module in kernels/, template attribute): the template both of its ops
# (``grouped_<class>`` and ``stacked_<class>``) render.
TEMPLATE_OF = {
    "linear": ("triton_gemm", "GEMM"),
    "conv2d": ("triton_conv", "CONV"),
    "layer_norm": ("triton_norm", "LAYER_NORM"),
    "group_norm": ("triton_group_norm", "GROUP_NORM"),
    "pointwise": ("triton_norm", "POINTWISE"),
}

# Helpers the TRITON_UNARY / TRITON_BINARY expressions call. Written with
# exp/exp2/log2/erf only, which both the interpreter and Triton 3.6 on CUDA have.
PRELUDE = '''
import triton
import triton.language as tl


@triton.jit
def _erf(x):
    return tl.math.erf(x)


@triton.jit
def _tanh(x):
    # From exp of a non-positive argument, so it never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _with_bias(y, prob, B: tl.constexpr, SB: tl.constexpr, cols, col_mask, DTYPE: tl.constexpr,
               IDX: tl.constexpr):
    # y [rows, cols] plus the member's bias at ``cols``: its address and stride are the
    # problem-table columns B and SB (address 0: no bias). The GEMM and conv templates'.
    b_addr = tl.load(prob + B)
    if b_addr != 0:
        bias_ptr = b_addr.to(tl.pointer_type(DTYPE))
        bias = tl.load(bias_ptr + cols * tl.load(prob + SB).to(IDX), mask=col_mask, other=0.0)
        y = y + bias.to(tl.float32)[None, :]
    return y


@triton.jit
def _pow(x, p):
    # torch.pow with a scalar exponent: a negative base keeps its sign for an odd
    # integral exponent and gives nan (log2 of a negative) for a fractional one.
    integral = p == tl.floor(p)
    odd = integral & (p - 2.0 * tl.floor(0.5 * p) == 1.0)
    mag = tl.exp2(p * tl.log2(tl.where(integral, tl.abs(x), x)))
    signed = tl.where(x < 0.0, -mag, mag)
    return tl.where(p == 0.0, 1.0, tl.where(odd, signed, mag))
'''


class Source:
    """An indented text buffer that hands out unique names."""

    def __init__(self, indent: str = "    ") -> None:
        self._lines: list[str] = []
        self._depth = 0
        self._indent = indent
        self._taken: dict[str, int] = {}

    def line(self, text: str = "") -> None:
        self._lines.append(self._indent * self._depth + text if text else "")

    def block(self, text: str) -> None:
        """Add a multi-line block, dedented, at the current depth."""
        for ln in textwrap.dedent(text).strip("\n").splitlines():
            self.line(ln)

    @contextlib.contextmanager
    def indented(self, depth: int = 1):
        self._depth += depth
        try:
            yield self
        finally:
            self._depth -= depth

    def name(self, prefix: str) -> str:
        """``prefix`` followed by the next free number: e0, e1, ..."""
        n = self._taken.get(prefix, 0)
        self._taken[prefix] = n + 1
        return f"{prefix}{n}"

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def table_columns(template: KernelTemplate, steps) -> tuple[str, ...]:
    """All int64 columns of a launch's problem table: the template's, then the epilogue operands'."""
    n_tensor, _ = ep.counts(steps)
    ext = tuple(f"e{k}{field}" for k in range(n_tensor) for field in EXT_FIELDS)
    return template.columns + ext


def float_width(template: KernelTemplate, steps) -> int:
    """Floats per member in the float table: the template's, then the epilogue scalars."""
    return len(template.float_columns) + ep.counts(steps)[1]


def render_epilogue(buf: Source, template: KernelTemplate, steps) -> None:
    """Emit the epilogue chain on ``y``.

    The template provides, at the marker: ``y`` (fp32 tile), ``prob`` (this
    member's table row), ``member``, ``float_ptr``, ``DTYPE``, ``mask`` and
    the operand indices ``ep_outer`` / ``ep_inner`` / ``ep_col``, already shaped
    to broadcast against ``y``.
    """
    if not steps:
        buf.line("# no epilogue")
        return
    buf.line(f"# epilogue: {ep.format_steps(steps)}")
    columns = table_columns(template, steps)
    nfloat = float_width(template, steps)
    tensor_k = 0
    scalar_k = len(template.float_columns)
    for step in steps:
        if step.operand == "none":
            buf.line(f"y = {ep.TRITON_UNARY[step.op]}  # {step}")
            continue
        if step.operand == "tensor":
            col = {f: columns.index(f"e{tensor_k}{f}") for f in EXT_FIELDS}
            operand = buf.name("e")
            buf.line(f"{operand}_ptr = tl.load(prob + {col['']}).to(tl.pointer_type(DTYPE))")
            # offsets in the template's IDX (int32 where members span < 2**31 elements), else int64
            cast = ".to(IDX)" if "IDX: tl.constexpr" in template.source else ""
            buf.line(f"{operand}_offs = ep_outer * tl.load(prob + {col['_outer']}){cast}"
                     f" + ep_inner * tl.load(prob + {col['_inner']}){cast}"
                     f" + ep_col * tl.load(prob + {col['_col']}){cast}")
            buf.line(f"{operand} = tl.load({operand}_ptr + {operand}_offs, mask=mask, other=0.0).to(tl.float32)")
            tensor_k += 1
        else:
            operand = buf.name("s")
            buf.line(f"{operand} = tl.load(float_ptr + member * {nfloat} + {scalar_k}).to(tl.float32)")
            scalar_k += 1
        expr = re.sub(r"\bo\b", operand, ep.TRITON_BINARY[step.op])
        buf.line(f"y = {expr}  # {step}")


def render(template: KernelTemplate, epilogue: str) -> str:
    """The full text of the generated module for ``template`` with ``epilogue``."""
    steps = ep.parse(epilogue)
    columns = table_columns(template, steps)
    holes = {name: str(i) for i, name in enumerate(columns)}
    holes.update({name: str(i) for i, name in enumerate(template.float_columns)})
    holes["NCOLS"] = str(len(columns))
    holes["NFLOAT"] = str(float_width(template, steps))
    body = string.Template(textwrap.dedent(template.source).strip("\n")).substitute(holes)

    buf = Source()
    buf.line(f'"""Generated by stfuse.kernels.codegen: {template.kernel}, '
             f'epilogue {ep.format_steps(steps)!r}. Do not edit; delete to regenerate."""')
    buf.block(PRELUDE)
    buf.line()
    buf.line()
    buf.line(f"# problem-table columns: {', '.join(f'{i}={c}' for i, c in enumerate(columns))}")
    for ln in body.splitlines():
        if ln.strip() == EPILOGUE_MARKER:
            depth = (len(ln) - len(ln.lstrip())) // 4
            with buf.indented(depth):
                render_epilogue(buf, template, steps)
        else:
            buf.line(ln)
    return buf.text()


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def source_path(template: KernelTemplate, source: str) -> Path:
    return config.cache_dir() / f"{template.kind}_{source_hash(source)}.py"


def write_source(template: KernelTemplate, source: str) -> tuple[Path, bool]:
    """Save ``source`` under its hash in the cache directory; (path, whether it was written).

    A file that exists with the same text is a cache hit. Writing goes through a
    temp file in the same directory and ``os.replace``, so a process that races
    us (or dies half-way) never leaves a partial file under the final name.
    """
    path = source_path(template, source)
    if path.exists() and path.read_text() == source:
        return path, False
    write_atomic(path, source)
    return path, True


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and
    ``os.replace``: a reader never sees a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# path of a generated file -> its imported module, so a process imports each once
_MODULES: dict[Path, object] = {}


def load_module(template: KernelTemplate, source: str):
    """Write (unless cached) and import the generated module."""
    path, _ = write_source(template, source)
    module = _MODULES.get(path)
    if module is None:
        name = f"stfuse_generated_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # inspect (and so triton.jit) looks modules up here
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return module


# (template kind, epilogue, cache dir's variables) -> kernel; skips rendering on every call
_KERNELS: dict[tuple[str, str, Path], object] = {}


def load_kernel(template: KernelTemplate, epilogue: str):
    """The compiled-on-first-launch Triton kernel of ``template`` with ``epilogue``."""
    # keyed on the variables cache_dir() reads (building its Path took ~5 us per launch)
    key = (template.kind, epilogue, os.environ.get("STFUSE_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"))
    kernel = _KERNELS.get(key)
    if kernel is None:
        module = load_module(template, render(template, epilogue))
        kernel = _KERNELS[key] = getattr(module, template.kernel)
    return kernel


def template_for(op_name: str) -> KernelTemplate:
    """The template ``op_name`` (``grouped_linear``, ``stacked_conv2d``, ...) renders."""
    kind, _, op_class = op_name.partition("_")
    if kind not in ("grouped", "stacked"):
        raise KeyError(op_name)
    module_name, attr = TEMPLATE_OF[op_class]
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, attr)


def source_for(op_name: str, epilogue: str = "") -> str:
    """The generated Triton source that runs ``op_name`` with ``epilogue``, for reading."""
    return render(template_for(op_name), epilogue)
