"""The fused sampling kernel (kernels/sampling.py) in Triton's interpreter: its argmax against torch.argmax (ties,
NaN, -inf, chunk edges), its race against the torch reference fed the kernel's own uniforms, the reference's
race against the closed-form softmax probabilities, and the sampler's dispatch to it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from benchmarks.sampling_kernel import kernel_uniforms
from miniserve.engine.sampler import SamplingBatch, race_applies, sample
from miniserve.kernels.sampling import BLOCK, MAX_CHUNKS, covers, gumbel_argmax, gumbel_argmax_reference
from miniserve.sampling_params import SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_argmax_is_torch_argmax(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g).to(dtype)
    logits[1] = logits[1].round()  # many ties: the first index of the largest value wins
    assert torch.equal(gumbel_argmax(logits, None, 0), logits.argmax(dim=-1))


def test_argmax_special_values_across_chunks():
    """torch.argmax's rules over chunk boundaries: the first of equal maxima, NaN above +inf, -inf rows."""
    vocab = 2 * BLOCK + 3
    logits = torch.zeros(6, vocab)
    logits[0, [5, BLOCK + 5]] = 3.0  # equal maxima in two chunks
    logits[1, [BLOCK + 5, 2 * BLOCK + 1]] = 3.0
    logits[2, 1] = math.inf  # a NaN in a later chunk outranks +inf
    logits[2, BLOCK + 7] = math.nan
    logits[3, [BLOCK + 9, 2 * BLOCK + 2]] = math.nan  # the first NaN
    logits[4] = -math.inf  # nothing is allowed: index 0, as torch says
    logits[5, -1] = 1.0  # the last column
    assert torch.equal(gumbel_argmax(logits, None, 0), logits.argmax(dim=-1))
    assert gumbel_argmax(logits, None, 0).tolist() == [5, BLOCK + 5, BLOCK + 7, BLOCK + 9, 0, vocab - 1]


@pytest.mark.parametrize("vocab", [5, BLOCK + 3])
def test_race_is_the_reference_with_the_kernels_uniforms(vocab):
    """Sampled rows (several temperatures) and greedy rows (temperature 0) in one batch, three seeds."""
    g = torch.Generator().manual_seed(vocab)
    temperature = torch.tensor([1.0, 0.0, 0.6, 2.0, 0.0, 1e-3])
    logits = torch.randn(len(temperature), vocab, generator=g).to(torch.bfloat16)
    logits[2, ::3] = -math.inf  # banned tokens are never drawn
    for seed in (0, 1, 2**31 - 2):
        want = gumbel_argmax_reference(logits, temperature, kernel_uniforms(len(temperature), vocab, seed, "cpu"))
        got = gumbel_argmax(logits, temperature, seed)
        assert torch.equal(got, want), seed
        assert got[2] % 3 != 0
        assert torch.equal(got[[1, 4]], logits[[1, 4]].argmax(dim=-1))


