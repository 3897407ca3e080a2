"""kernels/timing.py: the timing helper's protocol (never its numbers) and the cache."""

import json
import math

import pytest
import torch

from stfuse.kernels import timing

CPU = torch.device("cpu")


def _runs(seq):
    """[(name, length)] of consecutive equal entries."""
    out = []
    for x in seq:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return out


def test_time_pair_warms_up_then_takes_turns():
    seq = []
    f_us, a_us = timing.time_pair(lambda: seq.append("f"), lambda: seq.append("a"), CPU)
    runs = _runs(seq)
    assert [name for name, _ in runs] == ["f", "a"] * (len(runs) // 2)  # always in turns, first first
    assert seq.count("f") == seq.count("a")
    n = runs[-1][1]  # calls per sample; the warm-up calls one of each per turn
    samples = [length for _, length in runs[-2 * timing.MIN_REPEATS:]]
    assert samples == [n] * len(samples)
    assert len(seq) >= 2 * timing.WARM_UP_MIN + 2 * timing.MIN_REPEATS * n
    assert math.isfinite(f_us) and math.isfinite(a_us) and f_us > 0 and a_us > 0


def test_time_pair_caps_the_turns():
    seq = []
    timing.time_pair(lambda: seq.append("f"), lambda: seq.append("a"), CPU, budget_ms=1e6)
    runs = _runs(seq)
    n = runs[-1][1]
    timed = [r for r in runs if r[1] == n][-2 * timing.MAX_REPEATS:]
    warm = len(seq) - sum(length for _, length in timed)
    assert 2 * timing.WARM_UP_MIN <= warm <= 2 * timing.WARM_UP_MAX


def test_time_pair_stops_early_where_one_side_is_plainly_faster():
    import time

    seq = []

    def slow():
        seq.append("a")
        time.sleep(2e-3)  # 2 ms against a list append: plainly slower

    timing.time_pair(lambda: seq.append("f"), slow, CPU, budget_ms=1e6)  # the budget allows MAX_REPEATS
    turns = [name for name, _ in _runs(seq)].count("a") - timing.WARM_UP_MIN
    assert timing.SETTLED_TURNS <= turns < timing.MAX_REPEATS


def test_time_pair_stops_early_once_the_decision_is_plain():
    """Two sides that take the same time, timed for a decision that needs the first to take
    under a tenth of the second: every sample says no from the first turns on, even with a
    sample 5x slower on a loaded machine. (The same pair at decide_at=1 would run the whole
    budget, or stop by chance 1 time in 126.)"""
    import time

    seq = []

    def side(name):
        def run():
            seq.append(name)
            time.sleep(2e-3)
        return run

    timing.time_pair(side("f"), side("a"), CPU, budget_ms=1e6, decide_at=0.1)
    turns = [name for name, _ in _runs(seq)].count("a") - timing.WARM_UP_MIN
    assert turns == timing.SETTLED_TURNS


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "busy", lambda: None)  # cache whatever the load now
    return tmp_path


def test_cache_round_trip_in_one_file_per_device(cache_dir):
    c = timing.TimingCache(CPU)
    assert c.get("k") is None
    c.put("k", {"fused_us": 1.5, "apart_us": 2.0})
    assert c.get("k") == {"fused_us": 1.5, "apart_us": 2.0}
    assert not c.path.exists()  # nothing written before flush
    c.flush()
    assert c.path.parent == cache_dir / "tuning" and c.path.suffix == ".json"
    assert timing.TimingCache(CPU).get("k") == {"fused_us": 1.5, "apart_us": 2.0}
    data = json.loads(c.path.read_text())
    assert data["identity"] == timing.device_identity(CPU)
    assert data["identity"]["threads"] == torch.get_num_threads() and data["identity"]["torch"] == torch.__version__


def test_flush_keeps_what_another_process_wrote(cache_dir):
    a, b = timing.TimingCache(CPU), timing.TimingCache(CPU)
    a.put("a", {"x": 1.0})
    a.flush()
    b.put("b", {"x": 2.0})
    b.flush()
    fresh = timing.TimingCache(CPU)
    assert fresh.get("a") == {"x": 1.0} and fresh.get("b") == {"x": 2.0}
    assert [p.name for p in (cache_dir / "tuning").iterdir()] == [fresh.path.name]  # no temp files left


