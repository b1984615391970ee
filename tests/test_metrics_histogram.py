"""RunHistogram (server/metrics.py) counts runs of equal observations at once; its exposition must equal that of
prometheus_client's own Histogram fed the same values one at a time, bucket bounds included (le is inclusive)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from miniserve.server.metrics import LATENCY_BUCKETS, RunHistogram


def _samples(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")]


def test_runs_counted_at_once_expose_what_one_by_one_observations_do():
    rng = random.Random(0)
    mine, theirs = CollectorRegistry(), CollectorRegistry()
    runs = RunHistogram("t_seconds", "doc", LATENCY_BUCKETS, "m")
    mine.register(runs)
    oracle = Histogram("t_seconds", "doc", ["model_name"], buckets=LATENCY_BUCKETS, registry=theirs).labels("m")
    values = [*LATENCY_BUCKETS, 0.0, 1e-9, 31.0] + [rng.uniform(0, 12) for _ in range(40)]
    for value in values:  # every bound exactly, beyond the last, and values in between
        count = rng.randint(1, 5)
        runs.observe(value, count)
        for _ in range(count):
            oracle.observe(value)
    want = [line for line in _samples(theirs) if "_created" not in line]
    got = _samples(mine)
    assert [line.rsplit(" ", 1)[0] for line in got] == [line.rsplit(" ", 1)[0] for line in want]
    for g, w in zip(got, want):
        assert abs(float(g.rsplit(" ", 1)[1]) - float(w.rsplit(" ", 1)[1])) <= 1e-9 * max(
            1.0, abs(float(w.rsplit(" ", 1)[1]))
        )
