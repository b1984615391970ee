"""Every capacity limit at its edge: exactly N fits, N + 1 does not.

The limits: the KV pool (with and without the speculative lookahead slots), max_model_len, max_num_batched_tokens,
max_num_seqs, and block-size multiples. The oracle is arithmetic on the settings (ceil division, sums), never the
engine's own helpers, and requests that fit must also run to the end with the output of an unconstrained engine.
"""

from __future__ import annotations

import math
import warnings

import pytest

from miniserve import SamplingParams
from miniserve.config import EngineConfig
from miniserve.engine.llm_engine import LLMEngine
from miniserve.scheduler.block_manager import BlockManager

BLOCK = 8


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", block_size=BLOCK, **kw))


def greedy(max_tokens: int | None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(7 * i + offset) % 300 + 2 for i in range(n)]


def run(eng: LLMEngine, requests: list[tuple[list[int], SamplingParams]], max_steps: int = 200) -> dict:
    """Run to completion (a bounded number of steps, so a scheduling deadlock fails instead of hanging); returns
    the finished outputs by request id and the peaks of blocks in use and of running sequences."""
    for i, (ids, params) in enumerate(requests):
        eng.add_request(str(i), ids, params)
    peaks = {"blocks": 0, "running": 0}

    def note() -> None:
        stats = eng.stats()
        peaks["blocks"] = max(peaks["blocks"], stats["kv_blocks_used"])
        peaks["running"] = max(peaks["running"], stats["num_running"])

    free = eng.block_manager.free

    def noting_free(seq) -> None:  # blocks only ever return here: the peak is right before a free or a step's end
        note()
        free(seq)

    eng.block_manager.free = noting_free
    done = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            break
        done.update({out.request_id: out.outputs[0] for out in eng.step() if out.finished})
        note()
    eng.block_manager.free = free
    assert not eng.has_unfinished_requests(), f"not finished after {max_steps} steps"
    assert eng.stats()["kv_blocks_used"] == 0
    return {"outputs": done, "peak_blocks": peaks["blocks"], "peak_running": peaks["running"]}


def test_blocks_for_is_ceil_division():
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    assert [bm.blocks_for(n) for n in range(0, 4 * BLOCK + 2)] == [math.ceil(n / BLOCK) for n in range(4 * BLOCK + 2)]


def test_kv_pool_exact_fit_runs_and_one_more_token_never_fits(llama_dir):
    """4 blocks of 8 = 32 slots. The last token is sampled and never fed back, so it needs no slot: prompt +
    max_tokens = 33 runs to the end using the whole pool; 34 is refused."""
    eng = engine(llama_dir, num_kv_blocks=4)
    ref = run(engine(llama_dir), [(prompt(8), greedy(25))])["outputs"]["0"].token_ids
    got = run(eng, [(prompt(8), greedy(25))])
    assert got["outputs"]["0"].token_ids == ref and got["peak_blocks"] == 4
    assert len(run(eng, [(prompt(32), greedy(1))])["outputs"]["0"].token_ids) == 1
    for ids, n in ((prompt(8), 26), (prompt(33), 1), (prompt(1), 33)):
        with pytest.raises(ValueError, match="may need 33 tokens of KV cache, but the whole pool holds 32"):
            eng.add_request("x", ids, greedy(n))
    # two requests that each need the whole pool take turns (preemption), with unchanged output
    both = run(eng, [(prompt(8), greedy(25)), (prompt(8, offset=1), greedy(25))])["outputs"]
    alone = run(engine(llama_dir), [(prompt(8, offset=1), greedy(25))])["outputs"]["0"].token_ids
    assert both["0"].token_ids == ref and both["1"].token_ids == alone


