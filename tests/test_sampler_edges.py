"""The sampler at its edges: the all-greedy fast path, top-p at exactly its mass, logprobs of half-precision
logits, top-k past the vocabulary, logit_bias and penalties before the temperature, allowed_token_ids, bad words,
ranks. Oracles: maxima placed by hand, probabilities that are exact in float32 (equal logits: 1/4 each), logits
worked out by hand, and log_softmax in float64."""

from __future__ import annotations

import math

import pytest
import torch

from miniserve.engine.sampler import (
    SamplingBatch,
    apply_penalties_and_filters,
    bad_words_token_ids,
    check_allowed_tokens,
    probs,
    sample,
    sample_from_probs,
)
from miniserve.sampling_params import SamplingParams

V = 8


def build(params, outputs=None, eos=frozenset({0}), vocab_size=V):
    rows = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(rows)]
    return SamplingBatch.build(params, [None] * rows, [[] for _ in range(rows)], outputs, set(eos), vocab_size, "cpu")


def test_an_all_greedy_batch_without_penalties_takes_each_rows_argmax():
    logits = torch.zeros(3, V)
    logits[0, 5], logits[1, 2], logits[2, 7] = 3.0, 1.0, 0.5
    logits[1, 5] = 0.9  # a smaller peak where row 0 has its maximum
    out = sample(logits, build([SamplingParams(temperature=0.0)] * 3))
    assert out.token_ids.tolist() == [5, 2, 7] and out.logprobs is None and out.top_logprobs is None


@pytest.mark.parametrize(("top_p", "kept"), [(0.25, 1), (0.26, 2), (0.5, 2), (0.5001, 3), (0.75, 3), (0.99, 4)])
def test_top_p_keeps_the_smallest_prefix_that_reaches_its_mass(top_p, kept):
    """Four equal logits: each token is 1/4 exactly, so a prefix of n tokens holds n/4 exactly."""
    logits = torch.zeros(1, V)
    logits[0, 4:] = -math.inf  # 4 tokens of 1/4
    out = apply_penalties_and_filters(logits, build([SamplingParams(top_p=top_p)]))
    assert int(torch.isfinite(out).sum()) == kept


def test_logprobs_of_bfloat16_logits_are_computed_in_float32():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, V, generator=gen) * 4).to(torch.bfloat16)
    out = sample(logits, build([SamplingParams(temperature=0.0, logprobs=3)] * 2))
    exact = torch.log_softmax(logits.double(), dim=-1)
    assert out.token_ids.tolist() == logits.float().argmax(dim=-1).tolist()
    torch.testing.assert_close(out.logprobs.double(), exact.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-5)
    ids, values = out.top_logprobs
    torch.testing.assert_close(values.double(), exact.topk(3, dim=-1).values, rtol=0, atol=1e-5)
    assert ids.tolist() == exact.topk(3, dim=-1).indices.tolist()


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0.0)] * 3,
        [SamplingParams(temperature=0.0, logit_bias={3: 2.5}), SamplingParams(temperature=0.0)] * 2,
        [SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=1.3, top_p=0.8, seed=2)],
        [SamplingParams(temperature=0.9, top_k=3, seed=3, presence_penalty=0.5), SamplingParams(temperature=0.0)],
    ],
    ids=["greedy", "greedy-bias", "sampled", "penalized-mixed"],
)
def test_model_dtype_logits_sample_as_their_float32_copy(params):
    """The decoder hands the sampler bf16 logits (forward(float_logits=False)); the stepwise path hands it
    their exact fp32 copy: every row must draw the same token with the same generator state."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(len(params), V, generator=gen) * 3).to(torch.bfloat16)
    logits[:, 6] = logits[:, 5]  # ties: the first maximum wins in both dtypes

    def batch():
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        return SamplingBatch.build(params, gens, [[] for _ in params], [[1, 2]] * len(params), {0}, V, "cpu")

    assert torch.equal(probs(logits, batch()), probs(logits.float(), batch()))
    first, second = batch(), batch()
    for _ in range(8):
        assert torch.equal(sample(logits, first).token_ids, sample(logits.float(), second).token_ids)


def test_filters_return_float32_whatever_the_logits_dtype():
    logits = torch.tensor([[1.0, -2.5, 0.375, 3.0] + [0.0] * (V - 4)], dtype=torch.bfloat16)  # exact in bfloat16
    out = apply_penalties_and_filters(logits, build([SamplingParams(temperature=0.7)]))
    assert out.dtype == torch.float32
    assert torch.equal(out, logits.float() / torch.tensor(0.7, dtype=torch.float32))


def test_greedy_rows_of_a_mixed_batch_are_one_hot_in_the_distribution():
    """What rejection sampling reads: a greedy row's distribution is all on its argmax, beside sampled rows."""
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.5] + [-1.0] * (V - 4)] * 2)
    dist = probs(logits, build([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]))
    assert dist[0].tolist() == [0.0, 1.0] + [0.0] * (V - 2)
    torch.testing.assert_close(dist[1], torch.softmax(logits[1].double(), -1).float())


