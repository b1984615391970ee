"""miniserve.engine.sampler: parameter validation, and the batched sampler against independent oracles
(numpy filters, plain-Python penalties, HF's RepetitionPenaltyLogitsProcessor, exact frequencies)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from miniserve.engine.sampler import (
    SamplingBatch,
    apply_penalties_and_filters,
    probs,
    random_uniform,
    sample,
    sample_from_probs,
)
from miniserve.sampling_params import SamplingParams

V = 40


def build(params, prompts=None, outputs=None, generators=None, eos=frozenset({0}), vocab_size=V):
    rows = len(params)
    return SamplingBatch.build(
        params,
        generators if generators is not None else [None] * rows,
        prompts if prompts is not None else [[] for _ in range(rows)],
        outputs if outputs is not None else [[] for _ in range(rows)],
        set(eos),
        vocab_size,
        "cpu",
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- SamplingParams


BAD_VALUES = [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", None),
    ("top_k", -2), ("top_k", 2.0),
    ("min_p", -0.1), ("min_p", 1.5),
    ("seed", "7"), ("seed", 1.0), ("seed", 2**63), ("seed", -(2**63) - 1),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("max_tokens", 0), ("max_tokens", 2.5),
    ("min_tokens", -1), ("min_tokens", 0.5),
    ("stop", 5), ("stop", ["ok", 3]), ("stop", [""]),
    ("stop_token_ids", 3), ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", [1.0]),
    ("ignore_eos", "yes"),
    ("logprobs", -2), ("logprobs", 1.5),
    ("prompt_logprobs", -2), ("prompt_logprobs", "2"),
    ("include_stop_str_in_output", 1),
    ("skip_special_tokens", None),
    ("output_kind", "streaming"), ("detokenize", 1),
    ("logit_bias", {"5": 1.0}), ("logit_bias", {5: 101}), ("logit_bias", {5: -100.5}), ("logit_bias", [5]),
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("allowed_token_ids", 5),
    ("bad_words", "fool"), ("bad_words", [""]), ("bad_words", [" "]), ("bad_words", [3]),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", 1.5),
    ("structured_outputs", {"json": {}}),
    ("bad_words_token_ids", [[]]), ("bad_words_token_ids", [["a"]]),
    ("cache_salt", ""), ("cache_salt", 5),
    ("spaces_between_special_tokens", False), ("logits_processors", [lambda ids, logits: logits]),
]  # fmt: skip


def test_vllms_fields_and_helpers_that_do_nothing_new():
    """spaces_between_special_tokens=True and empty logits_processors are accepted (vLLM code passes them); clone()
    is a deep copy; CompletionOutput.finished()."""
    from miniserve.engine.outputs import CompletionOutput

    p = SamplingParams(spaces_between_special_tokens=True, logits_processors=[], stop=["x"], bad_words=["a"])
    q = p.clone()
    assert q == p and q is not p and q.stop is not p.stop and q.bad_words is not p.bad_words
    assert not CompletionOutput(0, "", []).finished() and CompletionOutput(0, "", [], "stop").finished()


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_every_field_is_validated():
    fields = set(SamplingParams.__dataclass_fields__)
    assert fields == {field for field, _ in BAD_VALUES}


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=3)
    assert SamplingParams(min_tokens=5, max_tokens=None).min_tokens == 5


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.logprobs) == (
        1,
        1.0,
        1.0,
        0,
        0.0,
        16,
        None,
    )
    assert p.stop == [] and p.stop_token_ids == []
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    ok = SamplingParams(temperature=0, top_k=-1, logprobs=0, max_tokens=None, seed=-5, presence_penalty=-2)
    assert ok.greedy and ok.logprobs == 0


@pytest.mark.parametrize("asked", [1e-45, 1e-6, 0.005, 0.00999])
def test_a_temperature_below_a_hundredth_is_raised_to_it_as_in_vllm(asked, caplog):
    """vLLM raises 0 < T < 0.01 to 0.01 (with a warning): such a request samples, it is not greedy. Two logits
    0.01 apart then win in the ratio 1 : e, where greedy would always take the larger."""
    with caplog.at_level("WARNING", logger="miniserve.sampling_params"):
        p = SamplingParams(temperature=asked)
    assert p.temperature == 0.01 and not p.greedy
    assert f"temperature {asked} is below 0.01" in caplog.text
    draws = 20000
    logits = torch.full((draws, V), -1e4)
    logits[:, 2], logits[:, 3] = 0.0, 0.01
    torch.manual_seed(3)
    tokens = sample(logits, build([p] * draws)).token_ids.numpy()
    share = np.mean(tokens == 2)
    assert set(np.unique(tokens)) == {2, 3} and abs(share - 1 / (1 + math.e)) < 0.015, share


@pytest.mark.parametrize("kept", [0.0, 0.01, 0.0100001, 0.5])
def test_zero_and_temperatures_from_a_hundredth_are_kept(kept, caplog):
    with caplog.at_level("WARNING", logger="miniserve.sampling_params"):
        p = SamplingParams(temperature=kept)
    assert p.temperature == kept and p.greedy == (kept == 0) and caplog.text == ""


# ---------------------------------------------------------------------------- oracles


def penalties_oracle(logits, params, prompts, outputs, eos):
    """Straightforward per-row, per-token Python version of the penalties and min_tokens masking."""
    out = [list(map(float, row)) for row in logits.tolist()]
    for row, p in enumerate(params):
        seen = set(prompts[row]) | set(outputs[row])
        for token in seen:
            x = out[row][token]
            out[row][token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for token in set(outputs[row]):
            out[row][token] -= p.frequency_penalty * outputs[row].count(token) + p.presence_penalty
        if len(outputs[row]) < p.min_tokens:
            for token in set(p.stop_token_ids) | set(eos):  # (EOS with ignore_eos too, as vLLM bans it)
                out[row][token] = -math.inf
    return torch.tensor(out)


def allowed_oracle(logits_row: np.ndarray, p: SamplingParams, slack: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """numpy: the distribution after temperature, min-p, top-k, top-p (vLLM's order), plus a slightly looser
    allowed set."""
    x = logits_row.astype(np.float64) / p.temperature
    keep = np.ones_like(x, dtype=bool)
    loose = np.ones_like(x, dtype=bool)
    if p.min_p > 0.0:  # of the whole tempered distribution
        e = np.exp(x - x.max())
        e /= e.sum()
        keep &= e >= p.min_p * e.max()
        loose &= e >= p.min_p * e.max() * (1.0 - slack)
        x = np.where(loose, x, -np.inf)
    if p.top_k > 0:
        kth = np.sort(x)[::-1][p.top_k - 1]
        keep &= x >= kth
        loose &= x >= kth
    if p.top_p < 1.0:
        e = np.where(keep, np.exp(x - x[keep].max()), 0.0)
        e /= e.sum()
        order = np.argsort(-e, kind="stable")
        before = np.cumsum(e[order]) - e[order]
        keep_sorted = before < p.top_p
        keep_sorted[0] = True
        loose_sorted = before < p.top_p + slack
        loose_sorted[0] = True
        keep[order[~keep_sorted]] = False
        loose[order[~loose_sorted]] = False
    dist = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    return dist / dist.sum(), loose


# ---------------------------------------------------------------------------- greedy, filters, distribution


def test_greedy_equals_argmax_after_penalties():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    params = [SamplingParams(temperature=0.0)] * 3 + [
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=1.0),
        SamplingParams(temperature=0.0, min_tokens=2, top_k=3, top_p=0.2),
    ]
    outputs = [[], [1, 2], [5], [int(logits[3].argmax())], [int(logits[4].argmax())] * 2, []]
    eos = {int(logits[5].argmax())}
    batch = build(params, outputs=outputs, eos=eos)
    got = sample(logits, batch).token_ids
    expected = penalties_oracle(logits, params, [[]] * 6, outputs, eos).argmax(dim=-1)
    assert torch.equal(got, expected)
    assert got[3] != logits[3].argmax() and got[4] != logits[4].argmax() and got[5] != logits[5].argmax()
    one_hot = probs(logits, batch)
    assert torch.equal(one_hot.argmax(dim=-1), expected) and torch.all(one_hot.max(dim=-1).values == 1.0)
    # a greedy row inside a random batch is still the argmax
    mixed = build(params[:3] + [SamplingParams(temperature=1.0)] * 3, outputs=outputs, eos=eos)
    assert torch.equal(sample(logits, mixed).token_ids[:3], logits[:3].argmax(dim=-1))


def test_min_p_comes_before_top_p_and_top_k_keeps_ties_as_in_vllm():
    """vLLM's order: min-p of the whole tempered distribution, then top-k, then top-p; top-k keeps every token tied
    with the k-th. Worked by hand: p = (.5, .3, .2), min_p .5 drops .2 (below .25), top_p .6 of the rest (.625, .375)
    keeps the first only (the reverse order kept two); logits (2, 1, 1, 0) with top_k 2 keep three tokens."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    batch = SamplingBatch.build([SamplingParams(min_p=0.5, top_p=0.6)], [None], [[0]], [[]], set(), 3, "cpu")
    assert probs(logits, batch).tolist() == [[1.0, 0.0, 0.0]]
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    batch = SamplingBatch.build([SamplingParams(top_k=2)], [None], [[0]], [[]], set(), 4, "cpu")
    e = [math.exp(2.0), math.exp(1.0), math.exp(1.0)]
    assert probs(logits, batch)[0].tolist() == pytest.approx([v / sum(e) for v in e] + [0.0])


FILTERS = [
    SamplingParams(top_k=5),
    SamplingParams(top_p=0.6),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.5, top_k=8, top_p=0.9),
    SamplingParams(temperature=1.7, top_p=0.75, min_p=0.05),
    SamplingParams(temperature=2.0, top_k=12, top_p=0.95, min_p=0.1),
    SamplingParams(top_k=1),
    SamplingParams(temperature=0.8),
]


