"""Debug switches and settings read from the environment, all in one place.

STFUSE_DEBUG=1        print each pass's name, time and graph size; dump graphs to STFUSE_DUMP_DIR
STFUSE_DUMP_DIR       where STFUSE_DEBUG dumps pass graphs (default: ./stfuse_debug)
STFUSE_CACHE_DIR      where generated kernel sources are cached (default: ~/.cache/stfuse)
STFUSE_DEVICE_MODEL   pin the cost model to the nominal constants of "cpu" or "cuda"
                      (passes/cost.DEVICES) instead of the measured device profile
STFUSE_TUNE           default of stfuse.compile(tune=...): "measure" (default), "model"
                      or "off" (passes/tune.py)
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


def device_model_override() -> str | None:
    return os.environ.get("STFUSE_DEVICE_MODEL") or None


TUNE_MODES = ("measure", "model", "off")
# "measure" by default: on the 2-core CPU the model kept conv groups that lose and
# dropped most transformer groups that win (benchmarks/RESULTS.md, "Measured plan
# selection"); measuring costs a fraction of a compile once, then nothing (cached).
DEFAULT_TUNE = "measure"


def tune_mode(value: str | None = None) -> str:
    """``value`` (stfuse.compile's ``tune``) checked, or STFUSE_TUNE, or DEFAULT_TUNE."""
    mode = value if value is not None else (os.environ.get("STFUSE_TUNE") or DEFAULT_TUNE)
    if mode not in TUNE_MODES:
        where = "tune" if value is not None else "STFUSE_TUNE"
        raise StfuseError(f"{where} must be one of {list(TUNE_MODES)}, got {mode!r}")
    return mode