def test_min_p_keeps_tokens_at_exactly_the_threshold():
    logits = torch.zeros(1, V)
    logits[0, 4:] = -math.inf  # 4 tokens of 1/4: each is exactly min_p = 1.0 times the largest
    out = apply_penalties_and_filters(logits, build([SamplingParams(min_p=1.0)]))
    assert int(torch.isfinite(out).sum()) == 4


def test_sample_from_probs_takes_the_argmax_on_greedy_rows():
    dist = torch.tensor([[0.45, 0.55] + [0.0] * (V - 2)] * 64)
    torch.manual_seed(0)
    assert sample_from_probs(dist, build([SamplingParams(temperature=0.0)] * 64)).tolist() == [1] * 64
    mixed = build([SamplingParams(temperature=0.0)] * 32 + [SamplingParams(temperature=1.0)] * 32)
    drawn = sample_from_probs(dist, mixed).tolist()
    assert drawn[:32] == [1] * 32 and set(drawn[32:]) == {0, 1}  # the sampled rows draw both


def test_a_repetition_penalty_of_two_divides_seen_positive_logits_and_multiplies_negative_ones():
    logits = torch.tensor([[4.0, -2.0, 3.0, 1.0] + [0.0] * (V - 4)])
    batch = SamplingBatch.build([SamplingParams(repetition_penalty=2.0)], [None], [[0]], [[1]], set(), V, "cpu")
    out = apply_penalties_and_filters(logits, batch)
    assert out[0, :4].tolist() == [2.0, -4.0, 3.0, 1.0]  # tokens 0 (prompt) and 1 (output) were seen


def test_build_names_the_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per row: 2 params, 1 generators, 2 prompts, 2 outputs"):
        SamplingBatch.build([SamplingParams()] * 2, [None], [[], []], [[], []], set(), V, "cpu")


@pytest.mark.parametrize(
    ("field", "expected"), [("frequency_penalty", [1.0, 1.0, -1.0, 0.0]), ("presence_penalty", [1.0, 1.0, 0.0, 0.0])]
)
def test_a_penalty_of_exactly_one(field, expected):
    logits = torch.ones(1, V)
    batch = SamplingBatch.build([SamplingParams(**{field: 1.0})], [None], [[0]], [[2, 2, 3]], set(), V, "cpu")
    out = apply_penalties_and_filters(logits, batch)
    assert (
        out[0, :4].tolist() == expected
    )  # token 2 was output twice, token 3 once; the prompt's token 0 does not count


def test_min_tokens_bans_the_stop_ids_in_the_vocabulary_and_ignores_the_others():
    params = SamplingParams(min_tokens=2, stop_token_ids=[V - 1, V])  # V is past the last id: never sampled
    batch = SamplingBatch.build([params], [None], [[]], [[]], {0}, V, "cpu")
    out = apply_penalties_and_filters(torch.zeros(1, V), batch)
    assert torch.isinf(out[0]).tolist() == [True] + [False] * (V - 2) + [True]  # EOS 0 and V - 1


def _large_vocab_logits(rows: int) -> torch.Tensor:
    """A 152k vocabulary (Qwen's) with a long tail: float32 running sums of its probabilities drift by ~1e-5."""
    return torch.randn(rows, 152064, generator=torch.Generator().manual_seed(0)) * 3.0


