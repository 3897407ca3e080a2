"""Hostile artifacts: every attack is built, rehashed as a deliberate attacker would, and
loaded in a child process (``stfuse.load`` and ``stfuse run``); no payload may ever run
(its marker file never appears) and each load must end in an ArtifactError.

The payloads target torch's readers: pickles (``torch.load`` falls back to a full
unpickle), zip archives that Python's ``zipfile`` and torch's miniz read differently
(NUL bytes in names, duplicate names, zip64 and data descriptors), code in the strings
torch evaluates (sympy expressions, guards) and callables outside the op allow-list.
"""

import io
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.artifact import ArtifactError

from conftest import rehash, saved_mlp_pair

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_mlp_pair(tmp_path_factory, "sec")


class _Payload:
    """Unpickling this creates ``marker``: the proof that artifact bytes ran as code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _pickle(marker) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=2)


def _torch_save_zip(marker) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "x": _Payload(marker)}, buf)
    return buf.getvalue()


def _pt2_archive(fused, tmp) -> dict[str, bytes]:
    """The entries of a real torch.export.save archive of a weightless program."""
    ep = torch.export.export(torch.nn.ReLU(), (torch.randn(2, 3),))
    f = tmp / "real.pt2"
    torch.export.save(ep, f)
    with zipfile.ZipFile(f) as z:
        return {n: z.read(n) for n in z.namelist()}


def _zip(entries: list[tuple[str, bytes]], *, zip64=False, descriptor=False) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in entries:
            if descriptor or zip64:  # streamed entries carry data descriptors after their data
                with z.open(zipfile.ZipInfo(name), "w", force_zip64=zip64) as w:
                    w.write(data)
            else:
                z.writestr(name, data)
    return out.getvalue()


def _with_nul(entries, target: str) -> bytes:
    """A zip whose entry ``target`` is named ``<target>\\0x`` in its raw bytes: zipfile
    cuts the name at the NUL, miniz keeps it whole."""
    placeholder = target[:-1] + "#" + "x" * 2
    blob = bytearray(_zip([(placeholder if n == target else n, d) for n, d in entries]))
    raw = (target + "\0x").encode()
    assert len(raw) == len(placeholder.encode())
    return bytes(blob.replace(placeholder.encode(), raw))


def _attacks(fused, tmp, marker_for):
    """name -> (file in the artifact to replace, its hostile bytes); each payload creates
    ``marker_for(name)`` if it ever runs."""
    arc = _pt2_archive(fused, tmp)
    prefix = next(iter(arc)).split("/")[0]
    sample = f"{prefix}/data/sample_inputs/model.pt"
    real = [(n, d) for n, d in arc.items() if n != sample]
    weights_cfg = f"{prefix}/data/weights/model_weights_config.json"
    weights_json = json.dumps({"config": {"w": {"path_name": "weight_0", "is_param": True,
                                                "use_pickle": True, "tensor_meta": None}}}).encode()
    pickled_weights = [(n, weights_json if n == weights_cfg else d) for n, d in real]
    builders = {
        "nul_name": lambda p: _with_nul(real + [(sample, p)], sample),
        "duplicate_payload_first": lambda p: _zip([(sample, p), (sample, b"")] + real),
        "duplicate_payload_last": lambda p: _zip(real + [(sample, b""), (sample, p)]),
        "pickle_in_sample_inputs": lambda p: _zip(real + [(sample, p)]),
        "pickle_format_weights": lambda p: _zip(pickled_weights + [(f"{prefix}/data/weights/weight_0", p)]),
        "raw_pickle": lambda p: p,
        "zip64": lambda p: _zip(real + [(sample, p)], zip64=True),
        "data_descriptor": lambda p: _zip(real + [(sample, p)], descriptor=True),
    }
    out = {name: ("programs/full.json", build(_pickle(marker_for(name)))) for name, build in builders.items()}
    out["legacy_model_pt"] = ("programs/full.json", _torch_save_zip(marker_for("legacy_model_pt")))
    out["torch_save_zip_as_weights"] = ("weights.safetensors", _torch_save_zip(marker_for("torch_save_zip_as_weights")))
    out["pickle_as_plan"] = ("plan.json", _pickle(marker_for("pickle_as_plan")))
    out["pickle_as_manifest_file"] = ("programs/tenant_0.json", _pickle(marker_for("pickle_as_manifest_file")))
    return out


CHILD = textwrap.dedent("""
    import subprocess, sys
    import torch
    import stfuse
    from stfuse.artifact import ArtifactError

    for path in sys.argv[1:]:
        try:
            prog = stfuse.load(path)
            prog(torch.randn(2, 8), torch.randn(2, 8))
            print(path, "LOADED")
        except ArtifactError as err:
            print(path, "REFUSED", str(err).replace("\\n", " ")[:200])
        cli = subprocess.run([sys.executable, "-m", "stfuse.cli", "run", path, "-q", "--repeat", "1"],
                             capture_output=True, text=True)
        print(path, "CLI", cli.returncode, cli.stderr.strip().count("\\n"))
