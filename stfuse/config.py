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


def tune_mode(value: str | None = None) -> str:
    """``value`` (stfuse.compile's ``tune``) checked, or STFUSE_TUNE, or DEFAULT_TUNE."""
    mode = value if value is not None else (os.environ.get("STFUSE_TUNE") or DEFAULT_TUNE)
    if mode not in TUNE_MODES:
        where = "tune" if value is not None else "STFUSE_TUNE"
        raise StfuseError(f"{where} must be one of {list(TUNE_MODES)}, got {mode!r}")
    return mode