def test_a_row_without_top_p_keeps_its_whole_tail_beside_a_top_p_row():
    """A row's distribution must not depend on its batch: top_p 1.0 cuts nothing, whoever else filters."""
    logits = _large_vocab_logits(2)
    params = [SamplingParams(top_p=0.9), SamplingParams()]
    out = apply_penalties_and_filters(logits, build(params, vocab_size=logits.shape[1]))
    assert int((~torch.isfinite(out[1])).sum()) == 0


@pytest.mark.parametrize("top_p", [0.999, 0.9999])
def test_top_p_keeps_its_mass_at_a_large_vocabulary(top_p):
    """The kept tokens are the smallest prefix whose mass reaches top_p (a float64 oracle), to within 1e-6: the
    float32 running sum from the largest kept ~1e-5 less than top_p."""
    logits = _large_vocab_logits(1)
    out = apply_penalties_and_filters(logits, build([SamplingParams(top_p=top_p)], vocab_size=logits.shape[1]))
    exact = torch.softmax(logits[0].double(), dim=-1)
    kept = torch.isfinite(out[0])
    smallest_kept = exact[kept].min()
    assert float(exact[kept].sum()) >= top_p - 1e-6
    assert float(exact[kept].sum() - smallest_kept) < top_p + 1e-6


def test_a_sequences_token_array_follows_its_tokens_through_growth():
    """Sequence.token_array (what the sampler reads of a penalized sequence's history) equals its token list after
    every append, across the buffer's growth (64, then doubling) and after the list is replaced by a shorter one."""
    import random

    from miniserve.scheduler.sequence import Sequence

    rng = random.Random(0)
    seq = Sequence(0, "r", 0, [rng.randrange(1000) for _ in range(5)], SamplingParams())
    for _ in range(300):
        seq.token_ids.extend(rng.randrange(1000) for _ in range(rng.choice((1, 1, 1, 7))))
        assert seq.token_array().tolist() == seq.token_ids
    seq.token_ids = seq.token_ids[:40] + [7, 7, 7]
    assert seq.token_array().tolist() == seq.token_ids


def test_a_top_k_above_the_vocabulary_filters_nothing_beside_a_row_that_filters():
    logits = torch.arange(V, dtype=torch.float32)[None].repeat(2, 1)
    out = apply_penalties_and_filters(logits, build([SamplingParams(top_k=V + 3), SamplingParams(top_k=2)]))
    assert out[0].tolist() == logits[0].tolist()
    assert out[1].tolist() == [-math.inf] * (V - 2) + [V - 2.0, V - 1.0]


def test_a_top_p_below_float32_resolution_keeps_the_most_likely_token():
    """1 - 1e-9 rounds to 1.0 in float32, so every position's tail mass is within it: only the first is kept."""
    logits = torch.tensor([[0.5, 2.0, 1.0] + [0.0] * (V - 3)])
    out = apply_penalties_and_filters(logits, build([SamplingParams(top_p=1e-9)]))
    assert torch.isfinite(out[0]).tolist() == [False, True] + [False] * (V - 2)