""")


def _load_in_child(paths) -> dict[str, str]:
    child = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True,
                           text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    lines = {}
    for line in child.stdout.splitlines():
        path, kind, rest = line.split(" ", 2)
        lines[(path, kind)] = rest
    return lines


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_hostile_files_never_run(saved, tmp_path):
    fused, good = saved
    dirs = {}
    for name, (target, data) in _attacks(fused, tmp_path, lambda n: tmp_path / f"pwned_{n}").items():
        d = dirs[name] = tmp_path / name
        shutil.copytree(good, d)
        (d / target).write_bytes(data)
        rehash(d, target)
    lines = _load_in_child(dirs.values())
    for name, d in dirs.items():
        assert not (tmp_path / f"pwned_{name}").exists(), f"{name}: the payload ran"
        assert lines[(str(d), "REFUSED")], name
        code, traceback_lines = lines[(str(d), "CLI")].split()
        assert code == "1" and traceback_lines == "0", f"{name}: stfuse run exit {code}, not one line"


def test_payload_markers_do_work(tmp_path):
    """The payloads are live: unpickling one does create its marker (else the test above
    could pass for the wrong reason)."""
    marker = tmp_path / "live"
    pickle.loads(_pickle(marker))  # noqa: S301 - our own payload, on purpose
    assert marker.exists()


def _edit_program(path, fn, name="programs/full.json"):
    model = json.loads((path / name).read_text())
    fn(model)
    (path / name).write_text(json.dumps(model))
    rehash(path, name)


def _first_node(model):
    return model["graph_module"]["graph"]["nodes"][0]


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: _first_node(m).update(target="builtins.exec"), "calls 'builtins.exec', outside the ops"),
    (lambda m: _first_node(m).update(target="torch.ops.aten.from_file.default"), "outside the ops"),
    (lambda m: _first_node(m).update(target="#torchbind.evil"), "outside the ops"),
    (lambda m: _first_node(m)["inputs"][0].update(arg={"as_graph": {"graph": {}}}), "argument kind 'as_graph'"),
    (lambda m: _first_node(m)["inputs"][0].update(arg={"as_custom_obj": {"name": "x"}}),
     "argument kind 'as_custom_obj'"),
    (lambda m: m["graph_module"]["graph"].update(custom_obj_values={"x": {}}), "custom objects"),
    (lambda m: m["graph_module"]["signature"]["input_specs"].__setitem__(
        0, {"parameter": {"arg": {"name": "w"}, "parameter_name": "w"}}), "takes parameters"),
    (lambda m: m.update(range_constraints={"__import__('os')": {"min_val": 1, "max_val": None}}),
     "refused symbol name"),
    (lambda m: m.update(verifiers=["EVIL"]), "unknown verifier"),
    (lambda m: m.update(graph_module=[]), "expected an object"),
])
def test_program_outside_the_allow_list_is_refused_before_torch_reads_it(saved, tmp_path, monkeypatch,
                                                                         edit, pattern):
    """Checked on the JSON itself: torch's deserialiser is never called."""
    from torch._export.serde import serialize

    d = tmp_path / "a"
    shutil.copytree(saved[1], d)
    _edit_program(d, edit)

    def never(*args, **kwargs):
        raise AssertionError("torch deserialised a program that should have been refused")
    monkeypatch.setattr(serialize, "deserialize", never)
    with pytest.raises(ArtifactError, match=pattern):
        stfuse.load(d)


