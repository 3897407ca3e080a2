"""kernels/arena.py: planned grouped GEMM sites, under the Triton interpreter on CPU tensors."""

import threading

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.kernels import arena, launch, reference
from stfuse.passes.lower import lower_program
from stfuse.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked-out lanes, see test_triton_gemm


def members(seed, rows=(3, 5, 1), K=17, N=9):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(m, K, generator=g) for m in rows]
    w = [torch.randn(N, K, generator=g) for _ in rows]
    b = [torch.randn(N, generator=g) if i != 1 else None for i in range(len(rows))]
    return x, w, b


def ref(x, w, b, epilogue="relu", ext=(), scalars=()):
    d = [None if t is None else t.double() for t in b]
    return reference.grouped_linear([t.double() for t in x], [t.double() for t in w], d, epilogue,
                                    [t.double() for t in ext], list(scalars))


def test_a_site_launches_again_while_its_inputs_stay_put():
    x, w, b = members(0)
    site = arena.GroupedLinearSite(w, b, "relu", [])
    first = site(x, [])
    assert_close(first, ref(x, w, b))
    for _ in range(2):  # the same tensors, written again in place: the kept launch reads them
        for t in x:
            t.mul_(-1)
        ys = site(x, [])
        assert all(a is b for a, b in zip(ys, first))  # the arena's tensors, every call
        assert_close(ys, ref(x, w, b))
    assert site.launches_again == 2


def test_moved_inputs_patch_the_kept_launch_into_the_same_arena():
    x, w, b = members(1)
    site = arena.GroupedLinearSite(w, b, "relu", [])
    first = [t.clone() for t in site(x, [])]
    for seed in (2, 3):  # new tensors of the same shapes: the x cells of the table move
        x2, _, _ = members(seed)
        ys = site(x2, [])
        assert_close(ys, ref(x2, w, b))
    assert (site.launches_again, site.moved_launches) == (0, 2)
    assert not torch.equal(ys[0], first[0])
    assert site(x2, []) is ys and site.launches_again == 1  # then in place again
    x3, _, _ = members(4, rows=(4, 5, 1))  # other shapes: the full path, another arena
    assert [tuple(y.shape) for y in site(x3, [])] == [(4, 9), (5, 9), (1, 9)]
    assert site.moved_launches == 2


def test_inputs_that_lose_the_alignment_of_vector_loads_take_the_full_path():
    x, w, b = members(5, K=16, N=16)  # fp32 rows of 64 bytes: VEC=4 where addresses are 16-byte aligned
    site = arena.GroupedLinearSite(w, b, "", [])
    site(x, [])
    shifted = [torch.randn(t.numel() + 1)[1:].view(t.shape) for t in x]  # contiguous, 4 bytes off
    assert_close(site(shifted, []), ref(shifted, w, b, ""))
    assert site.moved_launches == 0


def test_arena_outputs_share_one_block_and_start_aligned():
    ys = arena.arena_outputs([(3, 5), (0, 5), (2, 2, 3), ()], torch.float16, torch.device("cpu"))
    assert [tuple(y.shape) for y in ys] == [(3, 5), (0, 5), (2, 2, 3), ()]
    assert len({y.untyped_storage().data_ptr() for y in ys}) == 1
    assert all(y.data_ptr() % 16 == 0 for y in ys)
    assert all(y.is_contiguous() for y in ys)


def test_epilogue_operands_cast_for_the_launch_are_never_kept():
    x, w, b = members(4)
    res = [torch.randn(t.shape[0], 9, dtype=torch.float64) for t in x]  # cast to fp32 per call: a temporary
    site = arena.GroupedLinearSite(w, b, "add:tensor", [])
    for _ in range(2):
        ys = site(x, res)
    assert site.launches_again == 0
    assert_close(ys, ref(x, w, b, "add:tensor", res))


def test_each_thread_has_its_own_arena():
    x, w, b = members(5)
    site = arena.GroupedLinearSite(w, b, "", [])
    mine = site(x, [])
    theirs = []
    t = threading.Thread(target=lambda: theirs.extend(site(x, [])))
    t.start()
    t.join()
    assert site.launches_again == 0
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(mine, theirs))


def test_a_warm_up_never_keeps_a_launch():
    x, w, b = members(6)
    site = arena.GroupedLinearSite(w, b, "", [])
    with launch.tuning():
        site(x, [])
        site(x, [])
    assert site.launches_again == 0


@pytest.fixture(scope="module")
def grouped():
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 4, depth=2) for _ in range(3)]
    fused = stfuse.compile(models, [torch.randn(2, 8) for _ in models], tune="off")
    gm, counts = lower_program(fused.graph, tuple(fused.tenants), False)
    return models, gm


def test_plan_sites_binds_every_grouped_gemm_and_clones_what_leaves(grouped):
    models, gm = grouped
    planned, sites = arena.plan_sites(gm)
    assert sites and "stfuse.grouped_linear" not in planned.code and "stfuse.grouped_linear" in gm.code
    assert planned.code.count("aten.clone") == len(models)  # every output is read from an arena
    xs = [torch.randn(b, 8) for b in (1, 2, 3)]
    with torch.no_grad():
        first = planned(*xs)
        for m, x, y in zip(models, xs, first):
            assert_close(y, m.double()(x.double()))
            m.float()
        kept = [y.clone() for y in first]
        planned(*[-x for x in xs])  # the next call overwrites the arenas, not what the first returned
        planned(*xs)
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert all(s.launches_again >= 1 for s in sites[1:])  # ops after the first read the arena before them


# --- GPU: planned sites on CUDA streams, without a sync ---------------------------------


@pytest.mark.gpu
def test_sites_on_cuda_keep_an_arena_per_stream_and_never_synchronize():
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, b = (list(t.cuda() if t is not None else None for t in ts) for ts in members(7, rows=(64, 5, 33), K=256, N=128))
    site = arena.GroupedLinearSite(w, b, "relu", [])
    mine = site(x, [])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        theirs = site(x, [])
    torch.cuda.current_stream().wait_stream(side)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(mine, theirs))
    moved = [t.clone() for t in x]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        site(x, [])  # in place: the kept launch
        ys = site(moved, [])  # moved: the x cells patched through pinned memory
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (site.launches_again, site.moved_launches) == (1, 1)
    assert_close([y.cpu() for y in ys], ref([t.cpu() for t in x], [t.cpu() for t in w],
                                           [None if t is None else t.cpu() for t in b]), k=256)
