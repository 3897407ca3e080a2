"""Debug switches and settings read from the environment, all in one place.

STFUSE_DEBUG=1        print each pass's name, time and graph size; dump graphs to STFUSE_DUMP_DIR
STFUSE_DUMP_DIR       where STFUSE_DEBUG dumps pass graphs (default: ./stfuse_debug)
STFUSE_CACHE_DIR      where generated kernel sources are cached (default: ~/.cache/stfuse)
STFUSE_DEVICE_MODEL   pin the cost model to the nominal constants of "cpu" or "cuda"
                      (passes/cost.DEVICES) instead of the measured device profile
STFUSE_TUNE           default of stfuse.compile(tune=...): "measure" (default), "model"
                      or "off" (passes/tune.py)
STFUSE_CUDA_GRAPHS    "0": CUDA programs run launch by launch, never as captured CUDA
                      graphs (kernels/graphs.py; on by default)
STFUSE_CODEGEN        default codegen of stfuse.compile, stfuse.load and the torch.compile
                      backend: "direct", "inductor" (kernels/inductor.py) or "auto" (the
                      faster, measured: passes/program_check.choose_codegen; load takes it as
                      "direct"); unset, the first two take "direct", the backend "inductor"
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import StfuseError


def debug() -> bool:
    return os.environ.get("STFUSE_DEBUG", "") not in ("", "0")


def dump_dir() -> Path:
    return Path(os.environ.get("STFUSE_DUMP_DIR", "stfuse_debug"))


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stfuse"
    return Path(os.environ.get("STFUSE_CACHE_DIR", default))


def cuda_graphs() -> bool:
    return os.environ.get("STFUSE_CUDA_GRAPHS", "1") not in ("", "0")


def device_model_override() -> str | None:
    return os.environ.get("STFUSE_DEVICE_MODEL") or None


TUNE_MODES = ("measure", "model", "off")
# "measure" by default (benchmarks/RESULTS.md, "bench_tune.py"; noisy, 1 thread, loaded
# 2-core CPU): its plans ran as fast as the model's or faster (ResNet-50 x4: 12.4 ms with
# no groups against 12.9 ms with the model's 53 packed groups; the demo's conv groups
# time 65 us fused against 53 apart, which the model kept), it is the only mode that
# can be right where the model's constants are guesses (CUDA), and it costs +5% to +33%
# of a cold compile once, then ~0 (the demo's tuning passes: 4 ms warm).
DEFAULT_TUNE = "measure"


def _choice(value, name: str, env: str, modes: tuple, default: str) -> str:
    """``value`` checked against ``modes``, or the environment variable ``env``, or ``default``."""
    mode = value if value is not None else (os.environ.get(env) or default)
    if not isinstance(mode, str) or mode not in modes:
        where = name if value is not None else env
        raise StfuseError(f"{where} must be one of {list(modes)}, got {mode!r}")
    return mode


def tune_mode(value: str | None = None) -> str:
    """``value`` (stfuse.compile's ``tune``) checked, or STFUSE_TUNE, or DEFAULT_TUNE."""
    return _choice(value, "tune", "STFUSE_TUNE", TUNE_MODES, DEFAULT_TUNE)


CODEGEN_MODES = ("direct", "inductor", "auto")  # auto: measured per program (passes/tune.py)
# "direct" by default: "inductor" compiles each program on its first call (seconds to
# minutes on a 2-core CPU, again per subset and per batch-1 call) and "auto" compiles the
# full program inside every stfuse.compile to time it; what Inductor gains over the direct
# kernels is the pointwise work between stfuse's groups, which the epilogue pass already
# folds where it can. No quiet-machine numbers show yet where that pays for the compile
# (benchmarks/bench_models.py: columns stfuse and stfuse+inductor); the default should
# follow them per device.
DEFAULT_CODEGEN = "direct"


CPU_GEMM_MODES = ("auto", "onednn", "mkl")


def cpu_gemm_mode() -> str:
    """STFUSE_CPU_GEMM checked, else "auto" (kernels/cpu_gemm.py)."""
    return _choice(None, "STFUSE_CPU_GEMM", "STFUSE_CPU_GEMM", CPU_GEMM_MODES, "auto")


def codegen_mode(value: str | None = None, default: str = DEFAULT_CODEGEN) -> str:
    """``value`` (``codegen`` of stfuse.compile / stfuse.load) checked, or STFUSE_CODEGEN,
    or ``default``."""
    return _choice(value, "codegen", "STFUSE_CODEGEN", CODEGEN_MODES, default)


def bound_codegen(value: str | None = None) -> str:
    """codegen_mode for what binds a program without compiling it (stfuse.load,
    FusedProgram.set_codegen): "auto" has nothing to time there and means "direct"."""
    mode = codegen_mode(value)
    return "direct" if mode == "auto" else mode


# The torch.compile backend's default: a user of backend="stfuse" compares it with
# backend="inductor", and a one-model graph has few cross-op groups to win back what
# direct aten calls lose against Inductor's code (issue 17: 5.17 ms against 3.55 ms
# for one BERT-small on the 2-core CPU). STFUSE_CODEGEN overrides it too.
BACKEND_CODEGEN = "inductor"
