"""Timing candidate programs on the device, and the per-device cache of what was timed.

``time_pair(first, second, device)`` times two ways of computing one thing (a
fused group and its members run apart; a fused program and the tenants' own
programs): both are warmed up until their times settle, then timed in turns, each sample a run of calls
long enough for the clock, and the medians are returned in microseconds.
Taking turns puts both under the same noise from other processes; the median
drops the samples a context switch spoiled. On CUDA a sample is timed by two
events around the calls (host launch gaps included: they are what fusing saves).

``TimingCache`` keeps measurements in one JSON file per device identity (device
name, torch version, thread count) under ``config.cache_dir()/tuning``, written
atomically; an unreadable or malformed file reads as empty (and is replaced on
the next write), so a corrupt cache costs a measurement, never a compile.
Timings taken while the machine is overloaded (``busy``), or while other processes
used more than half a core (``OthersMeter``), are used but not kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from stfuse import config

from .codegen import write_atomic

log = logging.getLogger(__name__)

# A candidate gets about this much wall time once warm; at least MIN_REPEATS samples
# each side, at most MAX_REPEATS. 4 ms covers 25+ turns of a 50-us group on CPU;
# groups of big GEMMs take their minimum 3 turns (3 x 2 x 10 ms for BERT's FFN x 4).
BUDGET_MS = 4.0
MIN_REPEATS, MAX_REPEATS = 3, 25
SAMPLE_S = 100e-6  # a sample runs enough calls to last this long (perf_counter's jitter is ~1 us)
# Turns end early once the caller's decision is plain: from SETTLED_TURNS turns on, once
# every sample of the first side is under ``decide_at`` times every sample of the second,
# or every one over it. A group is kept where fused < (1 - cost.MARGIN) x apart, so a
# group 20% faster, or no faster at all, is told in 5 turns, not 25. By chance alone 5
# samples each fall wholly on one side 1 time in 126, and only where the true ratio is
# near ``decide_at``, where either decision costs little.
SETTLED_TURNS = 5
WARM_UP_MIN, WARM_UP_MAX, WARM_UP_S = 2, 20, 0.2  # turns (one call of each) before timing

CACHE_VERSION = 1


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _sample(fn: Callable, number: int, device: torch.device, sync) -> float:
    """Seconds for ``number`` calls of fn."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - t


def _warm_up(first: Callable, second: Callable, device: torch.device, sync) -> float:
    """Call both in turns until a turn is no faster than 0.8x the best before it (at
    least WARM_UP_MIN turns, at most WARM_UP_MAX or WARM_UP_S); returns the best turn's
    seconds. First calls allocate, initialise and compile (Triton's JIT); on the loaded
    2-core CPU the first calls of a 2-thread op took 12, 23 and 17 ms and then 0.007
    (a waking OpenMP thread waits for a core), and a sample sized by them was all slow."""
    best, start = math.inf, time.perf_counter()
    for turn in range(WARM_UP_MAX):
        t = _sample(first, 1, device, sync) + _sample(second, 1, device, sync)
        settled = turn >= WARM_UP_MIN - 1 and t >= 0.8 * best
        best = min(best, t)
        if settled or time.perf_counter() - start > WARM_UP_S:
            break
    return best


def time_pair(first: Callable, second: Callable, device: torch.device, what: str = "",
              budget_ms: float = BUDGET_MS, decide_at: float = 1.0) -> tuple[float, float]:
    """(median us of one call of ``first``, of ``second``), timed in turns on ``device``:
    fewer where the caller's decision, whether ``first`` takes under ``decide_at`` times
    what ``second`` takes, is plain from SETTLED_TURNS turns on.

    ``what`` names the pair (a group's op class and members, or "program") for a
    caller that replaces this function, as the tests do; it is not used here.
    """
    sync = _sync(device)
    with torch.no_grad():
        once = max(_warm_up(first, second, device, sync), 1e-7)
        number = max(1, math.ceil(SAMPLE_S / once))
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(budget_ms * 1e-3 / (once * number))))
        a, b = [], []
        for turn in range(repeats):
            a.append(_sample(first, number, device, sync))
            b.append(_sample(second, number, device, sync))
            if turn + 1 >= SETTLED_TURNS and (max(a) < decide_at * min(b) or min(a) > decide_at * max(b)):
                break
    return statistics.median(a) * 1e6 / number, statistics.median(b) * 1e6 / number