def test_logit_bias_and_penalties_come_before_the_temperature():
    """vLLM's order: (logit + bias - frequency * count - presence) / temperature; the values are exact in float32.
    Token 3 was output twice: 3 + 1 - 2 * 0.5 - 0.25 = 2.75; token 0 gets its bias: 0 + 2.5."""
    logits = torch.arange(V, dtype=torch.float32)[None]
    params = SamplingParams(temperature=0.5, logit_bias={0: 2.5, 3: 1.0}, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties_and_filters(logits, build([params], outputs=[[3, 3]]))
    expected = [2.5, 1.0, 2.0, 2.75] + list(range(4, V))
    assert out[0].tolist() == [v / 0.5 for v in expected]


def test_allowed_token_ids_mask_the_others_in_their_row_only():
    logits = torch.arange(2 * V, dtype=torch.float32).reshape(2, V)
    out = apply_penalties_and_filters(logits, build([SamplingParams(allowed_token_ids=[2, 5]), SamplingParams()]))
    assert out[0].tolist() == [-math.inf, -math.inf, 2.0, -math.inf, -math.inf, 5.0, -math.inf, -math.inf]
    assert out[1].tolist() == logits[1].tolist()


@pytest.mark.parametrize(
    "kw",
    [
        dict(allowed_token_ids=[0], min_tokens=1),  # only EOS, banned until one token: nothing left
        dict(allowed_token_ids=[0, 3], min_tokens=1, stop_token_ids=[3]),
        dict(allowed_token_ids=[4], bad_words_token_ids=[[4]]),
        dict(allowed_token_ids=[0, 4], min_tokens=2, bad_words_token_ids=[[4], [1, 0]]),
        dict(allowed_token_ids=[0], min_tokens=1, ignore_eos=True),  # EOS banned all the same (vLLM's rule)
        dict(allowed_token_ids=[0, 3], min_tokens=1),
        dict(allowed_token_ids=[0]),
        dict(allowed_token_ids=[6], bad_words_token_ids=[[4], [1, 6]]),  # 6 only after 1
        dict(allowed_token_ids=[3], min_tokens=1, stop_token_ids=[5]),
    ],
)
def test_allowed_token_ids_that_leave_nothing_to_sample_are_refused(kw):
    """The oracle is the sampler's own first-step masks (EOS = 0): the request is refused exactly when they leave
    no finite logit, where argmax would pick a masked token."""
    params = SamplingParams(**kw)
    first = apply_penalties_and_filters(torch.zeros(1, V), build([params]))
    if torch.isfinite(first).any():
        check_allowed_tokens(params, {0}, V)
    else:
        with pytest.raises(ValueError, match="allowed_token_ids: every token it allows is banned"):
            check_allowed_tokens(params, {0}, V)


@pytest.mark.parametrize(
    ("output", "banned"),
    [([], [4]), ([2], [4]), ([1, 2], [4, 6]), ([7, 1, 2], [4, 6]), ([1, 2, 3], [4]), ([2, 1], [4])],
)
def test_a_bad_words_last_token_is_banned_right_after_its_other_tokens(output, banned):
    """Bad words [4] and [1, 2, 6]: 4 is always banned, 6 only where the output ends with 1, 2 (also when that is
    the whole output)."""
    params = SamplingParams(bad_words_token_ids=[[4], [1, 2, 6]])
    out = apply_penalties_and_filters(torch.zeros(1, V), build([params], outputs=[output]))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == banned


def test_bad_words_become_token_sequences_read_as_vllm_reads_them():
    """On transformers' tokenizer of the demo model: the word with its leading spaces dropped and its trailing ones
    kept (vLLM's SamplingParams.update_from_tokenizer: "be " bans "be" only before a space), alone and after a
    space (both spellings, where vLLM drops the spaced one of another length: README)."""
    import transformers

    from miniserve.config import DEMO_TARGET
    from miniserve.tokenizer import Tokenizer

    hf = transformers.AutoTokenizer.from_pretrained(DEMO_TARGET)
    words = ["thee", "confess", "be ", "not\n", "  lead", "ROMEO", "xylophone"]
    want = []
    for word in words:
        alone = hf(word.lstrip(), add_special_tokens=False).input_ids
        spaced = hf(" " + word.lstrip(), add_special_tokens=False).input_ids
        want += [alone] + ([spaced] if spaced != alone else [])
    got = bad_words_token_ids(Tokenizer.from_pretrained(DEMO_TARGET), words)
    assert got == want and any(len(w) > 1 for w in want) and len(want) > len(words)


def test_a_sampled_tokens_rank_counts_the_tokens_at_least_as_likely():
    """vLLM's rank: 1 for a unique maximum; tokens tied with the chosen one count too."""
    logits = torch.tensor([[0.0, 3.0, 1.0] + [0.0] * (V - 3), [3.0, 3.0, 1.0] + [0.0] * (V - 3)])
    out = sample(logits, build([SamplingParams(temperature=0.0, logprobs=1)] * 2))
    assert out.token_ids.tolist() == [1, 0] and out.ranks.tolist() == [1, 2]
