"""Artifacts: save/load round trips (in a fresh process too), subsets, and every
kind of broken or hostile artifact failing with its own clear error."""

import hashlib
import importlib.util
import json
import operator
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.artifact import ArtifactError, check_graph as _check_graph
from stfuse.errors import InputError, StfuseError
from stfuse.artifact.loaded import ChainedPrograms
from stfuse.tolerances import assert_close

from conftest import BranchOnBatch

pytest.importorskip("safetensors")


class TwoHeads(torch.nn.Module):
    """Defined here so that the child process cannot import it; returns a dict."""

    def __init__(self):
        super().__init__()
        self.body = zoo.mlp(16, 32, 8, depth=2)
        self.head_a, self.head_b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 5)

    def forward(self, x, scale):
        h = torch.relu(self.body(x)) * scale
        return {"a": self.head_a(h), "b": [self.head_b(h)]}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Two same-architecture MLPs (fused, packed weights) and a two-input dict-output tenant."""
    torch.manual_seed(0)
    models = {"m1": zoo.mlp(16, 32, 4), "m2": zoo.mlp(16, 32, 4), "heads": TwoHeads()}
    examples = {"m1": (torch.randn(3, 16),), "m2": (torch.randn(3, 16),),
                "heads": (torch.randn(3, 16), torch.rand(3, 1) + 0.5)}
    fused = stfuse.compile(models, examples)
    path = tmp_path_factory.mktemp("art") / "trio"
    fused.save(path, subsets=[("m1", "heads")])
    return fused, path


def _args(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, generator=g), torch.randn(batch, 16, generator=g),
            (torch.randn(batch, 16, generator=g), torch.rand(batch, 1, generator=g) + 0.5))


def _equal(a, b) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb))


def test_layout_and_manifest(trio):
    fused, path = trio
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert {"manifest.json", "plan.json", "weights.safetensors", "programs/full.json",
            "programs/full_mixed.json", "programs/tenant_0.json", "programs/subset_0.json"} <= set(names)
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "stfuse-artifact" and m["format_version"] == 3
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["stfuse"] == stfuse.__version__
    assert [t["name"] for t in m["tenants"]] == fused.tenants
    assert set(m["files"]) == set(names) - {"manifest.json"}
    for name, meta in m["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == meta["sha256"]
    # The packed [2, ...] weights of the fused MLP groups are stored once: the members'
    # views (in the per-tenant programs) point into the same storages.
    stored = sum(s["numel"] for s in m["storages"].values())
    assert stored <= sum(p.numel() for tg in fused._tenants.values() for p in tg.tensors.values())
    model = json.loads((path / "programs" / "full.json").read_text())  # a graph, no tensors
    assert all(list(s) == ["user_input"] for s in model["graph_module"]["signature"]["input_specs"])


def test_round_trip_same_process(trio):
    fused, path = trio
    prog = stfuse.load(path)
    assert prog.tenants == fused.tenants
    assert prog.plan.stats == fused.plan.stats
    assert prog.plan.summary() == fused.plan.summary()
    assert set(prog.plan.groups) == set(fused.plan.groups)
    args = _args()
    assert _equal(prog(*args), fused(*args))
    # Another batch size per tenant in one call (the saved per-tenant-batch program).
    mixed = (torch.randn(1, 16), torch.randn(6, 16), (torch.randn(2, 16), torch.ones(2, 1)))
    assert _equal(prog(*mixed), fused(*mixed))


@pytest.mark.parametrize("subset", [("m1",), ("heads",), ("m1", "heads"), ("m2", "heads"), ("m1", "m2")])
def test_subsets(trio, subset):
    """Single tenants and the subset saved at save time run their own programs: the
    same kernels as the compiled program, so the same bits. Other subsets chain the
    single-tenant programs (unfused), equal within the float32 tolerance."""
    fused, path = trio
    prog = stfuse.load(path)
    inputs = {t: a for t, a in zip(fused.tenants, _args(batch=2, seed=3)) if t in subset}
    out = prog.run(inputs)
    assert list(out) == [t for t in fused.tenants if t in subset]
    if len(subset) == 1 or subset == ("m1", "heads"):
        assert _equal(out, fused.run(inputs))
    else:
        assert isinstance(prog._program(tuple(subset), True)[0], ChainedPrograms)
        assert_close(out, fused.run(inputs))


def test_loaded_inputs_are_checked(trio):
    _, path = trio
    prog = stfuse.load(path)
    a = _args()
    with pytest.raises(InputError, match="expected 3 arguments"):
        prog(a[0])
    with pytest.raises(InputError, match=r"tenant 'm1', argument 0 .*expected shape Tensor\[B, 16\]"):
        prog(torch.randn(3, 15), a[1], a[2])
    with pytest.raises(InputError, match="tenant 'm2', argument 0 .*expected dtype torch.float32"):
        prog.run({"m2": torch.randn(3, 16, dtype=torch.float64)})
    with pytest.raises(InputError, match="unknown tenant 'zz'"):
        prog.run({"zz": a[0]})
    with pytest.raises(InputError, match=r"tenant 'heads': 1 positional argument\(s\) where it takes 2"):
        prog.run({"heads": a[0]})


CHILD = textwrap.dedent("""
    import sys
    import torch
    import stfuse

    def plain(out):  # a transformers ModelOutput as the tuple of its values
        return tuple(out.values()) if hasattr(out, "to_tuple") else out

    def equal(a, b):
        la, sa = torch.utils._pytree.tree_flatten(plain(a))
        lb, sb = torch.utils._pytree.tree_flatten(b)
        return sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb))

    for name in sys.argv[1:]:
        want = torch.load(f"{name}_io.pt", weights_only=True)
        prog = stfuse.load(name)
        got = prog(*want["args"])
        assert all(equal(g, w) for g, w in zip(got, want["outs"])), name
        # Alone, a tenant runs its own unfused program: other kernels than the fused call
        # (baddbmm on packed weights vs linear), so equal within float32 tolerance, not bitwise.
        alone = prog.run({prog.tenants[0]: want["args"][0]})
        la = torch.utils._pytree.tree_leaves(plain(alone[prog.tenants[0]]))
        lw = torch.utils._pytree.tree_leaves(want["outs"][0])
        assert len(la) == len(lw) and all(torch.allclose(x, y, rtol=1e-4, atol=1e-4)
                                          for x, y in zip(la, lw)), name
        print(name, "ok", [type(o).__name__ for o in got])
    leaked = sorted(m for m in sys.modules if m.startswith(("test_", "conftest", "stfuse.zoo",
                                                            "transformers.models")))
    assert not leaked, leaked
    print("modules ok")
