"""Every stfuse op from one table, like lightning-thunder's OpInfo (STYLE items 12, 15).

Rows are ops (one ``OpInfo`` per entry of ``kernels/ops.OPS``, each with a
sample-inputs generator); columns are implementations and dtypes. Each case
runs every sample of its op and compares each output with the float64
reference (the torch reference on the samples cast to float64) within
``stfuse.tolerances``:

- ``reference``: the registered ``torch.ops.stfuse`` op on CPU tensors (its CPU
  kernel is the torch reference), so the registration is checked too;
- ``fake``: the registered fake under ``FakeTensorMode``; its outputs must have
  the reference's structure, shapes, dtypes and device (no values to compare);
- ``triton``: the Triton kernel itself (``triton_ops._TABLE``, not ``IMPLS``:
  ``IMPLS`` falls back to the reference for inputs Triton does not take, which
  would let a silent fallback pass as a Triton result), in Triton's interpreter
  on CPU (TRITON_INTERPRET=1, set in conftest.py);
- ``cuda``: the registered op on CUDA tensors (Triton compiled for the device);
  gpu-marked, so skipped without CUDA. Compiling for sm_80/sm_90 without a GPU
  is tests/test_aot.py's tier.

Samples cover odd sizes (1, 17, 33), an empty member (M=0 or batch 0), a
single member, mixed-shape members for the grouped forms, R=1 and R=3 for the
stacked forms, with and without bias, and an epilogue chain with tensor and
scalar operands. Shapes stay tiny: the interpreter runs each program in numpy.

What the table does not check stays in the per-op files: refused inputs,
strided and permuted inputs, kernel reuse across calls, pow of negative bases,
every epilogue step on its own, input aliasing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from stfuse.kernels import epilogue as ep
from stfuse.kernels.ops import OPS, op
from stfuse.tolerances import assert_close

# The interpreter evaluates masked-out lanes too (on the `other` value 0), so
# numpy warns about 0/0 and log2(0) there; those lanes are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@dataclass(frozen=True)
class Sample:
    label: str
    args: tuple  # the op's arguments, exactly as the schema takes them


@dataclass(frozen=True)
class OpInfo:
    name: str
    sample_inputs: Callable[[torch.dtype], Iterator[Sample]]
    triton_dtypes: tuple = ()  # the dtypes the Triton interpreter runs correctly


# --- sample-inputs generators ---------------------------------------------------------


def _randn(g: torch.Generator, dtype: torch.dtype, *shape, scale: float = 1.0) -> torch.Tensor:
    # drawn in float32 and cast, so every dtype sees the same values (up to rounding)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _operands(g, dtype, epilogue: str, shapes, members: int) -> tuple[list, list]:
    """ext and scalars for ``epilogue``: one tensor of each shape in ``shapes`` per tensor step
    (member-major for grouped ops: ``shapes`` lists one shape per member), and scalars
    0.5, 1.5, ... per scalar step and member."""
    nt, ns = ep.counts(ep.parse(epilogue))
    ext = [_randn(g, dtype, *s) for s in shapes for _ in range(nt)]
    scalars = [0.5 + i for i in range(members * ns)]
    return ext, scalars


# grouped linear members: (x shape, N, bias): odd sizes, M=0, a 3-d input, a single output column
LINEAR_MEMBERS = [((17, 33), 5, True), ((1, 17), 33, False), ((0, 5), 3, True), ((2, 3, 16), 1, False)]


def sample_grouped_linear(dtype):
    g = torch.Generator().manual_seed(0)

    def make(label, members, epilogue):
        x = [_randn(g, dtype, *xs) for xs, _, _ in members]
        w = [_randn(g, dtype, n, xs[-1]) for xs, n, _ in members]
        b = [_randn(g, dtype, n) if bias else None for _, n, bias in members]
        ext, scalars = _operands(g, dtype, epilogue, [(n,) for _, n, _ in members], len(members))
        return Sample(label, (x, w, b, epilogue, ext, scalars))

    yield make("mixed", LINEAR_MEMBERS, "")
    yield make("mixed+epilogue", LINEAR_MEMBERS, "add:tensor,gelu,mul:scalar")
    yield make("single", [((33, 17), 17, True)], "relu,sub:scalar")


def sample_stacked_linear(dtype):
    g = torch.Generator().manual_seed(1)
    # (label, x shape [R, ..., K], N, bias, epilogue)
    cases = [
        ("R=3,4-d", (3, 2, 17, 33), 9, True, "add:tensor,gelu_tanh,mul:scalar"),
        ("R=1", (1, 17, 33), 1, False, "silu"),
        ("R=3,2-d", (3, 17), 33, True, ""),
        ("R=2,M=0", (2, 0, 17), 5, True, "relu"),
    ]
    for label, xs, n, bias, epilogue in cases:
        R = xs[0]
        x, w = _randn(g, dtype, *xs), _randn(g, dtype, R, n, xs[-1])
        b = _randn(g, dtype, R, n) if bias else None
        nt, ns = ep.counts(ep.parse(epilogue))
        ext = [_randn(g, dtype, R, *([1] * (len(xs) - 2)), n) for _ in range(nt)]
        yield Sample(label, (x, w, b, epilogue, ext, [0.5 + r for r in range(R * ns)]))


# grouped conv members: (x shape, w shape, stride, padding, dilation, groups): odd sizes,
# an empty batch, strided/dilated/padded, grouped, 1x1, depthwise
CONV_MEMBERS = [
    ((2, 4, 9, 7), (6, 2, 3, 3), (1, 2), (1, 0), (1, 2), 2),
    ((1, 6, 5, 5), (5, 6, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((0, 3, 4, 4), (2, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 6, 6), (4, 1, 3, 3), (2, 1), (1, 1), (1, 1), 4),
    ((1, 2, 17, 3), (3, 2, 2, 1), (3, 1), (2, 0), (1, 1), 1),
]


def sample_grouped_conv2d(dtype):
    g = torch.Generator().manual_seed(2)

    def make(label, members, epilogue):
        x = [_randn(g, dtype, *m[0]) for m in members]
        w = [_randn(g, dtype, *m[1], scale=1 / 3) for m in members]
        b = [_randn(g, dtype, m[1][0]) if i % 2 == 0 else None for i, m in enumerate(members)]
        params = [[v for m in members for v in m[k]] for k in (2, 3, 4)] + [[m[5] for m in members]]
        # per-channel operands [O, 1, 1]
        ext, scalars = _operands(g, dtype, epilogue, [(m[1][0], 1, 1) for m in members], len(members))
        return Sample(label, (x, w, b, *params, epilogue, ext, scalars))

    yield make("mixed", CONV_MEMBERS, "")
    yield make("mixed+epilogue", CONV_MEMBERS, "add:tensor,relu,mul:scalar")
    yield make("single", CONV_MEMBERS[:1], "sigmoid,add:scalar")


def sample_stacked_conv2d(dtype):
    g = torch.Generator().manual_seed(3)
    # (label, R, x [B, C, H, W], w [O, C/g, kh, kw], stride, padding, dilation, groups, bias, epilogue)
    cases = [
        ("R=3,grouped", 3, (2, 4, 9, 6), (6, 2, 3, 2), [2, 1], [1, 0], [1, 2], 2, True,
         "add:tensor,tanh,div:scalar"),
        ("R=1,1x1", 1, (1, 3, 5, 5), (4, 3, 1, 1), [1, 1], [0, 0], [1, 1], 1, False, ""),
        ("R=2,B=0", 2, (0, 2, 5, 5), (3, 2, 3, 3), [1, 1], [1, 1], [1, 1], 1, True, "relu"),
    ]
    for label, R, xs, ws, stride, padding, dilation, groups, bias, epilogue in cases:
        x, w = _randn(g, dtype, R, *xs), _randn(g, dtype, R, *ws, scale=1 / 3)
        b = _randn(g, dtype, R, ws[0]) if bias else None
        nt, ns = ep.counts(ep.parse(epilogue))
        ext = [_randn(g, dtype, R, 1, ws[0], 1, 1) for _ in range(nt)]  # per-channel, per member
        yield Sample(label, (x, w, b, stride, padding, dilation, groups, epilogue, ext,
                             [1.0 + r for r in range(R * ns)]))


# layer-norm members: widths 33, 17, 1, 16; an empty member; a 3-d input
NORM_SHAPES = [(3, 33), (2, 1, 17), (0, 5), (5, 1), (6, 16)]


def sample_grouped_layer_norm(dtype):
    g = torch.Generator().manual_seed(4)

    def make(label, shapes, epilogue):
        x = [_randn(g, dtype, *s, scale=3) for s in shapes]  # mean far from 0: a one-pass variance fails
        x = [t + 1 for t in x]
        w = [_randn(g, dtype, s[-1]) if i % 3 != 1 else None for i, s in enumerate(shapes)]
        b = [_randn(g, dtype, s[-1]) if i % 2 == 0 else None for i, s in enumerate(shapes)]
        eps = [1e-5, 1e-3, 1e-5, 1e-6, 0.1][:len(shapes)]
        ext, scalars = _operands(g, dtype, epilogue, [s[-1:] for s in shapes], len(shapes))
        return Sample(label, (x, w, b, eps, epilogue, ext, scalars))

    yield make("mixed", NORM_SHAPES, "")
    yield make("mixed+epilogue", NORM_SHAPES, "mul:tensor,gelu,sub:scalar")
    yield make("single", NORM_SHAPES[:1], "relu")


def sample_stacked_layer_norm(dtype):
    g = torch.Generator().manual_seed(5)
    # (label, x shape [R, ..., D], affine, epilogue)
    cases = [
        ("R=3,affine", (3, 2, 5, 33), True, "add:tensor,mul:scalar"),
        ("R=1", (1, 4, 17), False, "gelu_tanh"),
        ("R=2,M=0", (2, 0, 17), True, ""),
    ]
    for label, xs, affine, epilogue in cases:
        R, D = xs[0], xs[-1]
        x = _randn(g, dtype, *xs, scale=2)
        w = _randn(g, dtype, R, D) if affine else None
        b = _randn(g, dtype, R, D) if affine else None
        nt, ns = ep.counts(ep.parse(epilogue))
        ext = [_randn(g, dtype, R, *([1] * (len(xs) - 2)), D) for _ in range(nt)]
        yield Sample(label, (x, w, b, 1e-5, epilogue, ext, [float(r + 1) for r in range(R * ns)]))


# group-norm members: (x shape [N, C, *], num_groups): odd group widths (17 channels of one
# group, 3 x 11 spatial), 2-d and 3-d inputs, an empty batch, one group per channel
GROUP_NORM_MEMBERS = [((2, 6, 3, 11), 3), ((3, 17), 1), ((1, 4, 33), 2), ((0, 4, 2, 2), 2), ((2, 5, 3), 5)]


def sample_grouped_group_norm(dtype):
    g = torch.Generator().manual_seed(8)

    def make(label, members, epilogue):
        x = [_randn(g, dtype, *xs, scale=3) + 1 for xs, _ in members]  # mean far from 0, as layer norm's
        w = [_randn(g, dtype, xs[1]) if i % 3 != 1 else None for i, (xs, _) in enumerate(members)]
        b = [_randn(g, dtype, xs[1]) if i % 2 == 0 else None for i, (xs, _) in enumerate(members)]
        groups = [n for _, n in members]
        eps = [1e-5, 1e-3, 1e-5, 1e-6, 0.1][:len(members)]
        # per-channel operands [C, 1, ...] (a full residual is the stacked samples' case)
        ext, scalars = _operands(g, dtype, epilogue, [(xs[1],) + (1,) * (len(xs) - 2) for xs, _ in members],
                                 len(members))
        return Sample(label, (x, w, b, groups, eps, epilogue, ext, scalars))

    yield make("mixed", GROUP_NORM_MEMBERS, "")
    yield make("mixed+epilogue", GROUP_NORM_MEMBERS, "mul:tensor,silu,sub:scalar")
    yield make("single", GROUP_NORM_MEMBERS[:1], "relu")


def sample_stacked_group_norm(dtype):
    g = torch.Generator().manual_seed(9)
    # (label, x shape [R, N, C, *], num_groups, affine, epilogue)
    cases = [
        ("R=3,affine", (3, 2, 6, 5, 7), 3, True, "add:tensor,gelu,mul:scalar"),
        ("R=1,3-d", (1, 3, 4, 17), 2, False, "silu"),
        ("R=2,2-d", (2, 5, 9), 3, True, ""),
        ("R=2,N=0", (2, 0, 4, 3, 3), 4, True, "relu"),
    ]
    for label, xs, groups, affine, epilogue in cases:
        R, C = xs[0], xs[2]
        x = _randn(g, dtype, *xs, scale=2) - 1
        w = _randn(g, dtype, R, C) if affine else None
        b = _randn(g, dtype, R, C) if affine else None
        nt, ns = ep.counts(ep.parse(epilogue))
        ext = [_randn(g, dtype, *xs) for _ in range(nt)]  # a full residual per member
        yield Sample(label, (x, w, b, groups, 1e-5, epilogue, ext, [float(r + 1) for r in range(R * ns)]))


POINTWISE_SHAPES = [(17,), (2, 33), (0, 3), (1, 1, 3), ()]


def sample_grouped_pointwise(dtype):
    g = torch.Generator().manual_seed(6)

    def make(label, shapes, epilogue):
        x = [_randn(g, dtype, *s) for s in shapes]
        ext, scalars = _operands(g, dtype, epilogue, [s[-1:] for s in shapes], len(shapes))
        return Sample(label, (x, epilogue, ext, scalars))

    yield make("mixed", POINTWISE_SHAPES, "")
    yield make("mixed+epilogue", POINTWISE_SHAPES, "silu,add:tensor,mul:scalar")
    yield make("single", POINTWISE_SHAPES[1:2], "tanh,rsub:scalar")


def sample_stacked_pointwise(dtype):
    g = torch.Generator().manual_seed(7)
    for label, shape, epilogue in [("R=3", (3, 17), "mul:tensor,sub:scalar,relu"),
                                   ("R=1", (1, 2, 33), ""),
                                   ("R=2,M=0", (2, 0, 5), "sigmoid")]:
        R = shape[0]
        nt, ns = ep.counts(ep.parse(epilogue))
        ext = [_randn(g, dtype, *shape) for _ in range(nt)]
        yield Sample(label, (_randn(g, dtype, *shape), epilogue, ext, [0.5 * (r + 1) for r in range(R * ns)]))


# bfloat16 everywhere but in the interpreter's GEMM and conv kernels: Triton 3.9's interpreter
# computes tl.dot on bf16 wrongly (errors around 1e10 on these very samples, where fp16 is
# within 1e-3), so a bf16 GEMM result on CPU says nothing about the GPU kernel; the norm and
# pointwise kernels do no dot and are within tolerance in bf16, so they run it.
DOT = (torch.float32, torch.float16)
NO_DOT = (torch.float32, torch.float16, torch.bfloat16)

OPINFOS = [
    OpInfo("grouped_linear", sample_grouped_linear, DOT),
    OpInfo("stacked_linear", sample_stacked_linear, DOT),
    OpInfo("grouped_conv2d", sample_grouped_conv2d, DOT),
    OpInfo("stacked_conv2d", sample_stacked_conv2d, DOT),
    OpInfo("grouped_layer_norm", sample_grouped_layer_norm, NO_DOT),
    OpInfo("stacked_layer_norm", sample_stacked_layer_norm, NO_DOT),
    OpInfo("grouped_group_norm", sample_grouped_group_norm, NO_DOT),
    OpInfo("stacked_group_norm", sample_stacked_group_norm, NO_DOT),
    OpInfo("grouped_pointwise", sample_grouped_pointwise, NO_DOT),
    OpInfo("stacked_pointwise", sample_stacked_pointwise, NO_DOT),
]


def test_the_table_covers_every_op():
    assert sorted(o.name for o in OPINFOS) == sorted(OPS)


# --- implementations -------------------------------------------------------------------


def _map_tensors(fn, args):
    return pytree.tree_map(lambda a: fn(a) if isinstance(a, torch.Tensor) else a, args)


def run_reference(name, args):
    return op(name)(*args)


def run_fake(name, args):
    with FakeTensorMode() as mode:
        return op(name)(*_map_tensors(mode.from_tensor, args))


def run_triton(name, args):
    from stfuse.kernels import triton_ops

    return triton_ops._TABLE[name][0](*args)


def run_cuda(name, args):
    out = op(name)(*_map_tensors(lambda t: t.cuda(), args))
    leaves = pytree.tree_leaves(out)
    assert all(t.is_cuda for t in leaves)
    return _map_tensors(lambda t: t.cpu(), out)


ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# implementation -> (runner, the dtypes it runs for an OpInfo, marks)
IMPLS = {
    "reference": (run_reference, lambda info: ALL_DTYPES, ()),
    "fake": (run_fake, lambda info: ALL_DTYPES, ()),
    "triton": (run_triton, lambda info: info.triton_dtypes, ()),
    "cuda": (run_cuda, lambda info: ALL_DTYPES, (pytest.mark.gpu,)),
}


def cases():
    for info in OPINFOS:
        for impl, (_, dtypes, marks) in IMPLS.items():
            for dtype in dtypes(info):
                yield pytest.param(info, impl, dtype, marks=marks,
                                   id=f"{info.name}-{impl}-{str(dtype).removeprefix('torch.')}")


def _float64(args):
    return _map_tensors(lambda t: t.double() if t.is_floating_point() else t, args)


@pytest.mark.parametrize("info, impl, dtype", list(cases()))
def test_op(info, impl, dtype, monkeypatch):
    if impl == "triton":
        pytest.importorskip("triton")
    if impl == "cuda":
        # fp32 through IEEE dots, against the 1e-4 tolerance (as tests/test_triton_*.py's gpu tests)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    run = IMPLS[impl][0]
    samples = list(info.sample_inputs(dtype))
    assert samples
    for s in samples:
        msg = f"{info.name}[{s.label}] {impl} {dtype}"
        got = run(info.name, s.args)
        if impl == "fake":
            # no values: the structure, shapes, dtypes and device of the real CPU outputs
            real = run_reference(info.name, s.args)
            g_leaves, g_spec = pytree.tree_flatten(got)
            r_leaves, r_spec = pytree.tree_flatten(real)
            assert g_spec == r_spec, msg
            for i, (a, r) in enumerate(zip(g_leaves, r_leaves)):
                assert (a.shape, a.dtype, a.device) == (r.shape, r.dtype, r.device), f"{msg} output {i}"
        else:
            expected = OPS[info.name].reference(*_float64(s.args))
            for i, a in enumerate(pytree.tree_leaves(got)):
                assert a.dtype == dtype, f"{msg} output {i}: dtype {a.dtype}"
            assert_close(got, expected, msg=msg)