def median_us(fn: Callable, device: torch.device, budget_ms: float = BUDGET_MS) -> float:
    """Median us of one call of ``fn`` (time_pair with itself as the partner)."""
    return time_pair(fn, fn, device, budget_ms=budget_ms)[0]


# ---------------------------------------------------------------------------- the cache


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_identity(device: torch.device) -> dict:
    """What a measurement depends on besides the program: the device, torch, the threads,
    and on CPU which GEMM library its linears are bound to (kernels/cpu_gemm.py: the
    configured mode, so a plan timed with one library is not reused under another)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    identity = {"type": device.type, "name": name, "torch": torch.__version__,
                "threads": torch.get_num_threads()}
    if device.type == "cpu":
        identity["cpu_gemm"] = config.cpu_gemm_mode()
        # convs bound to oneDNN's as well (kernels/cpu_conv.py), and grouped linears and
        # convs member by member (kernels/bind.py): timings taken before ran aten's, so
        # they are not reused
        identity["cpu_conv"] = "onednn"
        identity["cpu_grouped"] = "onednn"
    return identity


def _valid(data) -> bool:
    return (isinstance(data, dict) and data.get("version") == CACHE_VERSION
            and isinstance(data.get("entries"), dict)
            and all(isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                and math.isfinite(x) for x in v.values())
                    for v in data["entries"].values()))


def busy() -> str | None:
    """Why timings taken now should not be kept, or None: other processes want more
    cores than there are. On the 2-core machine at a load average of 7, a 2-thread
    baddbmm took 20 ms a call for minutes (its second thread waits for a core at every
    parallel region) against 7 us when quiet: a plan timed then is right only then."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cpus = os.cpu_count() or 1
    return f"load average {load:.1f} on {cpus} CPUs" if load > cpus + 0.5 else None


class OthersMeter:
    """CPU that other processes used since it was made, in cores, from /proc/stat (Linux;
    None elsewhere). The load average lags by a minute: at a load of 10 from processes
    that had just started, busy() saw none of it, and plans timed then filled the cache."""

    LIMIT = 0.5  # cores; a quiet machine reads under 0.1

    def __init__(self):
        self.start = self._sample()
        self.wall = time.perf_counter()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        # all but idle and iowait, then this process's user + system time
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def cores(self) -> float | None:
        now, wall = self._sample(), time.perf_counter() - self.wall
        if self.start is None or now is None or wall < 0.05:  # /proc/stat counts 10 ms ticks
            return None
        return max(0.0, (now[0] - self.start[0]) - (now[1] - self.start[1])) / wall

    def reason(self) -> str | None:
        """Why timings taken since should not be kept, or None."""
        cores = self.cores()
        return None if cores is None or cores <= self.LIMIT else f"other processes used {cores:.1f} cores meanwhile"


class TimingCache:
    """Measurements of one device identity: key -> {name: number}, one JSON file.

    ``get``/``put`` work in memory; ``flush`` merges what was put into the file as it
    is now (another process may have added entries) and replaces it atomically.
    What is put while the machine is ``busy``, or flushed after other processes used
    more than OthersMeter.LIMIT cores since the cache was made, serves this compile
    only: ``unsaved`` says why it was not written.
    """

    def __init__(self, device: torch.device):
        self.identity = device_identity(device)
        text = json.dumps(self.identity, sort_keys=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{device.type}-{self.identity['name']}")[:48].strip("-")
        self.path = config.cache_dir() / "tuning" / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
        self.entries = self._read()
        self.added: dict[str, dict] = {}
        self.unsaved: str | None = None
        self._others = OthersMeter()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("stfuse: ignoring unreadable timing cache %s (%s)", self.path, err)
            return {}
        if not _valid(data) or data.get("identity") != self.identity:
            log.warning("stfuse: ignoring malformed timing cache %s", self.path)
            return {}
        return data["entries"]

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        reason = busy()
        if reason is None:
            self.added[key] = value
        else:
            self.unsaved = reason

    def flush(self) -> None:
        if not self.added:
            return
        reason = self._others.reason()
        if reason is not None:  # timed beside other work: right only for this compile
            self.unsaved, self.added = reason, {}
            return
        entries = {**self._read(), **self.added}
        data = {"version": CACHE_VERSION, "identity": self.identity, "entries": entries}
        try:
            write_atomic(self.path, json.dumps(data, indent=0, sort_keys=True))
        except OSError as err:  # a read-only cache directory costs measurements, not the compile
            log.warning("stfuse: could not write the timing cache %s (%s)", self.path, err)
        self.added = {}
