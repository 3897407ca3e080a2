"""The torch.compile backend: entry point, numerics against eager, graph breaks,
dynamic batch, eager fallback, per-parameter specialisation, cross-model groups."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn as nn
from conftest import float64_reference
from test_horizontal import Attention, Inception

import stfuse
from stfuse import zoo
from stfuse.backend import MAX_SPECIALIZATIONS, graphs, reset
from stfuse.errors import StfuseError
from stfuse.tolerances import assert_close


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    reset()
    yield
    torch._dynamo.reset()
    reset()


def _run(compiled, *args):
    with torch.no_grad():
        return compiled(*args)


def _all_fused(cgs):
    """Every graph ran through stfuse and never eagerly."""
    assert cgs, "the backend compiled no graph"
    for cg in cgs:
        assert cg.eager_reason is None and cg.stats["eager_calls"] == 0, (cg.index, cg.eager_reason, cg.stats)
        assert cg.stats["stfuse_calls"] >= 1, cg.stats


def test_entry_point_reaches_backend_from_fresh_interpreter(tmp_path):
    """backend="stfuse" works in a new interpreter that never imported stfuse: the
    torch_dynamo_backends entry point loads it. Run from an empty directory, so that
    only the installed package can be found."""
    code = textwrap.dedent("""
        import sys, torch
        assert "stfuse" not in sys.modules
        assert "stfuse" in torch._dynamo.list_backends()
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
        c = torch.compile(m, backend="stfuse")
        x = torch.randn(3, 8)
        with torch.no_grad():
            y, ref = c(x), m(x)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        from stfuse.backend import backend, graphs
        assert torch._dynamo.backends.registry.lookup_backend("stfuse") is backend
        assert graphs()[-1].stats["stfuse_calls"] == 1, graphs()[-1].stats
        print("stfuse backend ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stfuse backend ok" in proc.stdout


def test_attention_qkv_group_and_dynamic_batch():
    torch.manual_seed(0)
    model = Attention().eval()
    compiled = torch.compile(model, backend=stfuse.backend)
    for batch in (2, 3, 5):  # 2: a static graph; 3: Dynamo recompiles with a SymInt batch; 5: reuses it
        x = torch.randn(batch, 5, 16)
        assert_close(_run(compiled, x), float64_reference(model, (x,)), msg=f"batch {batch}")
    cgs = graphs()
    _all_fused(cgs)
    assert len(cgs) == 2 and cgs[1].stats["traces"] == 1  # one dynamic program serves batches 3 and 5
    for cg in cgs:
        (program,) = cg.programs
        qkv = [grp for grp in program.plan.groups.values() if grp.op_class == "linear"]
        assert [len(grp.members) for grp in qkv] == [3], program.plan.summary()


def test_inception_block():
    torch.manual_seed(0)
    model = Inception().eval()
    compiled = torch.compile(model, backend="stfuse")
    x = torch.randn(2, 8, 7, 7)
    assert_close(_run(compiled, x), float64_reference(model, (x,)))
    _all_fused(graphs())
    (program,) = graphs()[-1].programs
    assert any(grp.op_class == "conv2d" and len(grp.members) == 4 for grp in program.plan.groups.values())


def test_transformers_bert():
    pytest.importorskip("transformers")
    model, (ids,) = zoo.hf_model("bert")
    compiled = torch.compile(model, backend="stfuse")
    out = _run(compiled, ids)
    assert type(out) is type(model(ids))  # a ModelOutput comes back as one
    assert_close(out, float64_reference(model, (ids,)))
    more = torch.randint(0, 100, (3, 8))
    assert_close(_run(compiled, more), float64_reference(model, (more,)))
    _all_fused(graphs())
    groups = [grp for p in graphs()[0].programs for grp in p.plan.groups.values()]
    assert sum(len(grp.members) == 3 and grp.op_class == "linear" for grp in groups) == 2  # QKV per layer


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Attention(), Attention()

    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()
        return self.b(y) * 2 + x


def test_graph_break():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    compiled = torch.compile(model, backend="stfuse")
    x = torch.randn(2, 5, 16)
    assert_close(_run(compiled, x), float64_reference(model, (x,)))
    assert len(graphs()) == 2
    _all_fused(graphs())


class WithCond(nn.Module):
    """torch.cond: a higher-order op, run unfused as the tenant's own op."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (self.lin(x),))


class MutatesInput(nn.Module):
    """Overwrites its input in forward: no inference program can replay that."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_higher_order_op_runs_through_stfuse():
    torch.manual_seed(0)
    model = WithCond().eval()
    compiled = torch.compile(model, backend="stfuse")
    for x in (torch.ones(3, 4), -torch.ones(3, 4)):
        with torch.no_grad():
            assert_close(compiled(x), model(x))
    (cg,) = graphs()
    assert cg.eager_reason is None and cg.stats["stfuse_calls"] == 2


def test_unsupported_graph_runs_eagerly():
    torch.manual_seed(0)
    model = MutatesInput().eval()
    compiled = torch.compile(model, backend="stfuse")
    for x in (torch.ones(3, 4), -torch.ones(3, 4)):
        with torch.no_grad():
            assert_close(compiled(x.clone()), model(x.clone()))
    (cg,) = graphs()
    assert cg.eager_reason is not None and cg.stats["eager_calls"] == 2 and cg.stats["stfuse_calls"] == 0


def test_strict_raises_instead():
    compiled = torch.compile(MutatesInput().eval(), backend="stfuse", options={"strict": True})
    with pytest.raises(StfuseError, match="overwrites input"):
        _run(compiled, torch.ones(3, 4))


def test_unknown_option_is_an_error():
    compiled = torch.compile(nn.Linear(4, 4), backend="stfuse", options={"gruop": "x"})
    # dynamo wraps whatever a backend raises in BackendCompilerFailed; the cause must be stfuse's own error
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"unknown option\(s\) \['gruop'\]") as info:
        _run(compiled, torch.ones(3, 4))
    assert isinstance(info.value.inner_exception, StfuseError)