""")


def test_round_trip_in_fresh_process(trio, tmp_path):
    """A child that imports only torch and stfuse (no model classes, no tests, no
    transformers model code) gets exactly the parent's outputs, HF ModelOutput included."""
    fused, path = trio
    shutil.copytree(path, tmp_path / "trio")
    args = _args(batch=5)
    torch.save({"args": args, "outs": fused(*args)}, tmp_path / "trio_io.pt")
    names = ["trio"]
    if importlib.util.find_spec("transformers") is not None:
        m1, a1 = zoo.hf_model("bert", 0)
        m2, a2 = zoo.hf_model("bert", 1)
        bert = stfuse.compile({"x": m1, "y": m2}, {"x": a1, "y": a2})
        bert.save(tmp_path / "bert")
        ids = (torch.randint(0, 100, (3, 8)), torch.randint(0, 100, (3, 8)))
        outs = bert(*ids)
        assert type(outs[0]).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
        torch.save({"args": ids, "outs": [tuple(o.values()) for o in outs]}, tmp_path / "bert_io.pt")
        names.append("bert")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child = subprocess.run([sys.executable, "-c", CHILD, *names], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "trio ok ['Tensor', 'Tensor', 'dict']" in child.stdout
    assert "modules ok" in child.stdout
    if "bert" in names:
        assert "bert ok ['BaseModelOutputWithPoolingAndCrossAttentions'" in child.stdout


# ---------------------------------------------------------------------------- broken artifacts

@pytest.fixture
def copy(trio, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trio[1], dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_flipped_byte_in_weights(copy):
    blob = bytearray((copy / "weights.safetensors").read_bytes())
    blob[-5] ^= 0x01
    (copy / "weights.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        stfuse.load(copy)


def test_truncated_program(copy):
    f = copy / "programs" / "full.json"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"programs/full.json has \d+ bytes.*truncated"):
        stfuse.load(copy)


def test_removed_file(copy):
    (copy / "programs" / "tenant_0.json").unlink()
    with pytest.raises(ArtifactError, match="missing file programs/tenant_0.json"):
        stfuse.load(copy)


def test_future_format_version(copy):
    _edit_manifest(copy, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99 is newer than this stfuse reads"):
        stfuse.load(copy)


@pytest.mark.parametrize("kind", ["empty_dir", "file", "missing", "other_json"])
def test_not_an_artifact(tmp_path, kind):
    target = tmp_path / "x"
    if kind == "empty_dir":
        target.mkdir()
    elif kind == "file":
        target.write_text("hello")
    elif kind == "other_json":
        target.mkdir()
        (target / "manifest.json").write_text('{"name": "some other tool"}')
    pattern = "is not an stfuse manifest" if kind == "other_json" else "not an stfuse artifact"
    with pytest.raises(ArtifactError, match=pattern):
        stfuse.load(target)


@pytest.mark.parametrize("edit, pattern", [
    (lambda files: files.pop("programs/full.json"), "manifest does not list 'programs/full.json'"),
    (lambda files: files.update({"../escape": {"bytes": 0, "sha256": ""}}), "unsafe file name '../escape'"),
])
def test_unlisted_program_and_unsafe_name(copy, edit, pattern):
    _edit_manifest(copy, lambda m: edit(m["files"]))
    with pytest.raises(ArtifactError, match=pattern):
        stfuse.load(copy)


def test_graph_calling_python_is_refused():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(os.system, (x,)))
    with pytest.raises(ArtifactError, match="calls <built-in function system>"):
        _check_graph(torch.fx.GraphModule(torch.nn.Module(), g), 1, "program p")
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.stfuse.grouped_pointwise.default, ([x], "relu,exec", [], []))
    g.output(g.call_function(operator.getitem, (y, 0)))
    with pytest.raises(ArtifactError, match="bad epilogue"):
        _check_graph(torch.fx.GraphModule(torch.nn.Module(), g), 1, "program p")


def test_weight_view_outside_its_storage(copy):
    def grow(m):
        t = next(iter(m["tensors"].values()))
        t["shape"][0] *= 1000
    _edit_manifest(copy, grow)
    with pytest.raises(ArtifactError, match="does not fit its storage"):
        stfuse.load(copy)


@pytest.mark.parametrize("type_name, pattern", [
    ("transformers.no_such_module.Output", "loading it needs transformers installed"),
    ("mypackage.outputs.Output", "is not registered with torch.utils._pytree"),
])
def test_unknown_output_type(copy, type_name, pattern):
    def retype(m):
        m["tenants"][0]["out_spec"] = json.dumps(
            [1, {"type": type_name, "context": "null", "children_spec": []}])
    _edit_manifest(copy, retype)
    with pytest.raises(ArtifactError, match=pattern):
        stfuse.load(copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda(trio):
    with pytest.raises(ArtifactError, match="CUDA is not available"):
        stfuse.load(trio[1], device="cuda")


# ---------------------------------------------------------------------------- saving

def test_save_replaces_an_artifact_but_nothing_else(trio, tmp_path):
    fused, _ = trio
    target = tmp_path / "a"
    fused.save(target)
    first = (target / "manifest.json").read_text()
    fused.save(target)  # replaced whole: the result loads
    assert stfuse.load(target).tenants == fused.tenants
    assert json.loads(first)["files"].keys() == json.loads((target / "manifest.json").read_text())["files"].keys()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not an stfuse artifact; refusing to overwrite"):
        fused.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_save_rejects_bad_subsets_and_fx_tenants(tmp_path):
    torch.manual_seed(0)
    fused = stfuse.compile([zoo.mlp(8, 16, 2), zoo.mlp(8, 16, 2)], [torch.randn(2, 8), torch.randn(2, 8)])
    with pytest.raises(StfuseError, match=r"subset \['0', 'z'\]"):
        fused.save(tmp_path / "s", subsets=[("0", "z")])
    fused._tenants["1"].method = "fx"  # as if torch.export had failed for it
    with pytest.raises(ArtifactError, match="tenant '1' was traced with torch.fx"):
        fused.save(tmp_path / "f")
    assert not (tmp_path / "s").exists() and not (tmp_path / "f").exists()


def test_loaded_program_checks_the_traced_batch_range(tmp_path):
    """Traced at 4, the graph holds for batch 1-4 only (issue 11, item 6): the manifest
    records the range; the loaded program has no model to trace again, so a call
    outside the range raises, naming tenant, argument, range and batch."""
    torch.manual_seed(0)
    models = {"br": BranchOnBatch().eval(), "mlp": zoo.mlp(8, 16, 8)}
    fused = stfuse.compile(models, {"br": torch.randn(4, 8), "mlp": torch.randn(4, 8)})
    fused.save(tmp_path / "br")
    m = json.loads((tmp_path / "br" / "manifest.json").read_text())
    assert [t["batch_range"] for t in m["tenants"]] == [[1, 4], [1, None]]
    prog = stfuse.load(tmp_path / "br")
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    assert _equal(prog(x, y), fused(x, y))
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    with pytest.raises(InputError, match=r"tenant 'br', argument 0 \(x\): batch size 8 is outside "
                                         r"the range \[1, 4\]"):
        prog(x, y)
    assert_close(prog.run({"mlp": y})["mlp"], fused.run({"mlp": y})["mlp"])  # other tenants still run
    assert_close(fused(x, y)[0], models["br"](x))  # the compiled program traces it again


# ---------------------------------------------------------------------------- keyword inputs


def test_version_2_manifest_with_an_args_only_spec_still_loads(trio, copy):
    """Version 2 recorded each tenant's args tuple alone; it is read as (args, {})."""
    import torch.utils._pytree as pytree

    def downgrade(m):
        m["format_version"] = 2
        for t in m["tenants"]:
            args, _ = pytree.tree_unflatten([0] * len(t["inputs"]), pytree.treespec_loads(t["in_spec"]))
            t["in_spec"] = pytree.treespec_dumps(pytree.tree_structure(args))
    _edit_manifest(copy, downgrade)
    prog, args = stfuse.load(copy), _args()
    assert _equal(prog(*args), trio[0](*args))


def test_input_spec_that_is_not_a_call_is_refused(copy):
    import torch.utils._pytree as pytree

    _edit_manifest(copy, lambda m: m["tenants"][0].update(
        in_spec=pytree.treespec_dumps(pytree.tree_structure([0]))))
    with pytest.raises(ArtifactError, match=r"tenant 'm1': its input spec is not a call \(args, kwargs\)"):
        stfuse.load(copy)


def test_keyword_tenant_round_trip(tmp_path):
    """A BERT tenant called with keywords: the manifest records its call spec, and the loaded
    program takes the same keywords (in any order) and names a missing one."""
    pytest.importorskip("transformers")
    from conftest import bert_call

    models = {"bert": zoo.hf_model("bert", 0)[0], "mlp": zoo.mlp(8, 16, 4)}
    fused = stfuse.compile(models, {"bert": bert_call(2, 8), "mlp": torch.randn(2, 8)})
    fused.save(tmp_path / "kw", example_inputs={"bert": bert_call(2, 8)})
    m = json.loads((tmp_path / "kw" / "manifest.json").read_text())
    assert m["tenants"][0]["inputs"][0]["value_range"][0] >= 3  # token ids, in spec order
    prog = stfuse.load(tmp_path / "kw")
    assert [s.keyword for s in prog.specs["bert"].inputs] == ["input_ids", "attention_mask"]
    call, x = bert_call(3, 8, seed=4), torch.randn(3, 8)
    assert _equal(prog.run({"bert": dict(reversed(list(call.items()))), "mlp": x}),
                  fused.run({"bert": call, "mlp": x}))
    with pytest.raises(InputError, match=r"tenant 'bert': missing keyword argument\(s\) 'attention_mask'"):
        prog.run({"bert": {"input_ids": call["input_ids"]}})


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, scale=1.0, act="relu"):
        y = self.lin(x) * scale
        return torch.relu(y) if act == "relu" else torch.tanh(y)


def test_constant_keywords_round_trip(tmp_path, capsys):
    """A tenant compiled with constant keywords (calls.split_constants): the manifest records
    them, and the loaded program checks every call against them as the compiled one does."""
    torch.manual_seed(0)
    models = {"a": _Scaled().eval(), "b": _Scaled().eval()}
    calls = {"a": {"x": torch.randn(2, 8), "scale": 0.5, "act": "tanh"}, "b": {"x": torch.randn(2, 8), "scale": 3}}
    fused = stfuse.compile(models, calls, tune="off")
    fused.save(tmp_path / "c")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [t["constants"] for t in m["tenants"]] == [{"scale": 0.5, "act": "tanh"}, {"scale": 3}]
    prog = stfuse.load(tmp_path / "c")
    assert prog.specs["b"].constants == {"scale": 3}
    from stfuse.cli import main

    assert main(["inspect", str(tmp_path / "c")]) == 0
    assert "in: Tensor[B, 8] float32 on cpu, scale=0.5, act='tanh'" in capsys.readouterr().out
    assert _equal(prog.run(calls), fused.run(calls))
    with pytest.raises(InputError, match=r"tenant 'b': keyword argument\(s\) scale=3.0, where the program was "
                                         r"compiled for scale=3"):
        prog.run({"b": {"x": torch.randn(2, 8), "scale": 3.0}})
    with pytest.raises(InputError, match=r"tenant 'a': missing keyword argument\(s\) 'act'"):
        prog.run({"a": {"x": torch.randn(2, 8), "scale": 0.5}})
    for bad, match in ((["x"], r"tenants\[1\].constants\['scale'\]: expected a boolean, number or string"),
                       ({"x": 1}, r"tenant 'b': keyword\(s\) \['x'\] are both inputs and constants")):
        _edit_manifest(tmp_path / "c", lambda m: m["tenants"][1].update(
            constants={"scale": bad} if isinstance(bad, list) else bad))
        with pytest.raises(ArtifactError, match=match):
            stfuse.load(tmp_path / "c")


@torch.library.custom_op("stfuse_test::triple", mutates_args=())
def _triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@_triple.register_fake
def _(x):
    return torch.empty_like(x)


class CallsALibraryOp(torch.nn.Module):
    """A model that calls another library's custom op (as transformers' MoE layers do)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return _triple(self.lin(x))


def test_save_refuses_a_program_that_load_would_refuse(tmp_path):
    """Found with Mixtral: its grouped_mm op saved fine and the artifact then failed to
    load. save() now runs the loader's allow-list check and names the op."""
    torch.manual_seed(0)
    models = [CallsALibraryOp().eval() for _ in range(2)]
    fused = stfuse.compile(models, [(torch.randn(2, 4),)] * 2)
    with pytest.raises(ArtifactError, match=r"calls torch\.ops\.stfuse_test\.triple\.default: an artifact may "
                                            r"call only aten and stfuse ops"):
        fused.save(tmp_path / "m.stfuse")
    assert not (tmp_path / "m.stfuse").exists()
