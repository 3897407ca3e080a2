"""Tier 4 (GPU compile, no GPU): every kernel template compiled for sm_80 and sm_90 by the
real Triton compiler, in a child process (the suite runs Triton's interpreter).

The CI tier is ``stfuse kernels --quick`` (each kernel's first config per dtype and flag
set, with an epilogue chain: 98 compiles, a minute or two on 2 cores); the full sweep is
``stfuse kernels`` (every config and epilogue, RESULTS.md). Asserted here: every variant
compiles with 0 spills; tensor cores where the arithmetic allows; vector loads wherever the
host promised alignment (VEC > 1) and never where it did not; cp.async for every aligned
16-bit GEMM and conv variant (fp32 gets 4-byte cp.async even unaligned), split-K partial
passes included, and none in split-K's reduce pass (no dot product to overlap).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from stfuse.kernels.aot import occupancy  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is its current default
    # two compiler processes: the tier takes half the time, and tests the pool (rows in sweep order)
    child = subprocess.run([sys.executable, "-m", "stfuse.cli", "kernels", "--quick", "--jobs", "2", "-q",
                            "--json", str(out)],
                           env=env, capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0, (child.stdout[-3000:], child.stderr[-3000:])
    rows = json.loads(out.read_text())
    assert f"{len(rows)} variants: {len(rows)} compiled, 0 failed" in child.stdout
    return rows


def test_rows_come_back_in_sweep_order(rows):
    """Compiled in two processes, the rows still come in the sweep's order (aot.variants,
    listed in a child without the interpreter, whose configs are the GPU ones)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    code = ("import json; from stfuse.kernels.aot import variants; print(json.dumps("
            "[[v.kernel, v.config, v.dtype, v.epilogue, a] for a in ('sm_80', 'sm_90') for v in variants(True, a)]))")
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                           check=True)
    want = json.loads(child.stdout.strip().splitlines()[-1])
    assert [[r["kernel"], r["config"], r["dtype"], r["epilogue"], r["arch"]] for r in rows] == want


def flags(row) -> dict:
    """The constexpr flags in a row's config name, e.g. "... K_CONTIGUOUS=1,VEC=8" -> {..}."""
    _, _, tail = row["config"].partition(" ")
    return {k: int(v) for k, v in (f.split("=") for f in tail.split(",") if f)}


def test_every_kernel_compiles_for_sm80_and_sm90(rows):
    fields = {"kernel", "config", "dtype", "arch", "ok", "error", "regs", "spill_bytes", "smem", "occupancy",
              "tensor_cores", "async_copy", "vector_loads"}
    assert all(fields <= set(r) for r in rows)
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    for arch in ("sm_80", "sm_90"):
        for kernel in ("gemm", "conv"):
            assert {(kernel, d, arch) for d in ("fp32", "tf32", "fp16", "bf16")} <= seen
        for kernel in ("layer_norm", "group_norm", "pointwise"):
            assert {(kernel, d, arch) for d in ("fp32", "fp16", "bf16")} <= seen
    for r in rows:
        assert r["ok"] and r["error"] is None, r
        assert 0 < r["regs"] <= 255 and isinstance(r["spill_bytes"], int) and isinstance(r["smem"], int), r
        assert r["spill_bytes"] == 0, r
        assert r["blocks_per_sm"] >= 1 and 0 < r["occupancy"] <= 1, r


def test_dot_products_use_tensor_cores_where_the_dtype_allows(rows):
    """tf32, fp16 and bf16 GEMM/conv tiles run on tensor cores (mma / wgmma); fp32 with
    torch's default "highest" precision must not (ieee fp32 has no tensor-core path)."""
    for r in rows:
        if r["kernel"] in ("gemm", "conv") and flags(r).get("SPLIT") != 2:  # split-K's reduce pass has no dot
            assert r["tensor_cores"] == (r["dtype"] != "fp32"), r
        else:
            assert not r["tensor_cores"], r