def test_a_pool_smaller_than_max_model_len_is_warned_about_at_the_start(llama_dir):
    """As vLLM refuses a KV cache that cannot hold one max_model_len sequence, miniserve says so as it starts (and
    serves what fits): 4 blocks of 8 hold a 32-token context exactly, 3 do not."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at the exact fit
        engine(llama_dir, num_kv_blocks=4, max_model_len=32)
    with pytest.warns(UserWarning, match="the KV pool holds 24 tokens, fewer than max_model_len=32"):
        engine(llama_dir, num_kv_blocks=3, max_model_len=32)


def test_kv_pool_exact_fit_counts_the_speculative_lookahead(llama_dir, draft_dir):
    """With k = 2 and overlapped rounds a sequence reserves 2k + 1 = 5 slots past its length: 8 + 20 - 1 + 5 = 32
    fits, one token more does not; a request of one token reserves none."""
    kw = dict(speculative_model=str(draft_dir), num_speculative_tokens=2, num_kv_blocks=4)
    eng = engine(llama_dir, **kw)
    assert eng.scheduler.lookahead == 5
    ref = run(engine(llama_dir), [(prompt(8), greedy(20))])["outputs"]["0"].token_ids
    assert run(eng, [(prompt(8), greedy(20))])["outputs"]["0"].token_ids == ref
    with pytest.raises(ValueError, match="33 tokens of KV cache, 5 of them for the draft's proposals.*at most 20 new"):
        eng.add_request("x", prompt(8), greedy(21))
    # a request whose only token comes from the prompt pass never runs a round: it takes no lookahead, so a
    # 32-token prompt fits, also when its last chunk is one token (the chunk is a prompt pass, not a round)
    one = run(engine(llama_dir), [(prompt(32), greedy(1))])["outputs"]["0"].token_ids
    assert run(eng, [(prompt(32), greedy(1))])["outputs"]["0"].token_ids == one
    chunked = engine(llama_dir, max_num_batched_tokens=31, max_model_len=64, enable_prefix_caching=False, **kw)
    assert run(chunked, [(prompt(32), greedy(1))])["outputs"]["0"].token_ids == one
    with pytest.raises(ValueError, match="33 tokens of KV cache, but .*; it can never fit"):
        eng.add_request("x", prompt(33), greedy(1))
    with pytest.raises(ValueError, match="at most 1 new tokens fit"):  # 1 fits without lookahead, 2 with it do not
        eng.add_request("x", prompt(30), greedy(2))
    eng = engine(llama_dir, overlap_spec_rounds=False, **kw)  # k = 2 slots: 8 + 23 - 1 + 2 = 32
    ref = run(engine(llama_dir), [(prompt(8), greedy(23))])["outputs"]["0"].token_ids
    assert run(eng, [(prompt(8), greedy(23))])["outputs"]["0"].token_ids == ref
    with pytest.raises(ValueError, match="^max_tokens: .*at most 23 new tokens fit beside this prompt"):
        eng.add_request("x", prompt(8), greedy(24))


def test_max_model_len_exact_fit(llama_dir):
    """Generation ends where the context is full, whatever max_tokens says (vLLM's offline engine); a prompt that
    leaves no room is refused."""
    eng = engine(llama_dir, max_model_len=32)
    cases = [(prompt(31), greedy(1)), (prompt(16), greedy(16)), (prompt(20), greedy(None)), (prompt(16), greedy(17))]
    cases += [(prompt(1), greedy(32)), (prompt(31), greedy(2))]
    out = run(eng, cases)["outputs"]
    assert [len(out[str(i)].token_ids) for i in range(6)] == [1, 16, 12, 16, 31, 1]
    assert all(out[str(i)].finish_reason == "length" for i in range(6))
    ref = run(engine(llama_dir), [(prompt(16), greedy(16))])["outputs"]["0"].token_ids
    assert out["3"].token_ids == ref  # the same tokens as a max_tokens that fits
    for ids, n in ((prompt(32), 1), (prompt(32), None), (prompt(40), 1)):
        with pytest.raises(ValueError, match="max_model_len"):
            eng.add_request("x", ids, greedy(n))
    assert not eng.has_unfinished_requests()


def first_schedule(eng: LLMEngine, prompts: list[list[int]]) -> list[tuple[int, bool]]:
    """(new tokens, prompt complete) per request in the first step the scheduler plans; (0, False) if left out."""
    for i, ids in enumerate(prompts):
        eng.add_request(str(i), ids, greedy(2))
    got = {s.seq.request_id: (s.num_new_tokens, s.completes_prompt) for s in eng.scheduler.schedule()}
    return [got.get(str(i), (0, False)) for i in range(len(prompts))]


def test_max_num_batched_tokens_exact_fit(llama_dir):
    """A 16-token budget prefills a 16-token prompt in one step; 17 tokens take two (chunked prefill)."""
    assert first_schedule(engine(llama_dir, max_num_batched_tokens=16), [prompt(16)]) == [(16, True)]
    assert first_schedule(engine(llama_dir, max_num_batched_tokens=16), [prompt(17)]) == [(16, False)]
    # the budget is shared: 8 + 8 both complete, 8 + 9 leaves the second one token short
    two = [prompt(8), prompt(8, 1)]
    assert first_schedule(engine(llama_dir, max_num_batched_tokens=16), two) == [(8, True), (8, True)]
    two = [prompt(8), prompt(9, 1)]
    assert first_schedule(engine(llama_dir, max_num_batched_tokens=16), two) == [(8, True), (8, False)]
    ref = run(engine(llama_dir), [(prompt(8), greedy(8)), (prompt(9, 1), greedy(8))])["outputs"]
    got = run(engine(llama_dir, max_num_batched_tokens=16), [(prompt(8), greedy(8)), (prompt(9, 1), greedy(8))])
    assert [got["outputs"][i].token_ids for i in "01"] == [ref[i].token_ids for i in "01"]


def test_max_num_seqs_exact_fit(llama_dir):
    three = [prompt(5, i) for i in range(3)]
    assert first_schedule(engine(llama_dir, max_num_seqs=3), three) == [(5, True)] * 3
    four = [prompt(5, i) for i in range(4)]
    assert first_schedule(engine(llama_dir, max_num_seqs=3), four) == [(5, True)] * 3 + [(0, False)]
    got = run(engine(llama_dir, max_num_seqs=3), [(p, greedy(6)) for p in four])
    ref = run(engine(llama_dir), [(p, greedy(6)) for p in four])
    assert got["peak_running"] == 3 and ref["peak_running"] == 4
    assert [got["outputs"][i].token_ids for i in "0123"] == [ref["outputs"][i].token_ids for i in "0123"]


@pytest.mark.parametrize(
    "prompt_len,max_tokens,blocks",
    [(8, 1, 1), (9, 1, 2), (7, 2, 1), (8, 2, 2), (16, 1, 2), (15, 2, 2), (16, 2, 3)],
)
def test_block_size_multiples(llama_dir, prompt_len, max_tokens, blocks):
    """A sequence holds ceil(written slots / 8) blocks: the prompt plus every sampled token fed back (the last
    sampled token is never written)."""
    assert math.ceil((prompt_len + max_tokens - 1) / BLOCK) == blocks
    got = run(engine(llama_dir), [(prompt(prompt_len), greedy(max_tokens))])
    assert got["peak_blocks"] == blocks and len(got["outputs"]["0"].token_ids) == max_tokens


def test_request_list_bounds_exact_fit(llama_dir):
    """max_stop_strings, max_stop_string_length and max_bad_words: the limit is accepted, one more is refused."""
    eng = engine(llama_dir, max_stop_strings=2, max_stop_string_length=5, max_bad_words=3)
    eng.add_request("fits", prompt(4), SamplingParams(max_tokens=1, stop=["a", "bcdef"], bad_words=["x", "y", "z"]))
    cases = [
        (dict(stop=["a", "b", "c"]), "max_stop_strings"),
        (dict(stop=["abcdef"]), "max_stop_string_length"),
        (dict(bad_words=["w", "x", "y", "z"]), "max_bad_words"),
    ]
    for kwargs, limit in cases:
        with pytest.raises(ValueError, match=limit):
            eng.add_request(limit, prompt(4), SamplingParams(max_tokens=1, **kwargs))
    assert list(run(eng, [])["outputs"]) == ["fits"]  # the refused requests were never queued