@pytest.mark.parametrize("index", range(len(FILTERS)))
def test_filters_match_numpy_and_never_emit_excluded_tokens(index):
    p = FILTERS[index]
    gen = torch.Generator().manual_seed(index)
    logits_row = torch.randn(V, generator=gen) * 2.0
    expected, loose = allowed_oracle(logits_row.numpy(), p)
    draws = 3000
    batch = build([p] * draws)
    logits = logits_row.expand(draws, V).contiguous()
    dist = probs(logits, batch)[0].double().numpy()
    assert np.allclose(dist, expected, atol=1e-5)
    torch.manual_seed(100 + index)
    emitted = set(sample(logits, batch).token_ids.tolist())
    assert emitted <= set(np.flatnonzero(loose).tolist())
    assert emitted & set(np.flatnonzero(expected > 0.02).tolist()) == set(np.flatnonzero(expected > 0.02).tolist())


def test_filters_are_per_row():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(len(FILTERS), V, generator=gen) * 2.0
    batch = build(FILTERS)
    dist = probs(logits, batch).double().numpy()
    for row, p in enumerate(FILTERS):
        assert np.allclose(dist[row], allowed_oracle(logits[row].numpy(), p)[0], atol=1e-5), p


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> tuple[float, int]:
    total = counts.sum()
    support = expected_probs > 0
    assert counts[~support].sum() == 0
    exp = expected_probs[support] * total
    return float(((counts[support] - exp) ** 2 / exp).sum()), int(support.sum() - 1)


