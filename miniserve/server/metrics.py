"""Prometheus metrics for the server, in a registry owned by one app (so tests can run several apps).

Engine-wide numbers (queue sizes, KV blocks, token totals, speculative decoding) are read from the latest
`engine.stats()` snapshot at scrape time; per-request latencies and token counts (vLLM's series), and the tokens
of every engine step, are observed as the engine process's messages arrive.

With several API server processes (`miniserve serve --api-servers N`) each observes its own requests, so the
per-request series use prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the CLI before
prometheus_client is imported): every process writes its values to a file there and a scrape of any process sums
them all (MultiProcessCollector). The engine's own series are asked of it at each scrape (the stats each
process holds are those of the last step that carried its output): every process then shows the same counts.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PREFIX = "miniserve:"
# vLLM labels every series with its model name and its engine core's index; this server runs one engine, "0"
LABELS = ("model_name", "engine")
ENGINE_INDEX = "0"


def check_shared_dir(env: Mapping[str, str] = os.environ) -> str | None:
    """PROMETHEUS_MULTIPROC_DIR, checked before anything loads (prometheus_client writes each process's values
    there, and a directory that is gone failed the server only after its model had loaded, with a traceback). A
    warning when it holds files already: an earlier run's counts add to this run's (vLLM warns alike)."""
    path = env.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:  # (empty: unset, for prometheus_client too)
        return None
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        problem = "is not a directory" if not os.path.isdir(path) else "is not writable"
        raise FileNotFoundError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} {problem} (prometheus_client keeps every API server's metrics "
            "there): create it, or unset it"
        )
    earlier = [name for name in os.listdir(path) if name.endswith(".db")]
    if earlier:
        return (
            f"PROMETHEUS_MULTIPROC_DIR={path!r} holds {len(earlier)} metrics files of an earlier run, whose counts "
            "add to this run's: empty it between runs, or unset it (`miniserve serve --api-servers N` then makes "
            "and removes one of its own)"
        )
    return None


# vLLM's bucket bounds (so its dashboards read these series alike), each with finer bounds below vLLM's first:
# on a GPU this engine's inter-token gaps are a few milliseconds and its queue and prefill times often less
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                      1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                        30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort")  # request_success's series, there from the start (as vLLM's)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets, sized by the model's context)."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


class RunHistogram(Collector):
    """A histogram observed in runs of equal values: a chunk of k streamed tokens shares the gap since the chunk
    before, so the inter-token latency is k observations of one value, counted at once (prometheus_client's
    Histogram.observe takes one at a time: per token, at every step, for every stream). Exposed like it."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...], model_name: str):
        self.name, self.doc, self.label_values = name, doc, [model_name, ENGINE_INDEX]
        self.bounds = [*buckets, math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(LABELS))
        cumulative = list(itertools.accumulate(self.counts))
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds, cumulative)]
        family.add_metric(self.label_values, buckets, self.sum)
        yield family


class _EachOnce:
    """RunHistogram's observe(value, count) on prometheus_client's Histogram, which takes one observation a call
    (the multiprocess mode's file-backed values have no bulk update)."""

    def __init__(self, histogram: Any):
        self.histogram = histogram

    def observe(self, value: float, count: int = 1) -> None:
        for _ in range(count):
            self.histogram.observe(value)


