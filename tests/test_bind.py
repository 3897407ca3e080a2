"""kernels/bind.py: the one step from the canonical program to what runs."""

import torch

import stfuse
from stfuse import zoo
from stfuse.kernels import reference
from stfuse.kernels.bind import bind


def _fused():
    torch.manual_seed(0)
    models = [zoo.mlp(16, 32, 4, depth=2) for _ in range(2)]
    return stfuse.compile(models, [torch.randn(2, 16), torch.randn(2, 16)])


def test_program_is_what_runs_on_cpu():
    """fused.program is the bound program: stfuse ops call their torch reference kernels,
    lowering's stack/unbind call torch functions; calling it gives the fused outputs."""
    fused = _fused()
    code, canonical = fused.program.code, fused.canonical_program.code
    assert "stfuse.stacked_linear" in canonical and "aten.stack" in canonical
    assert "stfuse.stacked_linear" not in code and "aten.stack" not in code
    assert "stacked_linear" in code  # the reference kernel, called directly
    xs = [torch.randn(3, 16), torch.randn(3, 16)]
    with torch.no_grad():
        direct = fused.program(*xs)
    for got, want in zip(direct, fused(*xs)):
        assert torch.equal(got, want)


def test_bind_leaves_the_canonical_program_alone():
    fused = _fused()
    before = fused.canonical_program.code
    bound = bind(fused.canonical_program, torch.device("cpu"))
    assert fused.canonical_program.code == before
    targets = {n.target for n in bound.graph.nodes if n.op == "call_function"}
    assert reference.stacked_linear in targets and torch.stack in targets
    # weights are shared, not copied
    names = dict(fused.canonical_program.named_buffers())
    assert all(b.data_ptr() == names[n].data_ptr() for n, b in bound.named_buffers())


def test_bind_on_cuda_keeps_the_custom_ops():
    fused = _fused()
    assert bind(fused.canonical_program, torch.device("cuda")) is fused.canonical_program