@pytest.mark.parametrize("options,match", [({"passes": "no"}, "'passes' takes True or False"),
                                           ({"codegen": "fast"}, "codegen must be one of"),
                                           ({"passes": False, "group": "g"}, "'group' needs the passes")])
def test_bad_passes_or_codegen_is_an_error(options, match):
    compiled = torch.compile(nn.Linear(4, 4), backend="stfuse", options=options)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=match) as info:
        _run(compiled, torch.ones(3, 4))
    assert isinstance(info.value.inner_exception, StfuseError)


@pytest.mark.inductor
def test_codegen_inductor_compiles_the_lowered_program():
    """The backend's default half two: stfuse's program (the Q/K/V group one stfuse op)
    handed to Inductor; a second batch size reuses the dynamic program."""
    torch.manual_seed(0)
    model = Attention().eval()
    compiled = torch.compile(model, backend="stfuse", options={"codegen": "inductor"})
    for batch in (2, 3, 4):
        x = torch.randn(batch, 5, 16)
        assert_close(_run(compiled, x), float64_reference(model, (x,)), msg=f"batch {batch}")
    _all_fused(graphs())
    for cg in graphs():
        (fused,) = cg.programs
        prog = fused.program
        assert fused.codegen == "inductor" and prog.error is None and prog.runs >= 1
        assert "torch.ops.stfuse.stacked_linear" in prog.canonical.code


@pytest.mark.parametrize("codegen", [pytest.param("inductor", marks=pytest.mark.inductor), "direct"])
def test_passes_off_hands_the_dynamo_graph_on(codegen):
    """passes=False: no stfuse tracing; Inductor compiles Dynamo's graph ("inductor"),
    or it runs as it is ("direct")."""
    torch.manual_seed(0)
    model = Attention().eval()
    compiled = torch.compile(model, backend="stfuse", options={"passes": False, "codegen": codegen})
    x = torch.randn(2, 5, 16)
    assert_close(_run(compiled, x), float64_reference(model, (x,)))
    assert graphs() == []


def test_autograd_calls_run_eagerly_with_gradients():
    torch.manual_seed(0)
    model = Attention()
    compiled = torch.compile(model, backend="stfuse")
    x = torch.randn(2, 5, 16)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert graphs()[-1].stats["eager_calls"] == 1