def test_another_thread_count_is_another_cache(cache_dir):
    c = timing.TimingCache(CPU)
    c.put("k", {"x": 1.0})
    c.flush()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        other = timing.TimingCache(CPU)
        assert other.path != c.path and other.get("k") is None
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("text", ["", "{", "[]", json.dumps({"version": 99, "entries": {}}),
                                  json.dumps({"version": 1, "entries": {"k": {"x": float("nan")}}}),
                                  json.dumps({"version": 1, "entries": {"k": {"x": True}}})])
def test_a_malformed_file_reads_as_empty_and_is_replaced(cache_dir, text):
    c = timing.TimingCache(CPU)
    c.path.parent.mkdir(parents=True)
    c.path.write_text(text)
    again = timing.TimingCache(CPU)
    assert again.entries == {}
    again.put("k", {"x": 1.0})
    again.flush()
    assert timing.TimingCache(CPU).get("k") == {"x": 1.0}


def test_a_file_of_another_identity_is_ignored(cache_dir):
    c = timing.TimingCache(CPU)
    c.put("k", {"x": 1.0})
    c.flush()
    data = json.loads(c.path.read_text())
    data["identity"]["name"] = "some other CPU"
    c.path.write_text(json.dumps(data))
    assert timing.TimingCache(CPU).get("k") is None


def test_an_unwritable_cache_costs_measurements_not_the_compile(cache_dir, caplog):
    (cache_dir / "tuning").write_text("a file where the directory should be")
    c = timing.TimingCache(CPU)
    c.put("k", {"x": 1.0})
    c.flush()  # warns, does not raise
    assert "could not write the timing cache" in caplog.text


def test_busy_names_the_load_beyond_the_cores(monkeypatch):
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (2.4, 1.0, 1.0))
    assert timing.busy() is None  # this process's own two threads
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (7.04, 1.0, 1.0))
    assert timing.busy() == "load average 7.0 on 2 CPUs"


def test_nothing_is_written_while_busy(cache_dir, monkeypatch):
    monkeypatch.setattr(timing, "busy", lambda: "load average 7.0 on 2 CPUs")
    c = timing.TimingCache(CPU)
    c.put("k", {"x": 1.0})
    assert c.get("k") == {"x": 1.0} and c.unsaved == "load average 7.0 on 2 CPUs"
    c.flush()
    assert not c.path.exists()


def test_nothing_is_written_after_other_processes_took_the_cores(cache_dir, monkeypatch):
    """The load average lags by a minute; the meter reads what other processes used
    while the cache was open, from /proc/stat."""
    monkeypatch.undo()
    monkeypatch.setenv("STFUSE_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(timing, "busy", lambda: None)
    c = timing.TimingCache(CPU)
    monkeypatch.setattr(timing.OthersMeter, "cores", lambda self: 1.3)
    c.put("k", {"x": 1.0})
    c.flush()
    assert not c.path.exists() and c.unsaved == "other processes used 1.3 cores meanwhile"
    assert c.get("k") == {"x": 1.0}  # still used by this compile
    monkeypatch.setattr(timing.OthersMeter, "cores", lambda self: 0.1)
    c.put("k", {"x": 2.0})
    c.flush()
    assert timing.TimingCache(CPU).get("k") == {"x": 2.0}


def test_the_meter_counts_other_processes_not_this_one(monkeypatch):
    """Cores used by others = the machine's busy CPU seconds less this process's own, over
    the wall time since the meter was made (samples faked: /proc/stat is the machine's)."""
    monkeypatch.undo()  # the suite's fixture stubs reason()
    samples = iter([(100.0, 10.0), (101.5, 10.9), (101.5, 10.9)])  # (machine busy s, this process s)
    monkeypatch.setattr(timing.OthersMeter, "_sample", staticmethod(lambda: next(samples)))
    clock = iter([50.0, 51.0, 51.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    meter = timing.OthersMeter()
    assert meter.cores() == pytest.approx(0.6)  # 1.5 s busy, 0.9 s of it ours, over 1 s
    assert meter.reason() == "other processes used 0.6 cores meanwhile"