def test_bounds_exact_fit_and_one_past():
    """The noise offsets are int32 and stage 2 reads MAX_CHUNKS chunks: the largest shapes it takes, and one more;
    the sampler falls back to torch past them (`covers`)."""
    assert covers(1, MAX_CHUNKS * BLOCK) and not covers(1, MAX_CHUNKS * BLOCK + 1)
    assert covers(2**31 // 1024 - 1, 1024) and not covers(2**31 // 1024, 1024)
    with pytest.raises(ValueError, match="covers at most"):
        gumbel_argmax(torch.zeros(1, MAX_CHUNKS * BLOCK + 1), None, 0)
    wide = torch.zeros(1, MAX_CHUNKS * BLOCK)
    wide[0, -1] = 1.0
    assert gumbel_argmax(wide, None, 0).item() == MAX_CHUNKS * BLOCK - 1


def test_seed_decides_the_draw():
    logits = torch.zeros(4, 1000)  # uniform: 1000 equally likely tokens a row
    temperature = torch.ones(4)
    first = gumbel_argmax(logits, temperature, 123)
    assert torch.equal(gumbel_argmax(logits, temperature, 123), first)
    assert not torch.equal(gumbel_argmax(logits, temperature, 124), first)
    assert len(set(first.tolist())) > 1  # rows draw apart (their offsets differ)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_reference_race_draws_from_the_tempered_softmax(temperature):
    """Chi-square of 40,000 draws against softmax(logits / T) (7 tokens, 6 degrees of freedom: the critical value
    at p = 1e-4 is 27.86); the kernel equals the reference draw for draw (test above)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 40_000
    g = torch.Generator().manual_seed(int(temperature * 10))
    uniform = torch.rand(n, len(logits), generator=g)
    draws = gumbel_argmax_reference(logits.expand(n, -1), torch.full((n,), temperature), uniform)
    counts = torch.bincount(draws, minlength=len(logits)).double()
    expected = n * torch.softmax(logits.double() / temperature, dim=0)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.86, (counts.tolist(), expected.tolist())


def params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=4, **kw)


def test_race_applies_only_to_plain_temperature_sampling():
    def on(device: str, ps: list[SamplingParams], generators: list) -> SamplingBatch:
        batch = SamplingBatch.build(ps, generators, [[1]] * len(ps), [[2]] * len(ps), {0}, 50, "cpu")
        return replace(batch, device=torch.device(device))  # (a device object: nothing runs on it)

    plain = [params(temperature=0.7), params(temperature=0.0)]
    assert race_applies(on("cuda", plain, [None, None]))
    assert not race_applies(on("cpu", plain, [None, None]))  # the CPU samples with torch
    assert not race_applies(on("cuda", [params(temperature=0.0)] * 2, [None, None]))  # all greedy: the argmax
    assert not race_applies(on("cuda", plain, [torch.Generator(), None]))  # a seeded row keeps its own draws
    for knob in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)):
        assert not race_applies(on("cuda", [params(temperature=0.7, **knob)], [None])), knob


def test_sample_uses_the_race_when_the_batch_has_its_temperatures():
    """A batch built for the GPU carries race_temperature; `sample` then draws with the kernel (here in the
    interpreter) with a seed from torch's global generator: greedy rows get their argmax, and the draw repeats
    under torch.manual_seed."""
    ps = [params(temperature=0.0), params(temperature=0.8), params(temperature=0.0)]
    batch = SamplingBatch.build(ps, [None] * 3, [[1]] * 3, [[2]] * 3, {0}, 50, "cpu")
    assert batch.race_temperature is None  # built for the CPU
    batch.race_temperature = torch.tensor([0.0, 0.8, 0.0])
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    first = sample(logits, batch).token_ids
    torch.manual_seed(7)
    assert torch.equal(sample(logits, batch).token_ids, first)
    assert torch.equal(first[[0, 2]], logits[[0, 2]].argmax(dim=-1))
    seed = torch.Generator().manual_seed(7)  # the seed the race drew: the kernel's draw with it
    race_seed = int(torch.randint(2**31 - 1, (1,), generator=seed).item())
    assert torch.equal(first, gumbel_argmax(logits, batch.race_temperature, race_seed))


def test_the_gpu_check_script_runs_in_the_interpreter():
    """benchmarks/sampling_kernel.py's checks on tiny shapes (so the GPU script cannot rot): no disagreement with
    torch.argmax or with the reference. (Its chi-square needs more draws than the interpreter makes quickly: the
    reference's race is tested against the softmax above.)"""
    from benchmarks import sampling_kernel

    cpu = torch.device("cpu")
    assert all(r["mismatches"] == 0 for r in sampling_kernel.check_argmax(cpu, [(3, BLOCK + 9)]))
    assert all(r["mismatches"] == 0 for r in sampling_kernel.check_race(cpu, [(3, 700)]))
