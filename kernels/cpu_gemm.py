"""CPU linears on constant weights: oneDNN's prepacked GEMM where it beats MKL's.

On CPU every linear, fused or not, is a GEMM on a weight that never changes
between calls: a tenant's own ``aten.linear`` on its parameter, a stacked
group's ``baddbmm`` on its packed weights. aten runs both through MKL's sgemm.
oneDNN can instead reorder the weight once into its blocked layout
(``mkldnn._reorder_linear_weight``, what Inductor's freezing pass does) and run
``mkldnn._linear_pointwise`` on it. Measured on the project's 2-core AMD EPYC
(Zen 5, AVX-512), one thread, fp32, median of turns (scratch A/B scripts; MKL
takes its AVX2 path on this CPU, oneDNN its AVX-512 one):

=============================  =========  ===========
rows x K x N (per member)      MKL us     oneDNN us
=============================  =========  ===========
4 x [32 x 768 x 768]           1594       734
4 x [32 x 768 x 3072]          7626       3454
4 x [256 x 768 x 3072]         45565      20310
[4 x 768 x 768]                94         40
[16 x 256 x 256]               24.6       19.7
[1 x 768 x 768]                31.9       41.2
4 x [1 x 256 x 256]            15.0       57.4   (baddbmm against 4 calls)
4 x [8 x 256 x 256]            59.6       68.8   (baddbmm against 4 calls)
=============================  =========  ===========

So a call takes oneDNN where a member's GEMM is big enough (``use_onednn``: at
least MIN_ROWS rows and MIN_MACS multiply-adds; the bound program compares one
input size, ``min_numel``), else the path it had. A gelu reading such a linear
(through one view) runs as oneDNN's post-op (``linear_gelu``). The reordered
weight is a second copy of each linear's weight, made when a program is bound
(kernels/bind.py) and shared by every program bound on the same weight
(``pack``); a weight changed in place rebuilds the program (stfuse/program.py)
and is packed again.

Whether oneDNN is used at all is ``mode``: STFUSE_CPU_GEMM (config.cpu_gemm_mode)
"onednn", "mkl", or "auto" (default): one linear timed both ways on this device
(about 20 ms, once per device identity, cached like every measurement), oneDNN
where it wins by MARGIN.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
import torch.nn.functional as F

from stfuse import config

from . import reference

# A member's GEMM takes oneDNN from this size (table above: 1 row of 768 x 768 is
# faster in MKL's gemv, 4 rows already 2.3x faster in oneDNN; below ~1M multiply-adds
# oneDNN's ~15 us per call costs more than its faster kernel saves).
MIN_ROWS = 2
MIN_MACS = 1 << 20
# "auto" takes oneDNN where it is this much faster on the probe GEMM (2.2x on the EPYC).
MARGIN = 0.10
PROBE = (32, 768, 768)  # rows, K, N of the linear "auto" times


def available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


# Weights smaller than this (K * N) are not packed: they reach MIN_MACS only beyond
# 8 rows, where oneDNN saves a few us (16 x 256 x 256: 24.6 -> 19.7 us), less than
# a batch-1 call loses to the choice (~0.3 us a linear, of a 4 x MLP-256 call's 50 us),
# and their packed copy costs memory.
MIN_WEIGHT = MIN_MACS // 8


def packable(w) -> bool:
    """A weight worth packing for oneDNN: a 2-D float32 CPU tensor of MIN_WEIGHT or more."""
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == torch.float32
            and w.device.type == "cpu" and w.numel() >= MIN_WEIGHT)


# Packed weights by source tensor, so that every program bound on the same weights
# (each subset fused.run lowers, the self-check's, a rebind) reads one packed copy: per
# id of the weight's base tensor, (a weak reference to it, {(offset, shape, strides, reorder, params):
# (version, weak reference to the packed weight)}). Weak both ways: an entry goes with
# its weight, a packed weight with the last program that reads it.
_PACKS: dict[int, tuple] = {}
_LOCK = threading.RLock()  # re-entered where a weight dies while a pack is made


def pack(w: torch.Tensor, reorder=None, *params) -> torch.Tensor:
    """w [N, K] reordered into oneDNN's blocked layout (or ``reorder(w, *params)``: a conv
    weight's, kernels/cpu_conv.py): a copy, made once per weight, version and params while
    a bound program holds it."""
    base = w if w._base is None else w._base
    reorder = reorder or torch.ops.mkldnn._reorder_linear_weight
    where = (w.storage_offset(), tuple(w.shape), tuple(w.stride()), reorder, repr(params))
    with _LOCK:
        entry = _PACKS.get(id(base))
        if entry is None or entry[0]() is not base:
            entry = (weakref.ref(base, functools.partial(_forget, id(base))), {})
            _PACKS[id(base)] = entry
        version, ref = entry[1].get(where, (None, None))
        packed = ref() if ref is not None and version == w._version else None
        if packed is None:
            packed = reorder(w.contiguous(), *params)
            entry[1][where] = (w._version, weakref.ref(packed))
    return packed


def _forget(key: int, ref) -> None:
    with _LOCK:
        if key in _PACKS and _PACKS[key][0] is ref:
            del _PACKS[key]


def use_onednn(rows: int, k: int, n: int) -> bool:
    return rows >= MIN_ROWS and rows * k * n >= MIN_MACS


def min_numel(k: int, n: int, members: int = 1) -> int:
    """The input size (elements) from which a call takes oneDNN: computed once, at
    binding, so that a call compares one number (the whole choice costs ~0.3 us a call,
    a batch-1 MLP's groups take 16 us)."""
    rows = max(MIN_ROWS, -(-MIN_MACS // max(k * n, 1)))
    return members * rows * k


def linear(x, w, b, packed, least: int):
    """``F.linear(x, w, b)``, through oneDNN on ``packed`` (= pack(w)) from ``least``
    input elements (min_numel)."""
    if x.numel() >= least and x.dtype is torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return F.linear(x, w, b)


def linear_gelu(x, w, b, packed, least: int, approximate: str):
    """``F.gelu(F.linear(x, w, b), approximate=approximate)``: on the oneDNN path gelu is
    the GEMM's post-op (one thread, [32, 768] x [768, 3072]: the tanh gelu's own pass
    takes 115 us, as a post-op 22 us; erf, at [256, 768] x [768, 3072], 250 against
    150 us)."""
    if x.numel() >= least and x.dtype is torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "gelu", [], approximate)
    return F.gelu(F.linear(x, w, b), approximate=approximate)


def stacked_linear(x, wt, b1, packed, biases, least: int, epilogue, ext, scalars):
    """``reference.stacked_linear_kn(x, wt, b1, ...)`` where ``packed`` / ``biases`` hold
    each member's packed weight and [N] bias: from ``least`` input elements (min_numel
    of all members), one oneDNN call per member (then one stack, ~2% of the GEMMs at
    [4, 256, 3072]), else the one baddbmm."""
    if x.numel() >= least and x.dtype is torch.float32:
        mk = torch.ops.mkldnn._linear_pointwise
        y = torch.stack([mk(xi, p, bi, "none", [], "") for xi, p, bi in zip(x.unbind(0), packed, biases)])
        return reference._stacked_epilogue(y, epilogue, ext, scalars)
    return reference.stacked_linear_kn(x, wt, b1, epilogue, ext, scalars)


def grouped_linear(x, w, b, packed, least, epilogue, ext, scalars):
    """``reference.grouped_linear`` with each member whose weight ``packed`` holds (None:
    not packed) through oneDNN from its ``least`` input elements. Members of other shapes
    run one by one either way; on aten's GEMMs they ran 3x slower than the same linears
    bound apart (mixed x4 quick, every group fused: 760 against 240 us a linear)."""
    ys = [linear(xi, wi, bi, p, n) if p is not None else F.linear(xi, wi, bi)
          for xi, wi, bi, p, n in zip(x, w, b, packed, least)]
    return reference._grouped_epilogue(ys, epilogue, ext, scalars)


def mode(device: torch.device) -> str:
    """"onednn" or "mkl": what CPU linears on constant weights run on ``device``."""
    wanted = config.cpu_gemm_mode()
    if device.type != "cpu" or not available() or wanted == "mkl":
        return "mkl"
    return "onednn" if wanted == "onednn" else _measured(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _measured(threads: int) -> str:
    """"auto": the probe linear timed both ways (cached per device identity, which
    includes the thread count; ``threads`` keys this process's memo the same way)."""
    from . import timing

    device = torch.device("cpu")
    cache = timing.TimingCache(device)
    hit = cache.get("cpu_gemm")
    if hit is None or not {"mkl_us", "onednn_us"} <= hit.keys():
        rows, k, n = PROBE
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((rows, k), (n, k), (n,)))
        packed = pack(w)
        # One thread: the libraries' kernels compared, not how long a second OpenMP thread
        # waits for a core (on the loaded 2-core CPU a 2-thread probe took 8 ms both ways
        # against 0.4 ms quiet, and the 2.2x between them vanished).
        torch.set_num_threads(1)
        try:
            mkl_us, onednn_us = timing.time_pair(
                lambda: F.linear(x, w, b), lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
                device, what="cpu_gemm", decide_at=1 - MARGIN)
        finally:
            torch.set_num_threads(threads)
        hit = {"mkl_us": mkl_us, "onednn_us": onednn_us}
        cache.put("cpu_gemm", hit)
        cache.flush()
    return "onednn" if hit["onednn_us"] < (1 - MARGIN) * hit["mkl_us"] else "mkl"
