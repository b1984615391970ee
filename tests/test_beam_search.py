"""LLM.beam_search (miniserve/beam_search.py) against transformers' own beam search, and on a hand-made
distribution where every score is worked out by hand (EOS, length_penalty, the final ranking)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from miniserve import LLM, BeamSearchParams
from miniserve.beam_search import beam_search
from tests.test_engine import token_prompts


def test_beams_are_transformers_beams(llama_dir):
    """Without EOS and with length_penalty 0 both rank beams by their summed logprob: the same beams, best first,
    with the same scores."""
    prompt = token_prompts(1, seed=31)[0]
    llm = LLM(str(llama_dir), dtype="float32", device="cpu")
    params = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True, length_penalty=0.0)
    ours = llm.beam_search([{"prompt_token_ids": prompt}], params)[0].sequences
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=4,
            length_penalty=0.0, return_dict_in_generate=True, output_scores=True, pad_token_id=0,
        )  # fmt: skip
    assert [b.tokens for b in ours] == out.sequences.tolist()
    assert [b.cum_logprob for b in ours] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
    assert all(b.finish_reason == "length" and len(b.logprobs) == 4 for b in ours)
    assert ours[0].text == llm.get_tokenizer().decode(ours[0].tokens)
    with pytest.raises(ValueError, match="max_logprobs=20"):  # 2 x beam_width top logprobs a step
        llm.beam_search([prompt], BeamSearchParams(beam_width=11, max_tokens=1))
    with pytest.raises(ValueError, match="cache_salt is not supported"):
        llm.beam_search([{"prompt_token_ids": prompt, "cache_salt": "s"}], params)
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1"):
        BeamSearchParams(beam_width=0, max_tokens=1)


# A hand-made model: prompt [9]; token 1 is EOS. Next-token probabilities after each prefix:
TABLE = {
    (9,): {5: 0.5, 6: 0.3, 1: 0.2},
    (9, 5): {5: 0.1, 6: 0.08, 1: 0.8},
    (9, 6): {5: 0.9, 6: 0.05, 1: 0.05},
}


def table_generate(batch, params):
    """What LLM.generate returns for one token with logprobs, for each beam in `batch` (TABLE's)."""
    assert params.max_tokens == 1 and params.logprobs == 4  # 2 x beam_width
    entries = [{t: math.log(p) for t, p in TABLE[tuple(ids)].items()} for ids in batch]
    return [SimpleNamespace(outputs=[SimpleNamespace(logprobs=[entry])]) for entry in entries]


@pytest.mark.parametrize(
    ("length_penalty", "expected"),
    [
        # scores (cum / length ** 1, the length without EOS, prompt included): [9,6,5] ln(.27)/3 = -0.436,
        # [9,5,1] ln(.4)/2 = -0.458, [9,5,5] ln(.05)/3 = -0.999, [9,1] ln(.2)/1 = -1.609, [9,6,1] ln(.015)/2
        (1.0, [([9, 6, 5], "length"), ([9, 5, 1], "stop")]),
        # summed logprobs: [9,5,1] ln(.4), [9,6,5] ln(.27), [9,1] ln(.2), ...
        (0.0, [([9, 5, 1], "stop"), ([9, 6, 5], "length")]),
    ],
)
def test_eos_completes_a_beam_and_the_length_penalty_ranks_them(length_penalty, expected):
    """Width 2, 2 tokens. Step 1: [9,1] completes; [9,5], [9,6] live. Step 2: [9,5,1] and [9,6,1] complete; of the
    live candidates [9,6,5] (.27) and [9,5,5] (.05) are kept over [9,5,6] (.04) and [9,6,6] (.015)."""
    params = BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=length_penalty)
    out = beam_search(table_generate, [[9]], params, {1}, 100, lambda ids: " ".join(map(str, ids)))[0].sequences
    assert [(b.tokens, b.finish_reason) for b in out] == expected
    probs = {(9, 6, 5): 0.27, (9, 5, 1): 0.4}
    assert [b.cum_logprob for b in out] == pytest.approx([math.log(probs[tuple(b.tokens)]) for b in out])
    assert {b.text for b in out} == {"9 6 5", "9 5"}  # a complete beam's text leaves its EOS out
    assert [b.stop_reason for b in out if b.finish_reason == "stop"] == [1]
    kept = beam_search(table_generate, [[9]], BeamSearchParams(2, 2, include_stop_str_in_output=True), {1}, 100, str)
    assert "[9, 5, 1]" in {b.text for b in kept[0].sequences}


def test_a_beam_that_fills_the_context_ends_there():
    """max_model_len 2: after one token every beam is full, so the second step never runs."""
    out = beam_search(table_generate, [[9]], BeamSearchParams(beam_width=2, max_tokens=5), {1}, 2, str)[0]
    assert [(b.tokens, b.finish_reason) for b in out.sequences] == [([9, 5], "length"), ([9, 6], "length")]
