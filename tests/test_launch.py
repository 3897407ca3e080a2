"""The launch plans and config choice of kernels/launch.py (and the config helpers of
triton_common), through the Triton ops under the interpreter where a launch is needed."""

import pytest
import torch
import triton

from stfuse.kernels import launch, reference, triton_common, triton_gemm
from stfuse.kernels.triton_ops import IMPLS
from stfuse.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked-out lanes, see test_triton_gemm


def stack(seed, R=3, M=5, K=17, N=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, M, K, generator=g), torch.randn(R, N, K, generator=g), torch.randn(R, N, generator=g)


def test_a_stack_reuses_its_plan_when_its_tensors_move():
    x, w, b = stack(0)
    IMPLS["stacked_linear"](x, w, b, "relu", [], [])
    plans = launch.plan_count()
    for seed in (1, 2):  # fresh tensors, same shapes: the plan's table is moved, not rebuilt
        x, w, b = stack(seed)
        y = IMPLS["stacked_linear"](x, w, b, "relu", [], [])
        assert_close(y, reference.stacked_linear(x.double(), w.double(), b.double(), "relu", [], []))
    assert launch.plan_count() == plans


def test_grouped_members_move_one_by_one():
    shapes = [((7, 33), 5), ((0, 4), 3), ((2, 3, 16), 18)]  # an empty member has no table row
    plans = None
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = [torch.randn(*s, generator=g) for s, _ in shapes]
        w = [torch.randn(n, s[-1], generator=g) for s, n in shapes]
        b = [torch.randn(n, generator=g) if i != 1 else None for i, (_, n) in enumerate(shapes)]
        ext = [torch.randn(1, n, generator=g) for _, n in shapes]
        ys = IMPLS["grouped_linear"](x, w, b, "mul:tensor,add:scalar", ext, [0.5, 1.0, -2.0])
        refs = reference.grouped_linear([t.double() for t in x], [t.double() for t in w],
                                        [None if t is None else t.double() for t in b], "mul:tensor,add:scalar",
                                        [t.double() for t in ext], [0.5, 1.0, -2.0])
        assert_close(ys, refs)
        plans = launch.plan_count() if plans is None else plans
    assert launch.plan_count() == plans


def test_an_operand_copied_for_the_launch_is_never_planned():
    # output [2, 3, 5, 6]; a full-size residual stored [5, 3, 2, 6] merges no two leading dims,
    # so it fits no row split and the launch copies it: the table points at a temporary
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 3, 5, 17, generator=g), torch.randn(6, 17, generator=g)
    res = torch.randn(5, 3, 2, 6, generator=g).permute(2, 1, 0, 3)
    plans = launch.plan_count()
    y = IMPLS["grouped_linear"]([x], [w], [None], "add:tensor", [res], [])
    assert_close(y, reference.grouped_linear([x.double()], [w.double()], [None], "add:tensor", [res.double()], []))
    assert launch.plan_count() == plans


def test_tables_reach_the_device_in_one_piece():
    parts = [torch.arange(5), torch.arange(6).view(2, 3), torch.tensor([7])]
    out = launch.to_device(parts, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(out, parts))
    assert all(t.data_ptr() % 16 == 0 for t in out)


def test_spans_past_int32_need_64_bit_offsets():
    assert launch._span_ok(torch.empty(2, 2**30 - 1, device="meta"))
    assert not launch._span_ok(torch.empty(3, 2**30, device="meta"))
    assert launch._span_ok(torch.empty(1, device="meta").expand(2**33))  # stride 0: one element


@pytest.mark.parametrize("dtype, values, vec", [
    (torch.float16, (1152, 128, 4096), 8),
    (torch.float16, (1152, 129), 1),
    (torch.float32, (4, 8, 1024), 4),
    (torch.bfloat16, (), 8),
])
def test_vec_width(dtype, values, vec):
    assert triton_common.vec_width(dtype, *values) == vec


def test_math_follows_torchs_switch_for_fp32_only():
    assert triton_common.math_of(torch.float32, False) == "fp32"
    assert triton_common.math_of(torch.float32, True) == "tf32"
    assert triton_common.math_of(torch.float16, False) == "fp16"
    assert triton_common.math_of(torch.bfloat16, True) == "bf16"


CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn)) for bm, bn in ((128, 128), (64, 64), (16, 64))]


def test_pick_config_fills_the_device_and_fits_small_batches():
    def tiles(m, n, r):
        return lambda c: r * -(-m // c.kwargs["BLOCK_M"]) * -(-n // c.kwargs["BLOCK_N"])
    assert triton_common.pick_config(CONFIGS, 256, tiles(256, 128, 118), 132) == 0  # plenty of tiles
    assert triton_common.pick_config(CONFIGS, 256, tiles(256, 128, 8), 132) == 1  # 16 big tiles: go smaller
    assert triton_common.pick_config(CONFIGS, 1, tiles(1, 1024, 118), 132) == 2  # one row: the small-M tile


def test_configs_are_never_timed_on_a_call(monkeypatch):
    import triton.testing

    def fail(*args, **kwargs):
        raise AssertionError("timed a config outside tuning()")
    monkeypatch.setattr(triton.testing, "do_bench", fail)
    key = ("test", object())
    assert launch.choose_config(key, CONFIGS, lambda cfg: None, default=1) is CONFIGS[1]
    with launch.tuning():  # no CUDA here: a warm-up cannot time either, and says so by the default
        assert launch.choose_config(key, CONFIGS, lambda cfg: None, default=2) is CONFIGS[2]


# --- GPU: aligned and unaligned members, layouts, and no sync on the call path -----------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_aligned_and_unaligned_members_on_cuda(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 64, 264, generator=g).to(dtype).cuda()
    w = (torch.randn(4, 96, 256, generator=g) / 16).to(dtype).cuda()
    for x in (base[..., :256], base[..., 1:257]):  # 16-byte aligned rows (VEC > 1); rows off by one element
        for _ in range(2):  # the second call reuses the plan
            y = torch.ops.stfuse.stacked_linear(x, w, None, "gelu", [], [])
            ref = reference.stacked_linear(x.cpu().double(), w.cpu().double(), None, "gelu", [], [])
            assert_close(y.cpu(), ref, k=256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_channels_last_conv_on_cuda(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 64, 14, 14, generator=g).to(dtype)
    w = (torch.randn(2, 32, 64, 3, 3, generator=g) / 24).to(dtype)
    xc = x.cuda().flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (2, 3))
    wc = w.cuda().flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (2, 32))
    y = torch.ops.stfuse.stacked_conv2d(xc, wc, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], [])
    ref = reference.stacked_conv2d(x.double(), w.double(), None, [1, 1], [1, 1], [1, 1], 1, "relu", [], [])
    assert_close(y.cpu(), ref, k=576)


@pytest.mark.gpu
def test_a_planned_call_never_synchronizes():
    x, w, b = (t.cuda() for t in stack(9, R=8, M=64, K=256, N=128))
    torch.ops.stfuse.stacked_linear(x, w, b, "relu", [], [])  # compiles, builds the plan
    x2 = x.clone()  # moved: the table is refreshed through pinned memory, asynchronously
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.stfuse.stacked_linear(x2, w, b, "relu", [], [])
        torch.ops.stfuse.stacked_linear(x, w, b, "relu", [], [])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_while_a_graph_captures_tables_are_kept_and_no_plan_is_made():
    x, w, b = stack(11, R=2, M=3, K=5, N=4)
    xs, ws, bs = list(x), list(w), list(b)
    plans, keep = launch.plan_count(), []
    with launch.keep_captured(keep):
        kept = []
        ys = IMPLS["grouped_linear"](xs, ws, bs, "", [], [])
        triton_gemm.grouped_linear(xs, ws, bs, "", [], [], plan=kept)
    assert launch.plan_count() == plans  # its tables would only fill when the graph replays
    assert len(keep) == 6 and not kept[0].reusable  # (problem, tile, float table) per launch
    assert_close(ys, reference.grouped_linear([t.double() for t in xs], [t.double() for t in ws],
                                              [t.double() for t in bs], "", [], []))
