"""The stfuse command line: compile -> inspect -> run end to end on the bundled
example, factories from a file, --help everywhere, and exit codes for errors."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import stfuse
from stfuse.cli import main

from conftest import saved_mlp_pair

pytest.importorskip("safetensors")


def _stfuse(*args, cwd):
    exe = shutil.which("stfuse")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from stfuse.cli import main; sys.exit(main())"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_end_to_end_on_the_bundled_example(tmp_path):
    out = tmp_path / "demo_art"
    comp = _stfuse("compile", "stfuse.demo:tenants", "-o", out, "--subset", "mlp_a,cnn_a", cwd=tmp_path)
    assert comp.returncode == 0, comp.stderr
    assert "exporting program full (1/" in comp.stderr and "saved" in comp.stderr  # progress lines
    assert "coverage" in comp.stdout and f"saved {out}" in comp.stdout

    insp = _stfuse("inspect", out, "--kernels", "--draw", tmp_path / "plan.png", cwd=tmp_path)
    assert insp.returncode == 0, insp.stderr
    lines = insp.stdout.splitlines()
    assert "sha256 verified" in insp.stdout and any(ln.startswith("tenants   4") for ln in lines)
    for name in ("mlp_a", "mlp_b", "cnn_a", "cnn_b"):
        assert any(ln.strip().startswith(name) and "Tensor[B, " in ln for ln in lines), name
    assert "subset_0 [mlp_a, cnn_a]" in insp.stdout
    assert any(ln.startswith("launches before") for ln in lines)
    assert any(ln.startswith("FLOPs") and "FLOP per call" in ln for ln in lines)
    assert "# ---- kernel stacked_conv2d" in insp.stdout
    assert (tmp_path / "plan.png").stat().st_size > 10_000

    run = _stfuse("run", out, "--batch", "3", "--repeat", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for name in ("mlp_a", "mlp_b", "cnn_a", "cnn_b"):
        assert f"{name}" in run.stdout
    assert run.stdout.count("[3, 10] float32") == 4
    assert "NOT FINITE" not in run.stdout  # every output a real number
    assert "ran 4 tenants: median" in run.stdout


FACTORIES = textwrap.dedent("""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids)).mean(1)

    def make():
        torch.manual_seed(0)
        return Tiny(), (torch.tensor([[10, 19, 12, 15, 11], [13, 14, 18, 16, 17]]),)

    def not_a_pair():
        return Tiny()
