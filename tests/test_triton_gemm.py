"""The grouped GEMM Triton kernel (kernels/triton_gemm.py) against a float64 torch reference.

On CPU these run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py) on tiny shapes; the gpu-marked tests go through the registered
torch.ops.stfuse ops on CUDA tensors.
"""

import pytest
import torch

from stfuse import config
from stfuse.errors import InputError
from stfuse.kernels import codegen, reference, triton_gemm
from stfuse.kernels.triton_ops import IMPLS
from stfuse.tolerances import assert_close

# The interpreter evaluates masked-out lanes too (on the `other` value 0), so
# numpy warns about 0/0 there; those lanes are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# bf16 runs only on the GPU: the interpreter computes bf16 wrongly.
DTYPES = [torch.float32, torch.float16]

# (x shape, N): odd sizes, an empty member, a 3-d input, a single output column
MIXED = [((17, 33), 1), ((0, 5), 3), ((1, 17), 33), ((2, 3, 16), 18)]


def f64(tensors):
    return [None if t is None else t.double() for t in tensors]


def make_linear(shapes, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(*xs, generator=g).to(dtype) for xs, _ in shapes]
    w = [torch.randn(n, xs[-1], generator=g).to(dtype) for xs, n in shapes]
    b = [torch.randn(n, generator=g).to(dtype) if bias and i % 2 == 0 else None
         for i, (_, n) in enumerate(shapes)]
    return x, w, b


def check_grouped(x, w, b, epilogue, ext, scalars):
    ys = IMPLS["grouped_linear"](x, w, b, epilogue, ext, scalars)
    refs = reference.grouped_linear(f64(x), f64(w), f64(b), epilogue, f64(ext), scalars)
    assert_close(ys, refs)
    for y, xi in zip(ys, x):
        assert y.dtype == xi.dtype
    return ys


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", ["", "add:tensor,gelu,mul:scalar"])
def test_grouped_linear_mixed_shapes(dtype, epilogue):
    for seed in (0, 1):  # twice, on fresh inputs: nothing may leak between calls
        x, w, b = make_linear(MIXED, dtype, seed)
        g = torch.Generator().manual_seed(100 + seed)
        # residual-shaped, bias-shaped and size-1 operands, broadcast in different ways
        out_shapes = [(*xs[:-1], n) for xs, n in MIXED]
        ext_shapes = [out_shapes[0], (3,), (1, 33), (3, 1)]
        ext = [torch.randn(s, generator=g).to(dtype) for s in ext_shapes] if epilogue else []
        scalars = [0.5, -2.0, 1.5, 3.0] if epilogue else []
        ys = check_grouped(x, w, b, epilogue, ext, scalars)
        assert [tuple(y.shape) for y in ys] == out_shapes


def test_grouped_linear_no_members():
    assert IMPLS["grouped_linear"]([], [], [], "", [], []) == []


def test_grouped_linear_strided_inputs():
    # transposed weights and a sliced input take the general-stride path (K not contiguous)
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(17, 40, generator=g)[:, ::2], torch.randn(5, 7, generator=g)]
    w = [torch.randn(20, 9, generator=g).t(), torch.randn(7, 6, generator=g).t()]
    b = [None, torch.randn(12, generator=g)[::2]]
    check_grouped(x, w, b, "tanh", [], [])


def test_grouped_linear_operand_without_common_row_split():
    # output [2, 3, 5, N]: a [5, N] operand needs rows split as (2*3, 5); a permuted
    # full-size one fits no split and is copied. Both must land on the right rows.
    g = torch.Generator().manual_seed(4)
    x = [torch.randn(2, 3, 5, 17, generator=g)]
    w = [torch.randn(9, 17, generator=g)]
    ext = [torch.randn(5, 9, generator=g), torch.randn(2, 5, 3, 9, generator=g).transpose(1, 2)]
    check_grouped(x, w, [None], "add:tensor,mul:tensor", ext, [])


def test_grouped_linear_does_not_touch_inputs():
    x, w, b = make_linear(MIXED[:2], torch.float32, seed=5)
    ext = [torch.randn(17, 1), torch.randn(3)]
    before = [t.clone() for t in x + w + ext]
    ys = IMPLS["grouped_linear"](x, w, b, "add:tensor", ext, [])
    assert all(torch.equal(a, t) for a, t in zip(before, x + w + ext))
    inputs = {t.data_ptr() for t in x + w + ext}
    assert not any(y.numel() and y.data_ptr() in inputs for y in ys)


