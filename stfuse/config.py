"""Debug switches and settings read from the environment, all in one place.

STFUSE_DEBUG=1        print each pass's name, time and graph size; dump graphs to STFUSE_DUMP_DIR
STFUSE_DUMP_DIR       where STFUSE_DEBUG dumps pass graphs (default: ./stfuse_debug)
STFUSE_CACHE_DIR      where generated kernel sources are cached (default: ~/.cache/stfuse)
STFUSE_DEVICE_MODEL   override the cost model's device ("cpu" or "cuda")
"""

from __future__ import annotations

import os
from pathlib import Path


def debug() -> bool:
    return os.environ.get("STFUSE_DEBUG", "") not in ("", "0")


def dump_dir() -> Path:
    return Path(os.environ.get("STFUSE_DUMP_DIR", "stfuse_debug"))


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stfuse"
    return Path(os.environ.get("STFUSE_CACHE_DIR", default))


def device_model_override() -> str | None:
    return os.environ.get("STFUSE_DEVICE_MODEL") or None
