"""The fused sampling kernel (kernels/sampling.py) in Triton's interpreter: its argmax against torch.argmax (ties,
NaN, -inf, chunk edges), its race against the torch reference fed the kernel's own uniforms, the reference's
race against the closed-form softmax probabilities, and the sampler's dispatch to it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from benchmarks.sampling_kernel import kernel_uniforms
from miniserve.engine import sampler as sampler_module
from miniserve.engine.sampler import SamplingBatch, apply_token_bitmask, draw_noise, race_applies, sample
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


def random_bitmask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """xgrammar's layout, int32 [rows, ceil(vocab / 32)], random bits (bit 31 included); row 1 allows nothing."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (rows, (vocab + 31) // 32), generator=g, dtype=torch.int64)
    bitmask = words.to(torch.int32)
    bitmask[1] = 0
    return bitmask


def allowed_by_bit(bitmask: torch.Tensor, row: int, token: int) -> bool:
    """One bit read the slow way, as Python integers (the oracle for the masks)."""
    return (int(bitmask[row, token // 32]) & 0xFFFFFFFF) >> (token % 32) & 1 == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [31, 32, 33, BLOCK + 40])
def test_masked_argmax_is_the_torch_paths(dtype, vocab):
    """A grammar's masks in the kernel: greedy rows get exactly what the torch path (unpack, mask, argmax) gives,
    NaN and all, and a row that allows nothing gets index 0."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g).to(dtype)
    logits[2, 3] = math.nan  # banned or not, as its bit says
    logits[3, -1] = 100.0  # the last column
    bitmask = random_bitmask(4, vocab, vocab)
    want = apply_token_bitmask(logits.float(), bitmask).argmax(dim=-1)
    got = gumbel_argmax(logits, None, 0, bitmask)
    assert torch.equal(got, want) and got[1] == 0
    for row in (0, 2, 3):
        assert allowed_by_bit(bitmask, row, int(got[row]))
    assert torch.equal(gumbel_argmax_reference(logits, None, None, bitmask), want)
    with pytest.raises(ValueError, match="bitmask must be int32"):
        gumbel_argmax(logits, None, 0, bitmask[:, :-1] if vocab > 32 else bitmask.to(torch.int64))


@pytest.mark.parametrize("vocab", [37, BLOCK + 3])
def test_masked_race_is_the_reference_and_draws_only_allowed_tokens(vocab):
    temperature = torch.tensor([1.0, 0.7, 0.0, 2.0])
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)).to(torch.bfloat16)
    bitmask = random_bitmask(4, vocab, vocab + 1)
    for seed in (0, 5, 2**31 - 2):
        uniforms = kernel_uniforms(4, vocab, seed, "cpu")
        got = gumbel_argmax(logits, temperature, seed, bitmask)
        assert torch.equal(got, gumbel_argmax_reference(logits, temperature, uniforms, bitmask)), seed
        assert all(allowed_by_bit(bitmask, row, int(got[row])) for row in (0, 2, 3)) and got[1] == 0
        assert got[2] == apply_token_bitmask(logits[2:3].float(), bitmask[2:3]).argmax()


def test_sample_takes_grammar_masks_into_the_kernel(monkeypatch):
    """A constrained batch that nothing else reshapes is sampled by the kernel, masks and all: greedy batches
    give the torch path's tokens, a racing batch draws no noise ahead (the kernel draws its own) and gets the
    kernel's draw; a seeded row, or a penalty, keeps the torch path and its noise drawn ahead."""
    monkeypatch.setattr(sampler_module, "_fused", lambda logits: True)  # (the interpreter stands in for a GPU)
    masks_in_kernel = []

    def spy(logits, temperature, seed, bitmask=None):
        masks_in_kernel.append(bitmask is not None)
        return gumbel_argmax(logits, temperature, seed, bitmask)

    monkeypatch.setattr(sampler_module, "gumbel_argmax", spy)
    vocab = 70
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    bitmask = random_bitmask(3, vocab, 2)
    bitmask[1] = -1  # row 1 allows everything here

    def batch(ps: list[SamplingParams], generators: list | None = None) -> SamplingBatch:
        b = SamplingBatch.build(ps, generators or [None] * 3, [[1]] * 3, [[2]] * 3, {0}, vocab, "cpu")
        return replace(b, token_bitmask=bitmask)

    greedy = batch([params(temperature=0.0)] * 3)
    assert torch.equal(sample(logits, greedy).token_ids, apply_token_bitmask(logits.clone(), bitmask).argmax(-1))
    racing = batch([params(temperature=0.8)] * 3)
    racing.race_temperature = torch.full((3,), 0.8)  # as a batch built for a GPU carries
    assert draw_noise(racing) is None
    torch.manual_seed(3)
    got = sample(logits, racing).token_ids
    seed = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(3)).item())
    assert torch.equal(got, gumbel_argmax(logits, racing.race_temperature, seed, bitmask))
    assert all(allowed_by_bit(bitmask, row, int(got[row])) for row in range(3))
    assert masks_in_kernel == [True, True]
    penalized = replace(racing, banned=(torch.tensor([0]), torch.tensor([5])))
    assert draw_noise(penalized) is not None  # the torch path, with its noise drawn ahead
    seeded = batch([params(temperature=0.8)] * 3, [torch.Generator().manual_seed(0), None, None])
    assert seeded.race_temperature is None and draw_noise(seeded) is not None


def test_the_gpu_check_script_runs_in_the_interpreter():
    """benchmarks/sampling_kernel.py's checks on tiny shapes (so the GPU script cannot rot): no disagreement with
    torch.argmax or with the reference. (Its chi-square needs more draws than the interpreter makes quickly: the
    reference's race is tested against the softmax above.)"""
    from benchmarks import sampling_kernel

    cpu = torch.device("cpu")
    assert all(r["mismatches"] == 0 for r in sampling_kernel.check_argmax(cpu, [(3, BLOCK + 9)]))
    assert all(r["mismatches"] == 0 for r in sampling_kernel.check_race(cpu, [(3, 700)]))
    masked = sampling_kernel.check_masked(cpu, [(3, 700)])
    assert all(r["greedy_mismatches"] == r["race_mismatches"] == r["banned_draws"] == 0 for r in masked)