def test_any_subset_and_batch_sizes_reuse_one_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    x, w, b = make_linear([((4, 17), 9), ((2, 33), 5), ((3, 5), 16)], torch.float32, seed=6)
    check_grouped(x, w, b, "silu", [], [])
    files = sorted(p.name for p in tmp_path.iterdir())
    kernel = codegen.load_kernel(triton_gemm.GEMM, "silu")
    # members 2 and 0 only, in another order, with other batch sizes
    g = torch.Generator().manual_seed(7)
    x2 = [torch.randn(1, 5, generator=g), torch.randn(19, 17, generator=g)]
    check_grouped(x2, [w[2], w[0]], [b[2], b[0]], "silu", [], [])
    assert config.cache_dir() == tmp_path
    assert len(files) == 1 and files[0].startswith("gemm_")
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # nothing new was generated
    assert codegen.load_kernel(triton_gemm.GEMM, "silu") is kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_linear(dtype, R, bias):
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(R, 2, 17, 33, generator=g).to(dtype)
        w = torch.randn(R, 9, 33, generator=g).to(dtype)
        b = torch.randn(R, 9, generator=g).to(dtype) if bias else None
        ext = [torch.randn(R, 1, 17, 9, generator=g).to(dtype), torch.randn(9, generator=g).to(dtype)]
        scalars = [0.5 + r for r in range(R)]
        epilogue = "add:tensor,gelu_tanh,mul:tensor,mul:scalar"
        y = IMPLS["stacked_linear"](x, w, b, epilogue, ext, scalars)
        ref = reference.stacked_linear(x.double(), w.double(), None if b is None else b.double(),
                                       epilogue, f64(ext), scalars)
        assert_close(y, ref)


def test_stacked_linear_2d_input_and_misfit_operand():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 33, generator=g)  # [R, K]: one row per member
    w = torch.randn(3, 5, 33, generator=g)
    ext = [torch.randn(3, 5, generator=g).t().contiguous().t()]  # a column-major [R, N] operand
    y = IMPLS["stacked_linear"](x, w, None, "rsub:tensor", ext, [])
    assert_close(y, reference.stacked_linear(x.double(), w.double(), None, "rsub:tensor", f64(ext), []))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, 3, 5, 17, generator=g)
    w = torch.randn(2, 4, 17, generator=g)
    ext = [torch.randn(5, 4, generator=g), torch.randn(2, 2, 5, 3, 4, generator=g).transpose(2, 3)]
    y = IMPLS["stacked_linear"](x, w, None, "add:tensor,div:tensor", ext, [])
    assert_close(y, reference.stacked_linear(x.double(), w.double(), None, "add:tensor,div:tensor",
                                             f64(ext), []))


# --- GPU: the registered ops on CUDA tensors ---------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_grouped_linear_cuda(dtype):
    torch.set_float32_matmul_precision("highest")  # fp32 through IEEE tl.dot, as torch.mm does
    shapes = [((256, 1152), 128), ((0, 64), 32), ((77, 300), 129), ((3, 5, 17), 33)]
    x, w, b = make_linear(shapes, dtype, seed=0)
    ext = [torch.randn(n).to(dtype) for _, n in shapes]
    scalars = [0.5, 1.0, 2.0, -1.0]
    cuda = lambda ts: [None if t is None else t.cuda() for t in ts]  # noqa: E731
    ys = torch.ops.stfuse.grouped_linear(cuda(x), cuda(w), cuda(b), "add:tensor,gelu,mul:scalar",
                                         cuda(ext), scalars)
    refs = reference.grouped_linear(f64(x), f64(w), f64(b), "add:tensor,gelu,mul:scalar", f64(ext), scalars)
    assert all(y.is_cuda for y in ys)
    assert_close([y.cpu() for y in ys], refs, k=1152)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_stacked_linear_cuda(dtype):
    torch.set_float32_matmul_precision("highest")
    R = 7
    x = torch.randn(R, 256, 1152).to(dtype)
    w = torch.randn(R, 128, 1152).to(dtype) / 30
    b = torch.randn(R, 128).to(dtype)
    y = torch.ops.stfuse.stacked_linear(x.cuda(), w.cuda(), b.cuda(), "relu", [], [])
    assert_close(y.cpu(), reference.stacked_linear(x.double(), w.double(), b.double(), "relu", [], []), k=1152)


