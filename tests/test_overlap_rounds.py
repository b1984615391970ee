"""Overlapped greedy speculative rounds: round N+1 starts from round N's device outputs before the host reads N.

The oracle is plain greedy decoding (and the same engine with overlap_spec_rounds=False): tokens, acceptance
counts and the KV pool's bookkeeping must not change, whatever happens to the batch while a round is in flight.
"""

from __future__ import annotations

import pytest

from miniserve import LLM, SamplingParams
from tests.test_spec_decode import mixed_prompts, run


def spec_kw(draft_dir, k: int, **extra) -> dict:
    return dict(speculative_model=str(draft_dir), num_speculative_tokens=k, **extra)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("self_draft", [False, True])
def test_overlapped_rounds_equal_plain_and_sequential_rounds(llama_dir, draft_dir, k, self_draft):
    """With the target as its own draft every proposal is accepted, so the next round's inputs come from the
    drafts; with the random draft almost none are, so they come from the target's correction."""
    draft_dir = llama_dir if self_draft else draft_dir
    prompts = mixed_prompts(3)
    # different lengths: sequences finish at different rounds, so rounds in flight are drained with finished rows
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 17, 30, 9, 24)]
    plain, _ = run(llama_dir, prompts, params)
    overlapped, eng = run(llama_dir, prompts, params, **spec_kw(draft_dir, k))
    sequential, eng_seq = run(llama_dir, prompts, params, **spec_kw(draft_dir, k, overlap_spec_rounds=False))
    assert overlapped == plain and sequential == plain
    assert eng.decoder.num_overlapped_rounds > 0 and eng_seq.decoder.num_overlapped_rounds == 0
    keys = ("spec_num_drafts", "spec_num_accepted_tokens", "spec_accepted_per_position")
    assert {key: eng.stats()[key] for key in keys} == {key: eng_seq.stats()[key] for key in keys}
    assert eng.block_manager.num_used_blocks == 0 and eng.decoder.in_flight is None


def test_overlap_reserves_the_next_rounds_slots(llama_dir, draft_dir):
    """A round launched from the device may start k+1 tokens past the host's length and write k more."""
    llm = LLM(str(llama_dir), dtype="float32", device="cpu", block_size=4, **spec_kw(draft_dir, 3))
    assert llm.engine.scheduler.lookahead == 2 * 3 + 1
    seq_llm = LLM(
        str(llama_dir), dtype="float32", device="cpu", block_size=4, **spec_kw(draft_dir, 3, overlap_spec_rounds=False)
    )
    assert seq_llm.engine.scheduler.lookahead == 3


def test_requests_arriving_and_aborted_while_a_round_is_in_flight(llama_dir, draft_dir):
    prompts = mixed_prompts(4)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want, _ = run(llama_dir, prompts, params)
    llm = LLM(str(llama_dir), dtype="float32", device="cpu", **spec_kw(draft_dir, 3))
    eng = llm.engine
    eng.add_request("a", prompts[0], params)
    eng.add_request("b", prompts[1], params)
    eng.add_request("gone", prompts[2], params)
    finished, seen_in_flight, step = {}, 0, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert (
                out.outputs[0].token_ids == want[prompts.index(out.prompt_token_ids)][: len(out.outputs[0].token_ids)]
            )
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        step += 1
        seen_in_flight += eng.decoder.in_flight is not None
        if step == 4:  # mid-stream: one request leaves, two arrive
            assert eng.decoder.in_flight is not None
            eng.abort_request("gone")
            eng.add_request("c", prompts[3], params)
            eng.add_request("d", prompts[4], params)
    assert finished == {"a": want[0], "b": want[1], "c": want[3], "d": want[4]}
    assert seen_in_flight > 4 and eng.decoder.num_overlapped_rounds > 0
    # the round launched with the last tokens belongs to finished sequences: dropped without reading
    assert eng.decoder.in_flight is None and eng.block_manager.num_used_blocks == 0


def test_stop_strings_and_preemption_with_overlap(llama_dir, draft_dir):
    prompts = mixed_prompts(5)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain, _ = run(llama_dir, prompts, params)
    # a pool too small for all five: sequences are preempted while rounds of the others are in flight
    spec, eng = run(llama_dir, prompts, params, num_kv_blocks=20, block_size=8, **spec_kw(draft_dir, 2))
    assert spec == plain and eng.scheduler.num_preemptions > 0 and eng.decoder.num_overlapped_rounds > 0
    # a stop string in the middle of an accepted run ends the text there; the round after it is dropped
    llm = LLM(str(llama_dir), dtype="float32", device="cpu", **spec_kw(draft_dir, 4))
    full = llm.generate([prompts[1]], params, use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=30, stop=[stop]), use_tqdm=False)
    assert cut[0].outputs[0].text == full.text[: full.text.index(stop)]
    assert cut[0].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("self_draft", [False, True])
@pytest.mark.parametrize("max_tokens", [2, 9, 20])
def test_no_round_is_launched_past_max_tokens(llama_dir, draft_dir, max_tokens, self_draft):
    """Once the round in flight may reach max_tokens, the next one waits for it: every launched round is read
    (one sequence: one row per round read)."""
    prompt = mixed_prompts(6)[2]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    want, _ = run(llama_dir, [prompt], params)
    got, eng = run(llama_dir, [prompt], params, **spec_kw(llama_dir if self_draft else draft_dir, 3))
    assert got == want
    assert eng.decoder.num_launched_rounds == eng.stats()["spec_num_drafts"]
    assert eng.decoder.num_overlapped_rounds > 0 or max_tokens == 2
