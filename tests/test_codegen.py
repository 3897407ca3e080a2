"""Code generation (kernels/codegen.py): rendering, the hash-keyed source cache, and the op tables."""

import os

import pytest
import torch

from stfuse.kernels import codegen
from stfuse.kernels import epilogue as ep
from stfuse.kernels import ops, triton_gemm, triton_norm
from stfuse.kernels.triton_ops import IMPLS

# Golden text of one small epilogue in the pointwise kernel (its template has 9
# columns, so the operand's columns are 9-12; no float columns before the scalar).
GOLDEN_EPILOGUE = """\
    # epilogue: add:tensor,relu,mul:scalar
    e0_ptr = tl.load(prob + 9).to(tl.pointer_type(DTYPE))
    e0_offs = ep_outer * tl.load(prob + 10).to(IDX) + ep_inner * tl.load(prob + 11).to(IDX) + ep_col * tl.load(prob + 12).to(IDX)
    e0 = tl.load(e0_ptr + e0_offs, mask=mask, other=0.0).to(tl.float32)
    y = y + e0  # add:tensor
    y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu
    s0 = tl.load(float_ptr + member * 1 + 0).to(tl.float32)
    y = y * s0  # mul:scalar
"""


def test_golden_epilogue():
    buf = codegen.Source()
    with buf.indented():
        codegen.render_epilogue(buf, triton_norm.POINTWISE, ep.parse("add:tensor,relu,mul:scalar"))
    assert buf.text() == GOLDEN_EPILOGUE
    assert GOLDEN_EPILOGUE in codegen.source_for("grouped_pointwise", "add:tensor,relu,mul:scalar")


def test_scalars_follow_the_template_float_columns():
    # layer norm keeps eps in float column 0, so the first epilogue scalar is column 1 of 2
    src = codegen.source_for("stacked_layer_norm", "mul:scalar")
    assert "s0 = tl.load(float_ptr + member * 2 + 1).to(tl.float32)" in src
    assert "eps = tl.load(float_ptr + member * 2 + 0).to(tl.float32)" in src


def test_source_is_stable_and_readable():
    a = codegen.source_for("grouped_linear", "add:tensor,gelu,mul:scalar")
    b = codegen.source_for("stacked_linear", "add:tensor,gelu,mul:scalar")
    assert a == b  # both forms run the same kernel
    assert codegen.source_hash(a) == codegen.source_hash(b)
    assert codegen.source_path(triton_gemm.GEMM, a) == codegen.source_path(triton_gemm.GEMM, b)
    assert "$" not in a and codegen.EPILOGUE_MARKER not in a
    assert "def _grouped_gemm_kernel(" in a and "# epilogue: add:tensor,gelu,mul:scalar" in a
    compile(a, "generated", "exec")
    # another epilogue is another source, under another name
    c = codegen.source_for("grouped_linear", "add:tensor")
    assert codegen.source_hash(c) != codegen.source_hash(a)
    assert "# no epilogue" in codegen.source_for("grouped_linear", "")


@pytest.mark.parametrize("op_name", sorted(ops.OPS))
def test_every_op_renders(op_name):
    src = codegen.source_for(op_name, "sub:tensor,silu,pow:scalar,gelu_tanh,tanh,rdiv:tensor")
    compile(src, op_name, "exec")
    for helper in ("_erf", "_tanh", "_pow"):
        assert f"def {helper}(" in src


def test_tables_cover_every_op():
    """Every op class the passes fuse (optable.OP_CLASSES) has both ops, a Triton
    implementation and a template; nothing else does."""
    from stfuse.passes.optable import OP_CLASSES

    classes = set(OP_CLASSES)
    assert set(codegen.TEMPLATE_OF) == classes
    assert set(IMPLS) == set(ops.OPS) == {f"{k}_{c}" for k in ("grouped", "stacked") for c in classes}
    assert set(ep.TRITON_UNARY) == set(ep.UNARY)
    assert set(ep.TRITON_BINARY) == set(ep.BINARY)


def test_cache_write_hit_and_cross_process_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path / "cache"))
    template, epilogue = triton_norm.POINTWISE, "sigmoid,mul:scalar"
    src = codegen.render(template, epilogue)

    path, written = codegen.write_source(template, src)
    assert written and path.parent == tmp_path / "cache"
    assert path.name == f"pointwise_{codegen.source_hash(src)}.py"
    assert path.read_text() == src
    mtime = path.stat().st_mtime_ns

    again, written = codegen.write_source(template, src)
    assert again == path and not written and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left

    kernel = codegen.load_kernel(template, epilogue)
    assert codegen.load_kernel(template, epilogue) is kernel
    # a fresh process: no in-process caches, the file is only imported
    monkeypatch.setattr(codegen, "_MODULES", {})
    monkeypatch.setattr(codegen, "_KERNELS", {})
    fresh = codegen.load_kernel(template, epilogue)
    assert fresh is not kernel and path.stat().st_mtime_ns == mtime
    x = [torch.randn(3, 5)]
    y = IMPLS["grouped_pointwise"](x, epilogue, [], [2.0])
    torch.testing.assert_close(y[0], torch.sigmoid(x[0]) * 2.0, rtol=1e-4, atol=1e-4)


def test_corrupt_cache_file_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    src = codegen.render(triton_norm.POINTWISE, "relu")
    path = codegen.source_path(triton_norm.POINTWISE, src)
    path.write_text(src[: len(src) // 2])  # a half-written file from a dead process
    assert codegen.write_source(triton_norm.POINTWISE, src) == (path, True)
    assert path.read_text() == src
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_unknown_step_is_refused():
    with pytest.raises(ValueError, match="unknown epilogue step"):
        codegen.source_for("grouped_linear", "softplus")
