"""The server log's periodic engine line, as vLLM's: every log_stats_interval seconds, the prompt and generation
throughput over the interval, the sequences running and waiting, KV cache usage and the prefix cache's hit rate;
with speculative decoding a second line on the drafts' acceptance. An operator reads load and cache pressure off
the log without a metrics scraper. An interval in which nothing was computed, after another such, is logged at
debug level: an idle server's log stays quiet."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from miniserve.server.metrics import kv_cache_usage

logger = logging.getLogger("miniserve.server")


class StatsLog:
    """The lines of each interval, from the engine's stats (LLMEngine.stats(): counters since start, and the
    running, waiting and KV block counts as of now) at its start and end."""

    def __init__(self, stats: dict, now: float):
        self.before, self.at = stats, now
        self.hit_rate = 0.0  # the prefix cache's, over the latest interval that looked anything up
        self.was_busy = True  # (the first interval is logged even if idle: the line shows the server is up)

    def update(self, stats: dict, now: float) -> tuple[int, list[str]]:
        """The log level and lines of the interval that ends now."""
        before, seconds = self.before, max(now - self.at, 1e-9)
        self.before, self.at = stats, now

        def delta(key: str) -> int:
            return stats.get(key, 0) - before.get(key, 0)

        prompt, generated = delta("prompt_tokens_total"), delta("generation_tokens_total")
        queries = delta("prefix_cache_queries")
        if queries:
            self.hit_rate = 100 * delta("prefix_cache_hits") / queries
        usage = 100 * kv_cache_usage(stats)
        lines = [
            f"Engine 000: Avg prompt throughput: {prompt / seconds:.1f} tokens/s, Avg generation throughput: "
            f"{generated / seconds:.1f} tokens/s, Running: {stats.get('num_running', 0)} reqs, Waiting: "
            f"{stats.get('num_waiting', 0)} reqs, KV cache usage: {usage:.1f}%, Prefix cache hit rate: "
            f"{self.hit_rate:.1f}%"
        ]
        drafts = delta("spec_num_drafts")
        if drafts:
            lines.append(_spec_line(before, stats, drafts, seconds))
        busy = bool(prompt or generated or stats.get("num_running", 0) or stats.get("num_waiting", 0))
        level = logging.INFO if busy or self.was_busy else logging.DEBUG
        self.was_busy = busy
        return level, lines


def _spec_line(before: dict, stats: dict, drafts: int, seconds: float) -> str:
    """vLLM's SpecDecoding line over an interval with `drafts` draft rounds."""
    accepted = stats["spec_num_accepted_tokens"] - before.get("spec_num_accepted_tokens", 0)
    drafted = stats["spec_num_draft_tokens"] - before.get("spec_num_draft_tokens", 0)
    now, earlier = stats["spec_accepted_per_position"], before.get("spec_accepted_per_position") or []
    per_position = [(n - (earlier[i] if i < len(earlier) else 0)) / drafts for i, n in enumerate(now)]
    return (
        f"SpecDecoding metrics: Mean acceptance length: {1 + accepted / drafts:.2f}, Accepted throughput: "
        f"{accepted / seconds:.2f} tokens/s, Drafted throughput: {drafted / seconds:.2f} tokens/s, Accepted: "
        f"{accepted} tokens, Drafted: {drafted} tokens, Per-position acceptance rate: "
        f"{', '.join(f'{rate:.3f}' for rate in per_position)}, Avg Draft acceptance rate: "
        f"{100 * accepted / drafted if drafted else 0.0:.1f}%"
    )


async def log_stats(engine: Any, every: float) -> None:
    """Log the engine's lines every `every` seconds until cancelled (the app's lifespan ends it). `engine`: the
    EngineProcess, whose fresh_stats() are the engine's as of now, also where several API servers share it."""
    log = StatsLog(await engine.fresh_stats(), time.monotonic())
    while True:
        await asyncio.sleep(every)
        level, lines = log.update(await engine.fresh_stats(), time.monotonic())
        for line in lines:
            logger.log(level, line)
