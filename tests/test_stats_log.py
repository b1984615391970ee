"""The log's periodic engine lines (miniserve/server/stats_log.py) from made-up engine stats: the rates, counts and
percentages below are worked out by hand, in vLLM's wording."""

from __future__ import annotations

import logging

from miniserve.server.stats_log import StatsLog

IDLE = {
    "num_running": 0,
    "num_waiting": 0,
    "kv_blocks_used": 0,
    "kv_blocks_total": 400,
    "prefix_cache_queries": 0,
    "prefix_cache_hits": 0,
    "prompt_tokens_total": 0,
    "generation_tokens_total": 0,
    "spec_num_drafts": 0,
    "spec_num_draft_tokens": 0,
    "spec_num_accepted_tokens": 0,
    "spec_accepted_per_position": [],
}


def line(prompt: str, generation: str, running: int, waiting: int, usage: str, hits: str) -> str:
    return (
        f"Engine 000: Avg prompt throughput: {prompt} tokens/s, Avg generation throughput: {generation} tokens/s, "
        f"Running: {running} reqs, Waiting: {waiting} reqs, KV cache usage: {usage}%, Prefix cache hit rate: {hits}%"
    )


def test_each_interval_is_rated_over_its_own_seconds_and_an_idle_server_goes_quiet():
    log = StatsLog(IDLE, now=100.0)
    # 4 s: 1,000 prompt tokens (250/s), 37 generated (9.25/s, shown 9.2: round half to even), 100 of 400 blocks;
    # 800 prompt tokens looked up in the prefix cache, 200 found
    busy = {**IDLE, "num_running": 3, "num_waiting": 2, "kv_blocks_used": 100, "prompt_tokens_total": 1000,
            "generation_tokens_total": 37, "prefix_cache_queries": 800, "prefix_cache_hits": 200}  # fmt: skip
    assert log.update(busy, now=104.0) == (logging.INFO, [line("250.0", "9.2", 3, 2, "25.0", "25.0")])
    # 2 s more: 63 generated (31.5/s), nothing looked up: the hit rate stays the latest interval's that looked
    done = {**busy, "num_running": 0, "num_waiting": 0, "kv_blocks_used": 1, "generation_tokens_total": 100}
    assert log.update(done, now=106.0) == (logging.INFO, [line("0.0", "31.5", 0, 0, "0.2", "25.0")])
    # the first idle interval still says so at info level; the next ones at debug
    assert log.update(done, now=116.0) == (logging.INFO, [line("0.0", "0.0", 0, 0, "0.2", "25.0")])
    assert log.update(done, now=126.0) == (logging.DEBUG, [line("0.0", "0.0", 0, 0, "0.2", "25.0")])
    # a waiting request is not idle, even before anything is computed for it; a lookup that found nothing: 0%
    queued = {**done, "num_waiting": 1, "prefix_cache_queries": 900}
    assert log.update(queued, now=136.0) == (logging.INFO, [line("0.0", "0.0", 0, 1, "0.2", "0.0")])


def test_speculative_decoding_adds_vllms_acceptance_line_for_intervals_with_drafts():
    before = {**IDLE, "spec_num_drafts": 10, "spec_num_draft_tokens": 30, "spec_num_accepted_tokens": 20,
              "spec_accepted_per_position": [9, 7, 4]}  # fmt: skip
    log = StatsLog(before, now=0.0)
    # 2 s: 20 rounds of 3 drafted tokens (60); accepted 18, 12 and 6 at positions 0, 1, 2 (36: 60%)
    after = {**before, "num_running": 1, "generation_tokens_total": 56, "spec_num_drafts": 30,
             "spec_num_draft_tokens": 90, "spec_num_accepted_tokens": 56,
             "spec_accepted_per_position": [27, 19, 10]}  # fmt: skip
    level, lines = log.update(after, now=2.0)
    assert level == logging.INFO and lines[0] == line("0.0", "28.0", 1, 0, "0.0", "0.0")
    assert lines[1:] == [
        "SpecDecoding metrics: Mean acceptance length: 2.80, Accepted throughput: 18.00 tokens/s, Drafted "
        "throughput: 30.00 tokens/s, Accepted: 36 tokens, Drafted: 60 tokens, Per-position acceptance rate: 0.900, "
        "0.600, 0.300, Avg Draft acceptance rate: 60.0%"
    ]
    assert len(log.update(after, now=4.0)[1]) == 1  # no drafts in this interval: no acceptance line


def test_one_api_server_writes_the_lines_unless_disable_log_stats(caplog):
    """With several API servers sharing the engine only the first logs its lines (the others would repeat them);
    disable_log_stats, vLLM's flag, turns them off."""
    import asyncio

    from miniserve.config import ServerConfig
    from miniserve.server.app import _start_stats_log
    from miniserve.server.engine_process import EngineLink

    class Engine:  # an EngineProcess's stats, nothing else
        async def fresh_stats(self) -> dict:
            return IDLE

    async def lines_of(server: ServerConfig, link: EngineLink | None) -> int:
        caplog.clear()
        task = _start_stats_log(Engine(), server, link)
        await asyncio.sleep(0.1)
        if task is not None:
            task.cancel()
        return sum(r.getMessage().startswith("Engine 000: ") for r in caplog.records)

    async def main() -> None:
        every = ServerConfig(log_stats_interval=0.02)
        assert await lines_of(every, None) >= 1
        assert await lines_of(every, EngineLink(None, None, 0, 2)) >= 1
        assert await lines_of(every, EngineLink(None, None, 1, 2)) == 0
        assert await lines_of(ServerConfig(log_stats_interval=0.02, disable_log_stats=True), None) == 0

    caplog.set_level(logging.DEBUG, logger="miniserve.server")
    asyncio.run(main())