class EngineStatsCollector(Collector):
    """Turns the engine's stats() snapshot into gauges and counters on every scrape."""

    def __init__(self, get_stats: Callable[[], dict], model_name: str, cache_config: dict[str, str] | None = None):
        self.get_stats = get_stats
        self.model_name = model_name
        self.cache_config = cache_config or {}

    def collect(self) -> Iterator[Metric]:
        s = self.get_stats()
        labels = list(LABELS)
        value = [self.model_name, ENGINE_INDEX]
        if self.cache_config:  # vLLM's cache_config_info: the KV cache settings (and the engine) as labels of a 1
            info = GaugeMetricFamily(
                PREFIX + "cache_config_info",
                "Information of the KV cache configuration.",
                labels=[*self.cache_config, "engine"],
            )
            info.add_metric([*self.cache_config.values(), ENGINE_INDEX], 1.0)
            yield info

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.get("num_running", 0))
        yield gauge("num_requests_waiting", "Requests queued for admission.", s.get("num_waiting", 0))
        yield gauge("kv_blocks_used", "KV cache blocks in use.", s.get("kv_blocks_used", 0))
        yield gauge("kv_blocks_total", "KV cache blocks in the pool.", s.get("kv_blocks_total", 0))
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use.", kv_cache_usage(s))
        yield counter("num_preemptions", "Preemptions (requests evicted to free blocks).", s.get("num_preemptions", 0))
        yield counter("prompt_tokens", "Prefilled prompt tokens.", s.get("prompt_tokens_total", 0))
        yield counter("generation_tokens", "Generated tokens.", s.get("generation_tokens_total", 0))
        queries = "Prefix cache queries, in tokens (of the sequences looked up when they joined the batch)."
        yield counter("prefix_cache_queries", queries, s.get("prefix_cache_queries", 0))
        yield counter("prefix_cache_hits", "Prefix cache hits, in tokens.", s.get("prefix_cache_hits", 0))
        drafts = s.get("spec_num_drafts", 0)
        accepted = s.get("spec_num_accepted_tokens", 0)
        yield counter("spec_decode_num_drafts", "Speculative draft rounds.", drafts)
        yield counter("spec_decode_num_draft_tokens", "Proposed draft tokens.", s.get("spec_num_draft_tokens", 0))
        yield counter("spec_decode_num_accepted_tokens", "Accepted draft tokens.", accepted)
        mean_len = 1.0 + accepted / drafts if drafts else 0.0
        yield gauge("spec_decode_mean_acceptance_length", "Tokens per target forward (1 + accepted/drafts).", mean_len)
        per_pos = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position in the draft.",
            labels=[*LABELS, "position"],
        )
        for pos, n in enumerate(s.get("spec_accepted_per_position", []) or []):
            per_pos.add_metric([*value, str(pos)], n)
        yield per_pos


def kv_cache_usage(stats: dict) -> float:
    """The fraction of the KV pool's blocks in use (LLMEngine.stats()), 0 before the pool exists."""
    total = stats.get("kv_blocks_total", 0)
    return stats.get("kv_blocks_used", 0) / total if total else 0.0