def test_code_in_expressions_is_refused_and_guards_never_run(saved, tmp_path):
    """torch sympifies ``expr_str`` while deserialising: code there is refused. Guards
    (which ExportedProgram.module() would exec) are dropped unread: the artifact loads."""
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    expr = tmp_path / "expr"
    shutil.copytree(saved[1], expr)

    def inject(model):
        text = json.dumps(model)
        assert "expr_str" in text
        model.update(json.loads(text.replace('"expr_str": "', '"expr_str": "' + code.replace('"', '\\"') + ' + ', 1)))
    _edit_program(expr, inject)
    with pytest.raises(ArtifactError, match="refused symbolic expression"):
        stfuse.load(expr)
    guards = tmp_path / "guards"
    shutil.copytree(saved[1], guards)

    def add_guards(model):
        model["guards_code"] = [code]
        _first_node(model)["metadata"] = {"source_fn_stack": "x,os.system"}
    _edit_program(guards, add_guards)
    prog = stfuse.load(guards)
    prog.program.recompile()
    prog(torch.randn(2, 8), torch.randn(2, 8))
    assert not marker.exists()


def test_version_1_archives_are_refused(saved, tmp_path):
    d = tmp_path / "v1"
    shutil.copytree(saved[1], d)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 1 stores programs as zip archives"):
        stfuse.load(d)


# ---------------------------------------------------------------------------- malformed

def _manifest_edit(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _deep(m):
    m["versions"] = "x"  # replaced below by raw text: JSON nested 200 000 levels


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m["files"].update({"plan.json": "x"}), r"files\['plan.json'\]: expected an object"),
    (lambda m: m.update(programs=[]), "programs: expected an object"),
    (lambda m: m.update(tenants={}), "tenants: expected a list"),
    (lambda m: m["tenants"][0].update(name="a:b"), "cannot contain ':'"),
    (lambda m: m["tenants"][1].update(name=m["tenants"][0]["name"]), "empty or repeated"),
    (lambda m: m["tenants"][0]["inputs"][0].update(dtype="object"), "invalid dtype"),
    (lambda m: m["tenants"][0].update(batch=True), "batch: expected an integer"),
    (lambda m: next(iter(m["programs"].values())).update(weights=["nope"]), "weights the manifest"),
    (lambda m: next(iter(m["tensors"].values())).update(stride=[-1, 1]), "does not fit its storage"),
    (lambda m: next(iter(m["tensors"].values())).update(offset=10 ** 30), "does not fit its storage"),
    (lambda m: m.update(format_version="2"), "invalid format version"),
    (lambda m: m["tenants"][0].update(batch_range=[3, 1]), "invalid batch range"),
    (lambda m: m["tenants"][0].update(batch_range=[1]), "batch_range: expected a list of 2"),
])
def test_malformed_manifest(saved, tmp_path, edit, pattern):
    d = tmp_path / "m"
    shutil.copytree(saved[1], d)
    _manifest_edit(d, edit)
    with pytest.raises(ArtifactError, match=pattern):
        stfuse.load(d)