""")


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "my_factories.py"
    path.write_text(FACTORIES)
    return path


def test_compile_named_factories_from_a_file_then_run_one(tmp_path, factories, capsys):
    out = tmp_path / "tiny"
    assert main(["compile", f"left={factories}:make", f"right={factories}:make", "-o", str(out), "-q"]) == 0
    assert "saved" in capsys.readouterr().out
    prog = stfuse.load(out)
    assert prog.tenants == ["left", "right"]
    ranges = [t["inputs"][0]["value_range"] for t in prog.manifest["tenants"]]
    assert ranges == [[10, 19], [10, 19]]  # `stfuse run` draws token ids from here
    assert main(["run", str(out), "--tenants", "right", "-q"]) == 0
    text = capsys.readouterr().out
    assert "right" in text and "left" not in text and "ran 1 tenants" in text


@pytest.mark.parametrize("argv, code, message", [
    (["inspect", "{tmp}/nothing"], 1, "not an stfuse artifact"),
    (["run", "{tmp}/nothing"], 1, "not an stfuse artifact"),
    (["compile", "no_such_module_xyz:f", "-o", "{tmp}/o"], 1, "cannot load the factory"),
    (["compile", "justtext", "-o", "{tmp}/o"], 1, "expected [NAME=]MODULE:FACTORY"),
    (["compile", "{factories}:not_a_pair", "-o", "{tmp}/o"], 1, "a factory returns (model, example_inputs)"),
    (["compile", "{factories}:make", "{factories}:make", "-o", "{tmp}/o"], 1, "tenant name 'make' is used twice"),
    (["kernels", "--kernels", "gemm,convv", "-q"], 1, "unknown kernel ['convv']"),
])
def test_errors_exit_1_with_a_message(tmp_path, factories, capsys, argv, code, message):
    argv = [a.format(tmp=tmp_path, factories=factories) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert f"stfuse {argv[0]}: error:" in err and message in err
    assert not (tmp_path / "o").exists()


def test_run_unknown_tenant(tmp_path, factories, capsys):
    out = tmp_path / "tiny"
    assert main(["compile", f"{factories}:make", "-o", str(out), "-q"]) == 0
    assert main(["run", str(out), "--tenants", "make,ghost", "-q"]) == 1
    assert "unknown tenant 'ghost'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["demo"], ["compile"], ["inspect"], ["run"], ["serve"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: stfuse") and "-h, --help" in text


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["compile", "stfuse.demo:tenants"])  # no -o
    assert exc.value.code == 2 and "-o/--output" in capsys.readouterr().err


def test_demo_still_works(capsys):
    assert main(["demo", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "outputs match eager" in out and "speed-up" in out


# ---------------------------------------------------------------------------- user errors

@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    return saved_mlp_pair(tmp_path_factory, "cli")[1]


def _one_line_error(capsys, argv) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv, pattern", [
    (["run", "{art}", "--batch", "0"], "--batch: must be between 1 and"),
    (["run", "{art}", "--batch", "-1"], "--batch: must be between 1 and"),
    (["run", "{art}", "--batch", "one"], "--batch: expected an integer"),
    (["run", "{art}", "--batch", "100000", "--max-input-mb", "1", "-q"], "MiB, more than --max-input-mb 1;"),
    (["run", "{art}", "--repeat", "0"], "--repeat: must be between 1 and"),
    (["run", "{art}", "--tenants", "nobody", "-q"], "unknown tenant 'nobody'"),
    (["inspect", "{art}", "--draw", "plan.xyz"], "format comes from its suffix"),
    (["compile", "stfuse.demo:tenants", "-o", "{blocked}/sub/out", "-q"], "is not a writable directory"),
    (["compile", "{bad_import}:make", "-o", "{tmp}/o", "-q"], "importing .* raised RuntimeError: boom at import"),
    (["compile", "{bad_factory}:make", "-o", "{tmp}/o", "-q"], "the factory raised ValueError: no weights here"),
    (["compile", "{bad_factory}:missing", "-o", "{tmp}/o", "-q"], "cannot load the factory"),
    (["serve", "{art}", "--policy", "nope", "-q"], "--policy 'nope': policies are"),
    (["serve", "{art}", "--slo-ms", "0", "-q"], "--slo-ms '0': expected \\[NAME=\\]NUMBER, a finite number > 0"),
    (["serve", "{art}", "--slo-ms", "a=5", "10", "-q"], "give one MS for every model, or NAME=MS per model"),
    (["serve", "{art}", "--port", "70000"], "--port: must be between 0 and 65535"),
    (["serve", "{art}", "--replicas", "0"], "--replicas: must be between 1 and"),
    (["kernels", "--jobs", "0"], "--jobs: must be between 1 and"),
])
def test_user_errors_are_one_line(small_artifact, tmp_path, capsys, argv, pattern):
    """Exit status non-zero, one line on stderr naming what was wrong, no traceback."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    (tmp_path / "bad_import.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "bad_factory.py").write_text("def make():\n    raise ValueError('no weights here')\n")
    names = {"art": small_artifact, "blocked": blocked, "tmp": tmp_path,
             "bad_import": tmp_path / "bad_import.py", "bad_factory": tmp_path / "bad_factory.py"}
    code, err = _one_line_error(capsys, [a.format(**names) for a in argv])
    assert code in (1, 2), err
    assert len(err) == 1 and re.search(pattern, err[0]), err
    assert not (tmp_path / "o").exists()


def test_run_batch_is_used(small_artifact, capsys):
    assert main(["run", str(small_artifact), "--batch", "5", "--repeat", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("Tensor: [5, 4] float32") == 2


@pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None,
                    reason="needs the serve extra (pip install -e '.[serve]')")
def test_serve_refuses_a_port_in_use_and_unknown_slo_names_in_one_line(small_artifact, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        code, err = _one_line_error(capsys, ["serve", str(small_artifact), "--port", port, "-q"])
    assert code == 1 and len(err) == 1 and "Address already in use" in err[0], err
    code, err = _one_line_error(capsys, ["serve", str(small_artifact), "--port", "0", "--slo-ms", "zz=5", "-q"])
    assert code == 1 and len(err) == 1 and "--slo-ms names unknown model(s) ['zz']" in err[0], err
