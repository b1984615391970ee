"""The engine's "delta" reports (what the server streams) and detokenize=False (the server detokenizes streams
itself): joined up they are exactly the final output that LLM.generate ("final_only") gives for the same seeded
requests, text included, with and without stop strings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from miniserve import LLM, SamplingParams
from miniserve.detokenizer import IncrementalDetokenizer

PROMPTS = ["ROMEO:", "Ἀθῆναι ünïcödé", "KING"]  # the demo model's byte-fallback BPE: partial UTF-8 in samples


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def run_deltas(llm: LLM, params: list[SamplingParams]) -> dict[str, dict]:
    """Every request's delta reports joined: {id: {index: [token_ids, text, logprobs, finish, stop]}}."""
    engine, joined = llm.engine, {}
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"d{i}", prompt, p)
        joined[f"d{i}"] = {j: [[], "", [], None, None] for j in range(p.n)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                acc = joined[out.request_id][o.index]
                acc[0] += o.token_ids
                acc[1] += o.text
                acc[2] += o.logprobs or []
                acc[3], acc[4] = o.finish_reason, o.stop_reason
    return joined


def test_delta_reports_join_up_to_the_final_output(llm):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, top_k=4000, n=2, logprobs=2) for s in range(3)]
    final = llm.generate(PROMPTS, params, use_tqdm=False)
    joined = run_deltas(llm, [replace(p, output_kind="delta") for p in params])
    for i, out in enumerate(final):
        for o in out.outputs:
            ids, text, logprobs, finish, stop = joined[f"d{i}"][o.index]
            assert [ids, text, finish, stop] == [o.token_ids, o.text, o.finish_reason, o.stop_reason]
            assert [sorted(e) for e in logprobs] == [sorted(e) for e in o.logprobs]  # same tokens ranked
            for got, want in zip(logprobs, o.logprobs):  # values up to the batch's float reduction order
                assert all(got[t] == pytest.approx(want[t], abs=1e-4) for t in want)


def test_delta_reports_with_stop_strings_hold_back_what_a_stop_may_cut(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    stops = [[o.outputs[0].text[8:11]] for o in greedy]  # each ends its own text early
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=s) for s in stops]
    final = llm.generate(PROMPTS, params, use_tqdm=False)
    joined = run_deltas(llm, [replace(p, output_kind="delta") for p in params])
    for i, out in enumerate(final):
        o = out.outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == stops[i][0]
        assert joined[f"d{i}"][0][:2] == [o.token_ids, o.text]


def test_without_detokenize_the_callers_detokenizer_gives_the_engines_text(llm):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, top_k=4000) for s in range(3)]
    final = llm.generate(PROMPTS, params, use_tqdm=False)
    joined = run_deltas(llm, [replace(p, output_kind="delta", detokenize=False) for p in params])
    tok = llm.get_tokenizer()
    for i, out in enumerate(final):
        ids, text = joined[f"d{i}"][0][:2]
        assert text == "" and ids == out.outputs[0].token_ids
        detok = IncrementalDetokenizer(tok, prompt_ids=out.prompt_token_ids)
        assert detok.add(ids) + detok.flush() == out.outputs[0].text
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