@pytest.mark.parametrize("use_generators", [False, True])
def test_sampled_frequencies_match_target_distribution(use_generators):
    p = SamplingParams(temperature=0.9, top_k=10, top_p=0.97)
    logits_row = torch.randn(V, generator=torch.Generator().manual_seed(7))
    draws = 20000
    generators = [seeded(1000 + i) for i in range(draws)] if use_generators else None
    batch = build([p] * draws, generators=generators)
    torch.manual_seed(11)
    tokens = sample(logits_row.expand(draws, V).contiguous(), batch).token_ids.numpy()
    target = allowed_oracle(logits_row.numpy(), p)[0]
    stat, dof = chi_square(np.bincount(tokens, minlength=V).astype(np.float64), target)
    # chi-square with ~9 degrees of freedom: 35 is far in the tail (p < 1e-4) for a correct sampler
    assert dof >= 5 and stat < 35.0, (stat, dof)


def test_sample_from_probs_matches_given_distribution():
    target = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    draws = 16000
    batch = build([SamplingParams()] * draws, vocab_size=5)
    torch.manual_seed(5)
    tokens = sample_from_probs(target.expand(draws, 5).contiguous(), batch).numpy()
    stat, dof = chi_square(np.bincount(tokens, minlength=5).astype(np.float64), target.numpy())
    assert dof == 3 and stat < 25.0
    one_hot = torch.eye(5)[[3, 0, 4]]
    assert sample_from_probs(one_hot, build([SamplingParams()] * 3, vocab_size=5)).tolist() == [3, 0, 4]


# ---------------------------------------------------------------------------- seeds


def run_steps(seed_row_params, others, steps=8):
    """Sample `steps` tokens for a seeded row placed at position 1 among `others` rows."""
    gen = seeded(1234)
    logits_gen = torch.Generator().manual_seed(99)
    tokens = []
    for _ in range(steps):
        params = others[:1] + [seed_row_params] + others[1:]
        generators = [None] + [gen] + [seeded(len(tokens) + j) if j % 2 else None for j in range(len(others) - 1)]
        logits = torch.randn(len(params), V, generator=logits_gen)
        target_row = torch.randn(V, generator=torch.Generator().manual_seed(len(tokens)))
        logits[1] = target_row
        tokens.append(int(sample(logits, build(params, generators=generators)).token_ids[1]))
    return tokens