def test_deeply_nested_manifest(saved, tmp_path):
    d = tmp_path / "deep"
    shutil.copytree(saved[1], d)
    (d / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        stfuse.load(d)


@pytest.mark.parametrize("edit, pattern", [
    (lambda p: p["groups"][0].pop("op_class"), r"groups\[0\]: missing field 'op_class'"),
    (lambda p: p["stats"].update(coverage="all"), "coverage: expected a number"),
    (lambda p: next(iter(p["tenants"].values()))["edges"].append([0, 999]), "edge to a node"),
    (lambda p: p.update(passes=None), "passes: expected a list"),
    (lambda p: p["stats"].update(rows_independent={"0": "yes"}), "expected a boolean"),
])
def test_malformed_plan(saved, tmp_path, edit, pattern):
    """Refused by load and by ``stfuse inspect`` (one line, exit 1), not a KeyError later."""
    from stfuse.cli import main

    d = tmp_path / "p"
    shutil.copytree(saved[1], d)
    plan = json.loads((d / "plan.json").read_text())
    edit(plan)
    (d / "plan.json").write_text(json.dumps(plan))
    rehash(d, "plan.json")
    with pytest.raises(ArtifactError, match=pattern):
        stfuse.load(d)
    assert main(["inspect", str(d)]) == 1


def test_weight_of_the_wrong_shape_fails_at_load(saved, tmp_path):
    """A view that fits its storage but not the program is refused at load, not at call."""
    d = tmp_path / "w"
    shutil.copytree(saved[1], d)

    def shrink(m):
        t = m["tensors"][m["programs"]["full"]["weights"][0]]
        t["shape"][-1] -= 1
    _manifest_edit(d, shrink)
    with pytest.raises(ArtifactError, match="weight 0 is"):
        stfuse.load(d)


# ---------------------------------------------------------------------------- names and saving

@pytest.mark.parametrize("names", [("café", "naïve"), ("模型", "🙂 tenant"), ("a b", "x.y/z")])
def test_unicode_tenant_names_round_trip(tmp_path, names):
    torch.manual_seed(0)
    models = {n: zoo.mlp(8, 16, 4) for n in names}
    fused = stfuse.compile(models, {n: torch.randn(3, 8) for n in names})
    fused.save(tmp_path / "u")
    prog = stfuse.load(tmp_path / "u")
    assert prog.tenants == list(names)
    x = torch.randn(5, 8)
    out = prog.run({names[1]: x})
    torch.testing.assert_close(out[names[1]], fused.run({names[1]: x})[names[1]])


@pytest.mark.parametrize("name, pattern", [("a:b", "cannot contain ':'"), ("", "non-empty"),
                                           ("tab\there", "control characters"), (3, "non-empty strings")])
def test_bad_tenant_names_fail_at_compile(name, pattern):
    with pytest.raises(stfuse.StfuseError, match=pattern):
        stfuse.compile({name: zoo.mlp(8, 16, 4)}, {name: torch.randn(2, 8)})


def test_save_killed_leaves_nothing_behind(saved, tmp_path):
    """A save killed by SIGKILL mid-way leaves its temporary directory; the next save at
    that path removes it (only directories stfuse made, whose process is gone)."""
    fused, _ = saved
    target = tmp_path / "art"
    script = textwrap.dedent(f"""
        import os, signal, torch, stfuse
        from stfuse import zoo
        torch.manual_seed(0)
        fused = stfuse.compile([zoo.mlp(8, 16, 4), zoo.mlp(8, 16, 4)], [torch.randn(3, 8), torch.randn(3, 8)])
        def die(msg):
            if msg.startswith("writing"):
                os.kill(os.getpid(), signal.SIGKILL)
        fused.save({str(target)!r}, progress=die)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    assert child.returncode == -9
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")]
    assert left, "the killed save left no temporary directory: the test proves nothing"
    (tmp_path / ".art.notours").mkdir()  # not made by stfuse: kept
    fused.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.notours", "art"]
    assert stfuse.load(target).tenants == fused.tenants


def test_save_into_an_unwritable_place(saved, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write an artifact"):
        saved[0].save(blocker / "sub" / "art")