class ServerMetrics:
    """All metrics of one app; `observe_*` are called on the event loop as the engine process's messages arrive
    (engine_process.py): per request from the engine's own timestamps, which travel with its final output."""

    def __init__(
        self,
        get_stats: Callable[[], dict],
        model_name: str,
        max_model_len: int,
        cache_config: dict[str, str] | None = None,
    ):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.engine_stats = EngineStatsCollector(get_stats, model_name, cache_config)
        self.shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # several API server processes
        self.registry.register(self.engine_stats)
        self.finished = Counter(
            PREFIX + "request_success",
            "Finished sequences (one per choice) by finish reason.",
            [*LABELS, "finished_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(model_name, ENGINE_INDEX, reason)
        self.ttft = self._histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        itl_doc = "Time between token steps (each token after a choice's first)."
        if self.shared_dir:  # a file-backed histogram: summed over the API server processes at scrape time
            self.itl: RunHistogram | _EachOnce = _EachOnce(
                self._histogram("inter_token_latency_seconds", itl_doc, TOKEN_TIME_BUCKETS)
            )
        else:
            self.itl = RunHistogram(PREFIX + "inter_token_latency_seconds", itl_doc, TOKEN_TIME_BUCKETS, model_name)
            self.registry.register(self.itl)
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_TIME_BUCKETS)
        self._request_series(one_two_five_buckets(max_model_len))
        self.iteration_tokens = self._histogram(
            "iteration_tokens_total",
            "Tokens the target computed per engine step (prompt + decode; k + 1 a speculative round).",
            ITERATION_TOKEN_BUCKETS,
        )

    def _request_series(self, tokens: tuple[int, ...]) -> None:
        """vLLM's per-request series: token counts, parameters, and where the time went (queue, prefill, decode)."""
        self.prompt_tokens = self._histogram("request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.generation_tokens = self._histogram(
            "request_generation_tokens", "Generated tokens per request (per choice: vLLM's n child requests).", tokens
        )
        self.max_generation_tokens = self._histogram(
            "request_max_num_generation_tokens", "Generated tokens of a request's longest choice.", tokens
        )
        self.params_n = self._histogram("request_params_n", "The n request parameter.", N_BUCKETS)
        self.params_max_tokens = self._histogram("request_params_max_tokens", "The max_tokens of a request.", tokens)
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Arrival in the engine to first scheduled.", REQUEST_TIME_BUCKETS
        )
        self.prefill_time = self._histogram(
            "request_prefill_time_seconds", "First scheduled to first token.", REQUEST_TIME_BUCKETS
        )
        self.decode_time = self._histogram(
            "request_decode_time_seconds", "First token to finish.", REQUEST_TIME_BUCKETS
        )
        self.inference_time = self._histogram(
            "request_inference_time_seconds", "First scheduled to finish (prefill + decode).", REQUEST_TIME_BUCKETS
        )
        self.time_per_output_token = self._histogram(
            "request_time_per_output_token_seconds",
            "A request's decode time over its tokens after the first (per choice).",
            TOKEN_TIME_BUCKETS,
        )

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Any:
        """The histogram's one labelled series (looked up once: observations come per token)."""
        histogram = Histogram(PREFIX + name, doc, list(LABELS), buckets=buckets, registry=self.registry)
        return histogram.labels(self.model_name, ENGINE_INDEX)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, count: int = 1) -> None:
        self.itl.observe(seconds, count)

    def observe_finished(self, reasons: list[str | None], e2e_seconds: list[float]) -> None:
        """One finished request: per choice (each one of vLLM's n child requests) a count of its finish reason and
        its end-to-end latency."""
        for reason in reasons:
            self.finished.labels(self.model_name, ENGINE_INDEX, reason or "unknown").inc()
        for seconds in e2e_seconds:
            self.e2e.observe(seconds)

    def observe_request(self, prompt_tokens: int, choice_tokens: list[int], n: int, params: Any, metrics: dict) -> None:
        """A request the engine finished. As in vLLM, where each of a request's n choices is a child request of
        its own: per choice its prompt and generated tokens, max_tokens, and its time in queue, prefill and decode
        (the engine's timestamps, which come with its final output: `metrics["choices"]`, else the request's);
        once per request its n and its longest choice. A phase that did not happen, e.g. no token generated, is
        not observed; the time per output token is 0 with one token, as vLLM's."""
        self.max_generation_tokens.observe(max(choice_tokens, default=0))
        self.params_n.observe(n)
        arrival = metrics.get("arrival_time")
        whole = (metrics.get("first_scheduled_time"), metrics.get("first_token_time"), metrics.get("finished_time"))
        times = metrics.get("choices") or [whole] * len(choice_tokens)
        for tokens, (scheduled, first, finished) in zip(choice_tokens, times):
            self.prompt_tokens.observe(prompt_tokens)
            self.generation_tokens.observe(tokens)
            if params.max_tokens is not None:
                self.params_max_tokens.observe(params.max_tokens)
            phases = [
                (self.queue_time, arrival, scheduled),
                (self.prefill_time, scheduled, first),
                (self.decode_time, first, finished),
                (self.inference_time, scheduled, finished),
            ]
            for histogram, start, end in phases:
                if start is not None and end is not None:
                    histogram.observe(max(0.0, end - start))
            if first is not None and finished is not None:
                self.time_per_output_token.observe(max(0.0, finished - first) / (tokens - 1) if tokens > 1 else 0.0)

    def observe_iteration(self, num_tokens: int) -> None:
        self.iteration_tokens.observe(num_tokens)

    def render(self) -> bytes:
        if not self.shared_dir:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every API server process's series, summed; the engine's snapshot once
        multiprocess.MultiProcessCollector(registry, self.shared_dir)
        registry.register(self.engine_stats)
        return generate_latest(registry)
