"""RunHistogram (server/metrics.py) counts runs of equal observations at once; its exposition must equal that of
prometheus_client's own Histogram fed the same values one at a time, bucket bounds included (le is inclusive)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from miniserve.server.metrics import TOKEN_TIME_BUCKETS as LATENCY_BUCKETS
from miniserve.server.metrics import RunHistogram, ServerMetrics, one_two_five_buckets


def _samples(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")]


def test_runs_counted_at_once_expose_what_one_by_one_observations_do():
    rng = random.Random(0)
    mine, theirs = CollectorRegistry(), CollectorRegistry()
    runs = RunHistogram("t_seconds", "doc", LATENCY_BUCKETS, "m")
    mine.register(runs)
    oracle = Histogram("t_seconds", "doc", ["model_name", "engine"], buckets=LATENCY_BUCKETS, registry=theirs)
    oracle = oracle.labels("m", "0")
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


def test_token_buckets_are_vllms_one_two_five_up_to_the_context():
    assert one_two_five_buckets(20000)[-3:] == (5000, 10000, 20000)  # exact fit: the bound is kept
    assert one_two_five_buckets(19999)[-1] == 10000  # one short: it is not
    assert one_two_five_buckets(32768) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
    assert one_two_five_buckets(1) == (1,)


def test_a_fresh_server_shows_every_finish_reason_at_zero():
    """vLLM's request_success has a series per finish reason before any request ends (dashboards sum them)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = ServerMetrics(dict, "m", max_model_len=64).render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    success = {s.labels["finished_reason"]: s.value for s in families["miniserve:request_success"].samples
               if s.name.endswith("_total")}  # fmt: skip
    assert success == {"stop": 0.0, "length": 0.0, "abort": 0.0}
    bounds = [s.labels["le"] for s in families["miniserve:request_prompt_tokens"].samples if "le" in s.labels]
    assert bounds == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "+Inf"]


def test_time_per_output_token_is_zero_for_one_token_as_vllms():
    """vLLM observes every finished request's time per output token, 0 for one generated token (so sum / count
    is its mean over requests); a request without a first token has no decode phase and none. Each of n choices
    is one of vLLM's child requests: its own tokens, max_tokens and time per output token; n once."""
    from prometheus_client.parser import text_string_to_metric_families

    from miniserve import SamplingParams

    m = ServerMetrics(dict, "m", max_model_len=64)
    timing = {"arrival_time": 0.0, "first_scheduled_time": 0.1, "first_token_time": 0.2, "finished_time": 0.5}
    m.observe_request(5, [1], 1, SamplingParams(max_tokens=1), timing)
    m.observe_request(5, [4, 3], 2, SamplingParams(max_tokens=4, n=2), timing)  # 0.3 s over 3, then over 2 more
    m.observe_request(5, [0], 1, SamplingParams(max_tokens=4), {**timing, "first_token_time": None})
    samples = {s.name: s.value for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert samples["miniserve:request_time_per_output_token_seconds_count"] == 3
    assert abs(samples["miniserve:request_time_per_output_token_seconds_sum"] - 0.25) < 1e-9
    assert samples["miniserve:request_params_n_sum"] == 4 and samples["miniserve:request_params_n_count"] == 3
    assert samples["miniserve:request_params_max_tokens_sum"] == 13
    assert samples["miniserve:request_prompt_tokens_count"] == 4
    assert samples["miniserve:request_generation_tokens_sum"] == 8
    assert samples["miniserve:request_max_num_generation_tokens_sum"] == 5