@pytest.mark.gpu
def test_launch_on_the_tensors_device():
    """Tensors on cuda:1 while the current device is cuda:0: the launch goes to cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x, w, b = make_linear([((33, 64), 17)], torch.float32, seed=1)
    on1 = lambda ts: [t.to("cuda:1") for t in ts]  # noqa: E731
    with torch.cuda.device(0):
        (y,) = torch.ops.stfuse.grouped_linear(on1(x), on1(w), on1(b), "relu", [], [])
    assert y.device == torch.device("cuda:1")
    assert_close([y.cpu()], reference.grouped_linear(f64(x), f64(w), f64(b), "relu", [], []), k=64)


@pytest.mark.parametrize("args", [
    ([torch.randn(3, 5)], [torch.randn(4, 6)], [None], "", [], []),  # K differs
    ([torch.randn(3, 5)], [torch.randn(4, 5)], [torch.randn(3)], "", [], []),  # bias is not [N]
    ([torch.randn(3, 5)], [torch.randn(4, 5), torch.randn(4, 5)], [None], "", [], []),  # list lengths
    ([torch.randn(3, 5)], [torch.randn(4, 5)], [None], "add:tensor", [], []),  # missing operand
    ([torch.randn(3, 5)], [torch.randn(4, 5)], [None], "mul:scalar", [], [1.0, 2.0]),  # extra scalar
])
def test_grouped_linear_refuses_mismatched_input(args):
    with pytest.raises(InputError, match="stfuse::grouped_linear"):
        IMPLS["grouped_linear"](*args)


def test_stacked_linear_refuses_mismatched_input():
    with pytest.raises(InputError, match="does not match w"):
        IMPLS["stacked_linear"](torch.randn(2, 3, 5), torch.randn(3, 4, 5), None, "", [], [])
    with pytest.raises(InputError, match="bias"):
        IMPLS["stacked_linear"](torch.randn(2, 3, 5), torch.randn(2, 4, 5), torch.randn(2, 3), "", [], [])


def test_grouped_linear_empty_reduction_and_empty_output():
    # K=0: the output is the bias alone; N=0: an empty output; M=0 beside them
    g = torch.Generator().manual_seed(10)
    x = [torch.randn(3, 0, generator=g), torch.randn(4, 5, generator=g), torch.randn(0, 0, generator=g)]
    w = [torch.randn(6, 0, generator=g), torch.randn(0, 5, generator=g), torch.randn(2, 0, generator=g)]
    b = [torch.randn(6, generator=g), None, None]
    ys = check_grouped(x, w, b, "relu", [], [])
    assert [tuple(y.shape) for y in ys] == [(3, 6), (4, 0), (0, 2)]


# --- split-K (triton_gemm.split_k): few tiles, long K ----------------------------------------


@pytest.fixture
def splits(monkeypatch):
    """The K slices of every split-K launch in the test (one-pass launches add nothing);
    ``splits.force`` overrides the heuristic."""
    chosen, real_split, real_launch = [], triton_gemm.split_k, triton_gemm._split_launch

    def split_k(tiles, K, block_k, sms):
        return splits.force or real_split(tiles, K, block_k, sms)

    def split_launch(*args):
        chosen.append(args[7])
        return real_launch(*args)
    splits.force, splits.chosen = None, chosen
    monkeypatch.setattr(triton_gemm, "split_k", split_k)
    monkeypatch.setattr(triton_gemm, "_split_launch", split_launch)
    triton_gemm._choice.cache_clear()  # it keeps each size's slices
    yield splits
    triton_gemm._choice.cache_clear()


def test_split_k_only_where_tiles_leave_sms_idle():
    # the paper's GEMM (M=256, N=128, K=1152) in 64x64 fp32 tiles on an H100's 132 SMs
    assert triton_gemm.split_k(tiles=8, K=1152, block_k=32, sms=132) == 9  # R=1: K // (4 steps x 32)
    assert triton_gemm.split_k(tiles=64, K=1152, block_k=32, sms=132) == 2  # R=8: 128 programs
    assert triton_gemm.split_k(tiles=8 * 118, K=1152, block_k=32, sms=132) == 1  # R=118 fills the GPU
    assert triton_gemm.split_k(tiles=1, K=100_000, block_k=64, sms=132) == triton_gemm.MAX_SPLITS
    assert triton_gemm.split_k(tiles=2, K=200, block_k=64, sms=132) == 1  # under 4 steps a slice
    assert triton_gemm.split_k(tiles=0, K=1152, block_k=32, sms=132) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("force", [None, 7])  # the heuristic's 4 slices; 7, some of them empty
def test_grouped_linear_split_k(splits, dtype, force):
    splits.force = force
    # K=296: 4 slices of 80 (a multiple of BLOCK_K), the last 56; K a multiple of 8, as fp16 VEC needs
    shapes = [((20, 296), 24), ((3, 40), 16), ((2, 5, 296), 8)]
    x, w, b = make_linear(shapes, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    ext = [torch.randn(24, generator=g).to(dtype), torch.randn(3, 16, generator=g).to(dtype),
           torch.randn(2, 5, 8, generator=g).to(dtype)]
    kept = []
    ys = IMPLS["grouped_linear"](x, w, b, "add:tensor,gelu,mul:scalar", ext, [0.5, -2.0, 3.0])
    triton_gemm.grouped_linear(x, w, b, "add:tensor,gelu,mul:scalar", ext, [0.5, -2.0, 3.0], plan=kept)
    refs = reference.grouped_linear(f64(x), f64(w), f64(b), "add:tensor,gelu,mul:scalar", f64(ext), [0.5, -2.0, 3.0])
    assert_close(ys, refs, k=296)
    assert splits.chosen == [force or 4] * 2 and kept[0].workspace.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_linear_split_k(splits, dtype, bias):
    g = torch.Generator().manual_seed(13)
    R = 2
    x = torch.randn(R, 3, 7, 200, generator=g).to(dtype)
    w = (torch.randn(R, 24, 200, generator=g) / 4).to(dtype)
    b = torch.randn(R, 24, generator=g).to(dtype) if bias else None
    ext = [torch.randn(R, 1, 7, 24, generator=g).to(dtype)]
    y = IMPLS["stacked_linear"](x, w, b, "add:tensor,relu,mul:scalar", ext, [2.0, -1.0])
    ref = reference.stacked_linear(x.double(), w.double(), None if b is None else b.double(),
                                   "add:tensor,relu,mul:scalar", f64(ext), [2.0, -1.0])
    assert_close(y, ref, k=200)
    assert splits.chosen == [3]  # 2 members x 2 x 2 tiles of 16x16; 200 // 64


def test_split_k_launch_again_and_moved(splits):
    """A split launch kept by kernels/arena.py: launched again it reads x anew; moved to
    other inputs of the same shapes it patches only the partial pass's table."""
    x, w, b = make_linear([((9, 256), 16), ((4, 128), 8)], torch.float32, seed=14)
    out = [torch.empty(9, 16), torch.empty(4, 8)]
    kept = []
    triton_gemm.grouped_linear(x, w, b, "silu", [], [], out=out, plan=kept)
    assert splits.chosen == [4] and kept[0].reusable
    for xi in x:
        xi.mul_(-0.5)  # same tensors, same addresses, new values
    kept[0]()
    assert_close(out, reference.grouped_linear(f64(x), f64(w), f64(b), "silu", [], []), k=256)
    x2 = [torch.randn_like(xi) for xi in x]
    now = list(kept[0].now)
    now[::len(now) // len(x2)] = [xi.data_ptr() for xi in x2]  # x leads each member's addresses
    kept[0].moved(now)()
    assert_close(out, reference.grouped_linear(f64(x2), f64(w), f64(b), "silu", [], []), k=256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("R", [1, 4])
def test_split_k_paper_gemm_cuda(splits, dtype, R):
    """The paper's GEMM at few members splits K on a real device (sm_count from the GPU)."""
    torch.set_float32_matmul_precision("highest")
    x = torch.randn(R, 256, 1152).to(dtype)
    w = (torch.randn(R, 128, 1152) / 30).to(dtype)
    y = torch.ops.stfuse.stacked_linear(x.cuda(), w.cuda(), None, "", [], [])
    assert_close(y.cpu(), reference.stacked_linear(x.double(), w.double(), None, "", [], []), k=1152)
    assert splits.chosen and splits.chosen[0] > 1
