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
    assert reference.stacked_linear_kn in targets and torch.stack in targets
    # weights are shared, not copied: every tensor the bound program reads is a view
    # of one of the canonical program's buffers
    storages = {b.untyped_storage().data_ptr() for b in fused.canonical_program.buffers()}
    read = [getattr(bound, n.target) for n in bound.graph.nodes if n.op == "get_attr"]
    assert read and all(t.untyped_storage().data_ptr() in storages for t in read)
    assert not dict(bound.named_buffers())  # plain attributes: a buffer read costs ~1 us


def test_bound_linear_reads_its_weights_as_views_taken_once():
    """stacked_linear binds to stacked_linear_kn on [R, K, N] / [R, 1, N] views of the
    packed weights, and computes what the canonical op computes."""
    fused = _fused()
    bound = fused.program
    calls = [n for n in bound.graph.nodes if n.target is reference.stacked_linear_kn]
    assert calls
    x, wt, b1 = calls[0].args[:3]
    assert getattr(bound, wt.target).shape[1:] == (16, 32) and getattr(bound, b1.target).shape[1] == 1
    xs = [torch.randn(3, 16), torch.randn(3, 16)]
    with torch.no_grad():
        for got, want in zip(bound(*xs), fused.canonical_program(*xs)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bind_on_cuda_keeps_the_custom_ops_under_cuda_graphs(monkeypatch):
    from stfuse.kernels.graphs import GraphedProgram

    fused = _fused()
    bound = bind(fused.canonical_program, torch.device("cuda"))
    assert isinstance(bound, GraphedProgram)
    assert bound.code == fused.canonical_program.code  # stacked: no grouped GEMM to plan
    assert not isinstance(bind(fused.canonical_program, torch.device("cuda"), graphs=False), GraphedProgram)
    monkeypatch.setenv("STFUSE_CUDA_GRAPHS", "0")
    assert not isinstance(bind(fused.canonical_program, torch.device("cuda")), GraphedProgram)


def test_cuda_binding_packs_half_conv_weights_channels_last():
    """On CUDA, binding repacks the fp16/bf16 conv weights the program owns once
    (kernels/triton_conv.py says why): a new buffer, gm's own weight and graph untouched;
    fp32, 1x1 and 3-channel weights stay as they are. Checked here on CPU tensors."""
    from stfuse.kernels.bind import _pack_conv_weights

    g = torch.Generator().manual_seed(0)
    root = torch.nn.Module()
    weights = {"w_half": torch.randn(4, 8, 3, 3, generator=g).half(), "w_fp32": torch.randn(4, 8, 3, 3, generator=g),
               "w_1x1": torch.randn(4, 8, 1, 1, generator=g).half(), "w_stem": torch.randn(4, 3, 3, 3, generator=g).half(),
               "w_stack": torch.randn(2, 4, 8, 3, 3, generator=g).half()}
    for name, t in weights.items():
        root.register_buffer(name, t)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    conv = torch.ops.stfuse.grouped_conv2d.default
    for name in ("w_half", "w_fp32", "w_1x1", "w_stem"):
        graph.call_function(conv, (x, [graph.get_attr(name)], [None], [1, 1], [0, 0], [1, 1], [1], "", [], []))
    graph.call_function(torch.ops.stfuse.stacked_conv2d.default,
                        (x, graph.get_attr("w_stack"), None, [1, 1], [0, 0], [1, 1], 1, "", [], []))
    graph.output(x)
    gm = torch.fx.GraphModule(root, graph)
    _pack_conv_weights(gm)
    read = [n.args[1] for n in gm.graph.nodes if n.op == "call_function"]
    read = [(v[0] if isinstance(v, list) else v).target for v in read]
    assert read == ["w_half_cl", "w_fp32", "w_1x1", "w_stem", "w_stack_cl"]
    assert gm.w_half_cl.stride(1) == 1 and torch.equal(gm.w_half_cl, weights["w_half"])
    assert gm.w_stack_cl[0].stride(1) == 1 and torch.equal(gm.w_stack_cl, weights["w_stack"])
    assert gm.w_half is weights["w_half"] and gm.w_half.is_contiguous()