@pytest.mark.parametrize("arch, regs, smem, warps, blocks, occ", [
    ("sm_90", 32, 0, 4, 16, 1.0),  # limited by warps: 64 / 4
    ("sm_90", 255, 0, 8, 1, 0.125),  # 256 regs x 256 threads = the whole register file
    ("sm_80", 128, 64 * 1024, 4, 2, 0.125),  # smem: 164 KiB / 64 KiB
    ("sm_80", 64, 0, 1, 32, 0.5),  # the block limit
])
def test_occupancy(arch, regs, smem, warps, blocks, occ):
    assert occupancy(arch, regs, smem, warps) == (blocks, occ)


def test_vector_loads_and_async_copies_follow_alignment(rows):
    for r in rows:
        f = flags(r)
        # group_norm takes no alignment flag (its per-channel index forbids vector loads)
        vector = f.get("VEC", 1) > 1 and (r["kernel"] != "conv" or f["X_C_UNIT"] or f["W_C_UNIT"])
        assert r["vector_loads"] == vector, r
        # split-K's reduce pass reads each partial once, with no dot to overlap: plain vector loads
        if r["kernel"] in ("gemm", "conv") and (vector or r["dtype"] in ("fp32", "tf32")):
            assert r["async_copy"] == (flags(r).get("SPLIT") != 2), r


def test_variants_list_what_the_launchers_run():
    """The sweep's variant list (built here under the interpreter; compiled in the child
    above): half-precision NCHW convs go channels_last (kernels/triton_conv.py), so no
    fp16/bf16 conv reads NCHW x with vector weights; split-K partial passes never carry an
    epilogue nor the 128x128 tile; ``kernels`` filters by kind."""
    from stfuse.kernels.aot import variants

    convs = variants(arch="sm_90", kernels=("conv",))
    assert {v.kernel for v in convs} == {"conv"}
    units = {(v.dtype, dict(v.constexprs)["X_C_UNIT"], dict(v.constexprs)["W_C_UNIT"]) for v in convs}
    for dtype in ("fp16", "bf16"):
        assert {(x, w) for d, x, w in units if d == dtype} == {(True, True), (True, False), (False, False)}
    assert (("fp32", False, True) in units) and (("tf32", False, True) in units)
    gemms = variants(arch="sm_80", kernels=("gemm",))
    split = {s: [v for v in gemms if dict(v.constexprs)["SPLIT"] == s] for s in (1, 2)}
    assert {v.dtype for v in split[1]} == {v.dtype for v in split[2]} == {"fp32", "tf32", "fp16", "bf16"}
    assert all(v.epilogue == "" and "BLOCK_M=128,BLOCK_N=128" not in v.config for v in split[1])
    assert {v.epilogue for v in split[2]} == {"", "add:tensor,gelu"}
    assert all(dict(v.constexprs)["VEC"] > 1 for v in split[1] + split[2])  # aligned members only


def test_unknown_kernel_kind_is_refused():
    from stfuse.errors import StfuseError
    from stfuse.kernels.aot import compile_all

    with pytest.raises(StfuseError, match="unknown kernel"):
        compile_all(("sm_90",), kernels=("gemmm",))


def test_relu_epilogue_keeps_nan_in_ptx():
    """Eager relu keeps NaN; PTX's plain max.f32 returns the other operand (NaN -> 0), so
    the relu step compiles to max.NaN.f32 (it ran as max.f32 before: a NaN input gave a
    finite output on the GPU, which the interpreter, on numpy's maximum, cannot show)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = ("import dataclasses, re; from stfuse.kernels.aot import ptx, variants; "
            "v = next(v for v in variants(True) if v.kernel == 'pointwise' and v.dtype == 'fp32'); "
            "print(sorted(set(re.findall(r'\\bmax\\.[A-Za-z0-9.]*', ptx(dataclasses.replace(v, epilogue='relu'), 'sm_90')))))")
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip().splitlines()[-1] == "['max.NaN.f32']"
