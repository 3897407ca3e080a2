"""The /metrics page in Prometheus' text format: one HELP and TYPE per family, samples of
the form name{labels} value, cumulative histogram buckets, escaped label values."""

import re

from stfuse.serve.metrics import LATENCY_BUCKETS, RUNTIME_COUNTERS, RequestMetrics, render

SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (-?[0-9.e+-]+|\+Inf|NaN)$')


def _stats(**counts) -> dict:
    keys = [key for _, key, _ in RUNTIME_COUNTERS]
    return {**dict.fromkeys(keys, 0), "queued": 0, "batch_sizes": {}, **counts}


def _page():
    requests = RequestMetrics(["a", 'we"ird\\'])
    for status, seconds in [(200, 0.0005), (200, 0.003), (429, 0.002), (200, 20.0)]:
        requests.observe("a", status, seconds)
    requests.observe("not-served", 404, 0.001)  # an unknown name: no label for it
    runtimes = [({"replica": "0"}, {"a": _stats(served=3, batch_sizes={1: 2, 3: 1}), 'we"ird\\': _stats()}),
                ({"replica": "1"}, {"a": _stats(served=1, fused_launches=1, batch_sizes={40: 1})})]
    return render(requests, runtimes)


def test_every_line_is_a_comment_or_a_sample_and_families_are_declared_once():
    lines = _page().splitlines()
    declared = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(declared) == len(set(declared))
    for line in lines:
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        assert any(m.group(1) == d or m.group(1).startswith(d + "_") for d in declared), line
    assert "not-served" not in "\n".join(lines)


def test_counts_histograms_and_labels():
    page = _page()
    assert 'stfuse_requests_total{model="a",code="200"} 3' in page
    assert 'stfuse_requests_total{model="a",code="429"} 1' in page
    assert 'stfuse_request_failures_total{model="a"} 1' in page
    assert 'stfuse_served_total{model="a",replica="1"} 1' in page
    assert 'stfuse_fused_launches_total{model="a",replica="1"} 1' in page
    assert 'model="we\\"ird\\\\"' in page  # a quote and a backslash, escaped
    buckets = [int(v) for v in re.findall(r'stfuse_request_duration_seconds_bucket\{model="a",le="[^"]+"\} (\d+)', page)]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert buckets == sorted(buckets) and buckets[0] == 1 and buckets[-2] == 3 and buckets[-1] == 4
    assert 'stfuse_request_duration_seconds_count{model="a"} 4' in page
    assert 'stfuse_batch_rows_bucket{model="a",replica="0",le="2"} 2' in page
    assert 'stfuse_batch_rows_bucket{model="a",replica="0",le="4"} 3' in page
    assert 'stfuse_batch_rows_sum{model="a",replica="0"} 5' in page
    assert 'stfuse_batch_rows_bucket{model="a",replica="1",le="+Inf"} 1' in page
    assert 'stfuse_batch_rows_bucket{model="a",replica="1",le="32"} 0' in page
