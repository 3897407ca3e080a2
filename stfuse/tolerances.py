"""The one tolerance table: fused results against a float64 reference.

float32 rtol/atol 1e-4 (1e-3 for reductions over K > 4096); tf32 on GPU 1e-3;
float16 1e-2; bfloat16 2e-2. Tests, the demo and benchmarks all check with
``assert_close`` / ``max_violation`` from here.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

TOLERANCES = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
    torch.float64: 1e-10,
}
TF32 = 1e-3
LONG_REDUCTION = 1e-3  # float32 with K > 4096
LONG_K = 4096


def tolerance(dtype: torch.dtype, k: int = 0, tf32: bool = False) -> float:
    tol = TOLERANCES[dtype]
    if dtype == torch.float32 and (tf32 or k > LONG_K):
        tol = max(tol, TF32 if tf32 else LONG_REDUCTION)
    return tol


def _pairs(actual, expected):
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if a_spec != e_spec:
        raise AssertionError(f"output structure differs: {a_spec} vs {e_spec}")
    return zip(a_leaves, e_leaves)


def assert_close(actual, expected, *, k: int = 0, tf32: bool = False, msg: str = "") -> None:
    """Every tensor leaf of ``actual`` within its dtype's tolerance of ``expected``
    (a float64 reference, or the eager output); structures must match exactly."""
    for i, (a, e) in enumerate(_pairs(actual, expected)):
        if not isinstance(a, torch.Tensor):
            assert a == e, f"{msg} leaf {i}: {a!r} != {e!r}"
            continue
        assert a.shape == e.shape, f"{msg} leaf {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not a.dtype.is_floating_point:
            assert torch.equal(a, e.to(a.dtype)), f"{msg} leaf {i}: integer values differ"
            continue
        tol = tolerance(a.dtype, k, tf32)
        torch.testing.assert_close(a.double(), e.double().to(a.device), rtol=tol, atol=tol,
                                   msg=lambda m: f"{msg} leaf {i} ({a.dtype}, tol {tol}): {m}")


def max_error(actual, expected) -> float:
    """The largest ``|a - e| / (1 + |e|)`` over the floating leaves (inf where shapes or
    structures differ): ``assert_close`` passes a float32 result iff this is <= 1e-4.
    Reports print it; tests assert with ``assert_close``."""
    try:
        pairs = list(_pairs(actual, expected))
    except AssertionError:
        return float("inf")
    worst = 0.0
    for a, e in pairs:
        if not isinstance(a, torch.Tensor) or not a.dtype.is_floating_point:
            continue
        if a.shape != e.shape:
            return float("inf")
        if a.numel():
            err = (a.double() - e.double().to(a.device)).abs() / (1 + e.double().to(a.device).abs())
            worst = max(worst, err.nan_to_num(nan=float("inf")).max().item())
    return worst