def test_same_class_models_share_a_graph_keyed_by_parameters():
    """Dynamo compiles one graph for both models (their weights are graph inputs): each
    must still run its own weights, and an in-place weight update must be seen."""
    torch.manual_seed(0)
    m1, m2 = Attention().eval(), Attention().eval()
    c1, c2 = (torch.compile(m, backend="stfuse") for m in (m1, m2))
    x = torch.randn(2, 5, 16)
    for _ in range(2):  # alternating calls find their own program: no tracing again
        y1, y2 = _run(c1, x), _run(c2, x)
        assert len(graphs()) == 1 and graphs()[0].stats["traces"] == 2
        assert_close(y1, float64_reference(m1, (x,)))
        assert_close(y2, float64_reference(m2, (x,)))
    with torch.no_grad():
        m1.q.weight.mul_(-1)
    assert_close(_run(c1, x), float64_reference(m1, (x,)))
    _all_fused(graphs())
    assert MAX_SPECIALIZATIONS >= 3


def _two_models_in_group(group_name, slice_ms):
    torch.manual_seed(0)
    group = stfuse.Group(group_name, slice_ms=slice_ms)
    models = [Attention().eval(), Attention(d=16, heads=4).eval()]
    compiled = [torch.compile(models[0], backend="stfuse", options={"group": group}),  # by object
                torch.compile(models[1], backend="stfuse", options={"group": group_name})]  # by name
    xs = [torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    for c, m, x in zip(compiled, models, xs):  # the first calls trace each model and join the group
        assert_close(_run(c, x), float64_reference(m, (x,)))
    assert len(group.tenants) == 2
    return group, models, compiled, xs


def test_group_fuses_concurrent_calls_from_two_threads():
    group, models, compiled, xs = _two_models_in_group("pair", slice_ms=100.0)
    rounds, barrier, results, errors = 6, threading.Barrier(2), {0: [], 1: []}, []

    def serve(i):
        try:
            with torch.no_grad():
                for _ in range(rounds):
                    barrier.wait()
                    results[i].append(compiled[i](xs[i]))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, m in enumerate(models):
        assert len(results[i]) == rounds
        for out in results[i]:
            assert_close(out, float64_reference(m, (xs[i],)))
    stats = group.stats()
    assert stats["fused_launches"] >= 1, stats
    assert stats["error"] is None and group.program.plan.stats["tenants"] == 2
    # the two models' projections fuse with each other, not only within each model
    assert any(len({group.program.graph.nodes[m]["tenant"] for m in grp.members}) == 2
               for grp in group.program.plan.groups.values())
    _all_fused(graphs())


@pytest.mark.inductor
def test_group_with_codegen_inductor():
    """A group's program compiled by Inductor: the warm-up compiles both tenants together
    and each alone, and lone calls run those."""
    torch.manual_seed(0)
    group = stfuse.Group("inductor", slice_ms=1.0, codegen="inductor")
    models = [Attention().eval(), Attention().eval()]
    compiled = [torch.compile(m, backend="stfuse", options={"group": group}) for m in models]
    for _ in range(2):  # first round: join (the second member's call builds the group)
        for c, m in zip(compiled, models):
            x = torch.randn(2, 5, 16)
            assert_close(_run(c, x), float64_reference(m, (x,)))
    assert group.stats()["error"] is None and group.program.codegen == "inductor"
    progs = [p for p, _ in group.program._programs.values()]
    assert len(progs) == 3 and all(p.error is None and p.runs >= 1 for p in progs)
    _all_fused(graphs())


def test_group_lone_call_runs_alone():
    group, models, compiled, xs = _two_models_in_group("lone", slice_ms=5.0)
    before = group.stats()
    assert_close(_run(compiled[0], xs[0]), float64_reference(models[0], (xs[0],)))
    after = group.stats()
    assert after["launches"] == before["launches"] + 1
    assert after["fused_launches"] == before["fused_launches"]


class Masked(nn.Module):
    """Attention scores masked by a [S, S] tensor: an input without the batch dim."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, mask):
        return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) + mask, -1)


def test_group_call_with_unbatched_input_runs_directly():
    """The runtime queues only calls whose inputs share dim 0; others run by
    themselves through the group's program, still correct."""
    torch.manual_seed(0)
    group = stfuse.Group("masked", slice_ms=5.0)
    models = [Masked().eval(), Masked().eval()]
    compiled = [torch.compile(m, backend="stfuse", options={"group": "masked"}) for m in models]
    x, mask = torch.randn(2, 5, 16), torch.randn(5, 5)
    for c, m in zip(compiled, models):
        assert_close(_run(c, x, mask), float64_reference(m, (x, mask)))
    assert_close(_run(compiled[0], x, mask), float64_reference(models[0], (x, mask)))
    stats = group.stats()
    assert group.program is not None and stats["direct_calls"] >= 2, stats
    _all_fused(graphs())


def test_many_models_of_one_class_all_run_through_stfuse():
    """Dynamo shares one graph between same-shape models of one class; each model is one
    set of weights of it, and none falls back to eager (a cap of 8 specialisations per
    graph made the 9th model run eagerly: issue 11, item 8)."""
    torch.manual_seed(0)
    models = [zoo.mlp(8, 16, 4) for _ in range(MAX_SPECIALIZATIONS + 3)]
    compiled = [torch.compile(m, backend="stfuse") for m in models]
    x = torch.randn(2, 8)
    for _ in range(2):
        for m, c in zip(models, compiled):
            assert_close(_run(c, x), float64_reference(m, (x,)))
    assert len(graphs()) == 1 and graphs()[0].stats["traces"] == len(models)
    _all_fused(graphs())


class Sized(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Linear(8, width), nn.Linear(width, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_dynamo_recompile_limit_is_counted_and_warned_once(caplog):
    """Models of one class but other sizes: Dynamo guards parameter shapes, so each is one
    more graph of the same function; past its recompile limit Dynamo runs the rest eagerly
    without calling the backend. That must show in the counters, with one warning."""
    from stfuse.backend import totals

    torch.manual_seed(0)
    models = [Sized(w) for w in (8, 12, 16, 20)]
    compiled = [torch.compile(m, backend="stfuse") for m in models]
    x = torch.randn(2, 8)
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level("WARNING", logger="stfuse.backend"):
        for _ in range(2):
            for m, c in zip(models, compiled):
                assert_close(_run(c, x), float64_reference(m, (x,)))  # eager is still right
    t = totals()
    assert t["graphs"] == 2 and t["stfuse_calls"] == 4 and t["eager_calls"] == 0
    assert t["dynamo_fallbacks"] >= 2 and all(cg.stats["dynamo_fallbacks"] >= 1 for cg in graphs())
    warned = [r for r in caplog.records if "recompile_limit" in r.getMessage() and r.name == "stfuse.backend"]
    assert len(warned) == 1 and "'forward'" in warned[0].getMessage()


def test_graphs_forget_models_whose_weights_were_freed():
    import gc

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    c = torch.compile(zoo.mlp(8, 16, 4), backend="stfuse")
    _run(c, x)
    del c
    gc.collect()
    m = zoo.mlp(8, 16, 4)
    assert_close(_run(torch.compile(m, backend="stfuse"), x), float64_reference(m, (x,)))
    assert len(graphs()) == 1 and len(graphs()[0].members) == 1


def test_parameter_shapes_made_dynamic_share_one_graph_across_model_sizes():
    """The way around Dynamo's per-size graphs (docs/backend.md): with parameter shapes
    dynamic, models of every size share one graph, and each still runs its own program."""
    torch.manual_seed(0)
    models = [Sized(w) for w in range(8, 8 + 4 * 10, 4)]
    compiled = [torch.compile(m, backend="stfuse") for m in models]
    x = torch.randn(2, 8)
    with torch._dynamo.config.patch(force_parameter_static_shapes=False,
                                    force_nn_module_property_static_shapes=False):
        for m, c in zip(models, compiled):
            assert_close(_run(c, x), float64_reference(m, (x,)))
    assert len(graphs()) == 2  # the first size, then one graph for every other size
    _all_fused(graphs())


def test_transformers_bert_called_with_keywords():
    """Dynamo flattens a keyword call into graph inputs: BertModel(input_ids=, attention_mask=)
    and ViTModel(pixel_values=) run through stfuse like positional calls."""
    pytest.importorskip("transformers")
    from conftest import bert_call, float64_call_reference, vit_call

    for family, make in (("bert", lambda b: bert_call(b, 8, seed=b)), ("vit", lambda b: vit_call(b, seed=b))):
        model = zoo.hf_model(family)[0]
        compiled = torch.compile(model, backend="stfuse")
        for batch in (2, 3):
            call = make(batch)
            assert_close(_run_kw(compiled, call), float64_call_reference(model, call), msg=f"{family} at {batch}")
    _all_fused(graphs())


def _run_kw(compiled, kwargs):
    with torch.no_grad():
        return compiled(**kwargs)