def test_seeded_row_reproduces_regardless_of_batch():
    p = SamplingParams(temperature=1.3, top_p=0.95, seed=1234)
    alone = run_steps(p, [SamplingParams()])
    crowded = run_steps(
        p, [SamplingParams(temperature=0.0), SamplingParams(top_k=3), SamplingParams(), SamplingParams()]
    )
    torch.manual_seed(42)  # the global RNG state must not matter either
    greedy_company = run_steps(p, [SamplingParams(temperature=0.0)])
    assert alone == crowded == greedy_company
    other_seed = []
    gen = seeded(4321)
    for step in range(8):
        row = torch.randn(V, generator=torch.Generator().manual_seed(step)).unsqueeze(0)
        other_seed.append(int(sample(row, build([p], generators=[gen])).token_ids[0]))
    assert other_seed != alone


def test_random_uniform_uses_row_generators():
    p = [SamplingParams(seed=1), SamplingParams(), SamplingParams(seed=2)]
    first = random_uniform(build(p, generators=[seeded(1), None, seeded(2)]), (3,))
    again = random_uniform(build(p[2:] + p[:1], generators=[seeded(2), seeded(1)]), (3,))
    assert first.shape == (3, 3) and bool(((first >= 0) & (first < 1)).all())
    assert torch.equal(first[0], again[1]) and torch.equal(first[2], again[0])
    assert random_uniform(build(p[:1], generators=[seeded(1)])).shape == (1,)


# ---------------------------------------------------------------------------- penalties


def test_penalties_match_python_oracle():
    gen = torch.Generator().manual_seed(1)
    rows = 6
    logits = torch.randn(rows, V, generator=gen) * 3.0
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(presence_penalty=1.2, frequency_penalty=-0.5),
        SamplingParams(presence_penalty=-1.0, min_tokens=3, stop_token_ids=[7, 9]),
        SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[11]),
        SamplingParams(min_tokens=1, repetition_penalty=1.1),
    ]
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (5, 8, 0, 3, 4, 6)]
    outputs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (4, 7, 9, 2, 1, 1)]
    outputs[2] += outputs[2][:3]  # repeated tokens for the frequency penalty
    eos = {0, 3}
    got = apply_penalties_and_filters(logits, build(params, prompts, outputs, eos=eos))
    assert torch.allclose(got, penalties_oracle(logits, params, prompts, outputs, eos), atol=1e-5)
    assert got[3, [0, 3, 7, 9]].eq(-math.inf).all() and got[4, [0, 11]].eq(-math.inf).all()
    assert (got[5] > -math.inf).all()  # min_tokens reached: nothing masked


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(2)
    rows, length = 4, 12
    logits = torch.randn(rows, V, generator=gen) * 2.0
    history = torch.randint(0, V, (rows, length), generator=gen)
    for penalty in (1.3, 0.8):
        hf = RepetitionPenaltyLogitsProcessor(penalty=penalty)(history, logits.clone())
        prompts = [h[:5].tolist() for h in history]
        outputs = [h[5:].tolist() for h in history]
        ours = apply_penalties_and_filters(
            logits, build([SamplingParams(repetition_penalty=penalty)] * rows, prompts, outputs)
        )
        assert torch.allclose(ours, hf, atol=1e-6)


def test_input_logits_are_not_modified_and_shapes_checked():
    logits = torch.randn(2, V)
    before = logits.clone()
    batch = build([SamplingParams(temperature=0.5, top_k=3, repetition_penalty=2.0)] * 2, outputs=[[1], [2]])
    sample(logits, batch)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="columns"):
        apply_penalties_and_filters(torch.randn(2, V + 1), batch)
    with pytest.raises(ValueError, match="logits must be"):
        apply_penalties_and_filters(torch.randn(3, V), batch)


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_model_logprobs():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, V, generator=gen)
    params = [
        SamplingParams(temperature=0.3, logprobs=5, repetition_penalty=1.7),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(top_k=2, frequency_penalty=1.0),
        SamplingParams(temperature=1.5, top_p=0.5, logprobs=2),
    ]
    out = sample(logits, build(params, outputs=[[1, 2], [], [3, 3], [4]]))
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (4,)
    assert torch.allclose(out.logprobs.double(), raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1), atol=1e-5)
    ids, values = out.top_logprobs
    assert ids.shape == values.shape == (4, 5)
    top = raw.topk(5, dim=-1)
    assert torch.equal(ids, top.indices) and torch.allclose(values.double(), top.values, atol=1e-5)


def test_top_logprobs_only_when_asked():
    logits = torch.randn(2, V)
    unasked = sample(logits, build([SamplingParams()] * 2))
    assert unasked.top_logprobs is None and unasked.logprobs is None
    ids, values = sample(logits, build([SamplingParams(logprobs=0), SamplingParams()])).top_logprobs
    assert ids.shape == values.shape == (2, 0)
