"""LLM.beam_search (miniserve/beam_search.py) against transformers' own beam search, and on a hand-made
distribution where every score is worked out by hand (EOS, length_penalty, the final ranking)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import transformers

from miniserve import LLM, BeamSearchParams
from miniserve.beam_search import BeamSearchSequence, beam_score, beam_search
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
    steps = []

    class Bar:  # vLLM's use_tqdm as a tqdm-like class: a bar over the search's steps, one generate call each
        def __init__(self, total, desc, disable):
            steps.append((total, desc, disable))

        def update(self, n):
            steps.append(n)

        def close(self):
            steps.append("closed")

    with_bar = llm.beam_search([{"prompt_token_ids": prompt}], params, use_tqdm=Bar)[0].sequences
    assert [b.tokens for b in with_bar] == [b.tokens for b in ours]
    assert steps == [(4, "Beam search", False), 1, 1, 1, 1, "closed"]
    with pytest.raises(ValueError, match="beam_width: .* max_logprobs=20 allows: beam_width <= 10"):
        llm.beam_search([prompt], BeamSearchParams(beam_width=11, max_tokens=1))  # 2 x beam_width logprobs a step
    assert len(llm.beam_search([prompt], BeamSearchParams(beam_width=10, max_tokens=1))[0].sequences) == 10
    full = [5] * llm.engine.max_model_len  # a prompt the context cannot extend: refused, as generate refuses it
    with pytest.raises(ValueError, match="the prompt has .* context length"):
        llm.beam_search([prompt, full], BeamSearchParams(beam_width=1, max_tokens=1))
    assert len(llm.beam_search([full[1:]], BeamSearchParams(beam_width=1, max_tokens=1))[0].sequences[0].tokens) == len(
        full
    )  # one token short of it: room for one
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


@pytest.mark.parametrize(
    ("length_penalty", "expected"),
    [
        # 1000: [9,1] (length 1) ln(.2); [9,5,1] ln(.4) / 2**1000 = -8.5e-302; the length-3 beams ln(p) / 3**1000,
        # past the floats (3**1000 overflows): -0.0 as floats, the best; of them (step 2 too) the larger ln(p)
        (1000.0, [([9, 6, 5], "length"), ([9, 5, 5], "length")]),
        # -1000: [9,1] ln(.2); [9,5,1] ln(.4) * 2**1000 = -9.8e300; the length-3 beams ln(p) * 3**1000: -inf
        (-1000.0, [([9, 1], "stop"), ([9, 5, 1], "stop")]),
    ],
)
def test_a_length_penalty_past_the_floats_ranks_as_the_exact_scores(length_penalty, expected):
    """A penalty whose power of the length overflows a float (or underflows to 0) ranks as the exact scores do,
    instead of raising (vLLM's OverflowError, ZeroDivisionError)."""
    params = BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=length_penalty)
    out = beam_search(table_generate, [[9]], params, {1}, 100, str)[0].sequences
    assert [(b.tokens, b.finish_reason) for b in out] == expected


def score(tokens: int, cum_logprob: float, length_penalty: float, eos: bool = False) -> float:
    """beam_score of a beam of `tokens` tokens (the last one EOS, token 1, if `eos`)."""
    beam = BeamSearchSequence(list(range(2, tokens + 1)) + [1 if eos else tokens + 1], cum_logprob=cum_logprob)
    return beam_score(beam, {1}, length_penalty)


def test_beam_score_orders_beams_as_the_exact_quotient_at_any_penalty():
    """vLLM's score, cum_logprob / length ** length_penalty worked out exactly (Fractions), orders every two beams
    as beam_score does, at ordinary penalties and at ones whose power is past the floats (where vLLM raises)."""
    beams = [(tokens, cum) for tokens in (1, 2, 3, 7, 300) for cum in (0.0, -1e-9, -0.5, -2.0, -3.5, -1e4)]
    for length_penalty in (-1000, -3, -1, 0, 1, 2, 1000):
        exact = {b: Fraction(b[1]) / Fraction(b[0]) ** length_penalty for b in beams}
        ours = {b: score(*b, float(length_penalty)) for b in beams}
        for a, b in itertools.combinations(beams, 2):
            if exact[a] != exact[b]:
                assert (exact[a] > exact[b]) == (ours[a] > ours[b]), (a, b, length_penalty)
    assert score(3, -2.0, 1.0, eos=True) == score(2, -2.0, 1.0)  # a final EOS does not count
    assert score(5, -math.inf, -1e308) == -math.inf < score(5, -1e4, 1e308)  # still a float at the extremes


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, pytest.param(10**400, id="10**400"), True, "1", None])
def test_a_length_penalty_is_a_finite_number(bad):
    """NaN or an infinity would rank no beam (the server refuses them as JSON: tests/test_server.py); an int is
    taken as its float (an int power of a huge int would be worked out exactly, without end)."""
    with pytest.raises(ValueError, match="length_penalty must be a"):
        BeamSearchParams(beam_width=1, max_tokens=1, length_penalty=bad)
    assert BeamSearchParams(beam_width=1, max_tokens=1, length_penalty=10**30).length_penalty == 1e30


def test_a_served_beam_that_ended_on_eos_shows_it_only_when_asked_for():
    """As vLLM's server beam search: a beam's final EOS is in its token ids (and so in usage) only with
    include_stop_str_in_output, as in its text; a beam cut by length keeps every token."""
    from miniserve.config import DEMO_TARGET
    from miniserve.server.beam import _choice
    from miniserve.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO_TARGET)
    state = SimpleNamespace(tokenizer=tok)
    prompt, said = tok.encode("ROMEO:"), tok.encode(" I", add_special_tokens=False)
    eos = tok.eos_token_id
    ended = BeamSearchSequence(prompt + said + [eos], finish_reason="stop", stop_reason=eos)
    cut = BeamSearchSequence(prompt + said, finish_reason="length")
    for keep in (False, True):
        req = SimpleNamespace(include_stop_str_in_output=keep, skip_special_tokens=False)
        choice = _choice(state, req, prompt, ended)
        assert choice["token_ids"] == said + [eos] * keep and choice["text"] == tok.decode(said + [eos] * keep)
        assert _choice(state, req, prompt, cut)["token_ids"] == said
